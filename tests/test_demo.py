"""The demo config (config/gateway.yaml, what `make demo` serves) through real gateways and the
real MCP client: every tool listed, CrewAI not imported until the crew is called, the scripted
agent answering from real tool results with its tool calls as calls of their own (the agent
acting for its caller, under the tenant policy), and the crew answering.

One gateway serves the demo config for the whole module; a second one adds a tenant policy that
forbids one of the agent's tools to agents."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
import yaml
from mcp import types

from examples.graphs import HOLD_ENV, TRACE_ENV
from gateway.config import load_config
from gateway.mcp_front import USAGE_META
from tests.gateway.conftest import (
    REPO_ROOT,
    GatewayFactory,
    GatewayProcess,
    child_env,
    mcp_session,
)

pytestmark = [
    pytest.mark.timeout(240),
    pytest.mark.filterwarnings("ignore:The experimental tasks API:DeprecationWarning"),
]

DEMO = REPO_ROOT / "config" / "gateway.yaml"
ANONYMOUS = "spiffe://duragate.local/anonymous"
ANALYST = "spiffe://duragate.local/agent/analyst"
TEXT = "Durable calls survive crashes. Policies decide who calls what."
AGENT_TOOLS = {"analyst", "add", "word_count", "pipeline"}
NO_AGENTS = """
tenant: default
members: [spiffe://duragate.local/**]
tools:
  analyst: {call: [group:members]}
  pipeline: {call: [group:members]}
  # Not for agents at all: hidden from them (a rule on the caller alone applies at list time).
  add:
    call: [group:members]
    deny:
      - when: "size(caller.chain) > 0"
        reason: add is for people, not agents
  # Agents may count short texts only: decided at call time, from the arguments.
  word_count:
    call: [group:members]
    deny:
      - when: "size(caller.chain) > 0 && size(args.text) > 40"
        reason: agents may count texts of 40 characters at most
"""


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    factory = GatewayFactory(tmp_path_factory.mktemp("demo"))
    yield factory(config=DEMO)
    factory.stop_all()


def admin(gateway: GatewayProcess, path: str) -> Any:
    """The admin API (the demo makes the anonymous caller an admin, on loopback)."""
    response = httpx.get(f"{gateway.base}/admin/api/{path}", timeout=30)
    assert response.status_code == 200, response.text
    return response.json()


def child_calls(gateway: GatewayProcess, tool: str, count: int) -> list[dict[str, Any]]:
    """The calls of `tool`, oldest first, with their details, once there are `count`."""
    deadline = time.monotonic() + 30
    while True:
        calls = admin(gateway, f"calls?tool={tool}")["calls"]
        if len(calls) >= count or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    details = [admin(gateway, f"calls/{c['task_id']}") for c in calls]
    return sorted(details, key=lambda d: d["created_at"])


def audit(gateway: GatewayProcess, tool: str, event: str) -> list[dict[str, Any]]:
    path = gateway.data_dir / "audit.jsonl"
    deadline = time.monotonic() + 10
    found: list[dict[str, Any]] = []
    while time.monotonic() < deadline:  # the audit log is written by a thread of its own
        records = [json.loads(line) for line in path.read_text().splitlines() if line]
        found = [r for r in records if r.get("tool") == tool and r.get("event") == event]
        if found:
            break
        time.sleep(0.1)
    return found


def test_the_demo_registry_loads_every_tool_without_importing_crewai() -> None:
    """In a fresh process, as `duragate serve` does: every tool of the demo config loads, the
    crew from its config (CrewAI and the crew's module are not imported)."""
    script = (
        "import json, sys\n"
        "from pathlib import Path\n"
        "from gateway.config import load_config\n"
        "from gateway.registry import Registry\n"
        f"registry = Registry.from_config(load_config(Path({str(DEMO)!r})))\n"
        "print(json.dumps({'tools': list(registry), 'imported': sorted(m for m in sys.modules\n"
        "    if m.split('.')[0] == 'crewai' or m == 'examples.crews')}))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        cwd=REPO_ROOT,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["tools"] == [t.name for t in load_config(DEMO).tools]
    assert {"research", "analyst", "pipeline", "review"} <= set(report["tools"])
    assert report["imported"] == []


async def test_every_demo_tool_is_listed(demo: GatewayProcess) -> None:
    async with mcp_session(demo.url) as session:
        tools = {t.name: t for t in (await session.list_tools()).tools}
    assert list(tools) == [t.name for t in load_config(DEMO).tools]
    assert tools["analyst"].inputSchema["required"] == ["message"]
    assert tools["research"].inputSchema["required"] == ["topic", "audience"]
    assert tools["research"].outputSchema == {
        "type": "object",
        "properties": {"result": {"type": "string"}},
        "required": ["result"],
    }
    # An agent-like tool is an A2A agent of its own.
    card = httpx.get(f"{demo.base}/a2a/agents/analyst/.well-known/agent-card.json", timeout=30)
    assert card.status_code == 200 and card.json()["name"] == "analyst"


async def test_the_agent_adds_through_the_gateway_step_by_step(demo: GatewayProcess) -> None:
    async with mcp_session(demo.url) as session:
        result = await session.call_tool("analyst", {"message": "What is 2 + 3 + 4?"})
    assert not result.isError, (result, demo.log())
    # Built from the tools' real results: 2 + 3 = 5 (first call), 5 + 4 = 9 (second call).
    assert result.structuredContent == {
        "answer": "2 + 3 + 4 = 9 (added with 2 calls of the add tool).",
        "steps": 3,
        "tool_calls": 2,
    }
    usage = (result.meta or {})[USAGE_META]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"] > 0

    # Each tool call was a call of its own, by the agent acting for the caller, and the second
    # one's arguments came from the first one's result.
    adds = child_calls(demo, "add", 2)
    assert [c["principal"] for c in adds] == [ANALYST, ANALYST]
    assert [c["chain"] for c in adds] == [[ANONYMOUS], [ANONYMOUS]]
    assert [c["via"] for c in adds] == ["agent", "agent"]
    assert [(c["arguments"], c["result"]) for c in adds] == [
        ({"a": 2.0, "b": 3.0}, {"result": 5.0}),
        ({"a": 5.0, "b": 4.0}, {"result": 9.0}),
    ]
    assert [c["state"] for c in adds] == ["completed", "completed"]


async def test_the_agent_analyses_a_text_with_a_python_tool_and_the_graph(
    demo: GatewayProcess,
) -> None:
    async with mcp_session(demo.url) as session:
        result = await session.call_tool("analyst", {"message": f"analyse: {TEXT}"})
    assert not result.isError, (result, demo.log())
    assert result.structuredContent == {
        "answer": "Analysis: 9 words, 1 line(s), 62 characters. Outline: 2 point(s). "
        "Draft: Durable calls survive crashes / Policies decide who calls what",
        "steps": 2,
        "tool_calls": 2,
    }
    (graph,) = child_calls(demo, "pipeline", 1)
    assert graph["principal"] == ANALYST and graph["arguments"] == {"text": TEXT}


async def test_the_crew_answers_through_mcp(demo: GatewayProcess) -> None:
    arguments = {"topic": "durable workflows", "audience": "engineers"}
    async with mcp_session(demo.url) as session:
        result = await session.call_tool("research", arguments)
    assert not result.isError, (result, demo.log())
    assert result.structuredContent == {
        "result": "[write] Write a brief about durable workflows for engineers, from the research."
    }
    assert (result.meta or {})[USAGE_META]["total_tokens"] > 0
    assert "loading the crew examples.crews:research_crew on its first call" in demo.log()


async def test_a_tool_the_policy_forbids_to_agents_fails_visibly(tmp_path: Path) -> None:
    config = yaml.safe_load(DEMO.read_text())
    (tmp_path / "policies").mkdir()
    (tmp_path / "policies" / "default.yaml").write_text(NO_AGENTS)
    config["policy"] = {"dir": str(tmp_path / "policies")}
    # Only the tools the agent uses: a gateway without CrewAI and the other demo tools.
    config["tools"] = [t for t in config["tools"] if t["name"] in AGENT_TOOLS]
    config["a2a"] = {"agents": []}
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(config))
    factory = GatewayFactory(tmp_path)
    try:
        gateway = factory(config=path)
        async with mcp_session(gateway.url) as session:
            result = await session.call_tool("analyst", {"message": f"analyse: {TEXT}"})
            assert not result.isError, (result, gateway.log())
            assert result.structuredContent is not None
            # The refusal and its reason are in the answer; the graph still ran.
            assert result.structuredContent["answer"] == (
                "Analysis: word_count failed (denied: agents may count texts of 40 characters "
                "at most). Outline: 2 point(s). Draft: Durable calls survive crashes / Policies "
                "decide who calls what"
            )
            # A tool the agent may not see is not offered to its model at all.
            hidden = await session.call_tool("analyst", {"message": "what is 2 + 3?"})
            assert hidden.structuredContent == {
                "answer": "I cannot work out 2 + 3: the add tool is not available to me.",
                "steps": 1,
                "tool_calls": 0,
            }
            # Both tools are the caller's own to call.
            direct = await session.call_tool("word_count", {"text": TEXT})
            assert not direct.isError and direct.structuredContent is not None
            assert direct.structuredContent["words"] == 9
            added = await session.call_tool("add", {"a": 2, "b": 3})
            assert added.structuredContent == {"result": 5.0}
        denied = audit(gateway, "word_count", "denied")
        assert [(d["principal"], d["chain"]) for d in denied] == [(ANALYST, [ANONYMOUS])]
        assert "agents may count texts of 40 characters at most" in str(denied[0])
        assert [r["principal"] for r in audit(gateway, "add", "scheduled")] == [ANONYMOUS]
    finally:
        factory.stop_all()


@pytest.mark.crash
async def test_sigkill_while_the_agent_waits_on_the_graph(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The agent's run and its tool calls are durable: killed while the graph it called is in
    `draft`, the restarted gateway finishes the same call from the agent's checkpoint (the
    finished word_count call not asked for again) and the graph resumes at `draft`."""
    trace, hold = tmp_path / "trace.txt", tmp_path / "hold"
    monkeypatch.setenv(TRACE_ENV, str(trace))  # the gateway processes inherit them
    monkeypatch.setenv(HOLD_ENV, str(hold))
    hold.touch()  # the graph waits in `draft`
    factory = GatewayFactory(tmp_path)
    data = tmp_path / "data"
    try:
        first = factory(config=DEMO, data_dir=data)
        async with mcp_session(first.url) as session:
            created = await session.experimental.call_tool_as_task(
                "analyst", {"message": f"analyse: {TEXT}"}
            )
            task_id = created.task.taskId
        deadline = time.monotonic() + 60
        while "draft" not in (trace.read_text() if trace.exists() else ""):
            assert time.monotonic() < deadline, first.log()
            time.sleep(0.05)
        first.kill()
        hold.unlink()

        second = factory(config=DEMO, data_dir=data)
        async with mcp_session(second.url) as session:
            with anyio.fail_after(90):
                result = await session.experimental.get_task_result(task_id, types.CallToolResult)
        assert not result.isError, (result, second.log())
        assert result.structuredContent == {
            "answer": "Analysis: 9 words, 1 line(s), 62 characters. Outline: 2 point(s). "
            "Draft: Durable calls survive crashes / Policies decide who calls what",
            "steps": 2,
            "tool_calls": 2,
        }
        assert trace.read_text().split() == ["outline", "draft", "draft", "finish"]
        # The retried agent went on from its checkpoint: the graph call still waiting was
        # joined (replayed under its idempotency key), the finished word_count call was not even
        # asked for again (a start from scratch would have replayed it too).
        assert [c["state"] for c in child_calls(second, "word_count", 1)] == ["completed"]
        assert len(audit(second, "pipeline", "replayed")) == 1
        assert len(audit(second, "word_count", "scheduled")) == 1
        records = (data / "audit.jsonl").read_text().splitlines()
        assert not [
            r
            for r in map(json.loads, records)
            if r.get("event") == "replayed" and r.get("tool") == "word_count"
        ]
    finally:
        factory.stop_all()
