"""The gateway assembled: registry, durable runtime, dispatcher, and the front doors.

    gateway = Gateway(config, data_dir)
    await gateway.start()          # all or nothing
    ...                            # gateway.dispatcher, gateway.reload(new_config)
    await gateway.stop()

    await serve(config, data_dir)          # MCP over Streamable HTTP, until cancelled
    await serve_stdio(config, data_dir)    # MCP over stdio, until stdin closes

`serve` leaves SIGINT/SIGTERM to its caller (cancel the task to stop it) and reloads the config
file on SIGHUP: a config that does not load is logged and the running one kept.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

import adapters
from adapters.base import PreparedTool
from gateway import paths, telemetry
from gateway.a2a_agents import check_agents
from gateway.audit import AUDIT_FILE_NAME, AuditLog
from gateway.config import ConfigError, GatewayConfig, load_config
from gateway.delegation import Delegation
from gateway.dispatch import AllowConfiguredTools, Dispatcher, Policy
from gateway.metrics import GatewayMetrics
from gateway.registry import Registry
from gateway.runtime import DurableRuntime
from gateway.state_client import StateClient
from identity.own import OwnIdentity, OwnIdentityError, own_identity
from identity.tls import PEER_KEY, TLS_EXTENSION, ServerTls, peer_from_transport
from policies.budgets import DaprBudgets
from policies.evaluator import PolicyEngine
from policies.limits import Admission
from policies.loader import PolicyStore

if TYPE_CHECKING:  # imported when needed: the engine starts before the front doors load
    from gateway.a2a_push import PushService
    from gateway.mcp_front import LiveSessions

log = logging.getLogger(__name__)

GRACEFUL_SHUTDOWN_SECONDS = 3.0
POLICY_REFRESH_SECONDS = 2.0


@dataclass(frozen=True)
class LoadedPolicies:
    """The policy the dispatcher consults: the tenant policy files of `policy.dir`, or, when
    the config names none, every configured tool for every authenticated caller."""

    engine: Policy
    store: PolicyStore | None


def load_policy(config: GatewayConfig) -> LoadedPolicies:
    """Raises ConfigError when a policy file is broken at start-up: nothing starts."""
    directory = config.policy.dir
    if directory is None:
        return LoadedPolicies(AllowConfiguredTools(), None)
    store = PolicyStore.open(Path(directory), strict=True, cel=config.policy.cel)
    return LoadedPolicies(PolicyEngine(store), store)


def _local_trust_domain() -> str:
    from gateway.stdio import LOCAL_TRUST_DOMAIN

    return LOCAL_TRUST_DOMAIN


class GatewayStartError(RuntimeError):
    """The gateway could not start; nothing it had started is left running."""


class Gateway:
    """One gateway process: its tools, its workflow engine and its dispatch path."""

    def __init__(
        self,
        config: GatewayConfig,
        data_dir: Path,
        *,
        adjust: Callable[[GatewayConfig], GatewayConfig] | None = None,
    ) -> None:
        # Applied to every config loaded from the file on reload, as to the first one: command
        # line settings (`serve --allow-anonymous`) outlive a SIGHUP.
        self._adjust = adjust
        self._config = config
        self.data_dir = data_dir
        self._sessions: LiveSessions | None = None
        self._registry: Registry | None = None
        self._runtime: DurableRuntime | None = None
        self._dispatcher: Dispatcher | None = None
        self._reload_lock = asyncio.Lock()
        self._policy: LoadedPolicies | None = None
        self._policy_refresh: asyncio.Task[None] | None = None
        self._push: PushService | None = None
        self._own: OwnIdentity | None = None
        self._audit: AuditLog | None = None
        self._budgets: DaprBudgets | None = None
        self.metrics = GatewayMetrics()

    @property
    def config(self) -> GatewayConfig:
        return self._config

    @property
    def registry(self) -> Registry:
        if self._registry is None:
            raise RuntimeError("the gateway is not started")
        return self._registry

    @property
    def runtime(self) -> DurableRuntime:
        if self._runtime is None:
            raise RuntimeError("the gateway is not started")
        return self._runtime

    @property
    def dispatcher(self) -> Dispatcher:
        if self._dispatcher is None:
            raise RuntimeError("the gateway is not started")
        return self._dispatcher

    @property
    def sessions(self) -> LiveSessions:
        """The live MCP sessions (told when the tool list changes)."""
        if self._sessions is None:
            from gateway.mcp_front import LiveSessions

            self._sessions = LiveSessions()
        return self._sessions

    @property
    def push(self) -> PushService | None:
        """A2A push notifications (None when the A2A front door is off)."""
        return self._push

    @property
    def policy_store(self) -> PolicyStore | None:
        """The tenant policy files in force (None when `policy.dir` is not set)."""
        return self._policy.store if self._policy is not None else None

    @property
    def audit_target(self) -> Path | str | None:
        """Where the audit log goes: a file, or "-" for stdout (None before the start)."""
        return self._audit.target if self._audit is not None else None

    def _lookup(self, name: str) -> PreparedTool | None:
        # Read through self, so a reloaded registry serves the activities too.
        return self._registry.get(name) if self._registry is not None else None

    async def start(self) -> None:
        """Load every tool, then start the engine. Raises `ConfigError` for a tool that does
        not load (nothing started yet) and `GatewayStartError` if the engine does not start
        (whatever had started is stopped)."""
        # The gateway's own identity first: tools that present it on their outbound calls
        # check for it when they load.
        try:
            self._own = own_identity(self._config, self.data_dir)
            if self._own is not None:
                await self._own.start()
        except OwnIdentityError as exc:
            raise GatewayStartError(f"identity.own: {exc}") from None
        adapters.set_own_identity(self._own)
        try:
            await self._start()
        except BaseException:
            await self._stop_own()
            raise

    async def _stop_own(self) -> None:
        own, self._own = self._own, None
        adapters.set_own_identity(None)
        if own is not None:
            await own.stop()

    async def _start(self) -> None:
        adapters.set_data_dir(self.data_dir)  # before tools load: some keep files there
        try:
            telemetry.setup()  # from OTEL_* (off without them); once per process
        except telemetry.TelemetryConfigError as exc:
            raise GatewayStartError(str(exc)) from None
        registry = await asyncio.to_thread(Registry.from_config, self._config)
        check_agents(self._config, registry)
        policy = await asyncio.to_thread(load_policy, self._config)
        try:
            paths.ensure_data_dir(self.data_dir)
        except paths.DataDirError as exc:
            raise GatewayStartError(str(exc)) from None
        audit_target = self._config.audit.path or self.data_dir / AUDIT_FILE_NAME
        try:
            audit = await asyncio.to_thread(
                AuditLog.open, audit_target, max_pending=self._config.audit.max_pending
            )
        except OSError as exc:
            raise GatewayStartError(f"cannot open the audit log {audit_target}: {exc}") from None
        runtime = DurableRuntime(
            self._config.engine,
            paths.engine_db_path(self.data_dir),
            self._lookup,
            observer=self.metrics,
        )
        # Agent tools call other tools through the dispatcher, once it exists (below).
        runtime.delegation = Delegation(
            asyncio.get_running_loop(),
            lambda: self._dispatcher,
            self._config.identity.trust_domain or _local_trust_domain(),
        )
        self._registry = registry
        try:
            await runtime.start()  # stops what it started if it fails
        except Exception as exc:
            self._registry = None
            await asyncio.to_thread(audit.close)
            kind = self._config.engine.kind
            raise GatewayStartError(f"the workflow engine ({kind}) did not start: {exc}") from exc
        self._runtime = runtime
        # Budgets are counted in the engine's state store, so they survive restarts.
        self._budgets = DaprBudgets(runtime.address)
        runtime.budgets = self._budgets  # the workflow charges token budgets with it
        self._dispatcher = Dispatcher(
            registry,
            runtime,
            policy=policy.engine,
            audit=audit,
            admission=Admission(budgets=self._budgets),
            metrics=self.metrics,
        )
        self._watch(policy, audit, runtime)
        self._audit = audit
        self._policy = policy
        if policy.store is not None:
            self._policy_refresh = asyncio.create_task(self._refresh_policies(policy.store))
        if self._config.a2a.enabled:
            state = StateClient(runtime.address, runtime.metadata)
            from gateway.a2a_push import PushService

            self._push = PushService(lambda: self.dispatcher, state, lambda: self.config.a2a.push)
            # Tasks whose final state was not pushed yet (the gateway was down): push it now.
            await self._push.resume()
        log.info("gateway started: %d tool(s), data in %s", len(registry), self.data_dir)

    def _watch(self, policy: LoadedPolicies, audit: AuditLog, runtime: DurableRuntime) -> None:
        """What the metrics read from the parts of a started gateway."""
        store = policy.store
        if store is not None:  # tenant labels: the tenants that have a policy file
            self.metrics.tenant.allowed = lambda tenant: store.get(tenant) is not None
        self.metrics.watch_audit(lambda: audit.dropped)
        embedded = self._config.engine.kind != "dapr"  # daprd's metrics are scraped on their own
        self.metrics.engine_address = lambda: runtime.http_address if embedded else None

    async def _refresh_policies(self, store: PolicyStore) -> None:
        # A changed file is validated before it replaces the one in force; a broken one keeps
        # the last good version (its error shows in /readyz and the log).
        while True:
            await asyncio.sleep(POLICY_REFRESH_SECONDS)
            try:
                await asyncio.to_thread(store.refresh)
            except Exception:  # noqa: BLE001 - keep refreshing; the store keeps what it had
                log.exception("policy refresh failed")

    def policy_problems(self) -> list[str]:
        store = self._policy.store if self._policy is not None else None
        return store.problems() if store is not None else []

    async def stop(self) -> None:
        refresh, self._policy_refresh = self._policy_refresh, None
        if refresh is not None:
            refresh.cancel()
        push, self._push = self._push, None
        if push is not None:
            await push.close()
        runtime, self._runtime = self._runtime, None
        self._dispatcher = None
        budgets, self._budgets = self._budgets, None
        if budgets is not None:
            if runtime is not None:
                runtime.budgets = None  # a charge now waits (retried) for the next start
            await asyncio.to_thread(budgets.close)
        if runtime is not None:
            await runtime.stop()
        audit, self._audit = self._audit, None
        if audit is not None:
            await asyncio.to_thread(audit.close)  # what is pending is written first
        await self._stop_own()
        await asyncio.to_thread(telemetry.flush)

    async def reload(self, config: GatewayConfig) -> None:
        """Swap in the tools (and limits, identity settings) of `config` and tell every live
        MCP session that the tool list changed. Raises (keeping the running config) if a tool
        does not load. Listen address, engine and data directory need a restart."""
        async with self._reload_lock:
            registry = await asyncio.to_thread(Registry.from_config, config)
            check_agents(config, registry)
            # A broken trust bundle refuses the whole reload, as a broken tool does.
            from gateway.http_app import build_authenticator

            await asyncio.to_thread(build_authenticator, config)
            old = self._config
            for key in ("listen", "engine", "data_dir", "policy", "audit"):
                if getattr(old, key) != getattr(config, key):
                    log.warning("config reload: %r changed; it takes effect at restart", key)
            self._config = config
            self._registry = registry
            if self._dispatcher is not None:
                self._dispatcher.registry = registry
            sent = await self.sessions.notify_tools_changed()
            log.info("config reloaded: %d tool(s); %d session(s) notified", len(registry), sent)

    async def reload_file(self, path: Path) -> bool:
        """Reload from `path`; a config that does not load is logged and the running one kept."""
        try:
            config = await asyncio.to_thread(load_config, path)
            if self._adjust is not None:
                config = self._adjust(config)
            await self.reload(config)
        except ConfigError as exc:
            log.error("config reload failed; keeping the running config:\n%s", exc)
            return False
        except Exception:
            log.exception("config reload failed; keeping the running config")
            return False
        return True


@contextlib.contextmanager
def _reload_on_sighup(gateway: Gateway, config: GatewayConfig) -> Iterator[None]:
    source = config.source
    if source is None:
        yield
        return
    loop = asyncio.get_running_loop()
    pending: set[asyncio.Task[bool]] = set()

    def on_sighup() -> None:
        log.info("SIGHUP: reloading %s", source)
        task = loop.create_task(gateway.reload_file(Path(source)))
        pending.add(task)
        task.add_done_callback(pending.discard)

    try:
        loop.add_signal_handler(signal.SIGHUP, on_sighup)
    except (NotImplementedError, RuntimeError):  # not the main thread, or no signals
        yield
        return
    try:
        yield
    finally:
        loop.remove_signal_handler(signal.SIGHUP)


def _listen(host: str, port: int) -> socket.socket:
    """Bind before anything starts, so a busy port fails fast and clearly.

    The socket is made with protocol IPPROTO_TCP: asyncio turns Nagle's algorithm off
    (TCP_NODELAY) only on connections whose socket says so, and a response written in two
    parts (headers, then body) would otherwise wait for the client's delayed ACK, 40 ms."""
    family = socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        # What socket.create_server does: reuse a port in TIME_WAIT; IPv6 only on IPv6.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((host.strip("[]"), port))
        sock.listen()
    except OSError as exc:
        sock.close()
        raise GatewayStartError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from exc
    sock.setblocking(False)
    return sock


class _Uvicorn(uvicorn.Server):
    """uvicorn without its own signal handling: the caller owns SIGINT/SIGTERM and stops
    `serve` by cancelling it."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def _with_peer(app: Any, tls: dict[str, Any]) -> Any:
    async def with_peer(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            scope["extensions"] = {**(scope.get("extensions") or {}), TLS_EXTENSION: tls}
        await app(scope, receive, send)

    return with_peer


class _PeerHttpMixin:
    """Reads the TLS peer once per connection (asyncio has finished the handshake before
    `connection_made`) and adds it to every request's `scope["extensions"]["tls"]`: uvicorn
    itself never hands the client certificate to the app. The app is wrapped per connection
    because h11 builds each request's scope inline, with no hook to extend it."""

    app: Any

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)  # type: ignore[misc]
        self.app = _with_peer(self.app, {PEER_KEY: peer_from_transport(transport)})


class _PeerH11Protocol(_PeerHttpMixin, H11Protocol):
    pass


def _peer_protocol() -> type[asyncio.Protocol]:
    # The protocol uvicorn's "auto" would pick: httptools when installed, else h11.
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    except ImportError:
        return _PeerH11Protocol

    class _PeerHttpToolsProtocol(_PeerHttpMixin, HttpToolsProtocol):
        pass

    return _PeerHttpToolsProtocol


async def serve(
    config: GatewayConfig,
    data_dir: Path,
    host: str | None = None,
    port: int | None = None,
    *,
    on_ready: Callable[[str], Any] | None = None,
    adjust: Callable[[GatewayConfig], GatewayConfig] | None = None,
) -> None:
    """Run the gateway with MCP over Streamable HTTP until cancelled. `on_ready(url)` is called
    with the MCP endpoint's URL once it accepts requests (useful with port 0). `adjust` is
    applied to a config reloaded from the file (command line settings; `config` has them)."""
    host = host or config.listen.host
    port = config.listen.port if port is None else port
    # Before binding: TLS files that do not load stop the start, named in the config file.
    tls = ServerTls.from_config(config)
    sock = _listen(host, port)
    gateway = Gateway(config, data_dir, adjust=adjust)
    try:
        await gateway.start()
    except BaseException:
        sock.close()
        raise
    try:
        # The front doors load now, after the engine and its worker have started: after a
        # crash, calls in flight resume while these imports are still running.
        from gateway.http_app import build_app
        from gateway.mcp_front import McpFront

        front = McpFront(gateway, gateway.sessions, front_door="mcp-http")
        app = build_app(gateway, front, host)
        tls_settings: dict[str, Any] = {}
        if tls is not None:
            context = tls.context
            tls_settings = {
                "ssl_context_factory": lambda *_: context,
                "http": _peer_protocol(),
            }
        server = _Uvicorn(
            uvicorn.Config(
                app,
                lifespan="on",
                log_config=None,
                access_log=False,
                timeout_graceful_shutdown=int(GRACEFUL_SHUTDOWN_SECONDS),
                **tls_settings,
            )
        )
        bound_port = sock.getsockname()[1]
        shown = f"[{host}]" if ":" in host else host
        scheme = "https" if tls is not None else "http"
        url = f"{scheme}://{shown}:{bound_port}/mcp"
        with _reload_on_sighup(gateway, config):
            task = asyncio.ensure_future(server.serve(sockets=[sock]))
            try:
                while not server.started and not task.done():
                    await asyncio.sleep(0.02)
                if server.started:
                    log.info("Duragate MCP endpoint: %s", url)
                    if on_ready is not None:
                        on_ready(url)
                await asyncio.shield(task)
            except asyncio.CancelledError:
                server.should_exit = True
                with contextlib.suppress(asyncio.CancelledError):
                    await task
                raise
    finally:
        sock.close()
        await gateway.stop()


async def serve_stdio(config: GatewayConfig, data_dir: Path) -> None:
    """Run the gateway with MCP over stdio until stdin closes (or until cancelled)."""
    from gateway.stdio import local_principal, protocol_stdout, run_stdio

    with protocol_stdout() as out:
        gateway = Gateway(config, data_dir)
        await gateway.start()
        try:
            from gateway.mcp_front import McpFront

            front = McpFront(
                gateway,
                gateway.sessions,
                front_door="mcp-stdio",
                default_principal=local_principal(config.identity),
            )
            with _reload_on_sighup(gateway, config):
                await run_stdio(front, out)
        finally:
            await gateway.stop()
