"""The `langgraph` kind through a real gateway and MCP client: derived schemas, results,
refused arguments, progress, a SIGKILL inside a node, and interrupt() as a durable wait."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from mcp import types

from adapters import adapter_for
from adapters.base import ToolContext, ToolLoadError
from gateway.config import EmbeddedEngineConfig, ToolConfig
from gateway.mcp_front import ERROR_META
from gateway.runtime import DurableRuntime
from tests.adapters.conftest import Trace, supply_input, write_config
from tests.gateway.conftest import GatewayFactory, mcp_session

pytestmark = [
    pytest.mark.timeout(120),
    pytest.mark.filterwarnings("ignore:The experimental tasks API:DeprecationWarning"),
]

TOOLS: list[dict[str, Any]] = [
    {
        "name": "pipeline",
        "kind": "langgraph",
        "target": "examples.graphs:pipeline",
        "timeout_seconds": 120,
        "options": {"recursion_limit": 20},
    },
    {
        "name": "review",
        "kind": "langgraph",
        "target": "examples.graphs:build_review",
        "timeout_seconds": 60,
    },
]
TEXT = "durable graphs resume. they do not start over. nodes run once"


async def test_schemas_result_progress_and_bad_arguments(
    spawn_gateway: GatewayFactory, tmp_path: Path, trace: Trace
) -> None:
    gateway = spawn_gateway(config=write_config(tmp_path, TOOLS))
    seen: list[tuple[float, str | None]] = []

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        seen.append((progress, message))

    async with mcp_session(gateway.url) as session:
        tools = {t.name: t for t in (await session.list_tools()).tools}
        pipeline = tools["pipeline"]
        assert pipeline.inputSchema["required"] == ["text"]
        assert set(pipeline.inputSchema["properties"]) == {"text", "delay_seconds"}
        assert pipeline.inputSchema["additionalProperties"] is False
        assert pipeline.outputSchema is not None
        assert set(pipeline.outputSchema["properties"]) == {"outline", "draft", "words"}

        result = await session.call_tool(
            "pipeline", {"text": TEXT, "delay_seconds": 1.0}, progress_callback=on_progress
        )
        assert not result.isError, result
        assert result.structuredContent == {
            "outline": ["durable graphs resume", "they do not start over", "nodes run once"],
            "draft": "Durable graphs resume / They do not start over / Nodes run once",
            "words": 13,
        }
        # The graph's progress reaches the client (reports in quick succession are coalesced
        # to the latest, so not every one is guaranteed: the full sequence is checked below).
        graph_messages = {"outlined 3 point(s)", "outline done", "draft done", "finish done"}
        assert graph_messages & {m for _, m in seen}, seen

        for bad in ({}, {"text": 3}, {"text": "x", "extra": 1}):
            refused = await session.call_tool("pipeline", bad)
            assert refused.isError
            assert (refused.meta or {}).get(ERROR_META, {}).get("type") == "invalid_arguments"
    assert trace.counts() == {"outline": 1, "draft": 1, "finish": 1}


@pytest.mark.crash
async def test_sigkill_inside_a_node_resumes_at_that_node(
    spawn_gateway: GatewayFactory, tmp_path: Path, trace: Trace
) -> None:
    config, data = write_config(tmp_path, TOOLS), tmp_path / "data"
    trace.hold.touch()  # `draft` waits while this file exists
    first = spawn_gateway(config=config, data_dir=data)
    async with mcp_session(first.url) as session:
        created = await session.experimental.call_tool_as_task("pipeline", {"text": TEXT})
        task_id = created.task.taskId
    trace.wait_for("draft", first)
    first.kill()  # SIGKILL inside `draft`, after `outline` finished
    assert trace.counts() == {"outline": 1, "draft": 1}
    trace.hold.unlink()

    second = spawn_gateway(config=config, data_dir=data)
    async with mcp_session(second.url) as session:
        with anyio.fail_after(60):
            result = await session.experimental.get_task_result(task_id, types.CallToolResult)
    assert not result.isError, (result, second.log())
    assert result.structuredContent is not None
    assert result.structuredContent["words"] == 13
    # `outline` was saved before the kill and did not run again; `draft` ran again from its start.
    assert trace.counts() == {"outline": 1, "draft": 2, "finish": 1}


async def wait_status(
    session: Any, task_id: str, status: str, timeout: float = 30
) -> types.GetTaskResult:
    with anyio.fail_after(timeout):
        while True:
            task = await session.experimental.get_task(task_id)
            if task.status == status:
                return task
            await anyio.sleep(0.1)


@pytest.mark.crash
async def test_interrupt_waits_for_input_across_a_restart(
    spawn_gateway: GatewayFactory, tmp_path: Path, trace: Trace
) -> None:
    config, data = write_config(tmp_path, TOOLS), tmp_path / "data"
    first = spawn_gateway(config=config, data_dir=data)
    async with mcp_session(first.url) as session:
        created = await session.experimental.call_tool_as_task(
            "review", {"text": "Checkpoints live in the state API. Nothing else."}
        )
        task_id = created.task.taskId
        task = await wait_status(session, task_id, "input_required")
    # The interrupt's payload is the status message.
    assert task.statusMessage is not None and "Publish this summary?" in task.statusMessage
    assert "Checkpoints live in the state API." in task.statusMessage
    first.kill()  # the wait is durable

    second = spawn_gateway(config=config, data_dir=data)
    async with mcp_session(second.url) as session:
        await wait_status(session, task_id, "input_required")
        # Not a JSON body with "value": refused with the reason.
        bad = httpx.post(f"{second.base}/tasks/{task_id}/input", json={"nope": 1}, timeout=30)
        assert bad.status_code == 400 and "value" in bad.json()["message"]
        missing = supply_input(second, "no-such-task", True)
        assert missing.status_code == 404

        answer = supply_input(second, task_id, {"approve": True, "note": "looks right"})
        assert answer.status_code == 200, answer.text
        with anyio.fail_after(60):
            result = await session.experimental.get_task_result(task_id, types.CallToolResult)
        again = supply_input(second, task_id, {"approve": False})
    assert not result.isError, (result, second.log())
    assert result.structuredContent == {
        "summary": "Checkpoints live in the state API.",
        "status": "approved",
        "reviewer_note": "looks right",
    }
    assert again.status_code == 409 and again.json()["error"] == "not_waiting"
    # summarise ran once; the interrupted node ran again from its start on resume.
    assert trace.counts() == {"summarise": 1, "approve": 2, "publish": 1}


async def test_a_failed_node_is_retried_from_the_saved_state(
    spawn_gateway: GatewayFactory, tmp_path: Path, trace: Trace
) -> None:
    flaky = {
        "name": "flaky_graph",
        "kind": "langgraph",
        "target": "tests.adapters.targets:flaky_graph",
        "retry": {"max_attempts": 2, "first_interval_seconds": 0.1},
    }
    gateway = spawn_gateway(config=write_config(tmp_path, [flaky]))
    async with mcp_session(gateway.url) as session:
        result = await session.call_tool("flaky_graph", {"n": 4})
    assert not result.isError, (result, gateway.log())
    assert result.structuredContent == {"n": 5, "doubled": 10}
    assert trace.counts() == {"prepare": 1, "unstable": 2}


async def test_every_node_and_custom_write_is_reported(tmp_path: Path, trace: Trace) -> None:
    runtime = DurableRuntime(
        EmbeddedEngineConfig(sidecar="thread"), tmp_path / "engine.db", lambda name: None
    )
    await runtime.start()
    try:
        tool = adapter_for("langgraph").prepare(ToolConfig(**TOOLS[0]))
        reports: list[tuple[float, float | None, str | None]] = []
        context = ToolContext(
            "call-1",
            "exec-1",
            report_progress=lambda p, t, m: reports.append((p, t, m)),
            checkpoints=runtime.checkpoints,
        )
        result = await tool.invoke({"text": TEXT}, context)
    finally:
        await runtime.stop()
    assert result["words"] == 13
    assert reports == [
        (1, None, "outlined 3 point(s)"),
        (2, None, "outline done"),
        (3, None, "draft done"),
        (4, None, "finish done"),
    ]


def test_load_errors_name_the_tool_and_key() -> None:
    adapter = adapter_for("langgraph")

    def prepare(**fields: Any) -> None:
        adapter.prepare(ToolConfig(name="g", kind="langgraph", **fields))

    with pytest.raises(ToolLoadError, match=r"tool 'g': unknown option 'recursion'"):
        prepare(target="examples.graphs:pipeline", options={"recursion": 3})
    with pytest.raises(ToolLoadError, match=r"option 'recursion_limit' must be a int"):
        prepare(target="examples.graphs:pipeline", options={"recursion_limit": "3"})
    with pytest.raises(ToolLoadError, match="not a compiled LangGraph graph"):
        prepare(target="examples.graphs:TRACE_ENV")
    with pytest.raises(ToolLoadError, match="returned a str"):
        prepare(target="tests.adapters.targets:not_a_graph")
    with pytest.raises(ToolLoadError, match="has no attribute 'nowhere'"):
        prepare(target="examples.graphs:nowhere")
