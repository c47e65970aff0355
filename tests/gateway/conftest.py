"""Fixtures for the gateway's end-to-end tests: real gateway processes, real MCP clients.

- `spawn_gateway(config=..., data_dir=...) -> GatewayProcess`: a gateway in its own process
  (`tests.gateway.launcher`), serving MCP over Streamable HTTP on a free loopback port; all are
  stopped (SIGTERM, then SIGKILL) at teardown. `.kill()` SIGKILLs one, as a crash would.
- `shared_gateway`: one gateway for a whole test module (start-up costs about a second).
- `mcp_session(url, ...)`: an initialized `ClientSession` over Streamable HTTP.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
import warnings
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import yaml
from mcp import ClientSession
from mcp.client.streamable_http import streamable_http_client

from gateway.config import parse_config
from gateway.dispatch import Dispatcher
from gateway.registry import Registry
from gateway.runtime import DurableRuntime
from tests.gateway.launcher import READY_MARKER

REPO_ROOT = Path(__file__).resolve().parents[2]
TEST_CONFIG = Path(__file__).with_name("gateway.yaml")
START_TIMEOUT = 30.0

# The experimental tasks API of mcp 1.30 warns that tasks move to an extension in 2.0.
warnings.filterwarnings("ignore", message=".*experimental tasks API.*", category=DeprecationWarning)


# The raw JSON-RPC `initialize` a client opens a session with, for tests that speak HTTP.
INIT = {
    "jsonrpc": "2.0",
    "id": 1,
    "method": "initialize",
    "params": {
        "protocolVersion": "2025-11-25",
        "capabilities": {},
        "clientInfo": {"name": "test", "version": "0"},
    },
}
MCP_HEADERS = {"Accept": "application/json, text/event-stream"}


def config_with(tmp_path: Path, **changes: Any) -> Path:
    """The test config with some top-level sections replaced, written to tmp_path."""
    config = yaml.safe_load(TEST_CONFIG.read_text())
    config.update(changes)
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def config_with_policy(tmp_path: Path, policy: str) -> Path:
    """The test config with `policy` as tenant `default`'s policy file."""
    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "default.yaml").write_text(policy)
    return config_with(tmp_path, policy={"dir": str(policies)})


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    env["PYTHONUNBUFFERED"] = "1"
    return env


class GatewayProcess:
    def __init__(self, config: Path, data_dir: Path, log_path: Path) -> None:
        self.config = config
        self.data_dir = data_dir
        self.log_path = log_path
        self._log = log_path.open("ab")
        cmd = [sys.executable, "-m", "tests.gateway.launcher"]
        cmd += ["--config", str(config), "--data-dir", str(data_dir), "--port", "0"]
        self.proc = subprocess.Popen(
            cmd, cwd=REPO_ROOT, env=child_env(), stdout=subprocess.PIPE, stderr=self._log
        )
        self.url = self._wait_ready()
        self.base = self.url.removesuffix("/mcp")

    def _wait_ready(self) -> str:
        assert self.proc.stdout is not None
        deadline = time.monotonic() + START_TIMEOUT
        buffer = b""
        while time.monotonic() < deadline:
            ready, _, _ = select.select([self.proc.stdout], [], [], 0.1)
            if ready:
                chunk = os.read(self.proc.stdout.fileno(), 4096)
                if not chunk:
                    break
                buffer += chunk
                for line in buffer.decode(errors="replace").splitlines():
                    if line.startswith(READY_MARKER):
                        return str(json.loads(line[len(READY_MARKER) :])["url"])
            elif self.proc.poll() is not None:
                break
        self.stop()
        raise RuntimeError(f"the gateway did not start; its log:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def signal(self, signum: int) -> None:
        self.proc.send_signal(signum)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()


class GatewayFactory:
    """Starts gateway processes (of `process`, a GatewayProcess class) and stops them all."""

    def __init__(self, tmp: Path, process: type[GatewayProcess] = GatewayProcess) -> None:
        self.tmp = tmp
        self.process = process
        self.started: list[GatewayProcess] = []

    def __call__(self, config: Path = TEST_CONFIG, data_dir: Path | None = None) -> Any:
        data_dir = data_dir or self.tmp / "data"
        log_path = self.tmp / f"gateway-{len(self.started)}.log"
        gateway = self.process(config, data_dir, log_path)
        self.started.append(gateway)
        return gateway

    def stop_all(self) -> None:
        for gateway in self.started:
            gateway.stop()


@pytest.fixture
def spawn_gateway(tmp_path: Path) -> Iterator[GatewayFactory]:
    factory = GatewayFactory(tmp_path)
    yield factory
    factory.stop_all()


@pytest.fixture(scope="module")
def shared_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    factory = GatewayFactory(tmp_path_factory.mktemp("gateway"))
    yield factory()
    factory.stop_all()


@asynccontextmanager
async def mcp_session(url: str, **session_kwargs: Any) -> AsyncIterator[ClientSession]:
    async with streamable_http_client(url) as (read, write, _):
        async with ClientSession(read, write, **session_kwargs) as session:
            await session.initialize()
            yield session


@asynccontextmanager
async def running_dispatcher(
    config_text: str, tmp_path: Path, **dispatcher_options: Any
) -> AsyncIterator[Dispatcher]:
    """A Dispatcher over a real embedded engine, for the config in `config_text`."""
    config = parse_config(config_text, "test.yaml", tmp_path)
    registry = Registry.from_config(config)
    runtime = DurableRuntime(config.engine, tmp_path / "engine.db", registry.get)
    await runtime.start()
    try:
        yield Dispatcher(registry, runtime, **dispatcher_options)
    finally:
        await runtime.stop()
