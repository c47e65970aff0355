"""The embedded sidecar: daprd's workflow and state gRPC APIs plus its HTTP health endpoints.

`Sidecar` runs inside an asyncio loop (`run_sidecar()` is what `duragate sidecar` runs);
`SidecarThread` runs one in a background thread for in-process use (the gateway, tests,
benchmarks). `python -m gateway.sidecar.server --db PATH` runs one as a process.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fcntl
import hmac
import json
import logging
import os
import signal
import socket
import stat
import sys
import threading
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import grpc
from pydantic import SecretStr

from .engine import Engine
from .health import HealthServer
from .metrics import EngineMetrics
from .protos import runtime_grpc, workflow_grpc
from .settings import MiB, SidecarSettings
from .state_service import StateServicer
from .state_store import StateStore
from .strict_parsing import add_servicer
from .workflow_service import WorkflowServicer

logger = logging.getLogger(__name__)

API_TOKEN_METADATA = "dapr-api-token"
# Room for keys, metadata and protobuf framing around a payload of max_payload_bytes.
MESSAGE_HEADROOM_BYTES = 1 * MiB
THREAD_START_TIMEOUT_SECONDS = 60.0


class SidecarError(RuntimeError):
    """The sidecar cannot start: its database is in use, its address is taken, ..."""


def grpc_server_options(settings: SidecarSettings) -> list[tuple[str, Any]]:
    limit = settings.max_payload_bytes + MESSAGE_HEADROOM_BYTES
    return [
        ("grpc.max_receive_message_length", limit),
        ("grpc.max_send_message_length", limit),
        # gRPC sets SO_REUSEPORT by default, which would let a second sidecar bind the same
        # port silently; refuse instead.
        ("grpc.so_reuseport", 0),
        # Workers hold GetWorkItems streams open for hours: ping idle clients to find dead ones.
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 1),
        # The SDK's channels ping every 30 s, even without calls (keepalive_permit_without_calls):
        # accept that rather than answer with GOAWAY "too_many_pings".
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        ("grpc.http2.max_ping_strikes", 0),
    ]


class ApiTokenInterceptor(grpc.aio.ServerInterceptor):
    """Requires metadata `dapr-api-token` equal to the configured token, as daprd does."""

    def __init__(self, token: str) -> None:
        self._token = token.encode()

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        presented = [
            value
            for key, value in (handler_call_details.invocation_metadata or ())
            if key == API_TOKEN_METADATA
        ]
        if not presented:
            return _rejecting_handler(handler, "missing api token in request metadata")
        token = presented[0]
        token_bytes = token.encode() if isinstance(token, str) else bytes(token)
        if not hmac.compare_digest(token_bytes, self._token):
            # Never echo the presented or the expected token.
            return _rejecting_handler(handler, "authentication error: api token mismatch")
        return handler


def _rejecting_handler(handler: grpc.RpcMethodHandler, message: str) -> grpc.RpcMethodHandler:
    """A handler of the same shape as `handler` that answers UNAUTHENTICATED."""
    detail = f"{message} ({API_TOKEN_METADATA})"

    async def reject(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, detail)

    # No request deserializer: an unauthenticated request is never parsed.
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(reject)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(reject)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(reject)
    return grpc.unary_unary_rpc_method_handler(reject)


class _DbLock:
    """An exclusive flock on `<db>.lock`, so that two sidecars never open the same database.

    flock() locks belong to the open file, so this also excludes a second sidecar in the same
    process; the kernel releases it when the process dies, even by SIGKILL.
    """

    def __init__(self, db_path: Path) -> None:
        self.db_path = db_path
        self.path = db_path.with_name(db_path.name + ".lock")
        self._fd: int | None = None

    def acquire(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
            os.close(fd)
            who = f" (pid {holder})" if holder.isdigit() else ""
            raise SidecarError(
                f"the database {self.db_path} is already in use by another sidecar{who};"
                f" lock file {self.path}"
            ) from None
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            # Closing the file releases the lock. The file stays: removing it would race with a
            # sidecar that has opened it and is about to lock it.
            os.close(self._fd)
            self._fd = None


def _clear_stale_unix_socket(path: str) -> None:
    """Remove a socket file left by a sidecar that died; refuse one that is still served."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise SidecarError(f"cannot listen on unix socket {path}: the file exists and is no socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        logger.info("removed the stale unix socket %s", path)
        return
    except OSError as exc:
        raise SidecarError(f"cannot listen on unix socket {path}: {exc}") from exc
    finally:
        probe.close()
    raise SidecarError(f"cannot listen on unix socket {path}: another process is serving it")


class Sidecar:
    """The embedded Dapr-compatible sidecar. start() and stop() run in the serving loop."""

    def __init__(self, settings: SidecarSettings) -> None:
        self.settings = settings
        self._lock = _DbLock(Path(settings.db_path))
        self._engine: Engine | None = None
        self._store: StateStore | None = None
        self._servers: list[grpc.aio.Server] = []
        self._health: HealthServer | None = None
        self._grpc_address: str | None = None
        self._app_addresses: dict[str, str] = {}
        self._ready = False

    @property
    def ready(self) -> bool:
        return self._ready

    @property
    def grpc_address(self) -> str:
        """The bound gRPC address: `host:port` (the real port when 0 was asked) or `unix://...`."""
        if self._grpc_address is None:
            raise RuntimeError("the sidecar is not started")
        return self._grpc_address

    @property
    def app_addresses(self) -> dict[str, str]:
        """The bound gRPC address of every app served, the sidecar's own app first."""
        if not self._app_addresses:
            raise RuntimeError("the sidecar is not started")
        return dict(self._app_addresses)

    @property
    def http_address(self) -> str | None:
        """The bound `host:port` of the HTTP health endpoints, or None without them."""
        return self._health.address if self._health is not None else None

    @property
    def engine(self) -> Engine | None:
        return self._engine

    async def start(self) -> None:
        settings = self.settings
        token = settings.api_token.get_secret_value() if settings.api_token else ""
        if settings.require_token() and not token:
            listeners = ", ".join(filter(None, [settings.grpc_listen, settings.http_listen]))
            raise ValueError(
                f"the sidecar would listen on a non-loopback address ({listeners}) without an"
                " API token: set api_token (DAPR_API_TOKEN), or listen on loopback or a unix"
                " socket"
            )
        if self._servers:
            raise RuntimeError("the sidecar is already started")
        db_path = Path(settings.db_path)
        db_path.parent.mkdir(parents=True, exist_ok=True)
        self._lock.acquire()
        try:
            await self._start_components(token)
        except BaseException:
            await self._shutdown(grace=0)
            raise
        self._ready = True
        logger.info(
            "sidecar serving: gRPC on %s, HTTP health on %s, database %s, API token %s",
            ", ".join(f"{addr} (app {app})" for app, addr in self._app_addresses.items()),
            self.http_address or "(off)",
            db_path,
            "required" if token else "not required",
        )

    async def _start_components(self, token: str) -> None:
        settings = self.settings
        self._engine = Engine(settings)
        await self._engine.start()
        self._store = StateStore(Path(settings.db_path), synchronous=settings.synchronous)
        await self._store.open()

        # One gRPC server per app: the address a worker connects to is the app it serves,
        # as each daprd serves one app. The state API keeps each app's keys apart.
        for app, listen in settings.app_listeners().items():
            interceptors = [ApiTokenInterceptor(token)] if token else []
            server = grpc.aio.server(
                interceptors=interceptors, options=grpc_server_options(settings)
            )
            add_servicer(
                server,
                workflow_grpc.add_TaskHubSidecarServiceServicer_to_server,
                WorkflowServicer(self._engine, app),
            )
            app_settings = settings.model_copy(update={"app_id": app})
            add_servicer(
                server,
                runtime_grpc.add_DaprServicer_to_server,
                StateServicer(self._store, app_settings),
            )
            self._servers.append(server)
            self._app_addresses[app] = await self._bind(server, listen)
            await server.start()
        self._grpc_address = self._app_addresses[settings.app_id]

        if settings.http_listen:
            metrics = EngineMetrics(lambda: self._engine)
            metrics.attach(self._engine)
            health = HealthServer(
                settings.http_listen,
                lambda: self._ready,
                metrics=metrics.exposition,
                token=token,
            )
            self._health = health
            try:
                await health.start()
            except OSError as exc:
                raise SidecarError(str(exc)) from exc

    @staticmethod
    async def _bind(server: grpc.aio.Server, listen: str) -> str:
        if listen.startswith("unix://"):
            path = listen[len("unix://") :]
            await asyncio.to_thread(_clear_stale_unix_socket, path)
            try:
                server.add_insecure_port(listen)
            except RuntimeError as exc:
                raise SidecarError(f"cannot listen on {listen} for gRPC: {exc}") from exc
            return listen
        host, _, _ = listen.rpartition(":")
        try:
            port = server.add_insecure_port(listen)
        except RuntimeError as exc:
            raise SidecarError(
                f"cannot listen on {listen} for gRPC: the address is in use or not available"
            ) from exc
        return f"{host}:{port}"

    async def stop(self, grace: float = 2.0) -> None:
        """Stop serving (in-flight calls get `grace` seconds), then close everything."""
        await self._shutdown(grace)
        logger.info("sidecar stopped")

    async def _shutdown(self, grace: float) -> None:
        self._ready = False  # the health endpoints answer 500 from now on
        servers, health, engine, store = self._servers, self._health, self._engine, self._store
        self._servers = []
        self._health = self._engine = self._store = None
        if engine is not None:
            engine.close_streams()  # workers' streams end now instead of after the grace period

        async def stop_servers() -> None:
            await asyncio.gather(*(s.stop(grace) for s in servers))

        steps: list[tuple[str, Callable[[], Awaitable[None]] | None]] = [
            ("gRPC servers", stop_servers if servers else None),
            ("workflow engine", engine.stop if engine is not None else None),
            ("state store", store.close if store is not None else None),
            ("HTTP health server", health.stop if health is not None else None),
        ]
        first_error: BaseException | None = None
        try:
            # Every part gets its chance to close, even when an earlier one fails.
            for name, step in steps:
                if step is None:
                    continue
                try:
                    await step()
                except Exception as exc:
                    logger.exception("stopping the %s failed", name)
                    first_error = first_error or exc
        finally:
            self._lock.release()
        if first_error is not None:
            raise first_error


async def run_sidecar(settings: SidecarSettings) -> None:
    """Serve until cancelled, then stop cleanly. The CLI runs this under asyncio.run()."""
    sidecar = Sidecar(settings)
    await sidecar.start()
    try:
        await asyncio.Event().wait()
    finally:
        await sidecar.stop()


class SidecarThread:
    """A Sidecar served by its own event loop in a background thread.

    >>> with SidecarThread(settings) as sidecar:
    ...     os.environ["DAPR_GRPC_ENDPOINT"] = sidecar.grpc_address
    """

    def __init__(self, settings: SidecarSettings, *, grace: float = 2.0) -> None:
        self.settings = settings
        self.grace = grace
        self.sidecar: Sidecar | None = None
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop_requested: asyncio.Event | None = None
        self._started = threading.Event()
        self._start_error: BaseException | None = None
        self._stop_wanted = False

    @property
    def grpc_address(self) -> str:
        if self.sidecar is None:
            raise RuntimeError("the sidecar thread is not started")
        return self.sidecar.grpc_address

    @property
    def http_address(self) -> str | None:
        return self.sidecar.http_address if self.sidecar is not None else None

    def start(self) -> SidecarThread:
        """Return once the sidecar serves; re-raise what made it fail to start."""
        if self._thread is not None:
            raise RuntimeError("a SidecarThread can be started once")
        self._thread = threading.Thread(target=self._run, name="duragate-sidecar", daemon=True)
        self._thread.start()
        if not self._started.wait(THREAD_START_TIMEOUT_SECONDS):
            # Ask it to stop as soon as it has started; do not wait for a start that hangs.
            self._request_stop()
            raise SidecarError("the sidecar did not start in time")
        if self._start_error is not None:
            self._thread.join()
            raise self._start_error
        return self

    def stop(self) -> None:
        """Stop the sidecar (in-flight calls get `grace` seconds) and join the thread."""
        thread = self._thread
        if thread is None or not thread.is_alive():
            return
        self._request_stop()
        thread.join()

    def _request_stop(self) -> None:
        self._stop_wanted = True
        loop, event = self._loop, self._stop_requested
        if loop is not None and event is not None:
            with contextlib.suppress(RuntimeError):  # the loop has just closed
                loop.call_soon_threadsafe(event.set)

    def __enter__(self) -> SidecarThread:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as exc:  # the loop itself failed
            if not self._started.is_set():
                self._start_error = exc
                self._started.set()
            else:
                logger.exception("the sidecar thread failed")

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop_requested = asyncio.Event()
        sidecar = Sidecar(self.settings)
        try:
            await sidecar.start()
        except BaseException as exc:
            self._start_error = exc
            self._started.set()
            return
        self.sidecar = sidecar
        self._started.set()
        if self._stop_wanted:  # stop() came while the loop was not yet there
            self._stop_requested.set()
        try:
            await self._stop_requested.wait()
        finally:
            await sidecar.stop(self.grace)


# -- python -m gateway.sidecar.server ---------------------------------------------------------

READY_MARKER = "DURAGATE_SIDECAR_READY"


def _app_pair(value: str) -> tuple[str, str]:
    """`LISTEN=APP_ID` -> (app id, listen address)."""
    listen, sep, app = value.rpartition("=")
    if not sep or not listen or not app:
        raise argparse.ArgumentTypeError(f"{value!r} is not LISTEN=APP_ID")
    return app, listen


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m gateway.sidecar.server",
        description="Run the embedded Dapr-compatible sidecar. The API token, if any, is read"
        " from the DAPR_API_TOKEN environment variable (as daprd does).",
    )
    parser.add_argument("--db", required=True, type=Path, help="SQLite database file")
    parser.add_argument(
        "--listen", default="127.0.0.1:50001", help="gRPC HOST:PORT or unix:///path"
    )
    parser.add_argument(
        "--http-listen", default="127.0.0.1:3500", help="health HOST:PORT, or 'none'"
    )
    parser.add_argument("--app-id", default="duragate", help="the app id of --listen")
    parser.add_argument(
        "--app",
        action="append",
        default=[],
        metavar="LISTEN=APP_ID",
        type=_app_pair,
        help="also serve the Dapr app APP_ID on its own gRPC address LISTEN (HOST:PORT or"
        " unix:///path); workers of that app connect there. Repeatable.",
    )
    parser.add_argument("--state-store", default="statestore")
    parser.add_argument(
        "--extra-state-store",
        action="append",
        default=[],
        metavar="NAME",
        help="also serve the state store component NAME (a key space of its own; listed by"
        " the metadata API). Repeatable.",
    )
    parser.add_argument("--max-payload-bytes", type=int, default=4 * MiB)
    parser.add_argument("--synchronous", choices=["FULL", "NORMAL"], default="FULL")
    parser.add_argument(
        "--no-stateful-history",
        action="store_true",
        help="always send workers the whole history, even those that cache it",
    )
    parser.add_argument(
        "--exit-with-parent",
        action="store_true",
        help="stop when stdin closes (for a sidecar started by a gateway process)",
    )
    parser.add_argument("--log-level", default="INFO")
    return parser.parse_args(argv)


def _watch_parent(loop: asyncio.AbstractEventLoop, stop: asyncio.Event) -> None:
    """Stop when stdin reaches EOF: the parent that holds its other end has exited, even by
    SIGKILL, so an embedded sidecar never outlives its gateway."""
    # os.read on the descriptor, not sys.stdin: a daemon thread blocked inside the buffered
    # reader holds its lock, which the interpreter then cannot take while it shuts down.
    try:
        while os.read(0, 4096):
            pass
    except OSError:
        pass
    loop.call_soon_threadsafe(stop.set)


async def _serve_main(settings: SidecarSettings, exit_with_parent: bool = False) -> None:
    sidecar = Sidecar(settings)
    await sidecar.start()
    # One line on stdout tells a parent process the bound addresses (port 0 picks them).
    ready = {
        "grpc_address": sidecar.grpc_address,
        "http_address": sidecar.http_address,
        "apps": sidecar.app_addresses,
        "pid": os.getpid(),
    }
    print(f"{READY_MARKER} {json.dumps(ready)}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    if exit_with_parent:
        threading.Thread(
            target=_watch_parent, args=(loop, stop), name="parent-watch", daemon=True
        ).start()
    try:
        await stop.wait()
    finally:
        await sidecar.stop()


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    token = os.environ.get("DAPR_API_TOKEN")
    settings = SidecarSettings(
        db_path=args.db,
        grpc_listen=args.listen,
        http_listen=None if args.http_listen.lower() == "none" else args.http_listen,
        api_token=SecretStr(token) if token else None,
        app_id=args.app_id,
        apps=dict(args.app),
        state_store_name=args.state_store,
        state_stores=args.extra_state_store,
        max_payload_bytes=args.max_payload_bytes,
        synchronous=args.synchronous,
        stateful_history=not args.no_stateful_history,
    )
    try:
        asyncio.run(_serve_main(settings, args.exit_with_parent))
    except (SidecarError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
