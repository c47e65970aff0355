"""The `a2a` kind between two real gateway processes: B serves tools over its A2A front door,
A has `a2a` tools pointing at B, the tests call A through MCP. Results, B's tool errors, a
SIGKILL of A in the middle of a call (B runs the tool once), and B's request for input
answered through A."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import anyio
import pytest
import yaml
from mcp import types

from adapters import adapter_for
from adapters.base import ToolContext, ToolLoadError
from gateway.config import EmbeddedEngineConfig, ToolConfig
from gateway.mcp_front import ERROR_META
from gateway.runtime import DurableRuntime
from tests.adapters.conftest import BASE, supply_input
from tests.gateway.conftest import GatewayFactory, GatewayProcess, mcp_session

pytestmark = [
    pytest.mark.timeout(180),
    pytest.mark.filterwarnings("ignore:The experimental tasks API:DeprecationWarning"),
]

B_TOOLS: list[dict[str, Any]] = [
    {"name": "add", "kind": "python", "target": "examples.tools:add"},
    {"name": "fail", "kind": "python", "target": "examples.tools:fail"},
    {
        "name": "slow_echo",
        "kind": "python",
        "target": "examples.tools:slow_echo",
        "timeout_seconds": 120,
    },
    {"name": "ask", "kind": "python", "target": "tests.adapters.targets:ask"},
]


def a_tools(b: GatewayProcess) -> list[dict[str, Any]]:
    def remote(name: str, skill: str, **options: Any) -> dict[str, Any]:
        return {
            "name": name,
            "kind": "a2a",
            "target": b.base,
            "timeout_seconds": 120,
            "retry": {"max_attempts": 3, "first_interval_seconds": 0.2},
            "options": {"skill": skill, "poll_seconds": 0.2, **options},
        }

    return [
        remote("remote_add", "add"),
        remote("remote_fail", "fail"),
        remote("remote_slow", "slow_echo"),  # follows B's task over a stream
        remote("remote_slow_poll", "slow_echo", stream=False),  # by GetTask
        remote("remote_ask", "ask"),
    ]


def write(directory: Path, tools: list[dict[str, Any]]) -> Path:
    directory.mkdir(exist_ok=True)
    path = directory / "gateway.yaml"
    path.write_text(yaml.safe_dump({**BASE, "tools": tools}))
    return path


def audit_events(gateway: GatewayProcess, tool: str, event: str) -> list[dict[str, Any]]:
    path = gateway.data_dir / "audit.jsonl"
    if not path.exists():
        return []
    records = [json.loads(line) for line in path.read_text().splitlines() if line]
    return [r for r in records if r.get("tool") == tool and r.get("event") == event]


def wait_audit(gateway: GatewayProcess, tool: str, event: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not audit_events(gateway, tool, event):
        assert time.monotonic() < deadline, f"no {event} for {tool}; log:\n{gateway.log()}"
        time.sleep(0.1)


async def wait_status(session: Any, task_id: str, status: str, timeout: float = 60) -> Any:
    with anyio.fail_after(timeout):
        while True:
            task = await session.experimental.get_task(task_id)
            if task.status == status:
                return task
            assert task.status not in ("completed", "failed", "cancelled"), task
            await anyio.sleep(0.1)


@pytest.fixture
def pair(spawn_gateway: GatewayFactory, tmp_path: Path) -> tuple[GatewayProcess, GatewayProcess]:
    b = spawn_gateway(config=write(tmp_path / "b", B_TOOLS), data_dir=tmp_path / "b" / "data")
    a = spawn_gateway(config=write(tmp_path / "a", a_tools(b)), data_dir=tmp_path / "a" / "data")
    return a, b


async def test_results_errors_and_progress_through_two_gateways(
    pair: tuple[GatewayProcess, GatewayProcess],
) -> None:
    a, b = pair
    seen: list[str | None] = []

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        seen.append(message)

    async with mcp_session(a.url) as session:
        tools = {t.name: t for t in (await session.list_tools()).tools}
        assert tools["remote_add"].description == "Add two numbers."  # from B's card
        assert tools["remote_add"].inputSchema == {"type": "object"}

        result = await session.call_tool("remote_add", {"a": 2, "b": 3})
        assert not result.isError, (result, a.log())
        assert result.structuredContent == {"result": 5}

        failed = await session.call_tool("remote_fail", {"message": "remote boom"})
        assert failed.isError
        error = (failed.meta or {})[ERROR_META]
        assert error["type"] == "tool_error" and "remote boom" in error["message"]
        assert error["data"]["state"] == "failed"

        # Arguments B refuses: B's reason, as A's tool error (not retried).
        refused = await session.call_tool("remote_add", {"a": "two"})
        assert (
            refused.isError and "invalid arguments" in (refused.meta or {})[ERROR_META]["message"]
        )

        slow = await session.call_tool(
            "remote_slow", {"text": "echoed", "seconds": 1.0}, progress_callback=on_progress
        )
        assert not slow.isError, slow
        assert slow.structuredContent == {"result": "echoed"}
    assert any(m and " of 1 s" in m for m in seen), seen  # B's progress, relayed by A
    assert len(audit_events(b, "fail", "scheduled")) == 1  # a tool error is not retried


@pytest.mark.crash
async def test_sigkill_of_the_caller_mid_call_runs_the_remote_tool_once(
    spawn_gateway: GatewayFactory, tmp_path: Path
) -> None:
    b = spawn_gateway(config=write(tmp_path / "b", B_TOOLS), data_dir=tmp_path / "b" / "data")
    config, data = write(tmp_path / "a", a_tools(b)), tmp_path / "a" / "data"
    first = spawn_gateway(config=config, data_dir=data)
    async with mcp_session(first.url) as session:
        created = await session.experimental.call_tool_as_task(
            "remote_slow_poll", {"text": "survived", "seconds": 4}
        )
        task_id = created.task.taskId
    wait_audit(b, "slow_echo", "scheduled")  # B runs it now
    time.sleep(0.5)
    first.kill()

    second = spawn_gateway(config=config, data_dir=data)
    async with mcp_session(second.url) as session:
        with anyio.fail_after(90):
            result = await session.experimental.get_task_result(task_id, types.CallToolResult)
    assert not result.isError, (result, second.log())
    assert result.structuredContent == {"result": "survived"}
    # B ran the tool once: A's retried activity followed the task it had started.
    assert len(audit_events(b, "slow_echo", "scheduled")) == 1, b.log()


async def test_input_required_at_the_remote_is_answered_through_the_caller(
    pair: tuple[GatewayProcess, GatewayProcess],
) -> None:
    a, b = pair
    async with mcp_session(a.url) as session:
        created = await session.experimental.call_tool_as_task("remote_ask", {"question": "Go?"})
        task_id = created.task.taskId
        task = await wait_status(session, task_id, "input_required")
        assert task.statusMessage == "Go? (answer 1)"  # B's tool's request, shown at A
        answer = supply_input(a, task_id, "more")
        assert answer.status_code == 200, answer.text
        task = await wait_status(session, task_id, "input_required")
        while task.statusMessage != "Go? (answer 2)":  # A may still show round 1 for a moment
            await anyio.sleep(0.1)
            task = await session.experimental.get_task(task_id)
        assert supply_input(a, task_id, "done").status_code == 200
        with anyio.fail_after(60):
            result = await session.experimental.get_task_result(task_id, types.CallToolResult)
    assert not result.isError, (result, a.log())
    assert result.structuredContent == {"answers": ["more", "done"]}
    assert len(audit_events(b, "ask", "scheduled")) == 1  # one remote task, answered twice


B_POLICY = """
tenant: default
members: [spiffe://duragate.local/**]
tools:
  word_count:
    call: [group:members]
    approval:
      approvers: [spiffe://duragate.local/anonymous]
      allow_self: true
      expires_seconds: 600
"""


async def test_an_approval_at_the_remote_is_given_through_the_caller(
    spawn_gateway: GatewayFactory, tmp_path: Path
) -> None:
    (tmp_path / "b").mkdir()
    policies = tmp_path / "b" / "policies"
    policies.mkdir()
    (policies / "default.yaml").write_text(B_POLICY)
    b_config = {
        **BASE,
        "policy": {"dir": str(policies)},
        "tools": [{"name": "word_count", "kind": "python", "target": "examples.tools:word_count"}],
    }
    (tmp_path / "b" / "gateway.yaml").write_text(yaml.safe_dump(b_config))
    b = spawn_gateway(config=tmp_path / "b" / "gateway.yaml", data_dir=tmp_path / "b" / "data")
    counting: dict[str, Any] = {"name": "remote_count", "kind": "a2a", "target": b.base}
    counting["options"] = {"skill": "word_count", "poll_seconds": 0.2}
    a = spawn_gateway(config=write(tmp_path / "a", [counting]), data_dir=tmp_path / "a" / "data")
    async with mcp_session(a.url) as session:
        created = await session.experimental.call_tool_as_task(
            "remote_count", {"text": "one two three"}
        )
        task_id = created.task.taskId
        task = await wait_status(session, task_id, "input_required")
        assert task.statusMessage == "word_count is waiting for approval"  # B's wait, at A
        answer = supply_input(a, task_id, {"approve": True, "reason": "fine"})
        assert answer.status_code == 200, answer.text
        with anyio.fail_after(60):
            result = await session.experimental.get_task_result(task_id, types.CallToolResult)
    assert not result.isError, (result, a.log())
    assert result.structuredContent is not None and result.structuredContent["words"] == 3
    approved = audit_events(b, "word_count", "approved")
    assert approved and approved[0]["reason"] == "fine"


async def test_a_resent_message_is_replayed_by_the_remote(
    shared_b: GatewayProcess, tmp_path: Path
) -> None:
    """Lost checkpoint, same task execution id: the same message id goes out again and the
    remote answers with the task it already ran."""
    runtime = DurableRuntime(
        EmbeddedEngineConfig(sidecar="thread"), tmp_path / "engine.db", lambda name: None
    )
    await runtime.start()
    try:
        tool = adapter_for("a2a").prepare(
            ToolConfig(name="r", kind="a2a", target=shared_b.base, options={"skill": "add"})
        )
        context = ToolContext("call-replay", "exec-1", checkpoints=runtime.checkpoints)
        first = await tool.invoke({"a": 40, "b": 2}, context)
        assert runtime.checkpoints is not None
        saved = await runtime.checkpoints.aget(context.call_key("a2a", "task"))
        assert isinstance(saved, dict)
        await runtime.checkpoints.adelete(context.call_key("a2a", "task"))
        again = await tool.invoke({"a": 40, "b": 2}, context)
    finally:
        await runtime.stop()
    assert first == again == {"result": 42}
    wait_audit(shared_b, "add", "replayed")
    replayed = audit_events(shared_b, "add", "replayed")
    assert [r["task"] for r in replayed] == [saved["task_id"]]
    assert [r["task"] for r in audit_events(shared_b, "add", "scheduled")] == [saved["task_id"]]


def test_an_unreachable_agent_or_unknown_skill_stops_the_start(
    shared_b: GatewayProcess,
) -> None:
    a2a = adapter_for("a2a")
    with pytest.raises(ToolLoadError, match=r"http://127\.0\.0\.1:9/\.well-known/agent-card"):
        a2a.prepare(ToolConfig(name="x", kind="a2a", target="http://127.0.0.1:9"))
    with pytest.raises(ToolLoadError, match="no skill 'nope'.*add"):
        a2a.prepare(
            ToolConfig(name="x", kind="a2a", target=shared_b.base, options={"skill": "nope"})
        )
    with pytest.raises(ToolLoadError, match="SECRET_NOT_SET"):
        a2a.prepare(
            ToolConfig(
                name="x",
                kind="a2a",
                target=shared_b.base,
                options={"headers": {"Authorization": "SECRET_NOT_SET"}},
            )
        )
    with pytest.raises(ToolLoadError, match="unknown option 'skil'"):
        a2a.prepare(ToolConfig(name="x", kind="a2a", target=shared_b.base, options={"skil": "a"}))
    tool = a2a.prepare(
        ToolConfig(
            name="x",
            kind="a2a",
            target=shared_b.base + "/.well-known/agent-card.json",
            options={"skill": "add", "text": True},
        )
    )
    assert tool.spec.input_schema["required"] == ["text"]


@pytest.fixture(scope="module")
def shared_b(tmp_path_factory: pytest.TempPathFactory) -> Any:
    tmp = tmp_path_factory.mktemp("a2a-b")
    factory = GatewayFactory(tmp)
    yield factory(config=write(tmp / "b", B_TOOLS), data_dir=tmp / "b" / "data")
    factory.stop_all()


def test_the_gateways_own_identity_needs_identity_own() -> None:
    adapter = adapter_for("a2a")
    url = "https://agents.example/"
    with pytest.raises(ToolLoadError, match="set identity.own"):
        adapter.prepare(ToolConfig(name="t", kind="a2a", target=url, options={"identity": "own"}))
    with pytest.raises(ToolLoadError, match="needs identity: own"):
        adapter.prepare(ToolConfig(name="t", kind="a2a", target=url, options={"jwt_audience": "x"}))
    with pytest.raises(ToolLoadError, match="can only be 'own'"):
        adapter.prepare(ToolConfig(name="t", kind="a2a", target=url, options={"identity": "mine"}))


def test_oauth_options_are_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    adapter = adapter_for("a2a")
    url = "https://agents.example/"
    monkeypatch.delenv("A2A_SECRET", raising=False)
    oauth = {"token_endpoint": "https://idp.example/token", "client_id": "gw"}
    with pytest.raises(ToolLoadError, match="A2A_SECRET"):
        adapter.prepare(
            ToolConfig(
                name="t",
                kind="a2a",
                target=url,
                options={"oauth": {**oauth, "client_secret_env": "A2A_SECRET"}},
            )
        )
    with pytest.raises(ToolLoadError, match="oauth.token_endpoint"):
        adapter.prepare(
            ToolConfig(
                name="t",
                kind="a2a",
                target=url,
                options={"oauth": {**oauth, "token_endpoint": "http://idp.example/token"}},
            )
        )
    with pytest.raises(ToolLoadError, match="only over https"):
        adapter.prepare(
            ToolConfig(
                name="t", kind="a2a", target="http://agents.example/", options={"oauth": oauth}
            )
        )
