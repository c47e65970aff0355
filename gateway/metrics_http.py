"""`GET /metrics` (the numbers are gateway/metrics.py's) and the authenticator wrapper that
counts and times every authentication, for the HTTP app."""

from __future__ import annotations

import ipaddress
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Protocol

from prometheus_client.exposition import CONTENT_TYPE_LATEST
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.types import Receive, Scope, Send

from gateway import telemetry
from gateway.metrics import GatewayMetrics
from identity.authenticate import AuthenticationError, bearer_token
from identity.principal import Principal


class CountedAuthenticator:
    """An Authenticator whose results are counted (by method and outcome) and timed (for the
    call's trace: `telemetry.last_auth()`); everything else is the wrapped one's."""

    def __init__(self, inner: Any, metrics: GatewayMetrics | None) -> None:
        self._inner = inner
        self._metrics = metrics

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    async def authenticate(self, headers: Mapping[str, str], peer: Any = None) -> Principal:
        start = time.time_ns()
        try:
            principal: Principal = await self._inner.authenticate(headers, peer)
        except AuthenticationError as exc:
            method = _claimed_method(headers, peer)
            outcome = "unauthenticated" if exc.status == 401 else "forbidden"
            telemetry.note_auth(telemetry.AuthTiming(start, time.time_ns(), method, outcome))
            if self._metrics is not None:
                self._metrics.authentication(method, outcome)
            raise
        telemetry.note_auth(telemetry.AuthTiming(start, time.time_ns(), principal.via))
        if self._metrics is not None:
            self._metrics.authentication(principal.via, "ok")
        return principal


def _claimed_method(headers: Mapping[str, str], peer: Any) -> str:
    """How a refused caller tried to prove itself (no principal to say it)."""
    if bearer_token(headers) is not None:
        return "bearer"
    if peer is not None and getattr(peer, "der", None) is not None:
        return "x509-svid"
    return "none"


# --- /metrics -------------------------------------------------------------------------------


class MetricsHost(Protocol):
    @property
    def metrics(self) -> GatewayMetrics: ...

    @property
    def config(self) -> Any: ...


Authenticate = Callable[[Request], Awaitable[Principal | Response]]
CheckOrigin = Callable[[Request], Awaitable[Response | None]]


def is_loopback(host: str | None) -> bool:
    try:
        return host is not None and ipaddress.ip_address(host.split("%")[0]).is_loopback
    except ValueError:
        return False


class MetricsEndpoint:
    """`GET /metrics`. Who may read it is `observability.metrics_access`: `loopback` (the
    default: callers on this machine only), `authenticated` (any caller the gateway
    authenticates, anonymous excluded) or `public`. Host and Origin are checked as on `/mcp`
    (a web page must not read it through DNS rebinding)."""

    def __init__(
        self, host: MetricsHost, authenticate: Authenticate, check_origin: CheckOrigin
    ) -> None:
        self.host = host
        self.authenticate = authenticate
        self.check_origin = check_origin

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = await self._answer(Request(scope, receive))
        await response(scope, receive, send)

    async def _answer(self, request: Request) -> Response:
        settings = self.host.config.observability
        if not settings.metrics:
            return _refuse(404, "not_found", "metrics are off (observability.metrics: false)")
        access = settings.metrics_access
        if access == "authenticated":
            found = await self.authenticate(request)
            if isinstance(found, Response):
                return found
            if found.via == "anonymous":
                return _refuse(
                    403, "forbidden", "metrics need an authenticated caller, not an anonymous one"
                )
        else:
            refused = await self.check_origin(request)
            if refused is not None:
                return refused
            client = request.client.host if request.client else None
            if access == "loopback" and not is_loopback(client):
                return _refuse(
                    403,
                    "forbidden",
                    "metrics are served to loopback callers only "
                    "(observability.metrics_access: loopback)",
                )
        body = await self.host.metrics.exposition()
        return Response(body, media_type=CONTENT_TYPE_LATEST)


def _refuse(status: int, error: str, message: str) -> Response:
    return JSONResponse({"error": error, "message": message}, status_code=status)
