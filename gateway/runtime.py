"""The gateway's connection to its workflow engine.

With `engine.kind: embedded` the gateway starts the embedded sidecar on loopback, by default as
a child process (its own core and GIL: about twice the throughput of running it as a thread of
the gateway; see bench/README.md) that stops when the gateway exits, even by SIGKILL. With
`engine.kind: dapr` it uses the configured daprd. Either way the gateway then runs the Dapr
SDK's worker with Duragate's workflow and activity, and holds an asyncio workflow client.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import dapr.ext.workflow as wf
import grpc
from dapr.ext.workflow.aio import DaprWorkflowClient
from dapr.ext.workflow.logger import LoggerOptions

from adapters.checkpoints import CheckpointStore
from gateway import workflow
from gateway.progress import ProgressHub
from gateway.sidecar.protos import workflow_grpc
from gateway.sidecar.server import READY_MARKER, SidecarThread
from gateway.sidecar.settings import SidecarSettings

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[1]
START_TIMEOUT_SECONDS = 30.0
# A sidecar of a gateway that was just killed may still be closing its database.
LOCKED_RETRY_SECONDS = 15.0
SDK_LOGS = LoggerOptions(log_level="WARNING")


def _http_endpoint(address: str) -> str:
    return (
        address.rstrip("/") if address.startswith(("http://", "https://")) else f"http://{address}"
    )


class EngineStartError(RuntimeError):
    pass


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
        deadline = time.monotonic() + LOCKED_RETRY_SECONDS
        while True:
            try:
                return await self._start_once()
            except EngineStartError as exc:
                if "in use" not in str(exc) or time.monotonic() > deadline:
                    raise
                log.info("the engine database is still held by a closing sidecar; retrying")
                await asyncio.sleep(0.2)

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
        self._sidecar: SidecarProcess | SidecarThread | None = None
        self._worker: wf.WorkflowRuntime | None = None
        self._client: DaprWorkflowClient | None = None
        self._channel: grpc.aio.Channel | None = None
        self._stub: workflow_grpc.TaskHubSidecarServiceStub | None = None
        self.metadata: tuple[tuple[str, str], ...] = ()

    @property
    def stub(self) -> workflow_grpc.TaskHubSidecarServiceStub:
        """The protocol stub, for the one call the SDK client cannot make (a start that must
        not reuse a finished instance's id); send `metadata` with each call."""
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
        if mode == "thread":
            settings = SidecarSettings(
                db_path=self.db_path,
                grpc_listen="127.0.0.1:0",
                http_listen=self.engine.http_listen or "127.0.0.1:0",
                state_stores=self.engine.state_stores,
                synchronous=self.engine.synchronous,
                apps=self.engine.apps,
            )
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
        """True when the engine answers."""
        if self._client is None:
            return False
        try:
            async with asyncio.timeout(2):
                await self._client.get_workflow_state("duragate-readiness-probe")
            return True
        except Exception:  # noqa: BLE001 - any failure means not ready
            return False

    async def stop(self) -> None:
        worker, self._worker = self._worker, None
        if worker is not None:
            await asyncio.to_thread(worker.shutdown)
        self._client = None
        checkpoints, self.checkpoints = self.checkpoints, None
        if checkpoints is not None:
            await asyncio.to_thread(checkpoints.close)
        channel, self._channel, self._stub = self._channel, None, None
        if channel is not None:
            await channel.close()
        sidecar, self._sidecar = self._sidecar, None
        if isinstance(sidecar, SidecarProcess):
            await sidecar.stop()
        elif sidecar is not None:
            with contextlib.suppress(Exception):
                await asyncio.to_thread(sidecar.stop)
