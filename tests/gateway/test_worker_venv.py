"""A `duragate worker` in a Python environment of its own: the venv (built by `tests.venvs`,
cached) has Duragate installed from this repository without extras, and `six` at a version other
than the gateway's. The gateway (this repository's venv) lists the worker's python tool from the
config; the call runs in the worker's interpreter, which the tool's answer shows."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import six
import yaml

from tests.gateway.conftest import REPO_ROOT, GatewayFactory, mcp_session
from tests.sidecar.test_crash import free_port
from tests.venvs import SUITE_VENVS, Venv, VenvBuildError, suite_venv

pytestmark = [
    pytest.mark.timeout(1200),  # the first run builds the venv (Duragate's dependencies)
    pytest.mark.filterwarnings("ignore:The experimental tasks API:DeprecationWarning"),
]

APP = "isolated"
# Not the gateway's version of six (a dependency of python-dateutil, so of Duragate's too).
SIX = SUITE_VENVS["worker"][0][0].split("==")[1]
WORKER_START_TIMEOUT = 120.0


@pytest.fixture(scope="session")
def worker_venv() -> Venv:
    try:
        return suite_venv("worker")
    except VenvBuildError as exc:
        pytest.fail(f"the worker's environment could not be built: {exc}")


def _config(tmp_path: Path) -> Path:
    config = {
        "identity": {"allow_anonymous": True},
        "listen": {"host": "127.0.0.1", "port": 0},
        "engine": {"apps": {APP: f"127.0.0.1:{free_port()}"}},
        "tools": [
            {
                "name": "where",
                "kind": "python",
                "target": "tests.gateway.venv_targets:where",
                "app_id": APP,
                "description": "Which Python environment ran this call.",
                "input_schema": {"type": "object", "additionalProperties": False},
                "timeout_seconds": 120,
            }
        ],
    }
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _start_worker(venv: Venv, config: Path, tmp_path: Path) -> tuple[subprocess.Popen[bytes], Path]:
    log_path = tmp_path / "worker.log"
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(tmp_path),
        "PYTHONPATH": str(REPO_ROOT),  # for the tool's module, under tests/ (not installed)
        "PYTHONUNBUFFERED": "1",
    }
    cmd = [str(venv.python), "-m", "gateway", "--log-format", "json", "--data-dir"]
    cmd += [str(tmp_path / "worker-data"), "worker", "--config", str(config), "--app-id", APP]
    with log_path.open("ab") as log:
        proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=log)
    deadline = time.monotonic() + WORKER_START_TIMEOUT
    while time.monotonic() < deadline:
        if f"worker of app {APP} is up" in log_path.read_text(errors="replace"):
            return proc, log_path
        if proc.poll() is not None:
            break
        time.sleep(0.1)
    proc.kill()
    proc.wait(10)
    raise AssertionError("the worker did not start:\n" + log_path.read_text(errors="replace"))


def _messages(log_path: Path) -> list[str]:
    out = []
    for line in log_path.read_text(errors="replace").splitlines():
        try:
            out.append(str(json.loads(line)["message"]))
        except (ValueError, KeyError, TypeError):
            out.append(line)
    return out


async def test_a_worker_in_its_own_venv_runs_the_tool_there(
    tmp_path: Path, worker_venv: Venv, spawn_gateway: GatewayFactory
) -> None:
    assert six.__version__ != SIX  # the gateway's own environment differs
    config = _config(tmp_path)
    gateway = spawn_gateway(config=config)
    proc, log_path = _start_worker(worker_venv, config, tmp_path)
    try:
        async with mcp_session(gateway.url) as session:
            result = await session.call_tool("where", {})
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    assert not result.isError, (result, _messages(log_path))
    where: Any = result.structuredContent
    assert where["prefix"] == str(worker_venv.path)
    assert where["executable"].startswith(str(worker_venv.path))
    assert where["six"] == SIX
    assert where["pid"] == proc.pid
    assert Path(sys.prefix).resolve() != worker_venv.path.resolve()
    assert proc.returncode == 0, _messages(log_path)
