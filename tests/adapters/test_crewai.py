"""The `crewai` kind through a real gateway and MCP client: the schema derived from the
placeholders, the result and token usage, refused arguments, progress, a SIGKILL in the middle
of the second task, and CrewAI kept off the network."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import anyio
import pytest
from mcp import types

from adapters import adapter_for
from adapters.base import ToolContext, ToolError, ToolLoadError
from gateway.config import EmbeddedEngineConfig, ToolConfig
from gateway.mcp_front import ERROR_META, USAGE_META
from gateway.runtime import DurableRuntime
from tests.adapters.conftest import Trace, write_config
from tests.gateway.conftest import REPO_ROOT, GatewayFactory, child_env, mcp_session

pytestmark = [
    pytest.mark.timeout(180),
    pytest.mark.filterwarnings("ignore:The experimental tasks API:DeprecationWarning"),
    # CrewAI's own deprecation notices about its internals, raised when a crew runs.
    pytest.mark.filterwarnings("ignore::DeprecationWarning:crewai.*"),
]

TOOLS: list[dict[str, Any]] = [
    {
        "name": "research",
        "kind": "crewai",
        "target": "examples.crews:research_crew",
        "timeout_seconds": 120,
    },
    {
        "name": "research_overridden",
        "kind": "crewai",
        "target": "examples.crews:research_crew",
        "input_schema": {
            "type": "object",
            "properties": {
                "topic": {"type": "string", "maxLength": 40},
                "audience": {"type": "string", "enum": ["engineers", "managers"]},
            },
            "required": ["topic", "audience"],
            "additionalProperties": False,
        },
    },
]
ARGS: dict[str, Any] = {"topic": "durable workflows", "audience": "engineers"}
BRIEF = "[write] Write a brief about durable workflows for engineers, from the research."


async def test_schema_result_usage_progress_and_bad_arguments(
    spawn_gateway: GatewayFactory, tmp_path: Path, trace: Trace
) -> None:
    gateway = spawn_gateway(config=write_config(tmp_path, TOOLS))
    seen: list[tuple[float, float | None, str | None]] = []

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        seen.append((progress, total, message))

    async with mcp_session(gateway.url) as session:
        tools = {t.name: t for t in (await session.list_tools()).tools}
        assert tools["research"].inputSchema == {
            "type": "object",
            "properties": {"topic": {"type": "string"}, "audience": {"type": "string"}},
            "required": ["topic", "audience"],
            "additionalProperties": False,
        }
        assert tools["research_overridden"].inputSchema["properties"]["audience"]["enum"] == [
            "engineers",
            "managers",
        ]
        result = await session.call_tool("research", ARGS, progress_callback=on_progress)
        assert not result.isError, result
        assert result.structuredContent == {"result": BRIEF}
        usage = (result.meta or {})[USAGE_META]
        assert usage["total_tokens"] > 0
        assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
        # Progress per finished task (reports close together are coalesced to the latest).
        assert {m for _, t, m in seen if t == 2.0} & {"research done", "write done"}, seen

        bad_calls: list[tuple[str, dict[str, Any]]] = [
            ("research", {"topic": "x"}),
            ("research", {"topic": "x", "audience": 3}),
            ("research", {**ARGS, "other": "y"}),
            ("research_overridden", {"topic": "x", "audience": "children"}),
        ]
        for name, bad in bad_calls:
            refused = await session.call_tool(name, bad)
            assert refused.isError
            assert (refused.meta or {})[ERROR_META]["type"] == "invalid_arguments", refused
    assert trace.counts() == {"research": 1, "write": 1}


@pytest.mark.crash
async def test_sigkill_in_the_second_task_resumes_there(
    spawn_gateway: GatewayFactory, tmp_path: Path, trace: Trace
) -> None:
    config, data = write_config(tmp_path, TOOLS), tmp_path / "data"
    trace.hold.touch()  # the model waits before answering `write`
    first = spawn_gateway(config=config, data_dir=data)
    async with mcp_session(first.url) as session:
        created = await session.experimental.call_tool_as_task("research", ARGS)
        task_id = created.task.taskId
    trace.wait_for("write", first, timeout=90)
    first.kill()
    assert trace.counts() == {"research": 1, "write": 1}
    trace.hold.unlink()

    second = spawn_gateway(config=config, data_dir=data)
    async with mcp_session(second.url) as session:
        with anyio.fail_after(90):
            result = await session.experimental.get_task_result(task_id, types.CallToolResult)
    assert not result.isError, (result, second.log())
    assert result.structuredContent == {"result": BRIEF}
    # The first task's saved output was restored: only `write` ran again.
    assert trace.counts() == {"research": 1, "write": 2}
    # CrewAI kept its files under the gateway's data directory.
    assert (data / "crewai").is_dir()


def test_crewai_is_kept_off_the_network_and_out_of_signals(tmp_path: Path) -> None:
    """In a fresh process: loading a crewai tool sets CrewAI's off-the-network settings before
    CrewAI is imported, leaves OpenTelemetry on, and installs no signal handlers."""
    script = textwrap.dedent(
        """
        import json, os, signal, sys
        from pathlib import Path
        import adapters
        from adapters import adapter_for
        from gateway.config import ToolConfig
        adapters.set_data_dir(Path(sys.argv[1]))
        handlers = (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT))
        assert "crewai" not in sys.modules
        adapter_for("crewai").prepare(
            ToolConfig(name="c", kind="crewai", target="examples.crews:research_crew")
        )
        same = handlers == (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT))
        names = ["CREWAI_DISABLE_TELEMETRY", "CREWAI_TRACING_ENABLED",
                 "CREWAI_DISABLE_VERSION_CHECK", "CREWAI_STORAGE_DIR", "OTEL_SDK_DISABLED"]
        print(json.dumps({"env": {n: os.environ.get(n) for n in names}, "signals": same}))
        """
    )
    env = child_env()
    for name in ("CREWAI_STORAGE_DIR", "OTEL_SDK_DISABLED", "CREWAI_TRACING_ENABLED"):
        env.pop(name, None)
    env["HOME"] = str(tmp_path / "home")
    done = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "data")],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    report: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["env"] == {
        "CREWAI_DISABLE_TELEMETRY": "true",
        "CREWAI_TRACING_ENABLED": "false",
        "CREWAI_DISABLE_VERSION_CHECK": "true",
        "CREWAI_STORAGE_DIR": str(tmp_path / "data" / "crewai"),
        "OTEL_SDK_DISABLED": None,
    }
    assert report["signals"] is True


async def test_progress_per_task_and_a_finished_crew_is_not_run_again(
    tmp_path: Path, trace: Trace
) -> None:
    runtime = DurableRuntime(
        EmbeddedEngineConfig(sidecar="thread"), tmp_path / "engine.db", lambda name: None
    )
    await runtime.start()
    try:
        tool = adapter_for("crewai").prepare(ToolConfig(**TOOLS[0]))
        reports: list[tuple[float, float | None, str | None]] = []

        def context() -> ToolContext:
            return ToolContext(
                "call-1",
                "exec-1",
                report_progress=lambda p, t, m: reports.append((p, t, m)),
                checkpoints=runtime.checkpoints,
            )

        first = context()
        assert await tool.invoke(ARGS, first) == {"result": BRIEF}
        assert first.usage["total_tokens"] > 0
        # The same activity again (a retry after the crew finished): every task is restored.
        again = context()
        assert await tool.invoke(ARGS, again) == {"result": BRIEF}
    finally:
        await runtime.stop()
    assert reports == [(1, 2, "research done"), (2, 2, "write done")]
    assert trace.counts() == {"research": 1, "write": 1}
    assert again.usage.get("total_tokens", 0) == 0


def test_load_errors() -> None:
    adapter = adapter_for("crewai")

    def prepare(**fields: Any) -> None:
        adapter.prepare(ToolConfig(name="c", kind="crewai", **fields))

    with pytest.raises(ToolLoadError, match=r"tool 'c': unknown option 'verbose'"):
        prepare(target="examples.crews:research_crew", options={"verbose": True})
    with pytest.raises(ToolLoadError, match="not a CrewAI Crew"):
        prepare(target="examples.crews:TRACE_ENV")
    with pytest.raises(ToolLoadError, match="must be a CrewAI Crew or a function without"):
        prepare(target="tests.adapters.targets:needs_arguments")
    with pytest.raises(ToolLoadError, match="returned a str, not a CrewAI Crew"):
        prepare(target="tests.adapters.targets:not_a_graph")
    with pytest.raises(ToolLoadError, match="tool 'c': option 'lazy' needs 'input_schema'"):
        prepare(target="examples.crews:research_crew", options={"lazy": True})


SCHEMA = TOOLS[1]["input_schema"]


async def test_a_lazy_crew_fails_its_call_when_it_cannot_be_loaded(tmp_path: Path) -> None:
    adapter = adapter_for("crewai")

    def lazy(target: str) -> Any:
        config = ToolConfig(
            name="c", kind="crewai", target=target, input_schema=SCHEMA, options={"lazy": True}
        )
        return adapter.prepare(config)

    # What can be checked without importing anything is checked at start-up.
    with pytest.raises(ToolLoadError, match="target 'examples.nope:crew': no module named"):
        lazy("examples.nope:crew")
    with pytest.raises(ToolLoadError, match="is not of the form"):
        lazy("examples.crews")
    # The rest on the first call: the call fails with the reason (a ToolError, not retried).
    context = ToolContext("call-1", "exec-1")
    missing = lazy("examples.crews:no_such_crew")
    assert missing.spec.input_schema == SCHEMA
    with pytest.raises(ToolError, match="'examples.crews' has no attribute 'no_such_crew'"):
        await missing.invoke({"topic": "t", "audience": "a"}, context)
    structured = lazy("tests.adapters.targets:structured_crew")
    with pytest.raises(ToolError, match="needs 'output_schema' in the config"):
        await structured.invoke({"topic": "t", "audience": "a"}, context)
