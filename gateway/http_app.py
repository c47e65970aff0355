"""The gateway's HTTP application (Starlette): the MCP endpoint and the health probes.

    /mcp       MCP Streamable HTTP (stateful sessions, SSE responses so progress flows)
    /approvals, /approvals/{task_id}   calls waiting for approval; approve or deny
    /tasks/{task_id}/input             the input a waiting call asked for (its owner only)
    /admin/api/..., /admin/openapi.json   the admin API (gateway.admin_api)
    /ui        the dashboard (gateway.dashboard)
    /healthz   200 while the process is up
    /metrics   Prometheus metrics (gateway/metrics.py; who may read them: observability)
    /readyz    200 when the workflow engine answers, 503 otherwise

Every request body above `limits.max_body_bytes` is refused with 413 before it is parsed.
When the gateway listens on loopback, `/mcp` checks `Host` and `Origin` against loopback names
(DNS-rebinding protection, the SDK's `TransportSecuritySettings`): a bad Host gets 421, a bad
Origin 403 (as the 2025-11-25 transport spec asks).

Every request to `/mcp` is authenticated on its own (`identity.authenticate.Authenticator`), not
only the one that opens a session (over TLS, a client certificate is checked once per connection
and the result kept on it: `identity.tls.TlsPeer`): the principal goes into the request's scope,
where the MCP front door reads it. A refused caller gets 401 with an RFC 6750 challenge
(`WWW-Authenticate: Bearer realm="duragate", error=..., error_description=...`) and the reason in
a JSON body, or 403 when it is known but belongs to no tenant; nothing reaches the session.
With OAuth issuers configured (`identity.oauth`), the 401 also names the RFC 9728 metadata
(`resource_metadata="<origin>/.well-known/oauth-protected-resource/mcp"`, served at that path and
at the root variant), where IDE clients find the authorization server.
A session stays bound to the caller that opened it (the SDK compares `scope["user"]`): another
principal presenting its id gets 404, as if it did not exist.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import re
from collections import deque
from collections.abc import AsyncIterator, Callable
from typing import Any, Protocol

from mcp.server.auth.middleware.bearer_auth import AuthenticatedUser
from mcp.server.auth.provider import AccessToken
from mcp.server.streamable_http_manager import StreamableHTTPSessionManager
from mcp.server.transport_security import TransportSecurityMiddleware, TransportSecuritySettings
from starlette.applications import Starlette
from starlette.datastructures import Headers
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway import telemetry
from gateway.a2a_front import build_routes as a2a_routes
from gateway.a2a_push import PushService
from gateway.admin_api import AdminApi
from gateway.config import ConfigError, GatewayConfig, IdentityConfig
from gateway.dashboard import dashboard_routes
from gateway.dispatch import Dispatcher, DispatchError
from gateway.mcp_front import PRINCIPAL_SCOPE_KEY, McpFront
from gateway.mcp_transport import AdaptiveSessionManager
from gateway.metrics_http import CountedAuthenticator, MetricsEndpoint
from identity.authenticate import VIA_ANONYMOUS, AuthenticationError, Authenticator
from identity.bundle import BundleError
from identity.oauth import JwksError
from identity.principal import Principal
from identity.resource_metadata import (
    metadata_url,
    protected_resource_metadata,
    request_origin,
)
from identity.tls import peer_of

log = logging.getLogger(__name__)

LOOPBACK_NAMES = ("127.0.0.1", "localhost", "[::1]")
REALM = "duragate"
# RFC 6750 3: error_description may only hold %x20-21 / %x23-5B / %x5D-7E: no double quote,
# no backslash, no control or non-ASCII character (so no header injection either).
_CHALLENGE_UNSAFE = re.compile(r"[^\x20-\x21\x23-\x5b\x5d-\x7e]")
MAX_CHALLENGE_REASON = 300


class ReadyProbe(Protocol):
    async def ready(self) -> bool: ...


class HttpHost(Protocol):
    """What the HTTP app needs of the gateway (read per request: a reload shows)."""

    @property
    def config(self) -> GatewayConfig: ...

    @property
    def runtime(self) -> ReadyProbe: ...

    @property
    def dispatcher(self) -> Dispatcher: ...

    @property
    def push(self) -> PushService | None: ...


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def transport_security(listen_host: str) -> TransportSecuritySettings:
    """DNS-rebinding protection on loopback; off (nothing to protect against) elsewhere."""
    if not is_loopback(listen_host):
        return TransportSecuritySettings(enable_dns_rebinding_protection=False)
    hosts = [h for name in LOOPBACK_NAMES for h in (name, f"{name}:*")]
    origins = [
        f"{scheme}://{name}{port}"
        for name in LOOPBACK_NAMES
        for scheme in ("http", "https")
        for port in ("", ":*")
    ]
    return TransportSecuritySettings(
        enable_dns_rebinding_protection=True, allowed_hosts=hosts, allowed_origins=origins
    )


def _json_error(status: int, error: str, message: str, **headers: str) -> Response:
    return JSONResponse({"error": error, "message": message}, status_code=status, headers=headers)


class BodyLimit:
    """Refuse request bodies above `limit` bytes with 413 and a JSON explanation; the body is
    counted as it arrives, so a missing or false Content-Length does not get around it."""

    def __init__(self, app: ASGIApp, limit: Callable[[], int]) -> None:
        self.app = app
        self.limit = limit  # read per request, so a config reload changes it

    def _too_large(self) -> Response:
        limit = self.limit()
        return _json_error(
            413,
            "request_too_large",
            f"the request body is larger than the gateway accepts ({limit} bytes; "
            "limits.max_body_bytes)",
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limit()
        declared = Headers(scope=scope).get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await self._too_large()(scope, receive, send)
            return
        body = bytearray()
        pending: deque[Message] = deque()
        while True:
            message = await receive()
            if message["type"] != "http.request":
                pending.append(message)
                break
            body.extend(message.get("body", b""))
            if len(body) > limit:
                await self._too_large()(scope, receive, send)
                return
            if not message.get("more_body", False):
                break
        pending.appendleft({"type": "http.request", "body": bytes(body), "more_body": False})

        async def replay() -> Message:
            return pending.popleft() if pending else await receive()

        await self.app(scope, replay, send)


def build_authenticator(config: GatewayConfig) -> Authenticator:
    """The Authenticator of `config`; a bundle file that does not load is a `ConfigError`
    placed on `identity.bundles` in the config file."""
    try:
        return Authenticator(config.identity)
    except BundleError as exc:
        raise ConfigError([config.problem(("identity", "bundles"), str(exc))]) from None
    except JwksError as exc:
        raise ConfigError([config.problem(("identity", "oauth"), str(exc))]) from None


def challenge(error: AuthenticationError, resource_metadata: str | None = None) -> str:
    """The `WWW-Authenticate` value for a 401 (RFC 6750 3), naming the protected resource
    metadata (RFC 9728 5.1) when OAuth issuers are configured."""
    value = f'Bearer realm="{REALM}"'
    if resource_metadata is not None:
        value += f', resource_metadata="{_CHALLENGE_UNSAFE.sub("?", resource_metadata)}"'
    if error.error is None:
        # No credentials at all: RFC 6750 3.1 asks for no error code in the challenge.
        return value
    reason = _CHALLENGE_UNSAFE.sub("?", error.reason)[:MAX_CHALLENGE_REASON]
    return f'{value}, error="{error.error}", error_description="{reason}"'


def refusal(error: AuthenticationError, resource_metadata: str | None = None) -> Response:
    if error.status == 401:
        return _json_error(
            401,
            error.error or "unauthenticated",
            error.reason,
            **{"WWW-Authenticate": challenge(error, resource_metadata)},
        )
    return _json_error(error.status, "forbidden", error.reason)


def _origin(scope: Scope) -> str:
    return request_origin(
        "https" if scope.get("scheme") == "https" else "http",
        Headers(scope=scope).get("host"),
        scope.get("server"),
    )


def _metadata_url(host: HttpHost, scope: Scope) -> str | None:
    identity = host.config.identity
    return metadata_url(identity, _origin(scope)) if identity.oauth else None


def session_user(principal: Principal) -> AuthenticatedUser:
    """What the SDK's session manager compares to bind a session to the caller that opened it
    (`authorization_context`: client id, issuer, subject). The token itself stays out of it."""
    return AuthenticatedUser(
        AccessToken(token="", client_id=principal.id, scopes=[], subject=principal.id)
    )


class McpEndpoint:
    """`/mcp`: authenticate every request, then hand over to the SDK's session manager.
    An ASGI callable instance, so that Starlette's `Route` serves it as an app at `/mcp`
    exactly (a `Mount` would redirect `/mcp` to `/mcp/`).

    The Authenticator is built here, once for the config at start (a bundle that does not
    load stops the start) and once per reloaded identity section, at the first request that
    sees it: the host hands out its current config, and nothing else announces a reload."""

    def __init__(self, host: HttpHost, manager: StreamableHTTPSessionManager) -> None:
        self.host = host
        self.manager = manager
        self._identity: IdentityConfig = host.config.identity
        self._authenticator = build_authenticator(host.config)

    @property
    def authenticator(self) -> CountedAuthenticator:
        config = self.host.config
        if config.identity is not self._identity:
            changed = config.identity != self._identity
            # Tried once per reload, whether it works or not: a broken bundle must not cost a
            # failed load (and a log line) on every request.
            self._identity = config.identity
            if changed:
                try:
                    self._authenticator = build_authenticator(config)
                except ConfigError as exc:
                    log.error(
                        "the reloaded identity settings do not load; authentication keeps the "
                        "previous ones:\n%s",
                        exc,
                    )
        # Counted (metrics) and timed (the call's trace) wherever it is used.
        return CountedAuthenticator(self._authenticator, getattr(self.host, "metrics", None))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            principal = await self.authenticator.authenticate(Headers(scope=scope), peer_of(scope))
        except AuthenticationError as exc:
            client = scope.get("client") or ("?", 0)
            log.info(
                "audit %s status=%d client=%s:%s reason=%s",
                "unauthenticated" if exc.status == 401 else "forbidden",
                exc.status,
                client[0],
                client[1],
                exc.reason,
            )
            await refusal(exc, _metadata_url(self.host, scope))(scope, receive, send)
            return
        if principal.chain:
            # Who acts for whom: the audit trail of a delegated request (identity.authenticate).
            log.info(
                "audit delegated principal=%s tenant=%s chain=%s",
                principal.id,
                principal.tenant,
                ",".join(principal.chain),
            )
        scope[PRINCIPAL_SCOPE_KEY] = principal
        scope[telemetry.AUTH_SCOPE_KEY] = telemetry.last_auth()  # the MCP handler's own task
        if principal.via != VIA_ANONYMOUS:
            scope["user"] = session_user(principal)
        await self.manager.handle_request(scope, receive, send)


class ApprovalsEndpoint:
    """`/approvals` (GET: the calls the caller may approve) and `/approvals/{task_id}` (POST
    `{"approve": bool, "reason": str}`). Callers are authenticated exactly as on `/mcp`; the
    policy decides who may approve what, and anyone else sees no such call."""

    def __init__(self, host: HttpHost, mcp: McpEndpoint, listen_host: str) -> None:
        self.host = host
        self.mcp = mcp
        # The same Host/Origin checks as /mcp: on loopback a web page must not be able to
        # approve calls through DNS rebinding.
        self.security = TransportSecurityMiddleware(transport_security(listen_host))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        request = Request(scope, receive)
        refused = await self.security.validate_request(request, is_post=request.method == "POST")
        if refused is not None:
            await refused(scope, receive, send)
            return
        try:
            approver = await self.mcp.authenticator.authenticate(
                Headers(scope=scope), peer_of(scope)
            )
        except AuthenticationError as exc:
            await refusal(exc, _metadata_url(self.host, scope))(scope, receive, send)
            return
        dispatcher = self.host.dispatcher
        task_id = scope.get("path_params", {}).get("task_id")
        if task_id is None:
            pending = await dispatcher.pending_approvals(approver)
            body = [
                {
                    "task_id": v.task_id,
                    "tool": v.tool,
                    "message": v.message,
                    "created_at": v.created_at.isoformat(),
                }
                for v in pending
            ]
            await JSONResponse({"approvals": body})(scope, receive, send)
            return
        try:
            decision = await request.json()
            approve = decision["approve"]
            if not isinstance(approve, bool):
                raise TypeError("approve must be true or false")
            reason = str(decision.get("reason", ""))
        except (ValueError, KeyError, TypeError) as exc:
            message = f'send {{"approve": true|false, "reason": "..."}} ({exc})'
            await _json_error(400, "bad_request", message)(scope, receive, send)
            return
        try:
            view = await dispatcher.decide(task_id, approver, approve, reason)
        except DispatchError as exc:
            status = 404 if exc.code == "not_found" else 409
            await _json_error(status, exc.code, exc.message)(scope, receive, send)
            return
        answer = {"task_id": view.task_id, "tool": view.tool, "approved": approve}
        await JSONResponse(answer)(scope, receive, send)


class A2AGuard:
    """Authentication for the A2A routes: the same Authenticator and the same Host/Origin
    checks as `/mcp`."""

    def __init__(self, mcp: McpEndpoint, listen_host: str) -> None:
        self.mcp = mcp
        self.security = TransportSecurityMiddleware(transport_security(listen_host))

    async def authenticate(self, request: Request) -> Principal | Response:
        # Host and Origin only: A2A bodies are checked by the SDK (and some POSTs have none).
        refused = await self.security.validate_request(request, is_post=False)
        if refused is not None:
            return refused
        try:
            principal = await self.mcp.authenticator.authenticate(
                Headers(scope=request.scope), peer_of(request.scope)
            )
        except AuthenticationError as exc:
            log.info(
                "audit unauthenticated front_door=a2a status=%d reason=%s", exc.status, exc.reason
            )
            return refusal(exc, _metadata_url(self.mcp.host, request.scope))
        if principal.chain:
            log.info(
                "audit delegated principal=%s tenant=%s chain=%s",
                principal.id,
                principal.tenant,
                ",".join(principal.chain),
            )
        return principal

    async def authenticate_optional(self, request: Request) -> Principal | None:
        """For cards: whoever proves an identity sees its skills; anyone else none."""
        found = await self.authenticate(request)
        return found if isinstance(found, Principal) else None


class TaskInputEndpoint:
    """`/tasks/{task_id}/input` (POST `{"value": <any JSON>}`): the input a waiting call asked
    for (its task shows `input_required`). Callers are authenticated exactly as on `/mcp`; only
    the task's owner may answer, anyone else is told there is no such task."""

    def __init__(self, host: HttpHost, mcp: McpEndpoint, listen_host: str) -> None:
        self.host = host
        self.mcp = mcp
        self.security = TransportSecurityMiddleware(transport_security(listen_host))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        request = Request(scope, receive)
        refused = await self.security.validate_request(request, is_post=True)
        if refused is not None:
            await refused(scope, receive, send)
            return
        try:
            caller = await self.mcp.authenticator.authenticate(Headers(scope=scope), peer_of(scope))
        except AuthenticationError as exc:
            await refusal(exc, _metadata_url(self.host, scope))(scope, receive, send)
            return
        task_id = scope["path_params"]["task_id"]
        try:
            body = await request.json()
            if not isinstance(body, dict) or "value" not in body:
                raise KeyError("value")
        except (ValueError, KeyError) as exc:
            message = f'send {{"value": <the input, any JSON value>}} ({exc})'
            await _json_error(400, "bad_request", message)(scope, receive, send)
            return
        try:
            view = await self.host.dispatcher.supply_input(task_id, caller, body["value"])
        except DispatchError as exc:
            status = 404 if exc.code == "not_found" else 409
            await _json_error(status, exc.code, exc.message)(scope, receive, send)
            return
        answer = {"task_id": view.task_id, "tool": view.tool, "supplied": True}
        await JSONResponse(answer)(scope, receive, send)


def _metrics_routes(host: HttpHost, guard: A2AGuard) -> list[Route]:
    """`/metrics` (gateway/metrics.py), for a host that keeps metrics."""
    if getattr(host, "metrics", None) is None:
        return []

    async def check_origin(request: Request) -> Response | None:
        return await guard.security.validate_request(request, is_post=False)

    endpoint = MetricsEndpoint(host, guard.authenticate, check_origin)  # type: ignore[arg-type]
    return [Route("/metrics", endpoint, methods=["GET"])]


def build_app(host: HttpHost, front: McpFront, listen_host: str) -> Starlette:
    """The ASGI app of one gateway. `front` is the MCP server for this transport."""
    # Each POST answered as JSON, or as an SSE stream when it may get progress or log
    # notifications first (gateway.mcp_transport).
    manager = AdaptiveSessionManager(
        app=front.server,
        json_response=False,
        stateless=False,
        security_settings=transport_security(listen_host),
        # BodyLimit (below) enforces limits.max_body_bytes, which a reload may raise; the
        # manager's own limit must not be the lower one.
        max_request_body_size=1 << 30,
    )
    mcp = McpEndpoint(host, manager)
    approvals = ApprovalsEndpoint(host, mcp, listen_host)
    guard = A2AGuard(mcp, listen_host)

    task_input = TaskInputEndpoint(host, mcp, listen_host)
    # The admin API and the dashboard (gateway.admin_api, gateway.dashboard).
    admin = AdminApi(
        host,
        lambda: mcp.authenticator,
        TransportSecurityMiddleware(transport_security(listen_host)),
        lambda exc, request: refusal(exc, _metadata_url(host, request.scope)),
        is_loopback(listen_host),
    )

    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def resource_metadata(request: Request) -> Response:
        # RFC 9728: served only when OAuth issuers are configured (nothing to sign in with else).
        identity = host.config.identity
        if not identity.oauth:
            return _json_error(404, "not_found", "no OAuth issuers are configured (identity.oauth)")
        return JSONResponse(protected_resource_metadata(identity, _origin(request.scope)))

    async def readyz(request: Request) -> Response:
        if await host.runtime.ready():
            body: dict[str, Any] = {"status": "ready"}
            # Broken policy files do not make the gateway unready (the last good version of
            # each is in force) but an operator must see them.
            problems = getattr(host, "policy_problems", None)
            if problems is not None and (errors := problems()):
                body["policy_errors"] = errors
            return JSONResponse(body)
        return JSONResponse(
            {"status": "not ready", "message": "the workflow engine does not answer"},
            status_code=503,
        )

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with manager.run():
            yield

    app = Starlette(
        routes=[
            Route("/mcp", mcp),
            Route("/approvals", approvals, methods=["GET"]),
            Route("/approvals/{task_id}", approvals, methods=["POST"]),
            Route("/tasks/{task_id}/input", task_input, methods=["POST"]),
            Route("/healthz", healthz, methods=["GET"]),
            Route("/.well-known/oauth-protected-resource/mcp", resource_metadata, methods=["GET"]),
            Route("/.well-known/oauth-protected-resource", resource_metadata, methods=["GET"]),
            Route("/readyz", readyz, methods=["GET"]),
            *a2a_routes(host, guard.authenticate, guard.authenticate_optional, lambda: host.push),
            *_metrics_routes(host, guard),
            *admin.routes(),
            *dashboard_routes(),
        ],
        lifespan=lifespan,
    )
    app.add_middleware(BodyLimit, limit=lambda: host.config.limits.max_body_bytes)
    return app
