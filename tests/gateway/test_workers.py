"""Tools in worker apps: `duragate worker` processes run the tools with an `app_id`, the gateway
never loads them, and calls reach the worker through the sidecar's app routing.

Everything runs as real processes: the gateway (with its embedded sidecar serving the app
`crews`), and `python -m gateway worker` for that app. The tool module records the pid of every
process that imports it (`tests.gateway.worker_targets`): only workers may appear there.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
import yaml
from mcp import types

from gateway.config import ConfigError, parse_config
from gateway.dispatch import CallRequest, CallState, Dispatcher
from gateway.registry import Registry, WorkerTool
from identity.principal import ANONYMOUS
from tests.gateway.conftest import (
    REPO_ROOT,
    GatewayFactory,
    child_env,
    mcp_session,
    running_dispatcher,
)
from tests.sidecar.conftest import start_sidecar_process
from tests.sidecar.test_crash import free_port

pytestmark = [
    pytest.mark.timeout(240),
    pytest.mark.filterwarnings("ignore:The experimental tasks API:DeprecationWarning"),
]
# (this module imports neither tests.gateway.worker_targets nor tests.gateway.worker_crews)

APP = "crews"
TARGETS = "tests.gateway.worker_targets"  # never imported here: this process is a gateway
IMPORTS_ENV = "DURAGATE_TEST_IMPORTS"
TEXT = "workers run apart. the gateway never loads them"
WORKER_START_TIMEOUT = 60.0


CREW_TOOL: dict[str, Any] = {
    "name": "research",
    "kind": "crewai",
    "target": "tests.gateway.worker_crews:research_crew",
    "app_id": APP,
    "description": "A two-task crew, run by a worker.",
    "input_schema": {
        "type": "object",
        "properties": {"topic": {"type": "string"}, "audience": {"type": "string"}},
        "required": ["topic", "audience"],
    },
    "timeout_seconds": 180,
}
CREW_ARGS = {"topic": "durable workflows", "audience": "engineers"}
BRIEF = "[write] Write a brief about durable workflows for engineers, from the research."


def config_text(port: int) -> str:
    config: dict[str, Any] = {
        "identity": {"allow_anonymous": True},
        "listen": {"host": "127.0.0.1", "port": 0},
        "engine": {"apps": {APP: f"127.0.0.1:{port}"}},
        "tools": [
            {"name": "add", "kind": "python", "target": "examples.tools:add"},
            {
                "name": "whereami",
                "kind": "python",
                "target": f"{TARGETS}:whereami",
                "app_id": APP,
                "description": "Says which process ran it.",
                "input_schema": {
                    "type": "object",
                    "properties": {"text": {"type": "string"}},
                    "required": ["text"],
                    "additionalProperties": False,
                },
                "timeout_seconds": 180,
            },
            {
                "name": "pipeline",
                "kind": "langgraph",
                "target": f"{TARGETS}:pipeline",
                "app_id": APP,
                "description": "outline -> draft -> finish, in the worker.",
                "input_schema": {
                    "type": "object",
                    "properties": {"text": {"type": "string"}},
                    "required": ["text"],
                },
                "timeout_seconds": 180,
            },
        ],
    }
    return yaml.safe_dump(config)


class WorkerProcess:
    """`python -m gateway worker --app-id crews`, logging JSON lines to a file."""

    def __init__(
        self,
        config: Path,
        data_dir: Path,
        log_path: Path,
        *extra: str,
        env: dict[str, str] | None = None,
    ) -> None:
        self.log_path = log_path
        self._log = log_path.open("ab")
        cmd = [sys.executable, "-m", "gateway", "--log-format", "json", "--data-dir"]
        cmd += [str(data_dir), "worker", "--config", str(config), "--app-id", APP, *extra]
        self.proc = subprocess.Popen(
            cmd,
            cwd=REPO_ROOT,
            env={**child_env(), **(env or {})},
            stdout=subprocess.DEVNULL,
            stderr=self._log,
        )
        self.pid = self.proc.pid

    def messages(self) -> list[str]:
        lines = self.log_path.read_text(errors="replace").splitlines()
        out = []
        for line in lines:
            try:
                out.append(str(json.loads(line)["message"]))
            except (ValueError, KeyError, TypeError):
                out.append(line)
        return out

    def wait_up(self) -> None:
        deadline = time.monotonic() + WORKER_START_TIMEOUT
        while time.monotonic() < deadline:
            if any("worker of app crews is up: serving" in m for m in self.messages()):
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.1)
        raise AssertionError("the worker did not start:\n" + "\n".join(self.messages()))

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()
        return self.proc.returncode


class Workers:
    def __init__(self, tmp: Path, config: Path) -> None:
        self.tmp = tmp
        self.config = config
        self.env: dict[str, str] = {}
        self.started: list[WorkerProcess] = []

    def __call__(self, *extra: str, wait: bool = True) -> WorkerProcess:
        log_path = self.tmp / f"worker-{len(self.started)}.log"
        data_dir = self.tmp / "worker-data"
        worker = WorkerProcess(self.config, data_dir, log_path, *extra, env=self.env)
        self.started.append(worker)
        if wait:
            worker.wait_up()
        return worker

    def pids(self) -> set[int]:
        return {w.pid for w in self.started}


@pytest.fixture
def setup(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Path, Workers]]:
    """The config file (app `crews` on a free port) and a factory of its workers. The
    environment every child inherits names the imports file, the node trace and the hold
    file of the example pipeline."""
    monkeypatch.setenv(IMPORTS_ENV, str(tmp_path / "imports"))
    monkeypatch.setenv("DURAGATE_EXAMPLE_TRACE", str(tmp_path / "trace"))
    monkeypatch.setenv("DURAGATE_EXAMPLE_HOLD", str(tmp_path / "hold"))
    config = tmp_path / "gateway.yaml"
    config.write_text(config_text(free_port()))
    workers = Workers(tmp_path, config)
    yield config, workers
    for worker in workers.started:
        worker.stop()


def importers(tmp_path: Path) -> set[int]:
    path = tmp_path / "imports"
    return {int(p) for p in path.read_text().split()} if path.exists() else set()


def trace(tmp_path: Path) -> list[str]:
    path = tmp_path / "trace"
    return path.read_text().split() if path.exists() else []


def _structured(result: Any) -> Any:
    assert not result.isError, result
    return result.structuredContent


async def test_mcp_calls_run_in_the_worker_and_never_in_the_gateway(
    tmp_path: Path, setup: tuple[Path, Workers], spawn_gateway: GatewayFactory
) -> None:
    config, workers = setup
    gateway = spawn_gateway(config=config, data_dir=tmp_path / "gateway-data")
    worker = workers()
    async with mcp_session(gateway.url) as session:
        listed = {t.name: t for t in (await session.list_tools()).tools}
        # Listed from the config alone: the gateway never loaded the target.
        assert listed["whereami"].description == "Says which process ran it."
        assert listed["whereami"].inputSchema["required"] == ["text"]
        where = _structured(await session.call_tool("whereami", {"text": "hi"}))
        graph = _structured(await session.call_tool("pipeline", {"text": TEXT}))
        local = _structured(await session.call_tool("add", {"a": 2, "b": 3}))
        refused = await session.call_tool("whereami", {"text": 5})
    assert where == {"pid": worker.pid, "text": "HI"}
    assert graph["outline"] == ["workers run apart", "the gateway never loads them"]
    assert graph["words"] == 9  # "Workers run apart / The gateway never loads them"
    assert local == {"result": 5}  # the gateway's own tools still run in the gateway
    assert refused.isError  # arguments are checked by the gateway, against the config's schema
    assert importers(tmp_path) == {worker.pid}
    assert gateway.proc.pid not in importers(tmp_path)
    # SIGTERM: a clean stop.
    assert worker.stop() == 0
    said = "\n".join(worker.messages())
    assert "worker of app crews stopped" in said
    assert "still in progress" not in said  # no tool was running


async def _wait_for(predicate: Any, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await anyio.sleep(0.05)


async def test_calls_wait_for_the_worker_and_survive_its_sigkill(
    tmp_path: Path, setup: tuple[Path, Workers]
) -> None:
    config, workers = setup
    async with running_dispatcher(config.read_text(), tmp_path) as dispatcher:
        await _waits_for_the_worker(dispatcher, workers)
        await _survives_a_sigkill(tmp_path, dispatcher, workers)
        # This test process was the gateway: it never imported the tools' module.
        assert TARGETS not in sys.modules
    assert importers(tmp_path) <= workers.pids()
    assert os.getpid() not in importers(tmp_path)


async def _waits_for_the_worker(dispatcher: Dispatcher, workers: Workers) -> None:
    view = await dispatcher.submit(CallRequest("whereami", {"text": "x"}, ANONYMOUS, "test"))
    # No worker of the app yet: the call waits, working, for as long as its timeout allows.
    waited = await dispatcher.wait(view.task_id, ANONYMOUS, 3)
    assert waited.state == CallState.WORKING
    assert waited.message == "running whereami"
    # Started from a thread: the engine serves the worker from this test's own event loop.
    worker = await asyncio.to_thread(workers)
    done = await dispatcher.wait(view.task_id, ANONYMOUS, 120)
    assert done.state == CallState.COMPLETED, done
    assert done.result == {"pid": worker.pid, "text": "X"}
    assert done.message == "whereami completed"
    await asyncio.to_thread(worker.stop)


async def _survives_a_sigkill(tmp_path: Path, dispatcher: Dispatcher, workers: Workers) -> None:
    hold = tmp_path / "hold"
    hold.write_text("")
    first = await asyncio.to_thread(workers)
    view = await dispatcher.submit(CallRequest("pipeline", {"text": TEXT}, ANONYMOUS, "test"))
    await _wait_for(lambda: trace(tmp_path) == ["outline", "draft"], "the draft node")
    first.kill()  # inside `draft`, after `outline` was checkpointed in the worker's state
    hold.unlink()
    assert (await dispatcher.get(view.task_id, ANONYMOUS)).state == CallState.WORKING
    second = await asyncio.to_thread(workers)
    done = await dispatcher.wait(view.task_id, ANONYMOUS, 120)
    assert done.state == CallState.COMPLETED, done
    assert done.result["words"] == 9
    # The restarted worker resumed at `draft`: `outline` ran once, in the first worker.
    assert trace(tmp_path) == ["outline", "draft", "draft", "finish"]
    assert {first.pid, second.pid} <= importers(tmp_path)


# --- start-up errors ----------------------------------------------------------------------------


def test_a_tool_of_an_app_the_sidecar_does_not_serve_stops_the_start(tmp_path: Path) -> None:
    config = yaml.safe_load(config_text(free_port()))
    config["tools"][2]["app_id"] = "graphs"
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(config))
    cmd = [sys.executable, "-m", "gateway", "--data-dir", str(tmp_path / "d")]
    cmd += ["serve", "--config", str(path)]
    done = subprocess.run(
        cmd, cwd=REPO_ROOT, env=child_env(), capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 2
    assert "tool 'pipeline' runs in app 'graphs', which engine.apps does not name" in done.stderr
    assert "(configured apps: crews)" in done.stderr


def test_worker_tools_need_their_spec_in_the_config(tmp_path: Path) -> None:
    config = yaml.safe_load(config_text(free_port()))
    del config["tools"][1]["input_schema"]
    with pytest.raises(ConfigError) as info:
        parse_config(yaml.safe_dump(config), "gateway.yaml", tmp_path)
    assert "tool 'whereami' runs in worker app 'crews'" in str(info.value)
    assert "set its input_schema in the config" in str(info.value)
    config["tools"][1]["input_schema"] = {"type": "object"}
    config["tools"][1]["app_id"] = "Not.An.App"
    with pytest.raises(ConfigError, match="is not a Dapr app id"):
        parse_config(yaml.safe_dump(config), "gateway.yaml", tmp_path)


def test_registries_of_the_gateway_and_of_a_worker(tmp_path: Path) -> None:
    config = parse_config(config_text(free_port()), "gateway.yaml", tmp_path)
    gateway = Registry.from_config(config)
    assert isinstance(gateway.get("whereami"), WorkerTool)
    assert gateway.get("whereami").spec.app_id == APP  # type: ignore[union-attr]
    assert list(gateway) == ["add", "whereami", "pipeline"]
    assert TARGETS not in sys.modules
    # A worker's registry holds only its app's tools (loading them is the worker tests' job).
    assert list(Registry.from_config(config, app_id="other")) == []
    # With daprd, the apps are daprd's business: no check.
    dapr = yaml.safe_load(config_text(free_port()))
    dapr["engine"] = {"kind": "dapr", "grpc_address": "127.0.0.1:50001"}
    parse_config(yaml.safe_dump(dapr), "gateway.yaml", tmp_path)


def test_a_worker_without_its_sidecar_exits_with_a_clear_error(
    tmp_path: Path, setup: tuple[Path, Workers]
) -> None:
    _, workers = setup
    worker = workers("--connect-timeout", "1", wait=False)
    assert worker.proc.wait(60) == 1
    text = "\n".join(worker.messages())
    assert "the sidecar of app 'crews' at 127.0.0.1:" in text
    assert "did not answer within 1 s" in text


def test_a_worker_without_tools_or_address_is_refused(tmp_path: Path) -> None:
    config = tmp_path / "gateway.yaml"
    config.write_text(config_text(free_port()))
    cmd = [sys.executable, "-m", "gateway", "--data-dir", str(tmp_path / "d"), "worker"]
    cmd += ["--config", str(config), "--app-id", "nobody"]
    done = subprocess.run(
        cmd, cwd=REPO_ROOT, env=child_env(), capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 2
    assert "no tool in" in done.stderr and "has app_id 'nobody': nothing to serve" in done.stderr
    config.write_text(config_text(free_port()).replace("crews:", "other:"))
    cmd[-1] = APP  # its tools, but no address for the app
    done = subprocess.run(
        cmd, cwd=REPO_ROOT, env=child_env(), capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 2
    assert "tool 'whereami' runs in app 'crews', which engine.apps does not name" in done.stderr


async def test_sigterm_in_the_middle_of_a_call_hands_it_to_the_next_worker(
    tmp_path: Path, setup: tuple[Path, Workers]
) -> None:
    config, workers = setup
    hold = tmp_path / "hold"
    hold.write_text("")
    async with running_dispatcher(config.read_text(), tmp_path) as dispatcher:
        # Workers are started and stopped from a thread: the engine serves them from this
        # test's own event loop.
        first = await asyncio.to_thread(workers)
        view = await dispatcher.submit(CallRequest("pipeline", {"text": TEXT}, ANONYMOUS, "test"))
        await _wait_for(lambda: trace(tmp_path) == ["outline", "draft"], "the draft node")
        # The node is still held: the worker stops without waiting for it.
        assert await asyncio.to_thread(first.stop) == 0
        said = "\n".join(first.messages())
        assert "worker of app crews stopped" in said
        assert "1 tool run(s) still in progress: exiting without them" in said
        hold.unlink()
        second = await asyncio.to_thread(workers)
        done = await dispatcher.wait(view.task_id, ANONYMOUS, 120)
        assert done.state == CallState.COMPLETED, done
        assert trace(tmp_path) == ["outline", "draft", "draft", "finish"]
        assert second.pid in importers(tmp_path)


# --- a crew in a worker, on a standalone sidecar (engine.kind: dapr) --------------------------


@pytest.mark.crash
async def test_a_crew_in_a_worker_of_a_shared_sidecar_resumes_after_a_sigkill(
    tmp_path: Path, setup: tuple[Path, Workers], spawn_gateway: GatewayFactory
) -> None:
    """`duragate sidecar --app LISTEN=crews` serves the gateway's app and the worker's; the
    gateway trusts it with the app (no engine.apps), the worker finds its address where
    `dapr run` would put it (DAPR_GRPC_PORT, DAPR_HTTP_PORT)."""
    config, workers = setup
    sidecar = start_sidecar_process(
        tmp_path / "shared.db", extra_args=("--app", f"127.0.0.1:0={APP}")
    )
    try:
        assert sidecar.http_address is not None
        config.write_text(
            yaml.safe_dump(
                {
                    "identity": {"allow_anonymous": True},
                    "listen": {"host": "127.0.0.1", "port": 0},
                    "engine": {
                        "kind": "dapr",
                        "grpc_address": sidecar.grpc_address,
                        "http_address": sidecar.http_address,
                    },
                    "tools": [CREW_TOOL],
                }
            )
        )
        workers.env = {
            "DAPR_GRPC_PORT": sidecar.apps[APP].rpartition(":")[2],
            "DAPR_HTTP_PORT": sidecar.http_address.rpartition(":")[2],
        }
        hold = tmp_path / "hold"
        hold.write_text("")  # the crew's model waits before answering the `write` task
        gateway = spawn_gateway(config=config, data_dir=tmp_path / "gateway-data")
        first = workers()
        async with mcp_session(gateway.url) as session:
            created = await session.experimental.call_tool_as_task("research", CREW_ARGS)
            task_id = created.task.taskId
            await _wait_for(lambda: trace(tmp_path) == ["research", "write"], "the write task")
            first.kill()
            hold.unlink()
            assert (await session.experimental.get_task(task_id)).status == "working"
            second = workers()
            with anyio.fail_after(120):
                result = await session.experimental.get_task_result(task_id, types.CallToolResult)
        assert not result.isError, result
        assert result.structuredContent == {"result": BRIEF}
        # The research task's output was checkpointed by the first worker: only `write` reran.
        assert trace(tmp_path) == ["research", "write", "write"]
        assert importers(tmp_path) == {first.pid, second.pid}
        assert gateway.proc.pid not in importers(tmp_path)
        assert any("(from DAPR_GRPC_ENDPOINT/DAPR_GRPC_PORT)" in m for m in second.messages())
        # CrewAI kept its files under the worker's data directory.
        assert (tmp_path / "worker-data" / "crewai").is_dir()
    finally:
        sidecar.popen.kill()
        sidecar.popen.wait(10)
