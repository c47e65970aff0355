"""The CLI's side of a running gateway: an MCP client over Streamable HTTP.

`duragate call` and `duragate tasks ...` use these; each opens one MCP session, does its one
thing and closes it. Errors, raised anywhere inside a session, come back as `RemoteError` with
a message for a person.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import timedelta
from typing import Any

import httpx
from mcp import ClientSession, McpError, types
from mcp.client.streamable_http import streamablehttp_client
from mcp.shared.session import ProgressFnT

DEFAULT_URL = "http://127.0.0.1:8770/mcp"
IDEMPOTENCY_META = "io.duragate/idempotency-key"
# The experimental tasks API of mcp 1.30 warns that it moves to an extension in 2.0.
warnings.filterwarnings("ignore", message=".*experimental tasks API.*", category=DeprecationWarning)

ProgressCallback = ProgressFnT


class RemoteError(Exception):
    pass


@asynccontextmanager
async def session(url: str, timeout: float = 30.0) -> AsyncIterator[ClientSession]:
    try:
        async with streamablehttp_client(url, timeout=timeout) as (read, write, _):
            async with ClientSession(read, write) as s:
                await s.initialize()
                yield s
    except Exception as exc:  # the client's task groups may wrap the cause in a group
        cause = _find(exc)
        if isinstance(cause, RemoteError):
            raise cause from None
        if isinstance(cause, McpError):
            raise RemoteError(cause.error.message) from exc
        if isinstance(cause, httpx.ConnectError):
            raise RemoteError(
                f"cannot reach a gateway at {url}: is `duragate serve` running there?"
            ) from exc
        if isinstance(cause, httpx.HTTPStatusError):
            raise RemoteError(
                f"the gateway at {url} answered HTTP {cause.response.status_code}"
            ) from exc
        raise


def _find(exc: BaseException) -> BaseException:
    """The first error of interest inside (possibly nested) exception groups."""
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            found = _find(inner)
            if isinstance(found, RemoteError | McpError | httpx.HTTPError):
                return found
    return exc


def result_payload(result: types.CallToolResult) -> Any:
    """The value a call returned: its structured content, else its text."""
    if result.structuredContent is not None:
        return result.structuredContent
    texts = [c.text for c in result.content if isinstance(c, types.TextContent)]
    return "\n".join(texts)


async def call_tool(
    url: str,
    tool: str,
    arguments: dict[str, Any],
    *,
    idempotency_key: str | None = None,
    on_progress: ProgressCallback | None = None,
    timeout: float = 3600.0,
) -> types.CallToolResult:
    meta = {IDEMPOTENCY_META: idempotency_key} if idempotency_key else None
    async with session(url) as s:
        return await s.call_tool(
            tool,
            arguments,
            read_timeout_seconds=timedelta(seconds=timeout),
            progress_callback=on_progress,
            meta=meta,
        )


async def start_task(url: str, tool: str, arguments: dict[str, Any]) -> types.Task:
    async with session(url) as s:
        created = await s.experimental.call_tool_as_task(tool, arguments)
        return created.task


async def list_tasks(url: str) -> list[types.Task]:
    async with session(url) as s:
        tasks: list[types.Task] = []
        cursor: str | None = None
        while True:
            page = await s.experimental.list_tasks(cursor=cursor)
            tasks.extend(page.tasks)
            cursor = page.nextCursor
            if not cursor:
                return tasks


async def get_task(url: str, task_id: str) -> types.GetTaskResult:
    async with session(url) as s:
        return await s.experimental.get_task(task_id)


async def task_result(url: str, task_id: str) -> types.CallToolResult:
    async with session(url, timeout=3600.0) as s:
        return await s.experimental.get_task_result(task_id, types.CallToolResult)


async def cancel_task(url: str, task_id: str) -> types.CancelTaskResult:
    async with session(url) as s:
        return await s.experimental.cancel_task(task_id)


def render(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, indent=2, ensure_ascii=False)
