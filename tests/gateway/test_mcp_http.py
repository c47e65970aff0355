"""The MCP front door over Streamable HTTP, through the real `mcp` client, against a gateway
running in its own process (one for the module)."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import anyio
import httpx
import pytest
from mcp import ClientSession, McpError, types
from starlette.testclient import TestClient

from gateway.config import GatewayConfig
from gateway.http_app import build_app
from gateway.mcp_front import (
    ERROR_META,
    IDEMPOTENCY_META,
    REPLAYED_META,
    TASK_ID_META,
    LiveSessions,
    McpFront,
)
from tests.gateway.conftest import INIT, MCP_HEADERS, GatewayProcess, mcp_session

pytestmark = [
    pytest.mark.timeout(60),
    pytest.mark.filterwarnings("ignore:The experimental tasks API:DeprecationWarning"),
]


def text_of(result: types.CallToolResult) -> str:
    return "\n".join(c.text for c in result.content if isinstance(c, types.TextContent))


async def wait_status(session: ClientSession, task_id: str, *statuses: str) -> types.Task:
    with anyio.fail_after(20):
        while True:
            task = await session.experimental.get_task(task_id)
            if task.status in statuses:
                return task
            await anyio.sleep(0.1)


async def test_initialize_and_list_tools(shared_gateway: GatewayProcess) -> None:
    async with mcp_session(shared_gateway.url) as session:
        caps = session.get_server_capabilities()
        assert caps is not None
        assert caps.tools is not None and caps.tools.listChanged is True
        assert caps.logging is not None
        assert caps.tasks is not None and caps.tasks.list is not None
        assert caps.tasks.requests is not None and caps.tasks.requests.tools is not None
        tools = {t.name: t for t in (await session.list_tools()).tools}
    assert set(tools) == {"add", "slow_echo", "slow_task", "flaky", "fail", "word_count"}
    add = tools["add"]
    assert add.inputSchema["required"] == ["a", "b"]
    assert add.inputSchema["properties"]["a"]["type"] == "number"
    assert add.outputSchema is not None and "result" in add.outputSchema["properties"]
    assert tools["word_count"].outputSchema is not None
    assert tools["word_count"].outputSchema["properties"]["words"]["type"] == "integer"
    assert tools["fail"].outputSchema is None
    modes = {name: t.execution.taskSupport for name, t in tools.items() if t.execution}
    assert modes["add"] == "forbidden"
    assert modes["slow_echo"] == "optional"
    assert modes["slow_task"] == "required"


async def test_calls_sync_and_async_tools(shared_gateway: GatewayProcess) -> None:
    async with mcp_session(shared_gateway.url) as session:
        added, counted, echoed = await asyncio.gather(
            session.call_tool("add", {"a": 2, "b": 3.5}),
            session.call_tool("word_count", {"text": "one two\nthree"}),
            session.call_tool("slow_echo", {"text": "hello", "seconds": 0.2}),
        )
    assert not added.isError
    assert added.structuredContent == {"result": 5.5}
    assert '"result": 5.5' in text_of(added)
    assert added.meta is not None and added.meta[TASK_ID_META]
    assert counted.structuredContent == {"words": 3, "characters": 13, "lines": 2}
    assert echoed.structuredContent == {"result": "hello"}


async def test_schema_violation_is_a_tool_error_naming_the_field(
    shared_gateway: GatewayProcess,
) -> None:
    # MCP 2025-11-25 (SEP-1303): input validation errors are tool execution errors.
    async with mcp_session(shared_gateway.url) as session:
        result = await session.call_tool("add", {"a": "two", "b": 3})
        missing = await session.call_tool("add", {"a": 1})
    assert result.isError
    assert "a: 'two' is not of type 'number'" in text_of(result)
    assert result.meta is not None and result.meta[ERROR_META]["type"] == "invalid_arguments"
    assert missing.isError and "'b' is a required property" in text_of(missing)


async def test_unknown_tool_is_invalid_params(shared_gateway: GatewayProcess) -> None:
    async with mcp_session(shared_gateway.url) as session:
        with pytest.raises(McpError) as caught:
            await session.call_tool("no_such_tool", {})
    assert caught.value.error.code == types.INVALID_PARAMS
    assert "no_such_tool" in caught.value.error.message


async def test_tool_that_raises_is_an_error_result(shared_gateway: GatewayProcess) -> None:
    async with mcp_session(shared_gateway.url) as session:
        result = await session.call_tool("fail", {"message": "the disk is on fire"})
    assert result.isError
    assert text_of(result) == "the disk is on fire"
    assert result.meta is not None and result.meta[ERROR_META]["data"] == {"tool": "fail"}


async def test_retry_succeeds_on_the_third_attempt(shared_gateway: GatewayProcess) -> None:
    key = uuid.uuid4().hex
    async with mcp_session(shared_gateway.url) as session:
        result = await session.call_tool("flaky", {"key": key, "failures": 2})
    assert not result.isError, text_of(result)
    assert result.structuredContent == {"result": f"{key}: succeeded after 2 failures"}


async def test_progress_and_log_notifications(shared_gateway: GatewayProcess) -> None:
    reports: list[tuple[float, float | None, str | None]] = []
    logs: list[Any] = []

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        reports.append((progress, total, message))

    async def on_log(params: types.LoggingMessageNotificationParams) -> None:
        logs.append(params.data)

    async with mcp_session(shared_gateway.url, logging_callback=on_log) as session:
        await session.set_logging_level("info")
        result = await session.call_tool(
            "slow_echo", {"text": "x", "seconds": 1.0}, progress_callback=on_progress
        )
    assert not result.isError
    assert reports[0] == (0.0, None, "running slow_echo")
    values = [p[0] for p in reports]
    assert values == sorted(set(values))  # strictly increasing, as MCP requires
    reported = [p for p in reports if p[1] == 1.0]  # the tool's own reports, of 1 s in all
    assert len(reported) >= 3, reports
    assert reported[-1][2] is not None and reported[-1][2].endswith("of 1 s")
    events = [d["event"] for d in logs if isinstance(d, dict)]
    assert events == ["call started", "call finished"]
    assert logs[1]["state"] == "completed"


async def test_cancelled_notification_terminates_the_workflow(
    shared_gateway: GatewayProcess,
) -> None:
    started = anyio.Event()
    task_ids: list[str] = []

    async def on_log(params: types.LoggingMessageNotificationParams) -> None:
        if isinstance(params.data, dict) and params.data.get("event") == "call started":
            task_ids.append(params.data["task"])
            started.set()

    async with mcp_session(shared_gateway.url, logging_callback=on_log) as session:
        await session.set_logging_level("info")
        request_id = session._request_id  # the id the next request gets
        call = asyncio.ensure_future(
            session.call_tool("slow_echo", {"text": "never", "seconds": 30})
        )
        with anyio.fail_after(10):
            await started.wait()
        await session.send_notification(
            types.ClientNotification(
                types.CancelledNotification(
                    params=types.CancelledNotificationParams(requestId=request_id, reason="test")
                )
            )
        )
        with pytest.raises(McpError):
            await call
        task = await wait_status(session, task_ids[0], "cancelled", "completed", "failed")
    assert task.status == "cancelled"


async def test_task_create_poll_result_list(shared_gateway: GatewayProcess) -> None:
    async with mcp_session(shared_gateway.url) as session:
        created = await session.experimental.call_tool_as_task(
            "slow_echo", {"text": "later", "seconds": 0.5}
        )
        task = created.task
        assert task.status == "working"
        assert isinstance(task.ttl, int) and task.ttl > 0
        polled = await session.experimental.get_task(task.taskId)
        assert polled.taskId == task.taskId
        assert polled.status in ("working", "completed")
        result = await session.experimental.get_task_result(task.taskId, types.CallToolResult)
        assert result.structuredContent == {"result": "later"}
        assert result.meta is not None
        assert result.meta["io.modelcontextprotocol/related-task"] == {"taskId": task.taskId}
        assert (await session.experimental.get_task(task.taskId)).status == "completed"
        listed = await session.experimental.list_tasks()
        assert task.taskId in {t.taskId for t in listed.tasks}
        with pytest.raises(McpError) as terminal:
            await session.experimental.cancel_task(task.taskId)
        assert terminal.value.error.code == types.INVALID_PARAMS
        with pytest.raises(McpError) as unknown:
            await session.experimental.get_task("no-such-task")
        assert unknown.value.error.code == types.INVALID_PARAMS


async def test_task_cancel_and_task_modes(shared_gateway: GatewayProcess) -> None:
    async with mcp_session(shared_gateway.url) as session:
        created = await session.experimental.call_tool_as_task(
            "slow_task", {"text": "never", "seconds": 30}
        )
        cancelled = await session.experimental.cancel_task(created.task.taskId)
        assert cancelled.status == "cancelled"
        assert (await session.experimental.get_task(created.task.taskId)).status == "cancelled"
        result = await session.experimental.get_task_result(
            created.task.taskId, types.CallToolResult
        )
        assert result.isError
        with pytest.raises(McpError) as required:
            await session.call_tool("slow_task", {"text": "x"})
        assert required.value.error.code == types.METHOD_NOT_FOUND
        with pytest.raises(McpError) as forbidden:
            await session.experimental.call_tool_as_task("add", {"a": 1, "b": 2})
        assert forbidden.value.error.code == types.METHOD_NOT_FOUND


async def test_idempotent_and_conflicting_replay(shared_gateway: GatewayProcess) -> None:
    key = {IDEMPOTENCY_META: uuid.uuid4().hex}
    async with mcp_session(shared_gateway.url) as session:
        first = await session.call_tool("word_count", {"text": "a b c"}, meta=key)
        again = await session.call_tool("word_count", {"text": "a b c"}, meta=key)
        assert (
            first.structuredContent
            == again.structuredContent
            == {
                "words": 3,
                "characters": 5,
                "lines": 1,
            }
        )
        assert first.meta is not None and again.meta is not None
        assert first.meta[TASK_ID_META] == again.meta[TASK_ID_META]  # one workflow, one run
        assert REPLAYED_META not in first.meta and again.meta[REPLAYED_META] is True
        with pytest.raises(McpError) as conflict:
            await session.call_tool("word_count", {"text": "other"}, meta=key)
        assert conflict.value.error.code == types.INVALID_PARAMS
        assert "idempotency key" in conflict.value.error.message

        task_key = {IDEMPOTENCY_META: uuid.uuid4().hex}
        args = {"text": "once", "seconds": 0.2}
        one = await session.experimental.call_tool_as_task("slow_echo", args, meta=task_key)
        two = await session.experimental.call_tool_as_task("slow_echo", args, meta=task_key)
        assert one.task.taskId == two.task.taskId


async def test_health_and_readiness(shared_gateway: GatewayProcess) -> None:
    async with httpx.AsyncClient(base_url=shared_gateway.base) as client:
        assert (await client.get("/healthz")).status_code == 200
        ready = await client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["status"] == "ready"


async def test_dns_rebinding_is_refused(shared_gateway: GatewayProcess) -> None:
    async with httpx.AsyncClient(base_url=shared_gateway.base) as client:
        bad_host = await client.post(
            "/mcp", json=INIT, headers={**MCP_HEADERS, "Host": "evil.example:80"}
        )
        bad_origin = await client.post(
            "/mcp", json=INIT, headers={**MCP_HEADERS, "Origin": "http://evil.example"}
        )
        good = await client.post(
            "/mcp", json=INIT, headers={**MCP_HEADERS, "Origin": "http://localhost:3000"}
        )
    assert bad_host.status_code == 421
    assert bad_origin.status_code == 403
    assert good.status_code == 200


async def test_oversized_body_gets_413(shared_gateway: GatewayProcess) -> None:
    big = {**INIT, "params": {**INIT["params"], "padding": "x" * 70_000}}  # type: ignore[dict-item]
    async with httpx.AsyncClient(base_url=shared_gateway.base) as client:
        response = await client.post("/mcp", json=big, headers=MCP_HEADERS)
    assert response.status_code == 413
    assert response.json()["error"] == "request_too_large"
    assert "65536" in response.json()["message"]


# --- in-process: the HTTP layer alone, no engine -----------------------------------------------


class _NotReady:
    async def ready(self) -> bool:
        return False


class _Host:
    def __init__(self, config: GatewayConfig) -> None:
        self.config = config
        self.runtime = _NotReady()
        self.push = None  # no A2A push notifications without an engine

    @property
    def dispatcher(self) -> Any:
        raise AssertionError("no call may reach the dispatcher")


def test_anonymous_refused_and_not_ready_without_engine() -> None:
    host = _Host(GatewayConfig.model_validate({"identity": {"allow_anonymous": False}}))
    front = McpFront(host, LiveSessions(), front_door="mcp-http")
    with TestClient(build_app(host, front, "127.0.0.1"), base_url="http://127.0.0.1") as client:
        refused = client.post("/mcp", json=INIT, headers=MCP_HEADERS)
        assert refused.status_code == 401
        assert "authentication is not configured" in refused.json()["message"]
        assert refused.headers["www-authenticate"].startswith("Bearer")
        assert client.get("/healthz").status_code == 200
        assert client.get("/readyz").status_code == 503
