"""Gateway processes that crash, restart and reload their config."""

from __future__ import annotations

import shutil
import signal
from pathlib import Path
from typing import Any

import anyio
import pytest
from mcp import types

from gateway.config import ConfigError, parse_config
from gateway.server import Gateway
from tests.gateway.conftest import TEST_CONFIG, GatewayFactory, mcp_session

pytestmark = [
    pytest.mark.timeout(90),
    pytest.mark.filterwarnings("ignore:The experimental tasks API:DeprecationWarning"),
]


@pytest.mark.crash
async def test_task_survives_sigkill_and_is_polled_from_a_new_session(
    spawn_gateway: GatewayFactory, tmp_path: Path
) -> None:
    data_dir = tmp_path / "data"
    first = spawn_gateway(data_dir=data_dir)
    async with mcp_session(first.url) as session:
        created = await session.experimental.call_tool_as_task(
            "slow_echo", {"text": "survived", "seconds": 1.5}
        )
        task_id = created.task.taskId
        assert (await session.experimental.get_task(task_id)).status == "working"
        first.kill()  # SIGKILL, mid-call

    second = spawn_gateway(data_dir=data_dir)
    async with mcp_session(second.url) as session:
        result = await session.experimental.get_task_result(task_id, types.CallToolResult)
        task = await session.experimental.get_task(task_id)
    assert result.structuredContent == {"result": "survived"}, second.log()
    assert task.status == "completed"


RELOAD_TOOL = """
  - name: shout
    kind: python
    target: examples.tools:slow_echo
    timeout_seconds: 10
"""


async def test_reload_sends_list_changed_and_keeps_old_config_when_broken(
    spawn_gateway: GatewayFactory, tmp_path: Path
) -> None:
    config = tmp_path / "gateway.yaml"
    shutil.copy(TEST_CONFIG, config)
    gateway = spawn_gateway(config=config)
    changed = anyio.Event()

    async def on_message(message: Any) -> None:
        if isinstance(message, types.ServerNotification) and isinstance(
            message.root, types.ToolListChangedNotification
        ):
            changed.set()

    async with mcp_session(gateway.url, message_handler=on_message) as session:
        before = {t.name for t in (await session.list_tools()).tools}
        assert "shout" not in before

        config.write_text(config.read_text() + RELOAD_TOOL)
        gateway.signal(signal.SIGHUP)
        with anyio.fail_after(15):
            await changed.wait()
        after = {t.name for t in (await session.list_tools()).tools}
        assert after == before | {"shout"}
        shouted = await session.call_tool("shout", {"text": "new tool", "seconds": 0})
        assert shouted.structuredContent == {"result": "new tool"}

        # A config that does not load: logged, and the running one kept.
        config.write_text(config.read_text() + "\n  - name: broken\n    kind: python\n")
        gateway.signal(signal.SIGHUP)
        with anyio.fail_after(15):
            while "config reload failed" not in gateway.log():
                await anyio.sleep(0.1)
        assert {t.name for t in (await session.list_tools()).tools} == after


async def test_a_tool_that_does_not_load_never_half_starts(tmp_path: Path) -> None:
    text = "tools:\n  - name: ghost\n    kind: python\n    target: examples.tools:nowhere\n"
    config = parse_config(text, "bad.yaml", tmp_path)
    gateway = Gateway(config, tmp_path / "data")
    with pytest.raises(ConfigError) as caught:
        await gateway.start()
    assert "bad.yaml:4: tools[0].target" in str(caught.value)
    assert "nowhere" in str(caught.value)
    assert not (tmp_path / "data").exists()  # nothing was started, not even the data dir
    with pytest.raises(RuntimeError, match="not started"):
        _ = gateway.dispatcher
