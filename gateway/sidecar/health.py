"""daprd's HTTP health endpoints, served by uvicorn inside the sidecar's event loop.

`DaprClient` polls `GET /v1.0/healthz/outbound` before its first call; daprd also serves
`GET /v1.0/healthz`. Both answer 204 when the sidecar is ready and 500 otherwise. Like daprd,
they do not require the API token. `GET /metrics` serves the engine's Prometheus metrics
(gateway/sidecar/metrics.py); it does require the API token when one is set (header
`dapr-api-token`). Nothing else is served over HTTP.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import math
import socket
from collections.abc import Callable, Iterator

import uvicorn
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

logger = logging.getLogger(__name__)

STARTUP_TIMEOUT_SECONDS = 10.0


def create_health_app(
    is_ready: Callable[[], bool],
    metrics: Callable[[], bytes] | None = None,
    token: str = "",
) -> Starlette:
    async def healthz(request: Request) -> Response:
        return Response(status_code=204 if is_ready() else 500)

    async def scrape(request: Request) -> Response:
        assert metrics is not None
        offered = request.headers.get("dapr-api-token", "")
        if token and not hmac.compare_digest(offered.encode(), token.encode()):
            return PlainTextResponse("send the API token in the dapr-api-token header", 401)
        return Response(metrics(), media_type=CONTENT_TYPE_LATEST)

    routes = [
        Route("/v1.0/healthz", healthz, methods=["GET"]),
        Route("/v1.0/healthz/outbound", healthz, methods=["GET"]),
    ]
    if metrics is not None:
        routes.append(Route("/metrics", scrape, methods=["GET"]))
    return Starlette(routes=routes)


class _EmbeddedServer(uvicorn.Server):
    """A uvicorn server that leaves signal handling to the process that embeds it."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        # uvicorn would replace SIGINT/SIGTERM handlers (when on the main thread) and re-raise
        # the signals afterwards; the CLI owns signals and stops the sidecar itself.
        yield


def bind_tcp(address: str) -> socket.socket:
    """A listening-ready TCP socket bound to HOST:PORT (port 0 picks a free one)."""
    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    infos = socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    errors: list[OSError] = []
    for family, kind, proto, _, sockaddr in infos:
        sock = socket.socket(family, kind, proto)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(sockaddr)
        except OSError as exc:
            sock.close()
            errors.append(exc)
            continue
        sock.setblocking(False)
        return sock
    reason = errors[0].strerror if errors else "no address"
    raise OSError(f"cannot listen on {address} for HTTP: {reason}")


class HealthServer:
    """Serves the health app on `listen` until stop()."""

    def __init__(
        self,
        listen: str,
        is_ready: Callable[[], bool],
        *,
        grace: float = 2.0,
        metrics: Callable[[], bytes] | None = None,
        token: str = "",
    ) -> None:
        self._listen = listen
        self._is_ready = is_ready
        self._metrics = metrics
        self._token = token
        self._grace = grace
        self._server: _EmbeddedServer | None = None
        self._task: asyncio.Task[None] | None = None
        self._address: str | None = None

    @property
    def address(self) -> str | None:
        """The bound `host:port`, once started."""
        return self._address

    async def start(self) -> None:
        # getaddrinfo() may block on a resolver: not on the event loop.
        sock = await asyncio.to_thread(bind_tcp, self._listen)
        config = uvicorn.Config(
            create_health_app(self._is_ready, self._metrics, self._token),
            # No log_config: the host application owns logging configuration.
            log_config=None,
            access_log=False,
            lifespan="off",
            ws="none",
            server_header=False,
            timeout_graceful_shutdown=max(1, math.ceil(self._grace)),
        )
        server = _EmbeddedServer(config)
        self._server = server
        self._task = asyncio.create_task(server.serve(sockets=[sock]), name="sidecar-health-http")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + STARTUP_TIMEOUT_SECONDS
        while not server.started:
            if self._task.done():
                sock.close()
                exc = self._task.exception() if not self._task.cancelled() else None
                raise RuntimeError(f"the HTTP health server on {self._listen} failed") from exc
            if loop.time() > deadline:
                await self.stop()
                raise RuntimeError(f"the HTTP health server on {self._listen} did not start")
            await asyncio.sleep(0.01)
        host, port = sock.getsockname()[:2]
        self._address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    async def stop(self) -> None:
        server, task = self._server, self._task
        self._server = self._task = None
        if server is None or task is None:
            return
        server.should_exit = True
        try:
            await asyncio.wait_for(asyncio.shield(task), timeout=self._grace + 1.0)
        except TimeoutError:
            server.force_exit = True
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        except Exception:
            logger.exception("the HTTP health server failed while stopping")
