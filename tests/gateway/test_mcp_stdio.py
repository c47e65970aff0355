"""The MCP front door over stdio, through the real `mcp` client spawning the gateway.

It spawns `python -m gateway stdio --config ...` when the CLI has that command, and otherwise the
test launcher's `--stdio` mode, which runs the same `gateway.server.serve_stdio`.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from mcp import ClientSession, types
from mcp.client.stdio import StdioServerParameters, stdio_client

from tests.gateway.conftest import REPO_ROOT, TEST_CONFIG, child_env

pytestmark = [
    pytest.mark.timeout(60),
    pytest.mark.filterwarnings("ignore:The experimental tasks API:DeprecationWarning"),
]


def _cli_has_stdio() -> bool:
    from gateway.cli import app

    return any(
        (c.name or getattr(c.callback, "__name__", "")) == "stdio" for c in app.registered_commands
    )


def server_parameters(data_dir: Path) -> StdioServerParameters:
    if _cli_has_stdio():
        args = ["-m", "gateway", "--data-dir", str(data_dir), "stdio", "--config", str(TEST_CONFIG)]
    else:
        args = ["-m", "tests.gateway.launcher", "--stdio", "--config", str(TEST_CONFIG)]
        args += ["--data-dir", str(data_dir)]
    return StdioServerParameters(
        command=sys.executable, args=args, env=child_env(), cwd=str(REPO_ROOT)
    )


async def test_stdio_lists_calls_and_runs_tasks(tmp_path: Path) -> None:
    params = server_parameters(tmp_path / "data")
    with (tmp_path / "stderr.log").open("w") as errlog:
        async with stdio_client(params, errlog=errlog) as (read, write):
            async with ClientSession(read, write) as session:
                init = await session.initialize()
                assert init.capabilities.tools is not None
                assert init.capabilities.tools.listChanged is True
                tools = {t.name for t in (await session.list_tools()).tools}
                assert {"add", "slow_echo", "word_count"} <= tools

                added = await session.call_tool("add", {"a": 1, "b": 2})
                assert added.structuredContent == {"result": 3.0}
                failed = await session.call_tool("fail", {"message": "nope"})
                assert failed.isError

                created = await session.experimental.call_tool_as_task(
                    "slow_echo", {"text": "over stdio", "seconds": 0.2}
                )
                result = await session.experimental.get_task_result(
                    created.task.taskId, types.CallToolResult
                )
                assert result.structuredContent == {"result": "over stdio"}
                # The local user owns the task: it is listed for this caller.
                listed = await session.experimental.list_tasks()
                assert created.task.taskId in {t.taskId for t in listed.tasks}


def test_stdout_is_reserved_for_the_protocol() -> None:
    """Whatever a tool prints goes to stderr; only the protocol reaches stdout."""
    code = (
        "import os, sys\n"
        "from gateway.stdio import protocol_stdout\n"
        "with protocol_stdout() as out:\n"
        "    print('noise from a tool')\n"
        "    os.write(1, b'raw noise\\n')\n"
        '    out.write(\'{"jsonrpc": "2.0"}\\n\')\n'
        "    out.flush()\n"
        "print('after')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO_ROOT,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    assert done.stdout == '{"jsonrpc": "2.0"}\nafter\n'
    assert "noise from a tool" in done.stderr and "raw noise" in done.stderr
