"""The workflow's side of token budgets, without an engine: a call with a token budget runs the
charge activity after the tool, only when usage was reported; a call recorded before token
budgets (no charge in its input) schedules nothing new, so its history replays; and the charge
activity run twice for one call (a retry) charges once, on a real sidecar's state store."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from dapr.ext.workflow._durabletask import task as dt

from gateway import workflow
from gateway.sidecar.server import SidecarThread
from gateway.sidecar.settings import SidecarSettings
from policies.budgets import DaprBudgets

BUDGET = {"tokens": 100, "per_seconds": 3600.0}
ALICE = "spiffe://acme.test/people/alice"


class Ctx:
    """What call_workflow uses of a workflow context; every activity completes at once."""

    is_replaying = False
    instance_id = "task-1"

    def __init__(self, answers: dict[str, Any]) -> None:
        self.answers = answers
        self.activities: list[tuple[str, Any]] = []
        self.status = ""

    def set_custom_status(self, status: str) -> None:
        self.status = status

    def call_activity(
        self, name: str, *, input: Any = None, retry_policy: Any = None, app_id: Any = None
    ) -> Any:
        self.activities.append((name, input))
        done: dt.CompletableTask[Any] = dt.CompletableTask()
        done.complete(self.answers[name])
        return done

    def create_timer(self, _: Any) -> Any:
        return dt.CompletableTask()


def run(ctx: Ctx, call: dict[str, Any]) -> Any:
    steps = workflow.call_workflow(ctx, call)  # type: ignore[arg-type]
    sent: Any = None
    try:
        while True:
            step = steps.send(sent)
            # when_any(activity, timer): the activity wins; a task alone: its result.
            children = getattr(step, "_tasks", None)
            sent = children[0] if children else step.get_result()
    except StopIteration as stop:
        return stop.value


CALL = {"tool": "chat", "arguments": {}, "principal": {}, "timeout_seconds": 10}
CHARGE = {"key": "k", "usage_key": "total_tokens", "expires_at": 0}
ANSWER = {"envelope": 1, "result": "hi", "usage": {"total_tokens": 40}}


def test_a_call_with_a_token_budget_is_charged_before_it_completes() -> None:
    ctx = Ctx({workflow.ACTIVITY_NAME: ANSWER, workflow.CHARGE_ACTIVITY_NAME: 40})
    output = run(ctx, {**CALL, "budget_tokens": CHARGE})
    assert output == {"ok": True, "result": "hi", "usage": {"total_tokens": 40}}
    assert [name for name, _ in ctx.activities] == ["duragate.tool", "duragate.charge"]
    assert ctx.activities[1][1] == {"charge": CHARGE, "usage": {"total_tokens": 40}}


def test_a_call_recorded_before_token_budgets_schedules_no_charge() -> None:
    ctx = Ctx({workflow.ACTIVITY_NAME: ANSWER})
    assert run(ctx, CALL)["ok"] is True
    assert [name for name, _ in ctx.activities] == ["duragate.tool"]


def test_no_usage_no_charge() -> None:
    ctx = Ctx({workflow.ACTIVITY_NAME: {"envelope": 1, "result": "hi"}})
    run(ctx, {**CALL, "budget_tokens": CHARGE})
    assert [name for name, _ in ctx.activities] == ["duragate.tool"]


@pytest.fixture
def sidecar(tmp_path: Path) -> Iterator[SidecarThread]:
    thread = SidecarThread(
        SidecarSettings(db_path=tmp_path / "s.db", grpc_listen="127.0.0.1:0", http_listen=None)
    )
    thread.start()
    yield thread
    thread.stop()


class ActivityCtx:
    workflow_id = "task-1"


async def test_the_charge_activity_run_twice_charges_once(sidecar: SidecarThread) -> None:
    budgets = DaprBudgets(sidecar.grpc_address)
    try:
        activity = workflow.make_charge_activity(lambda: budgets)
        charge = await budgets.check_tokens("acme", "chat", ALICE, BUDGET)
        inp = {"charge": charge, "usage": {"total_tokens": 60}}
        assert await activity(ActivityCtx(), inp) == 60
        assert await activity(ActivityCtx(), inp) == 0  # the retry of the same call
        assert await asyncio.to_thread(budgets._read, charge["key"]) == 60
    finally:
        budgets.close()


async def test_the_charge_activity_waits_for_the_budget_store() -> None:
    activity = workflow.make_charge_activity(lambda: None)
    with pytest.raises(RuntimeError, match="not ready yet"):  # retried by its policy
        await activity(ActivityCtx(), {"charge": CHARGE, "usage": {"total_tokens": 1}})
