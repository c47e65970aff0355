"""A tool's request for input as a durable wait, whatever the kind (here a python tool that
raises InputRequired): who may answer, stale answers, repeated requests, the CLI."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from gateway.dispatch import CallRequest, CallState, CallView, Dispatcher, DispatchError
from gateway.workflow import INPUT_EVENT
from identity.principal import Principal
from tests.adapters.conftest import write_config
from tests.gateway.conftest import REPO_ROOT, GatewayFactory, child_env, running_dispatcher

pytestmark = pytest.mark.timeout(120)

CONFIG = """
identity:
  allow_anonymous: true
tools:
  - name: ask
    kind: python
    target: tests.adapters.targets:ask
    timeout_seconds: 30
"""
OWNER = Principal(id="spiffe://example.org/user/alice", tenant="default", via="test")
OTHER = Principal(id="spiffe://example.org/user/mallory", tenant="default", via="test")


@pytest.fixture
async def dispatcher(tmp_path: Path) -> AsyncIterator[Dispatcher]:
    async with running_dispatcher(CONFIG, tmp_path) as d:
        yield d


async def waiting(d: Dispatcher, task_id: str, round_: int) -> CallView:
    for _ in range(600):
        view = await d.get(task_id, OWNER)
        if view.waiting_for == "input" and view.input_round == round_:
            return view
        assert not view.terminal, view
        await asyncio.sleep(0.05)
    raise AssertionError(f"task {task_id} never waited for input round {round_}")


async def test_only_the_owner_answers_and_each_answer_resumes_the_tool(
    dispatcher: Dispatcher,
) -> None:
    d = dispatcher
    submitted = await d.submit(CallRequest("ask", {"question": "Colour?"}, OWNER, "test"))
    task_id = submitted.task_id
    view = await waiting(d, task_id, 1)
    assert view.state == CallState.INPUT_REQUIRED
    assert view.message == "Colour? (answer 1)" and view.input_request == {"asked": 1}

    # Anyone but the owner is told the task does not exist; it is not an approval either.
    with pytest.raises(DispatchError) as other:
        await d.supply_input(task_id, OTHER, "red")
    assert other.value.code == "not_found"
    with pytest.raises(DispatchError) as approval:
        await d.decide(task_id, OWNER, True)
    assert approval.value.code == "not_waiting"
    assert [v.task_id for v in await d.pending_approvals(OWNER)] == []

    await d.supply_input(task_id, OWNER, "red")
    view = await waiting(d, task_id, 2)  # the tool ran again and asked once more
    assert view.message == "Colour? (answer 2)"
    # An answer meant for round 1 arriving late must not answer round 2.
    await d.runtime.client.raise_workflow_event(
        task_id, INPUT_EVENT, data={"value": "done", "by": OWNER.id, "round": 1}
    )
    await asyncio.sleep(1)
    assert (await d.get(task_id, OWNER)).input_round == 2
    await d.supply_input(task_id, OWNER, "done")
    final = await d.wait(task_id, OWNER, 30)
    assert final.state == CallState.COMPLETED, final
    assert final.result == {"answers": ["red", "done"]}
    with pytest.raises(DispatchError) as late:
        await d.supply_input(task_id, OWNER, "more")
    assert late.value.code == "not_waiting"


async def test_supply_input_from_the_cli(spawn_gateway: GatewayFactory, tmp_path: Path) -> None:
    tools = [{"name": "ask", "kind": "python", "target": "tests.adapters.targets:ask"}]
    gateway = spawn_gateway(config=write_config(tmp_path, tools))

    def duragate(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "gateway", *args, "--url", gateway.url],
            cwd=REPO_ROOT,
            env=child_env(),
            capture_output=True,
            text=True,
            timeout=60,
        )

    started = duragate("call", "ask", "--args", '{"question": "Go?"}', "--task")
    assert started.returncode == 0, started.stderr
    task_id = started.stdout.strip()
    for _ in range(200):
        shown = duragate("tasks", "show", task_id)
        if '"input_required"' in shown.stdout:
            break
        await asyncio.sleep(0.1)
    assert '"Go? (answer 1)"' in shown.stdout, shown.stdout
    bad = duragate("tasks", "input", task_id, "--value", "not json")
    assert bad.returncode != 0 and "not JSON" in bad.stderr
    answered = duragate("tasks", "input", task_id, "--value", '"done"')
    assert answered.returncode == 0 and "input supplied" in answered.stdout, answered.stderr
    result = duragate("tasks", "result", task_id)
    assert result.returncode == 0 and '"done"' in result.stdout, result.stderr
    missing = duragate("tasks", "input", "nope", "--value", "1")
    assert missing.returncode == 1 and "no task" in missing.stderr
