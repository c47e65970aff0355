"""Two gateway processes sharing one standalone sidecar (`engine.kind: dapr`): a task started on
one is served by the other, and survives the first one being SIGKILLed mid-call."""

from __future__ import annotations

from pathlib import Path

from mcp import types

from tests.gateway.conftest import GatewayFactory, config_with, mcp_session
from tests.sidecar.conftest import start_sidecar_process


def shared_config(tmp_path: Path, address: str) -> Path:
    return config_with(tmp_path, engine={"kind": "dapr", "grpc_address": address})


async def test_second_gateway_serves_a_task_of_the_first(
    spawn_gateway: GatewayFactory, tmp_path: Path
) -> None:
    sidecar = start_sidecar_process(tmp_path / "shared.db", http_listen=None)
    try:
        config = shared_config(tmp_path, sidecar.grpc_address)
        first = spawn_gateway(config=config, data_dir=tmp_path / "a")
        second = spawn_gateway(config=config, data_dir=tmp_path / "b")

        async with mcp_session(first.url) as a:
            created = await a.experimental.call_tool_as_task(
                "slow_echo", {"text": "shared", "seconds": 2}
            )
            task_id = created.task.taskId
        async with mcp_session(second.url) as b:
            task = await b.experimental.get_task(task_id)
            assert task.status == "working"
            # The gateway that took the call dies; the other one's worker finishes it.
            first.kill()
            result = await b.experimental.get_task_result(task_id, types.CallToolResult)
            listed = await b.experimental.list_tasks()
        assert result.structuredContent == {"result": "shared"}, second.log()
        assert task_id in {t.taskId for t in listed.tasks}
    finally:
        sidecar.popen.kill()
        sidecar.popen.wait(10)
