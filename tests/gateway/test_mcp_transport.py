"""Each MCP POST answered as JSON or as an SSE stream, whichever it needs
(gateway/mcp_transport.py), and connections that never wait on Nagle's algorithm."""

from __future__ import annotations

import asyncio
import json
import socket
from typing import Any

import httpx
from mcp import types

from gateway.server import _listen

from .conftest import INIT, MCP_HEADERS, GatewayProcess, mcp_session


def _post(client: httpx.Client, url: str, headers: dict[str, str], body: Any) -> httpx.Response:
    return client.post(url, json=body, headers={"Content-Type": "application/json", **headers})


def _open_session(client: httpx.Client, url: str, accept: str) -> dict[str, str]:
    opened = _post(client, url, {"Accept": accept}, INIT)
    assert opened.status_code == 200, opened.text
    headers = {
        "Accept": accept,
        "Mcp-Session-Id": opened.headers["mcp-session-id"],
        "Mcp-Protocol-Version": "2025-11-25",
    }
    done = _post(client, url, headers, {"jsonrpc": "2.0", "method": "notifications/initialized"})
    assert done.status_code == 202
    return headers


def _call(i: int, meta: dict[str, Any] | None = None) -> dict[str, Any]:
    params: dict[str, Any] = {"name": "slow_echo", "arguments": {"text": f"t{i}", "seconds": 0}}
    if meta is not None:
        params["_meta"] = meta
    return {"jsonrpc": "2.0", "id": i, "method": "tools/call", "params": params}


def _sse_messages(response: httpx.Response) -> list[dict[str, Any]]:
    return [
        json.loads(line[len("data:") :])
        for line in response.text.splitlines()
        if line.startswith("data:") and line[len("data:") :].strip()
    ]


def test_plain_calls_get_json_and_streams_only_when_needed(
    shared_gateway: GatewayProcess,
) -> None:
    url = shared_gateway.url
    with httpx.Client(timeout=30) as client:
        headers = _open_session(client, url, MCP_HEADERS["Accept"])
        # No progress asked for, no log level set: one JSON answer.
        plain = _post(client, url, headers, _call(2))
        assert plain.headers["content-type"].startswith("application/json")
        assert plain.json()["result"]["structuredContent"] == {"result": "t2"}
        listed = _post(client, url, headers, {"jsonrpc": "2.0", "id": 3, "method": "tools/list"})
        assert listed.headers["content-type"].startswith("application/json")
        # A progress token: an SSE stream, progress first, then the result.
        streamed = _post(client, url, headers, _call(4, {"progressToken": "p4"}))
        assert streamed.headers["content-type"].startswith("text/event-stream")
        messages = _sse_messages(streamed)
        assert messages[0]["method"] == "notifications/progress"
        assert messages[0]["params"]["progressToken"] == "p4"
        assert messages[-1]["id"] == 4
        assert messages[-1]["result"]["structuredContent"] == {"result": "t4"}
        # Once the session asks for log messages, its calls stream them.
        level = {"jsonrpc": "2.0", "id": 5, "method": "logging/setLevel"}
        assert _post(client, url, headers, {**level, "params": {"level": "info"}}).is_success
        logged = _post(client, url, headers, _call(6))
        assert logged.headers["content-type"].startswith("text/event-stream")
        methods = [m.get("method") for m in _sse_messages(logged)]
        assert methods.count("notifications/message") == 2  # call started, call finished


def test_a_client_that_accepts_only_json_gets_json(shared_gateway: GatewayProcess) -> None:
    """Even with a progress token: there is no stream to send progress on."""
    url = shared_gateway.url
    with httpx.Client(timeout=30) as client:
        headers = _open_session(client, url, "application/json")
        answer = _post(client, url, headers, _call(2, {"progressToken": 7}))
        assert answer.status_code == 200
        assert answer.headers["content-type"].startswith("application/json")
        assert answer.json()["result"]["structuredContent"] == {"result": "t2"}


async def test_the_sdk_client_gets_progress_without_asking_for_logs(
    shared_gateway: GatewayProcess,
) -> None:
    reports: list[float] = []

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        reports.append(progress)

    async with mcp_session(shared_gateway.url) as session:
        plain = await session.call_tool("slow_echo", {"text": "a", "seconds": 0})
        result = await session.call_tool(
            "slow_echo", {"text": "b", "seconds": 0.5}, progress_callback=on_progress
        )
    assert plain.structuredContent == {"result": "a"}
    assert isinstance(result, types.CallToolResult) and not result.isError
    assert len(reports) >= 2 and reports == sorted(set(reports))


async def test_accepted_connections_turn_nagle_off() -> None:
    """A response written as headers then body must not wait for the client's delayed ACK
    (40 ms a request): the listening socket is what makes asyncio set TCP_NODELAY."""
    sock = _listen("127.0.0.1", 0)
    accepted: asyncio.Future[int] = asyncio.get_running_loop().create_future()

    class Probe(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            peer = transport.get_extra_info("socket")
            accepted.set_result(peer.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
            transport.close()

    server = await asyncio.get_running_loop().create_server(Probe, sock=sock)
    try:
        _, writer = await asyncio.open_connection(*sock.getsockname()[:2])
        assert await asyncio.wait_for(accepted, 10) != 0
        writer.close()
    finally:
        server.close()
        await server.wait_closed()
