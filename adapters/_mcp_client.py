"""A remote MCP server as the `mcp` kind reaches it: where it is (Streamable HTTP or stdio), how
the gateway presents itself (headers, its own SVID, an OAuth token), a session, `tools/list`
and `tools/call`. The kind itself (`adapters.mcp`) decides which remote tools become gateway
tools; this module knows nothing of gateway tools.

Errors of a call:
- the remote's `isError` result, or a JSON-RPC refusal of the call itself (unknown tool,
  invalid parameters): `ToolError` (final, not retried);
- an unreachable server, a broken connection, a timeout, an HTTP error status:
  `RemoteCallError`, retried per the tool's retry policy.
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import shlex
import ssl
import threading
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal, TypeVar
from urllib.parse import urlsplit

import httpx
from mcp import ClientSession, McpError, StdioServerParameters, types
from mcp.client.stdio import get_default_environment, stdio_client
from mcp.client.streamable_http import streamable_http_client
from pydantic import BaseModel, ConfigDict, Field

import adapters
from adapters._outbound import OAuthTokens
from adapters.base import ToolContext, ToolError, ToolLoadError
from gateway import __version__, telemetry
from identity.outbound import OutboundAuthError

IDEMPOTENCY_META = "io.duragate/idempotency-key"
STDIO_PREFIX = "stdio:"
# JSON-RPC errors that refuse the call itself: repeating it cannot help.
_REFUSALS = frozenset({types.METHOD_NOT_FOUND, types.INVALID_PARAMS})
ENV_NAME = r"^[A-Za-z_][A-Za-z0-9_]*$"
# tools/list pages read at most: a server whose cursors never end must not hang the start.
MAX_LIST_PAGES = 1000

T = TypeVar("T")


class TlsOptions(BaseModel):
    """Client TLS for an https server: our certificate and key, and the CAs to trust."""

    model_config = ConfigDict(extra="forbid")

    cert: Path | None = None
    key: Path | None = None
    ca: Path | None = None


class ConnectionOptions(BaseModel):
    """The `options` of an `mcp` entry that say how to reach the server."""

    model_config = ConfigDict(extra="forbid")

    bearer_token_env: str | None = Field(default=None, pattern=ENV_NAME)
    headers_from_env: dict[str, str] = Field(default_factory=dict)
    env_from_env: dict[str, str] = Field(default_factory=dict)
    connect_timeout_seconds: float = Field(default=10.0, gt=0)
    tls: TlsOptions | None = None
    # "own": present the gateway's own identity (`identity.own` in gateway.yaml): its current
    # X.509-SVID for mTLS over https, and a JWT-SVID for `jwt_audience` as a bearer token.
    identity: Literal["own"] | None = None
    jwt_audience: str | None = Field(default=None, min_length=1)
    # An OAuth access token for the gateway itself (client credentials, RFC 6749 4.4) from this
    # authorization server, sent as the bearer token (identity.outbound.OutboundOAuthConfig).
    oauth: dict[str, Any] | None = None


def client_tls(options: TlsOptions) -> ssl.SSLContext:
    """The TLS context of one connection: the CAs to trust and the certificate to present."""
    try:
        context = ssl.create_default_context(cafile=str(options.ca) if options.ca else None)
    except (OSError, ssl.SSLError) as exc:
        raise ToolLoadError(f"tls.ca {options.ca}: cannot load trust anchors: {exc}") from None
    if options.cert is not None and options.key is not None:
        try:
            context.load_cert_chain(str(options.cert), str(options.key))
        except (OSError, ssl.SSLError) as exc:
            raise ToolLoadError(
                f"tls.cert {options.cert} / tls.key {options.key}: cannot load the client "
                f"certificate: {exc}"
            ) from None
    return context


class RemoteCallError(Exception):
    """The remote server could not be reached or did not answer: worth retrying."""


class ServerUnreachable(ToolLoadError):
    """The server's tools could not be read at load time; `reason` says why."""

    def __init__(self, where: str, reason: str) -> None:
        super().__init__(f"cannot read the tools of the MCP server {where}: {reason}")
        self.where = where
        self.reason = reason


def _env(name: str, what: str) -> str:
    value = os.environ.get(name)
    if not value:
        raise ToolLoadError(f"{what} comes from the environment variable {name}, which is not set")
    return value


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def run_blocking(make: Callable[[], Coroutine[Any, Any, T]], timeout: float) -> T:
    """Run a coroutine to completion from synchronous code (tools are prepared at start-up,
    outside any event loop, or in a worker thread of one)."""

    async def bounded() -> T:
        async with asyncio.timeout(timeout):
            return await make()

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(bounded())
    # Called on a running loop's thread: use a private loop in a thread of its own.
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["value"] = asyncio.run(bounded())
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
            outcome["error"] = exc

    thread = threading.Thread(target=run, name="mcp-prepare", daemon=True)
    thread.start()
    thread.join()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def cause(exc: BaseException) -> BaseException:
    """The first error of interest inside the exception groups the client's task groups raise."""
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            found = cause(inner)
            if not isinstance(found, BaseExceptionGroup):
                return found
    return exc


def describe(exc: BaseException) -> str:
    if isinstance(exc, httpx.HTTPStatusError):
        return f"HTTP {exc.response.status_code}"
    if isinstance(exc, McpError):
        return exc.error.message
    if isinstance(exc, TimeoutError):
        return "timed out"
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _texts(result: types.CallToolResult) -> str:
    return "\n".join(c.text for c in result.content if isinstance(c, types.TextContent))


def result_value(result: types.CallToolResult) -> Any:
    """What a successful remote call returned: its structured content, else its text, else
    (images, resources, ...) its content blocks as JSON."""
    if result.structuredContent is not None:
        return result.structuredContent
    if any(isinstance(c, types.TextContent) for c in result.content):
        return _texts(result)
    return [c.model_dump(mode="json", by_alias=True, exclude_none=True) for c in result.content]


class RemoteServer:
    """One remote MCP server: `target` is its URL or `stdio:COMMAND ARGS...`. Everything the
    options need from the environment (headers, the server's variables) is read, and every
    credential file checked, here: a missing piece stops the start, not the first call."""

    def __init__(self, target: str, options: ConnectionOptions) -> None:
        self.options = options
        self.where = target.strip()
        self._stdio: StdioServerParameters | None = None
        self._headers: dict[str, str] = {}
        self._oauth: OAuthTokens | None = None
        if self.where.startswith(STDIO_PREFIX):
            self._stdio = self._stdio_params(self.where)
        else:
            self._headers = self._check_http(self.where)

    # --- start-up -----------------------------------------------------------------------
    def _stdio_params(self, target: str) -> StdioServerParameters:
        if (
            self.options.headers_from_env
            or self.options.bearer_token_env
            or self.options.tls
            or self.options.oauth
        ):
            raise ToolLoadError("headers and tls apply to an MCP server over HTTP, not over stdio")
        try:
            argv = shlex.split(target[len(STDIO_PREFIX) :])
        except ValueError as exc:
            raise ToolLoadError(f"target {target!r}: {exc}") from None
        if not argv:
            raise ToolLoadError(f"target {target!r} names no command after 'stdio:'")
        env = get_default_environment()
        for name, source in self.options.env_from_env.items():
            env[name] = _env(source, f"the server's variable {name}")
        return StdioServerParameters(command=argv[0], args=argv[1:], env=env)

    def _check_http(self, url: str) -> dict[str, str]:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ToolLoadError(
                f"target {url!r} is not an MCP server URL (http:// or https://) nor "
                f"'stdio:<command>'"
            )
        if self.options.env_from_env:
            raise ToolLoadError("env_from_env applies to an MCP server over stdio, not HTTP")
        headers: dict[str, str] = {}
        for header, source in self.options.headers_from_env.items():
            if not header or any(c in header for c in " :\r\n"):
                raise ToolLoadError(f"{header!r} is not an HTTP header name")
            headers[header] = _env(source, f"header {header}")
        if self.options.bearer_token_env:
            token = _env(self.options.bearer_token_env, "the bearer token")
            headers["Authorization"] = f"Bearer {token}"
        if headers and parts.scheme != "https" and not _is_loopback(parts.hostname):
            raise ToolLoadError(
                f"target {url!r}: credentials are sent only over https (or to a loopback host);"
                " use an https:// URL"
            )
        if self.options.identity == "own":
            if adapters.own_identity() is None:
                raise ToolLoadError(
                    "identity: own needs the gateway's own identity: set identity.own in the "
                    "gateway config"
                )
            if self.options.tls is not None or self.options.bearer_token_env:
                raise ToolLoadError(
                    "identity: own presents the gateway's SVIDs: leave out tls and bearer_token_env"
                )
            if parts.scheme != "https" and not _is_loopback(parts.hostname):
                raise ToolLoadError(
                    f"target {url!r}: the gateway's identity is presented only over https "
                    "(or to a loopback host)"
                )
        elif self.options.jwt_audience:
            raise ToolLoadError("jwt_audience needs identity: own")
        if self.options.oauth is not None:
            if self.options.bearer_token_env or self.options.jwt_audience:
                raise ToolLoadError(
                    "oauth gets the bearer token: leave out bearer_token_env and jwt_audience"
                )
            if parts.scheme != "https" and not _is_loopback(parts.hostname):
                raise ToolLoadError(
                    f"target {url!r}: access tokens are sent only over https (or to a loopback "
                    "host)"
                )
            self._oauth = OAuthTokens(self.options.oauth)
        tls = self.options.tls
        if tls is not None:
            if parts.scheme != "https":
                raise ToolLoadError(f"target {url!r}: tls options need an https:// URL")
            if (tls.cert is None) != (tls.key is None):
                raise ToolLoadError("tls.cert and tls.key go together: give both, or neither")
            client_tls(tls)  # refuse a start with unreadable files, not the first call
        return headers

    # --- sessions -----------------------------------------------------------------------
    @asynccontextmanager
    async def session(self, read_timeout: float) -> AsyncIterator[ClientSession]:
        """An initialized session; `read_timeout` bounds one HTTP read (a call's answer)."""
        info = types.Implementation(name="duragate", version=__version__)
        request_timeout = timedelta(seconds=self.options.connect_timeout_seconds)
        if self._stdio is not None:
            async with stdio_client(self._stdio) as (read, write):
                async with ClientSession(
                    read, write, read_timeout_seconds=request_timeout, client_info=info
                ) as session:
                    await session.initialize()
                    yield session
            return
        timeout = httpx.Timeout(read_timeout, connect=self.options.connect_timeout_seconds)
        verify: ssl.SSLContext | bool = True
        headers = dict(self._headers)
        if self.options.tls is not None:
            # Read for every session: a renewed SVID is picked up without a restart.
            verify = client_tls(self.options.tls)
        elif self.options.identity == "own":
            own = adapters.own_identity()
            if own is None:
                raise RemoteCallError("the gateway's own identity is not available")
            if urlsplit(self.where).scheme == "https":
                verify = own.client_ssl_context()  # the current SVID, rotations included
            if self.options.jwt_audience:
                token = await own.jwt_svid(self.options.jwt_audience)
                headers["Authorization"] = f"Bearer {token}"
        if self._oauth is not None:
            try:
                token = await self._oauth.token()
            except OutboundAuthError as exc:
                raise RemoteCallError(f"no access token for {self.where}: {exc}") from None
            headers["Authorization"] = f"Bearer {token}"
        async with httpx.AsyncClient(headers=headers, timeout=timeout, verify=verify) as http:
            async with streamable_http_client(self.where, http_client=http) as (read, write, _):
                async with ClientSession(
                    read, write, read_timeout_seconds=request_timeout, client_info=info
                ) as session:
                    await session.initialize()
                    yield session

    async def list_tools(self) -> list[types.Tool]:
        """Every tool the server lists, in its order (all pages of `tools/list`)."""
        tools: list[types.Tool] = []
        async with self.session(self.options.connect_timeout_seconds) as session:
            cursor: str | None = None
            for _ in range(MAX_LIST_PAGES):
                page = await session.list_tools(
                    params=types.PaginatedRequestParams(cursor=cursor) if cursor else None
                )
                tools.extend(page.tools)
                cursor = page.nextCursor
                if not cursor:
                    return tools
        raise RemoteCallError(f"tools/list did not end after {MAX_LIST_PAGES} pages")

    def read_tools(self) -> list[types.Tool]:
        """`list_tools` from synchronous code (start-up), bounded by the connect timeout;
        raises `ServerUnreachable` when the server does not answer."""
        try:
            return run_blocking(self.list_tools, self.options.connect_timeout_seconds)
        except ToolLoadError:
            raise
        except Exception as exc:
            raise ServerUnreachable(self.where, describe(cause(exc))) from None

    async def call(
        self, remote_name: str, arguments: dict[str, Any], context: ToolContext, timeout: float
    ) -> Any:
        """Call the remote tool once; its value, or `ToolError` / `RemoteCallError`."""
        carrier = {IDEMPOTENCY_META: context.task_execution_id} if context.task_execution_id else {}
        # The trace goes on to the remote (a remote Duragate continues it from `_meta`).
        meta = telemetry.inject(carrier) or None

        async def on_progress(progress: float, total: float | None, message: str | None) -> None:
            context.progress(progress, total, message)

        try:
            async with self.session(timeout) as session:
                result = await session.call_tool(
                    remote_name,
                    arguments,
                    read_timeout_seconds=timedelta(seconds=timeout),
                    progress_callback=on_progress,
                    meta=meta,
                )
        except Exception as exc:
            first = cause(exc)
            if isinstance(first, McpError) and first.error.code in _REFUSALS:
                raise ToolError(
                    f"the MCP server {self.where} refused the call of {remote_name!r}: "
                    f"{first.error.message}"
                ) from None
            raise RemoteCallError(
                f"calling {remote_name!r} on the MCP server {self.where} failed: {describe(first)}"
            ) from None
        if result.isError:
            message = _texts(result) or f"the remote tool {remote_name!r} reported an error"
            raise ToolError(message, data=result.structuredContent)
        return result_value(result)
