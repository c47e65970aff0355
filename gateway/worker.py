"""`duragate worker`: the tools of one Dapr app, run in a process of their own.

A tool with `app_id: X` in the config is not loaded by the gateway: its workflow sends the
tool's activity to app X (`call_activity(..., app_id=X)`), and a worker of app X runs it. The
worker can live in its own Python environment (a crew whose dependencies conflict with the
gateway's): it needs only `duragate` and the tool's framework installed.

The worker reads the same config, loads through their adapters only the tools whose `app_id` is
its own, and runs a Dapr `WorkflowRuntime` with the `duragate.tool` activity, connected to the
sidecar's address for its app: `engine.apps[X]` of the embedded sidecar, `duragate sidecar
--app LISTEN=X`, or the daprd of app X. Checkpoints go to the state API of that address, so
they are the worker's own (Dapr keeps each app's keys apart), and survive the worker's restarts.

Progress a tool reports in a worker goes nowhere: the gateway's progress hub lives in the gateway
process. Callers still see the call's state (running, completed, failed) from the workflow.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dapr.ext.workflow as wf
import grpc

import adapters
from adapters.checkpoints import CheckpointStore
from gateway import workflow
from gateway.config import DaprEngineConfig, EmbeddedEngineConfig, GatewayConfig
from gateway.progress import ProgressHub
from gateway.registry import Registry
from gateway.runtime import SDK_LOGS

log = logging.getLogger("duragate.worker")

DEFAULT_CONNECT_TIMEOUT_SECONDS = 30.0


class WorkerError(RuntimeError):
    """The worker cannot run; the message says what to fix."""


@dataclass(frozen=True)
class SidecarAddress:
    """Where a worker of one app reaches its sidecar."""

    grpc: str
    # The HTTP health endpoint `DaprClient` probes before its first call (checkpoints); None
    # when unknown, and then the gRPC address is checked instead.
    http: str | None
    source: str


def _env_address(endpoint_var: str, port_var: str) -> str | None:
    # What daprd hands its app (`dapr run`, the Kubernetes injector).
    endpoint = os.environ.get(endpoint_var)
    if endpoint:
        return endpoint
    port = os.environ.get(port_var)
    return f"127.0.0.1:{port}" if port else None


def resolve_address(
    config: GatewayConfig, app_id: str, address: str | None, http_address: str | None
) -> SidecarAddress:
    """The sidecar address of app `app_id`: `address` when given; otherwise `engine.apps` of
    the embedded engine, or (`engine.kind: dapr`) the address the app's daprd hands it in the
    environment (DAPR_GRPC_ENDPOINT / DAPR_GRPC_PORT)."""
    engine = config.engine
    dapr = isinstance(engine, DaprEngineConfig)
    if http_address is None and dapr:
        http_address = _env_address("DAPR_HTTP_ENDPOINT", "DAPR_HTTP_PORT")
    if address is not None:
        return SidecarAddress(address, http_address, "--address")
    if isinstance(engine, EmbeddedEngineConfig):
        listen = engine.apps.get(app_id)
        if listen is None:
            known = ", ".join(sorted(engine.apps)) or "none"
            raise WorkerError(
                f"engine.apps does not name app {app_id!r} (configured apps: {known}): add it "
                "there, or pass --address HOST:PORT"
            )
        return SidecarAddress(listen, http_address, f"engine.apps.{app_id}")
    from_env = _env_address("DAPR_GRPC_ENDPOINT", "DAPR_GRPC_PORT")
    if from_env is None:
        raise WorkerError(
            f"with engine.kind: dapr, app {app_id!r} has a daprd of its own: pass its gRPC "
            "address with --address HOST:PORT (or run the worker under `dapr run`, which sets "
            "DAPR_GRPC_PORT)"
        )
    return SidecarAddress(from_env, http_address, "DAPR_GRPC_ENDPOINT/DAPR_GRPC_PORT")


def _host_port(address: str) -> tuple[str, str]:
    # unix:///path splits into ("unix", "///path"), which the SDK joins back with ':'.
    host, _, port = address.removeprefix("http://").rpartition(":")
    return host, port


def _http_endpoint(address: str) -> str:
    return address if address.startswith(("http://", "https://")) else f"http://{address}"


async def wait_for_sidecar(address: str, app_id: str, timeout: float) -> None:
    """Return once `address` accepts gRPC connections; `WorkerError` after `timeout` s."""
    target = address.removeprefix("http://")
    async with grpc.aio.insecure_channel(target) as channel:
        try:
            await asyncio.wait_for(channel.channel_ready(), timeout)
        except TimeoutError:
            raise WorkerError(
                f"the sidecar of app {app_id!r} at {address} did not answer within "
                f"{timeout:g} s: start the gateway (or `duragate sidecar`) that serves this "
                "app first, or check the address"
            ) from None


class _Runs:
    """Tool runs in progress, counted from whichever thread the SDK runs activities on."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.count = 0

    def add(self, delta: int) -> None:
        with self._lock:
            self.count += delta


class _Counted:
    """A prepared tool that counts its runs in progress (a stopping worker reports them)."""

    def __init__(self, tool: Any, runs: _Runs) -> None:
        self._tool = tool
        self._runs = runs

    @property
    def spec(self) -> Any:
        return self._tool.spec

    async def invoke(self, arguments: dict[str, Any], context: Any) -> Any:
        self._runs.add(1)
        try:
            return await self._tool.invoke(arguments, context)
        finally:
            self._runs.add(-1)


class ToolWorker:
    """The SDK worker of one app with the `duragate.tool` activity for its tools."""

    def __init__(
        self,
        config: GatewayConfig,
        app_id: str,
        address: SidecarAddress,
        *,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT_SECONDS,
    ) -> None:
        self.config = config
        self.app_id = app_id
        self.address = address
        self.connect_timeout = connect_timeout
        self.registry: Registry | None = None
        self.progress = ProgressHub()  # no one listens here: see the module doc
        self._runtime: wf.WorkflowRuntime | None = None
        self._checkpoints: CheckpointStore | None = None
        self._runs = _Runs()

    @property
    def running(self) -> int:
        """Tool runs in progress: once stopped, they have nowhere to send their results."""
        return self._runs.count

    def _lookup(self, name: str) -> Any:
        tool = self.registry.get(name) if self.registry is not None else None
        return None if tool is None else _Counted(tool, self._runs)

    def load_tools(self) -> Registry:
        """Load this app's tools (ConfigError if one cannot be; WorkerError if none)."""
        registry = Registry.from_config(self.config, app_id=self.app_id)
        if not len(registry):
            raise WorkerError(f"no tool in the config has app_id {self.app_id!r}")
        self.registry = registry
        return registry

    async def start(self) -> None:
        registry = self.registry
        if registry is None:
            registry = await asyncio.to_thread(self.load_tools)
        engine = self.config.engine
        if isinstance(engine, DaprEngineConfig) and os.environ.get(engine.api_token_env):
            from dapr.conf import settings as dapr_settings

            token = os.environ[engine.api_token_env]
            dapr_settings.DAPR_API_TOKEN = token  # type: ignore[attr-defined]
        await wait_for_sidecar(self.address.grpc, self.app_id, self.connect_timeout)
        http = self.address.http
        self._checkpoints = CheckpointStore(
            self.address.grpc,
            http_endpoint=_http_endpoint(http) if http else None,
            probe_http=http is not None,
        )
        host, port = _host_port(self.address.grpc)
        runtime = wf.WorkflowRuntime(host=host, port=port, logger_options=SDK_LOGS)
        # Only the activity: the workflow runs on the gateway's app, and sends here just the
        # activities of this app's tools.
        runtime.register_activity(
            workflow.make_tool_activity(self._lookup, self.progress, self._checkpoints),
            name=workflow.ACTIVITY_NAME,
        )
        try:
            await asyncio.to_thread(runtime.start)
        except Exception as exc:
            await asyncio.to_thread(runtime.shutdown)
            raise WorkerError(
                f"the worker's stream to the sidecar at {self.address.grpc} did not open: {exc}"
            ) from exc
        self._runtime = runtime

    async def stop(self) -> None:
        runtime, self._runtime = self._runtime, None
        if runtime is not None:
            await asyncio.to_thread(runtime.shutdown)
        checkpoints, self._checkpoints = self._checkpoints, None
        if checkpoints is not None:
            await asyncio.to_thread(checkpoints.close)


async def run_worker(
    config: GatewayConfig,
    app_id: str,
    data_dir: Path,
    *,
    address: str | None = None,
    http_address: str | None = None,
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT_SECONDS,
    on_ready: Callable[[ToolWorker], None] | None = None,
) -> None:
    """Serve app `app_id`'s tools until cancelled (SIGTERM: the CLI cancels this task)."""
    resolved = resolve_address(config, app_id, address, http_address)
    adapters.set_data_dir(data_dir)  # before tools load: some keep files there
    worker = ToolWorker(config, app_id, resolved, connect_timeout=connect_timeout)
    registry = await asyncio.to_thread(worker.load_tools)
    log.info(
        "worker of app %s: connecting to %s (from %s) for tools %s",
        app_id,
        resolved.grpc,
        resolved.source,
        ", ".join(registry),
    )
    try:
        await worker.start()
        log.info("worker of app %s is up: serving %d tool(s)", app_id, len(registry))
        if on_ready is not None:
            on_ready(worker)
        await asyncio.Event().wait()
    finally:
        await worker.stop()
        log.info("worker of app %s stopped", app_id)
