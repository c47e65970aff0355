"""The `dapr_agent` tool kind, against an unmodified dapr-agents from the package index.

dapr-agents needs dapr < 1.19, so it cannot share the gateway's environment: a venv of its own
is built once (`tests.venvs`, cached under `.cache/venvs`), and the agent app
(`tests/adapters/dapr_agent_app.py`, dapr-agents' public API only) runs there as a separate
process, connected as the Dapr app `weather-agent` to the gateway's embedded sidecar. Its LLM is
the local chat-completions server (`tests.adapters.chat_server`), scripted to call the agent's
tool once and then answer with what the tool said: an answer that names the agent process's
pid and environment can only have come from the agent. Calls go through the MCP front door
with the real mcp client.
"""

from __future__ import annotations

import json
import os
import re
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import dapr.ext.workflow as wf
import pytest
import yaml
from a2a.types import TaskState
from mcp import types

from adapters.base import ToolLoadError
from adapters.dapr_agent import ADAPTER, agent_workflow_name
from gateway.config import ToolConfig, parse_config
from gateway.registry import Registry
from gateway.workflow import child_instance_id
from tests.adapters.chat_server import ChatServer, Reply, text, tool_call
from tests.gateway.conftest import REPO_ROOT, GatewayFactory, child_env, mcp_session
from tests.gateway.test_a2a import a2a_client, collect, final_task, message, result_of, send
from tests.sidecar.test_crash import free_port
from tests.venvs import Venv, VenvBuildError, suite_venv

# `make test` builds the venv before the suite (pip, from the index: about 75 s here); run
# alone, the first test builds it (bounded by tests.venvs.DEFAULT_TIMEOUT).
pytestmark = [
    pytest.mark.timeout(1200),
    pytest.mark.filterwarnings("ignore:The experimental tasks API:DeprecationWarning"),
]

APP = "weather-agent"
AGENT = "weather"
APP_FILE = Path(__file__).with_name("dapr_agent_app.py")
APP_START_TIMEOUT = 120.0
SUMMARY = "The user asked about the weather."
# The state store components a Dapr Agents app looks up by name.
AGENT_STORES = ["agent-workflow", "agent-memory", "agent-registry"]


# --- the agent's environment and its LLM -------------------------------------------------------


@pytest.fixture(scope="session")
def agents_venv() -> Venv:
    try:
        venv = suite_venv("dapr-agents")
    except VenvBuildError as exc:
        pytest.fail(f"the dapr-agents environment could not be built: {exc}")
    if venv.built:
        print(f"\nbuilt the dapr-agents venv {venv.path} in {venv.seconds:.0f} s")
    return venv


class Script:
    """The agent's model: call get_weather for the city in the task, then answer with what it
    said. Dapr Agents also asks for a JSON summary of the run (its conversation memory). While
    `hold` is set, the first turn of a task about Rome waits for it."""

    def __init__(self) -> None:
        self.hold: threading.Event | None = None

    def __call__(self, body: dict[str, Any]) -> Reply:
        reply = script(body)
        if self.hold is not None and reply.message.get("tool_calls") and "Rome" in str(body):
            reply.hold = self.hold
        return reply


def script(body: dict[str, Any]) -> Reply:
    if body.get("response_format"):
        return text(json.dumps({"summary": SUMMARY}))
    messages = body["messages"]
    task = next(m["content"] for m in messages if m["role"] == "user")
    if "refuse" in task:
        return Reply(status=400)  # the model refuses: the agent's run fails
    said = [m["content"] for m in messages if m["role"] == "tool"]
    if not said:
        city = task.rsplit(" in ", 1)[-1].rstrip("?")
        return tool_call("call-1", "get_weather", {"city": city})
    return text(f"Forecast from the agent: {said[-1]}")


@pytest.fixture
def chat() -> Iterator[ChatServer]:
    server = ChatServer(Script())
    yield server
    if isinstance(server.script, Script) and server.script.hold is not None:
        server.script.hold.set()
    server.close()


# --- the gateway and the agent app ---------------------------------------------------------------


@dataclass
class Setup:
    config: Path
    app_address: str  # the agent app's gRPC address on the embedded sidecar
    http_address: str  # the sidecar's HTTP health address


@pytest.fixture
def setup(tmp_path: Path) -> Setup:
    app_address, http_address = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    config = {
        "identity": {"allow_anonymous": True},
        "listen": {"host": "127.0.0.1", "port": 0},
        "engine": {
            "apps": {APP: app_address},
            "http_listen": http_address,
            "state_stores": AGENT_STORES,
        },
        "tools": [
            {
                "name": AGENT,
                "kind": "dapr_agent",
                "target": AGENT,
                "app_id": APP,
                "timeout_seconds": 300,
            }
        ],
    }
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(config))
    return Setup(path, app_address, http_address)


class AgentApp:
    """The agent app, a process of the dapr-agents venv; its log in a file."""

    def __init__(self, venv: Venv, setup: Setup, chat: ChatServer, log_path: Path) -> None:
        self.log_path = log_path
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(log_path.parent),
            "DAPR_GRPC_ENDPOINT": setup.app_address,
            "DAPR_HTTP_ENDPOINT": f"http://{setup.http_address}",
            "OPENAI_BASE_URL": chat.url,
            "OPENAI_API_KEY": "test-key",
            "DAPR_API_MAX_RETRIES": "1",  # a refused LLM call fails the run at once
            "PYTHONUNBUFFERED": "1",
        }
        with log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [str(venv.python), str(APP_FILE)],
                cwd=log_path.parent,
                env=env,
                stdout=subprocess.PIPE,
                stderr=log,
            )
        self.pid = self.proc.pid

    def wait_ready(self) -> None:
        assert self.proc.stdout is not None
        deadline = time.monotonic() + APP_START_TIMEOUT
        buffer = b""
        while time.monotonic() < deadline:
            ready, _, _ = select.select([self.proc.stdout], [], [], 0.2)
            if ready:
                chunk = os.read(self.proc.stdout.fileno(), 4096)
                if not chunk:
                    break
                buffer += chunk
                if b"DAPR_AGENT_APP_READY" in buffer:
                    return
            elif self.proc.poll() is not None:
                break
        self.stop()
        raise AssertionError(f"the agent app did not start; its log:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-6000:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


@pytest.fixture
def agent_apps(tmp_path: Path, agents_venv: Venv, setup: Setup, chat: ChatServer) -> Iterator[Any]:
    started: list[AgentApp] = []

    def start(wait: bool = True) -> AgentApp:
        app = AgentApp(agents_venv, setup, chat, tmp_path / f"agent-{len(started)}.log")
        started.append(app)
        if wait:
            app.wait_ready()
        return app

    yield start
    for app in started:
        app.stop()


def _task_id(result: Any) -> str:
    return str((result.meta or {})["io.duragate/task-id"])


def _agent_state(setup: Setup, instance_id: str) -> Any:
    host, port = setup.app_address.rsplit(":", 1)
    client = wf.DaprWorkflowClient(host=host, port=port)
    try:
        return client.get_workflow_state(instance_id, fetch_payloads=True)
    finally:
        client.close()


# --- through the MCP front door ------------------------------------------------------------------


async def test_an_mcp_call_runs_the_dapr_agent_in_its_own_app(
    setup: Setup,
    spawn_gateway: GatewayFactory,
    agent_apps: Any,
    chat: ChatServer,
    agents_venv: Venv,
) -> None:
    gateway = spawn_gateway(config=setup.config)
    app = agent_apps()
    async with mcp_session(gateway.url) as session:
        listed = {t.name: t for t in (await session.list_tools()).tools}
        result = await session.call_tool(AGENT, {"task": "What is the weather in Paris?"})
        refused = await session.call_tool(AGENT, {"task": ""})  # the gateway checks the input
    assert listed[AGENT].inputSchema["required"] == ["task"]
    assert "weather" in (listed[AGENT].description or "")
    assert not result.isError, result
    answer = result.structuredContent
    assert answer is not None
    # The model's reply, quoting what the agent's own tool returned in the agent's process.
    expected = f"sunny in Paris (pid {app.pid}, prefix {agents_venv.path})"
    assert answer["content"] == f"Forecast from the agent: {expected}"
    assert answer["role"] == "assistant" and answer["name"] == AGENT
    assert refused.isError
    # The agent's LLM saw its tool, and the tool's result came back to it.
    offered = [t["function"]["name"] for t in chat.requests[0]["tools"]]
    assert offered == ["get_weather"]
    assert any(m.get("role") == "tool" for m in chat.requests[1]["messages"])
    # The agent's run is the workflow Dapr Agents registered, under the id derived from the call.
    state = _agent_state(setup, child_instance_id(_task_id(result), AGENT))
    assert state is not None and state.runtime_status == wf.WorkflowStatus.COMPLETED
    assert state.name == agent_workflow_name(AGENT) == "dapr.agents.weather.workflow"
    assert json.loads(state.serialized_input) == {"task": "What is the weather in Paris?"}
    # The agent found its state stores among the sidecar's components (metadata API).
    said = app.log_path.read_text(errors="replace")
    assert "ConversationDaprStateMemory initialized (store=agent-memory" in said
    assert "Registered agent 'weather' in team 'default' registry" in said


async def test_an_a2a_message_to_the_agent_is_answered_by_it(
    setup: Setup, spawn_gateway: GatewayFactory, agent_apps: Any
) -> None:
    # An agent-like kind: the tool is an A2A agent of its own; a text message is its task.
    gateway = spawn_gateway(config=setup.config)
    app = agent_apps()
    async with a2a_client(gateway.base, "JSONRPC", f"/a2a/agents/{AGENT}") as client:
        task = final_task(await collect(client, send(message(None, text="Weather in Kyiv?"))))
    assert task.status.state == TaskState.TASK_STATE_COMPLETED, task
    answer = result_of(task)
    assert answer["content"].startswith(f"Forecast from the agent: sunny in Kyiv (pid {app.pid},")


async def test_a_failed_agent_run_is_the_tools_error(
    setup: Setup, spawn_gateway: GatewayFactory, agent_apps: Any
) -> None:
    gateway = spawn_gateway(config=setup.config)
    agent_apps()
    async with mcp_session(gateway.url) as session:
        result = await session.call_tool(AGENT, {"task": "refuse to say the weather in Oslo"})
    assert result.isError
    message = result.content[0].text  # type: ignore[union-attr]
    assert re.search(
        r"weather: workflow dapr\.agents\.weather\.workflow of app weather-agent failed: "
        r"Agent weather workflow failed",
        message,
    ), message


async def test_a_call_waits_for_the_agent_app_to_connect(
    setup: Setup, spawn_gateway: GatewayFactory, agent_apps: Any
) -> None:
    gateway = spawn_gateway(config=setup.config)
    results: list[Any] = []
    async with mcp_session(gateway.url) as session:
        async with anyio.create_task_group() as group:

            async def call() -> None:
                results.append(await session.call_tool(AGENT, {"task": "Weather in Lima?"}))

            group.start_soon(call)
            await anyio.sleep(3)  # no agent app yet: the run waits in the sidecar's queue
            assert results == []
            app = await anyio.to_thread.run_sync(agent_apps)
    (result,) = results
    assert not result.isError, result
    assert result.structuredContent["content"].startswith(
        f"Forecast from the agent: sunny in Lima (pid {app.pid},"
    )


async def test_without_its_app_a_call_times_out_naming_the_app(
    setup: Setup, spawn_gateway: GatewayFactory
) -> None:
    config = yaml.safe_load(setup.config.read_text())
    config["tools"][0]["timeout_seconds"] = 2
    setup.config.write_text(yaml.safe_dump(config))
    gateway = spawn_gateway(config=setup.config)
    async with mcp_session(gateway.url) as session:
        result = await session.call_tool(AGENT, {"task": "Weather in Quito?"})
    assert result.isError
    message = result.content[0].text  # type: ignore[union-attr]
    assert re.search(
        r"weather did not finish within 2 s: workflow dapr\.agents\.weather\.workflow of app "
        r"weather-agent \(instance [0-9a-f]+:weather\) has not completed; is that app running",
        message,
    ), message


@pytest.mark.crash
async def test_a_gateway_killed_mid_run_resumes_the_same_agent_run(
    setup: Setup, spawn_gateway: GatewayFactory, agent_apps: Any, chat: ChatServer, tmp_path: Path
) -> None:
    hold = threading.Event()
    assert isinstance(chat.script, Script)
    chat.script.hold = hold
    data_dir = tmp_path / "data"
    first = spawn_gateway(config=setup.config, data_dir=data_dir)
    app = agent_apps()
    async with mcp_session(first.url) as session:
        created = await session.experimental.call_tool_as_task(AGENT, {"task": "Weather in Rome?"})
        task_id = created.task.taskId
        deadline = time.monotonic() + 60
        while not any("Rome" in str(r) for r in chat.requests):  # the agent asks its model
            assert time.monotonic() < deadline, app.log()
            await anyio.sleep(0.05)
        first.kill()  # SIGKILL: the gateway and its embedded sidecar go, the agent app stays
    hold.set()  # the model answers; the agent cannot report it until a sidecar is back
    second = spawn_gateway(config=setup.config, data_dir=data_dir)
    async with mcp_session(second.url) as session:
        with anyio.fail_after(180):
            result = await session.experimental.get_task_result(task_id, types.CallToolResult)
    assert not result.isError, (result, second.log(), app.log())
    assert result.structuredContent is not None
    assert result.structuredContent["content"].startswith(
        f"Forecast from the agent: sunny in Rome (pid {app.pid},"
    )
    # One agent run for the call, started once, under the id derived from it.
    host, port = setup.app_address.rsplit(":", 1)
    client = wf.DaprWorkflowClient(host=host, port=port)
    try:
        runs = [i for i in client.iter_workflow_instance_ids() if i.startswith(task_id + ":")]
        history = client.get_workflow_history(child_instance_id(task_id, AGENT))
    finally:
        client.close()
    assert runs == [child_instance_id(task_id, AGENT)]
    kinds = [event.event_type for event in history]
    assert kinds.count(wf.WorkflowHistoryEventType.EXECUTION_STARTED) == 1, kinds
    assert kinds[-1] == wf.WorkflowHistoryEventType.EXECUTION_COMPLETED, kinds


async def test_cancelling_the_call_terminates_the_agent_run(
    setup: Setup, spawn_gateway: GatewayFactory, agent_apps: Any, chat: ChatServer
) -> None:
    hold = threading.Event()
    assert isinstance(chat.script, Script)
    chat.script.hold = hold
    gateway = spawn_gateway(config=setup.config)
    app = agent_apps()
    async with mcp_session(gateway.url) as session:
        created = await session.experimental.call_tool_as_task(AGENT, {"task": "Weather in Rome?"})
        task_id = created.task.taskId
        deadline = time.monotonic() + 60
        while not any("Rome" in str(r) for r in chat.requests):
            assert time.monotonic() < deadline, app.log()
            await anyio.sleep(0.05)
        cancelled = await session.experimental.cancel_task(task_id)
    hold.set()
    assert cancelled.status == "cancelled"
    # The agent's run, a child of the call in another app, is terminated with it.
    deadline = time.monotonic() + 30
    while True:
        state = _agent_state(setup, child_instance_id(task_id, AGENT))
        assert state is not None
        if state.runtime_status == wf.WorkflowStatus.TERMINATED or time.monotonic() > deadline:
            break
        await anyio.sleep(0.1)
    assert state.runtime_status == wf.WorkflowStatus.TERMINATED


# --- the adapter alone ----------------------------------------------------------------------------


def test_the_workflow_name_is_dapr_agents_own() -> None:
    assert agent_workflow_name("weather") == "dapr.agents.weather.workflow"
    assert agent_workflow_name("My Agent!") == "dapr.agents.MyAgent.workflow"
    with pytest.raises(ToolLoadError, match="no letter"):
        agent_workflow_name("???")


def test_a_dapr_agent_tool_needs_its_app() -> None:
    config = ToolConfig(name="w", kind="dapr_agent", target="weather")
    with pytest.raises(ToolLoadError, match="needs `app_id`"):
        ADAPTER.prepare(config)
    other = ToolConfig(
        name="w",
        kind="dapr_agent",
        target="x",
        app_id="a",
        options={"workflow": "dapr.openai.x.workflow"},
    )
    spec = ADAPTER.prepare(other).spec
    assert spec.workflow == "dapr.openai.x.workflow" and spec.app_id == "a"
    assert spec.output_schema is None  # another framework's workflow: no output promised
    with pytest.raises(ToolLoadError, match="unknown option"):
        ADAPTER.prepare(
            ToolConfig(name="w", kind="dapr_agent", target="x", app_id="a", options={"x": 1})
        )


def test_the_gateway_loads_it_and_the_embedded_sidecar_must_serve_its_app(tmp_path: Path) -> None:
    tool = {"name": "w", "kind": "dapr_agent", "target": "weather", "app_id": APP}
    served = {"engine": {"apps": {APP: "127.0.0.1:45999"}}, "tools": [tool]}
    registry = Registry.from_config(parse_config(yaml.safe_dump(served), "g.yaml", tmp_path))
    spec = registry.specs()[0]
    # Its spec comes from the adapter (no description or schema needed in the config) ...
    assert spec.workflow == "dapr.agents.weather.workflow" and spec.input_schema["required"] == [
        "task"
    ]
    # ... and a worker of that app has nothing to run.
    worker = Registry.from_config(
        parse_config(yaml.safe_dump(served), "g.yaml", tmp_path), app_id=APP
    )
    assert len(worker) == 0
    unserved = {"tools": [tool]}
    with pytest.raises(Exception, match="which engine.apps does not name"):
        Registry.from_config(parse_config(yaml.safe_dump(unserved), "g.yaml", tmp_path))


def test_the_sidecar_health_address_is_loopback_only(tmp_path: Path) -> None:
    config = {"engine": {"http_listen": "127.0.0.1:3501"}}
    engine = parse_config(yaml.safe_dump(config), "g.yaml", tmp_path).engine
    assert getattr(engine, "http_listen", None) == "127.0.0.1:3501"
    with pytest.raises(Exception, match="0.0.0.0:3501 is not a loopback address"):
        parse_config(
            yaml.safe_dump({"engine": {"http_listen": "0.0.0.0:3501"}}), "g.yaml", tmp_path
        )
    with pytest.raises(Exception, match="is not HOST:PORT"):
        parse_config(yaml.safe_dump({"engine": {"http_listen": "3501"}}), "g.yaml", tmp_path)


def test_engine_state_stores_are_component_names(tmp_path: Path) -> None:
    def engine(stores: list[str]) -> Any:
        config = {"engine": {"state_stores": stores}}
        return parse_config(yaml.safe_dump(config), "g.yaml", tmp_path).engine

    assert getattr(engine(AGENT_STORES), "state_stores", None) == AGENT_STORES
    with pytest.raises(Exception, match="the gateway's own state store"):
        engine(["statestore"])
    with pytest.raises(Exception, match="not a Dapr component name"):
        engine(["Agent Memory"])
    with pytest.raises(Exception, match="named twice"):
        engine(["a", "a"])


def test_a_duragate_worker_for_the_agents_app_says_it_has_nothing_to_serve(
    setup: Setup,
) -> None:
    cmd = [sys.executable, "-m", "gateway", "worker", "--config", str(setup.config)]
    done = subprocess.run(
        [*cmd, "--app-id", APP],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO_ROOT,
        env=child_env(),
    )
    assert done.returncode == 2, done.stderr
    assert "app 'weather-agent' runs its own workflows for weather" in done.stderr


def test_the_app_file_uses_only_dapr_agents() -> None:
    # The agent's environment has no Duragate: the app must not import it.
    source = APP_FILE.read_text()
    assert not re.search(r"^\s*(from|import) (gateway|adapters|tests)\b", source, re.M)
    assert APP_FILE.is_relative_to(REPO_ROOT)
