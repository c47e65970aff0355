"""Fixtures for tests that need the embedded sidecar, in-process or as a separate process.

- `sidecar`: a started `SidecarThread` on a fresh database, gRPC and HTTP on 127.0.0.1:0.
- `sidecar_env`: the same sidecar, with the environment set so that the unmodified Dapr SDK
  (`DaprClient`, `DaprWorkflowClient`, `WorkflowRuntime`) finds it. Returns the sidecar.
- `sidecar_factory`: `make(**settings_overrides) -> SidecarThread`, started; all are stopped at
  teardown. The default database is `<tmp_path>/sidecar.db`, so calling it again after
  `.stop()` restarts a sidecar on the same file.
- `dapr_env`: `point(grpc_address, http_address, token=None)` sets the SDK's environment.
- `sidecar_process`: `spawn(db_path, listen=..., http_listen=..., env=None) -> SidecarProcess`,
  a sidecar in its own process (`python -m gateway.sidecar.server`), for crash tests
  (`.kill()` sends SIGKILL; `.apps` maps each app id served to its address). All are killed
  at teardown.
"""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import pytest

from gateway.sidecar.server import READY_MARKER, SidecarThread
from gateway.sidecar.settings import SidecarSettings

REPO_ROOT = Path(__file__).resolve().parents[2]
PROCESS_START_TIMEOUT = 30.0

# Variables the Dapr SDK reads; tests must not see a developer's own values.
_SDK_ENV = (
    "DAPR_GRPC_ENDPOINT",
    "DAPR_HTTP_ENDPOINT",
    "DAPR_RUNTIME_HOST",
    "DAPR_GRPC_PORT",
    "DAPR_HTTP_PORT",
    "DAPR_API_TOKEN",
    "DAPR_API_TIMEOUT_SECONDS",
)


class SidecarFactory(Protocol):
    def __call__(self, **overrides: Any) -> SidecarThread: ...


class DaprEnv(Protocol):
    def __call__(
        self, grpc_address: str, http_address: str | None, token: str | None = None
    ) -> None: ...


def sidecar_settings(db_path: Path, **overrides: Any) -> SidecarSettings:
    values: dict[str, Any] = {
        "db_path": db_path,
        "grpc_listen": "127.0.0.1:0",
        "http_listen": "127.0.0.1:0",
    }
    values.update(overrides)
    return SidecarSettings(**values)


@pytest.fixture
def sidecar_factory(tmp_path: Path) -> Iterator[SidecarFactory]:
    started: list[SidecarThread] = []

    def make(**overrides: Any) -> SidecarThread:
        overrides.setdefault("db_path", tmp_path / "sidecar.db")
        thread = SidecarThread(sidecar_settings(**overrides))
        thread.start()
        started.append(thread)
        return thread

    yield make
    for thread in reversed(started):
        thread.stop()


@pytest.fixture
def sidecar(sidecar_factory: SidecarFactory) -> SidecarThread:
    return sidecar_factory()


@pytest.fixture
def dapr_env(monkeypatch: pytest.MonkeyPatch) -> DaprEnv:
    for name in _SDK_ENV:
        monkeypatch.delenv(name, raising=False)

    def point(grpc_address: str, http_address: str | None, token: str | None = None) -> None:
        monkeypatch.setenv("DAPR_GRPC_ENDPOINT", grpc_address)
        if not grpc_address.startswith("unix:"):
            host, _, port = grpc_address.rpartition(":")
            monkeypatch.setenv("DAPR_RUNTIME_HOST", host)
            monkeypatch.setenv("DAPR_GRPC_PORT", port)
        if http_address is not None:
            # DaprClient polls /v1.0/healthz/outbound here before its first call.
            monkeypatch.setenv("DAPR_HTTP_ENDPOINT", f"http://{http_address}")
            monkeypatch.setenv("DAPR_HTTP_PORT", http_address.rpartition(":")[2])
        # Fail in seconds, not the SDK's 60, when the sidecar is not there.
        monkeypatch.setenv("DAPR_HEALTH_TIMEOUT", "10")
        if token is not None:
            monkeypatch.setenv("DAPR_API_TOKEN", token)
        else:
            monkeypatch.delenv("DAPR_API_TOKEN", raising=False)

    return point


@pytest.fixture
def sidecar_env(sidecar: SidecarThread, dapr_env: DaprEnv) -> SidecarThread:
    dapr_env(sidecar.grpc_address, sidecar.http_address)
    return sidecar


# -- a sidecar in its own process ------------------------------------------------------------


@dataclass
class SidecarProcess:
    popen: subprocess.Popen[str]
    grpc_address: str
    http_address: str | None
    log_path: Path
    db_path: Path = field(repr=False, default=Path())
    apps: dict[str, str] = field(default_factory=dict)  # app id -> bound gRPC address

    @property
    def pid(self) -> int:
        return self.popen.pid

    def kill(self) -> None:
        """SIGKILL: no cleanup of any kind runs in the sidecar."""
        if self.popen.poll() is None:
            os.kill(self.popen.pid, signal.SIGKILL)
        self.popen.wait(timeout=10)

    def terminate(self, timeout: float = 10.0) -> int:
        """SIGTERM, a clean stop; returns the exit status."""
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
        return self.popen.wait(timeout=timeout)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


def _wait_for_port(address: str, deadline: float) -> None:
    if address.startswith("unix://"):
        family, target = socket.AF_UNIX, address[len("unix://") :]
    else:
        host, _, port = address.rpartition(":")
        family, target = socket.AF_INET, (host, int(port))  # type: ignore[assignment]
    while True:
        probe = socket.socket(family, socket.SOCK_STREAM)
        probe.settimeout(1.0)
        try:
            probe.connect(target)
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
        finally:
            probe.close()


def start_sidecar_process(
    db_path: Path,
    *,
    listen: str = "127.0.0.1:0",
    http_listen: str | None = "127.0.0.1:0",
    env: dict[str, str] | None = None,
    extra_args: tuple[str, ...] = (),
    timeout: float = PROCESS_START_TIMEOUT,
) -> SidecarProcess:
    """Start `python -m gateway.sidecar.server` and return once its gRPC port answers."""
    log_path = db_path.with_name(db_path.name + f".{int(time.time() * 1000)}.log")
    child_env = dict(os.environ if env is None else env)
    child_env["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(REPO_ROOT), child_env.get("PYTHONPATH")])
    )
    cmd = [
        sys.executable,
        "-m",
        "gateway.sidecar.server",
        "--db",
        str(db_path),
        "--listen",
        listen,
        "--http-listen",
        http_listen or "none",
        *extra_args,
    ]
    with open(log_path, "ab") as log:
        popen = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=log, text=True, cwd=REPO_ROOT, env=child_env
        )
    assert popen.stdout is not None
    deadline = time.monotonic() + timeout
    try:
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"the sidecar process did not start: {log_path.read_text()}")
            readable, _, _ = select.select([popen.stdout], [], [], remaining)
            if not readable:
                continue
            line = popen.stdout.readline()
            if not line:  # the process ended before it was ready
                popen.wait(timeout=10)
                raise RuntimeError(
                    f"the sidecar process exited with {popen.returncode}: {log_path.read_text()}"
                )
            if line.startswith(READY_MARKER):
                ready = json.loads(line[len(READY_MARKER) :])
                break
        _wait_for_port(ready["grpc_address"], deadline)
    except BaseException:
        if popen.poll() is None:
            popen.kill()
            popen.wait(timeout=10)
        raise
    return SidecarProcess(
        popen=popen,
        grpc_address=ready["grpc_address"],
        http_address=ready["http_address"],
        log_path=log_path,
        db_path=db_path,
        apps=ready.get("apps", {}),
    )


@pytest.fixture
def sidecar_process() -> Iterator[Callable[..., SidecarProcess]]:
    started: list[SidecarProcess] = []

    def spawn(db_path: Path, **kwargs: Any) -> SidecarProcess:
        process = start_sidecar_process(db_path, **kwargs)
        started.append(process)
        return process

    yield spawn
    for process in started:
        if process.popen.poll() is None:
            process.popen.kill()
            process.popen.wait(timeout=10)
        if process.popen.stdout is not None:
            process.popen.stdout.close()
