"""Fixtures for the adapter tests: real gateway processes (from tests.gateway) serving the
example graphs and crews, with the examples' trace and hold files set in their environment."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

import adapters
from tests.gateway.conftest import GatewayFactory, GatewayProcess, spawn_gateway  # noqa: F401

BASE: dict[str, Any] = {
    "listen": {"host": "127.0.0.1", "port": 0},
    "identity": {"allow_anonymous": True},
    "limits": {"max_body_bytes": 65536, "max_wait_seconds": 60},
}


def write_config(tmp_path: Path, tools: list[dict[str, Any]]) -> Path:
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump({**BASE, "tools": tools}))
    return path


@pytest.fixture(autouse=True)
def _isolated_adapter_state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Loading a crewai tool in the test process sets CrewAI's environment variables and
    storage dir (under the adapters' data dir): keep both to this test."""
    monkeypatch.setattr(adapters, "_data_dir", tmp_path / "adapter-data")
    for name in (
        "CREWAI_DISABLE_TELEMETRY",
        "CREWAI_TRACING_ENABLED",
        "CREWAI_DISABLE_VERSION_CHECK",
        "CREWAI_STORAGE_DIR",
    ):
        monkeypatch.setenv(name, "")  # restored after the test; empty counts as unset


class Trace:
    """The examples' side-effect files: which node/task ran how often, and the hold file."""

    def __init__(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        self.path = tmp_path / "trace.txt"
        self.hold = tmp_path / "hold"
        # Gateway processes inherit the test's environment (tests.gateway.conftest.child_env).
        monkeypatch.setenv("DURAGATE_EXAMPLE_TRACE", str(self.path))
        monkeypatch.setenv("DURAGATE_EXAMPLE_HOLD", str(self.hold))

    def counts(self) -> Counter[str]:
        if not self.path.exists():
            return Counter()
        return Counter(line for line in self.path.read_text().splitlines() if line)

    def wait_for(self, name: str, gateway: GatewayProcess, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while self.counts()[name] < 1:
            assert time.monotonic() < deadline, f"{name} never ran; log:\n{gateway.log()}"
            time.sleep(0.05)


@pytest.fixture
def trace(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Trace]:
    yield Trace(tmp_path, monkeypatch)


def supply_input(gateway: GatewayProcess, task_id: str, value: Any) -> httpx.Response:
    return httpx.post(f"{gateway.base}/tasks/{task_id}/input", json={"value": value}, timeout=30)
