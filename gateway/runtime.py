"""The gateway's connection to its workflow engine.

With `engine.kind: embedded` the gateway starts the embedded sidecar on loopback. By default
(`engine.sidecar: inprocess`) it runs on the gateway's own event loop: the gateway's worker
(`gateway.sidecar.inprocess.InProcessWorker`, the Dapr SDK's executors) and its workflow client
(the SDK's aio `DaprWorkflowClient` over an in-process channel) reach it without gRPC, which
costs a fraction of the CPU per call; other processes reach it over its gRPC listener. With
`process` it is a child process that stops when the gateway exits, even by SIGKILL; with
`thread`, a thread of the gateway. With `engine.kind: dapr` it uses the configured daprd. In
those three cases the gateway runs the Dapr SDK's own worker and client over gRPC.
Either way Duragate's workflow and activities are registered on a `WorkflowRuntime`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import dapr.ext.workflow as wf
import grpc
from dapr.ext.workflow.aio import DaprWorkflowClient
from dapr.ext.workflow.logger import LoggerOptions

from adapters.checkpoints import CheckpointStore
from gateway import workflow
from gateway.progress import ProgressHub
from gateway.sidecar import inprocess
from gateway.sidecar.protos import workflow_grpc
from gateway.sidecar.server import READY_MARKER, Sidecar, SidecarError, SidecarThread
from gateway.sidecar.settings import SidecarSettings
from gateway.sidecar.workflow_service import WorkflowServicer

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[1]
START_TIMEOUT_SECONDS = 30.0
# A sidecar of a gateway that was just killed may still be closing its database.
LOCKED_RETRY_SECONDS = 15.0
SDK_LOGS = LoggerOptions(log_level="WARNING")
T = TypeVar("T")


def _http_endpoint(address: str) -> str:
    return (
        address.rstrip("/") if address.startswith(("http://", "https://")) else f"http://{address}"
    )


class EngineStartError(RuntimeError):
    pass


async def _retry_while_locked(start: Callable[[], Awaitable[T]]) -> T:
    """`start()`, again while the engine database is held by a sidecar that is closing (that
    of a gateway that was just stopped or killed), for at most LOCKED_RETRY_SECONDS."""
    deadline = time.monotonic() + LOCKED_RETRY_SECONDS
    while True:
        try:
            return await start()
        except (EngineStartError, SidecarError) as exc:
            if "in use" not in str(exc) or time.monotonic() > deadline:
                raise EngineStartError(str(exc)) from None
            log.info("the engine database is still held by a closing sidecar; retrying")
            await asyncio.sleep(0.2)


class SidecarProcess:
    """The embedded sidecar as a child process (`python -m gateway.sidecar.server`).

    Its stdin is a pipe from this process: when this process exits for any reason the pipe
    closes and the sidecar shuts down cleanly (`--exit-with-parent`)."""

    def __init__(
        self,
        db_path: Path,
        synchronous: str,
        apps: dict[str, str] | None = None,
        http_listen: str | None = None,
        state_stores: list[str] | None = None,
    ) -> None:
        self.db_path = db_path
        self.synchronous = synchronous
        self.apps = apps or {}
        self.http_listen = http_listen or "127.0.0.1:0"
        self.state_stores = state_stores or []
        self._proc: asyncio.subprocess.Process | None = None
        self.address = ""
        self.http_address: str | None = None

    async def start(self) -> str:
        return await _retry_while_locked(self._start_once)

    async def _start_once(self) -> str:
        level = logging.getLevelName(logging.getLogger().getEffectiveLevel())
        cmd = [sys.executable, "-m", "gateway.sidecar.server", "--db", str(self.db_path)]
        # The HTTP listener serves only the health probe that `DaprClient` (checkpoints, apps of
        # engine.apps) waits on.
        cmd += ["--listen", "127.0.0.1:0", "--http-listen", self.http_listen]
        cmd += ["--synchronous", self.synchronous, "--exit-with-parent", "--log-level", level]
        for app, listen in self.apps.items():
            cmd += ["--app", f"{listen}={app}"]
        for name in self.state_stores:
            cmd += ["--extra-state-store", name]
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
        proc = await asyncio.create_subprocess_exec(
            *cmd,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=env,
            # Its own session: a Ctrl-C meant for the gateway must not stop the sidecar under
            # it; it stops when the gateway closes its stdin, after the worker has stopped.
            start_new_session=True,
        )
        assert proc.stdout is not None and proc.stderr is not None
        errors: list[str] = []

        async def relay() -> None:
            # The sidecar logs to stderr: pass it on, keeping the last lines for errors.
            assert proc.stderr is not None
            async for raw in proc.stderr:
                line = raw.decode(errors="replace").rstrip()
                errors.append(line)
                del errors[:-20]
                sys.stderr.write(line + "\n")

        relay_task = asyncio.create_task(relay())
        try:
            async with asyncio.timeout(START_TIMEOUT_SECONDS):
                async for raw in proc.stdout:
                    line = raw.decode(errors="replace")
                    if line.startswith(READY_MARKER):
                        ready = json.loads(line[len(READY_MARKER) :])
                        self.address = ready["grpc_address"]
                        self.http_address = ready.get("http_address")
                        self._proc = proc
                        self._relay = relay_task
                        return self.address
        except TimeoutError:
            proc.kill()
            raise EngineStartError(
                f"the embedded sidecar did not start in {START_TIMEOUT_SECONDS:g} s"
            ) from None
        await proc.wait()
        await relay_task
        detail = next((e for e in reversed(errors) if "error" in e.lower()), "; ".join(errors))
        raise EngineStartError(f"the embedded sidecar exited at start-up: {detail}")

    async def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.stdin is not None:
            proc.stdin.close()  # the sidecar sees EOF and stops cleanly
        try:
            await asyncio.wait_for(proc.wait(), timeout=10)
        except TimeoutError:
            proc.kill()
            await proc.wait()
        self._relay.cancel()


class DurableRuntime:
    """Engine, SDK worker and workflow client for one gateway process."""

    def __init__(
        self,
        engine: Any,
        db_path: Path,
        lookup: Callable[[str], Any],
        observer: workflow.CallObserver | None = None,
    ) -> None:
        self.engine = engine
        self.observer = observer  # told when each call's workflow ends (metrics)
        self.db_path = db_path
        self.lookup = lookup
        self.progress = ProgressHub()
        self.address = ""
        self.http_address: str | None = None
        # Adapters' checkpoints, in the sidecar's state API (see adapters.checkpoints).
        self.checkpoints: CheckpointStore | None = None
        # Set by the gateway before `start`: tools' access to other tools (gateway.delegation).
        self.delegation: Any = None
        # Set by the gateway once the engine is up: token budgets' charges (policies.budgets).
        self.budgets: Any = None
        self._sidecar: SidecarProcess | SidecarThread | Sidecar | None = None
        # With the sidecar in this process: its servicer, which the client calls directly.
        self._servicer: WorkflowServicer | None = None
        self._worker: wf.WorkflowRuntime | inprocess.InProcessWorker | None = None
        self._client: DaprWorkflowClient | None = None
        self._channel: grpc.aio.Channel | None = None
        self._stub: workflow_grpc.TaskHubSidecarServiceStub | None = None
        self.metadata: tuple[tuple[str, str], ...] = ()

    @property
    def stub(self) -> workflow_grpc.TaskHubSidecarServiceStub:
        """The protocol stub, for the one call the SDK client cannot make (a start that must
        not reuse a finished instance's id); send `metadata` with each call."""
        if self._stub is None and self._servicer is not None:
            self._stub = inprocess.workflow_stub(self._servicer)
        if self._stub is None:
            self._channel = grpc.aio.insecure_channel(self.address)
            self._stub = workflow_grpc.TaskHubSidecarServiceStub(self._channel)
        return self._stub

    @property
    def client(self) -> DaprWorkflowClient:
        if self._client is None:
            raise RuntimeError("the durable runtime is not started")
        return self._client

    async def start(self) -> None:
        try:
            self.address = await self._start_engine()
            host, _, port = self.address.rpartition(":")
            worker = wf.WorkflowRuntime(host=host, port=port, logger_options=SDK_LOGS)
            http = self.http_address
            self.checkpoints = CheckpointStore(
                self.address, http_endpoint=_http_endpoint(http) if http else None
            )
            workflow.register(
                worker,
                self.lookup,
                self.progress,
                self.checkpoints,
                lambda: self.delegation,
                observer=self.observer,
                budgets=lambda: self.budgets,
            )
            if self._servicer is not None:
                # The engine is in this process: the same workflows and activities, run by
                # the in-process worker, and the SDK's client without the network.
                assert isinstance(self._sidecar, Sidecar) and self._sidecar.engine is not None
                local = inprocess.InProcessWorker(
                    self._sidecar.engine, inprocess.registry_of(worker)
                )
                local.start()
                self._worker = local
                self._client = inprocess.inprocess_client(self._servicer, self.address)
            else:
                await asyncio.to_thread(worker.start)
                self._worker = worker
                self._client = DaprWorkflowClient(host=host, port=port, logger_options=SDK_LOGS)
        except BaseException:
            await self.stop()
            raise
        log.info("workflow engine ready at %s", self.address)

    async def _start_engine(self) -> str:
        if self.engine.kind == "dapr":
            token_env = self.engine.api_token_env
            if os.environ.get(token_env):
                from dapr.conf import settings as dapr_settings

                dapr_settings.DAPR_API_TOKEN = os.environ[token_env]  # type: ignore[attr-defined]
                self.metadata = (("dapr-api-token", os.environ[token_env]),)
            self.http_address = self.engine.http_address
            return str(self.engine.grpc_address)
        mode = getattr(self.engine, "sidecar", "process")
        settings = SidecarSettings(
            db_path=self.db_path,
            grpc_listen="127.0.0.1:0",
            http_listen=self.engine.http_listen or "127.0.0.1:0",
            state_stores=self.engine.state_stores,
            synchronous=self.engine.synchronous,
            apps=self.engine.apps,
        )
        if mode == "inprocess":
            sidecar = Sidecar(settings)
            await _retry_while_locked(sidecar.start)
            self._sidecar = sidecar
            assert sidecar.engine is not None
            self._servicer = WorkflowServicer(sidecar.engine)
            self.http_address = sidecar.http_address
            return sidecar.grpc_address
        if mode == "thread":
            thread = SidecarThread(settings)
            await asyncio.to_thread(thread.start)
            self._sidecar = thread
            self.http_address = thread.http_address
            return thread.grpc_address
        process = SidecarProcess(
            self.db_path,
            self.engine.synchronous,
            self.engine.apps,
            self.engine.http_listen,
            self.engine.state_stores,
        )
        self._sidecar = process
        address = await process.start()
        self.http_address = process.http_address
        return address

    async def ready(self) -> bool:
        """True when the engine answers (and, in process, its worker takes work)."""
        if self._client is None:
            return False
        if isinstance(self._worker, inprocess.InProcessWorker) and not self._worker.running:
            return False
        try:
            async with asyncio.timeout(2):
                await self._client.get_workflow_state("duragate-readiness-probe")
            return True
        except Exception:  # noqa: BLE001 - any failure means not ready
            return False

    async def stop(self) -> None:
        worker, self._worker = self._worker, None
        if isinstance(worker, inprocess.InProcessWorker):
            await worker.stop()
        elif worker is not None:
            await asyncio.to_thread(worker.shutdown)
        self._client = None
        checkpoints, self.checkpoints = self.checkpoints, None
        if checkpoints is not None:
            await asyncio.to_thread(checkpoints.close)
        channel, self._channel, self._stub = self._channel, None, None
        if channel is not None:
            await channel.close()
        sidecar, self._sidecar = self._sidecar, None
        self._servicer = None
        if isinstance(sidecar, SidecarProcess | Sidecar):
            await sidecar.stop()
        elif sidecar is not None:
            with contextlib.suppress(Exception):
                await asyncio.to_thread(sidecar.stop)
