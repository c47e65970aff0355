"""The `agent` kind through a real gateway and MCP client, its model a local server speaking
the chat-completions API (tests.adapters.chat_server): a tool call then an answer, tools called
through policy as the agent acting for its caller, 429 with Retry-After, token usage, memory
across calls, and a SIGKILL between steps that repeats neither the finished model call nor the
tool call."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
import yaml
from mcp import types

from adapters import adapter_for
from adapters.base import ToolContext, ToolError, ToolLoadError
from gateway.config import ToolConfig
from gateway.mcp_front import USAGE_META
from tests.adapters.chat_server import ChatServer, Reply, text, tool_call
from tests.adapters.conftest import BASE
from tests.gateway.conftest import GatewayFactory, GatewayProcess, mcp_session
from tests.gateway.test_a2a import a2a_client, collect, final_task, result_of, send
from tests.gateway.test_a2a import message as a2a_message

pytestmark = [
    pytest.mark.timeout(180),
    pytest.mark.filterwarnings("ignore:The experimental tasks API:DeprecationWarning"),
]

KEY_ENV = "DURAGATE_TEST_LLM_KEY"
AGENT_ID = "spiffe://duragate.local/agent/assistant"
ANONYMOUS = "spiffe://duragate.local/anonymous"
POLICY = """
tenant: default
members: [spiffe://duragate.local/**]
tools:
  assistant: {call: [group:members]}
  add: {call: [group:members]}
  fail:
    call: [group:members]
    deny:
      - when: "size(caller.chain) > 0 && args.message == 'boom'"
        reason: fail is not for agents
"""


class Model:
    """The scripted model: what it answers depends only on the conversation it is sent."""

    def __init__(self) -> None:
        self.hold_after_tool: threading.Event | None = None
        self.limited: set[str] = set()
        self.server = ChatServer(self.answer)

    def answer(self, body: dict[str, Any]) -> Reply:
        messages = body["messages"]
        last = messages[-1]
        if last["role"] == "tool":
            reply = text(f"the tool said: {last['content']}")
            reply.hold = self.hold_after_tool
            return reply
        asked = last["content"]
        if asked.startswith("add "):
            a, b = (int(x) for x in asked.removeprefix("add ").split(" and "))
            return tool_call("call-1", "add", {"a": a, "b": b})
        if asked == "try fail":
            return tool_call("call-1", "fail", {"message": "boom"})
        if asked == "busy" and asked not in self.limited:
            self.limited.add(asked)
            return Reply(status=429, headers={"Retry-After": "1"})
        earlier = [m["content"] for m in messages[:-1] if m["role"] == "user"]
        return text(f"you asked before: {earlier}")

    def count(self, predicate: Any) -> int:
        return sum(1 for body in self.server.requests if predicate(body["messages"]))


@pytest.fixture
def model(monkeypatch: pytest.MonkeyPatch) -> Iterator[Model]:
    monkeypatch.setenv(KEY_ENV, "test-key-123")  # the gateway processes inherit it
    scripted = Model()
    yield scripted
    if scripted.hold_after_tool is not None:
        scripted.hold_after_tool.set()
    scripted.server.close()


def agent_config(model: Model, **options: Any) -> dict[str, Any]:
    return {
        "name": "assistant",
        "kind": "agent",
        "target": "assistant",
        "timeout_seconds": 120,
        "retry": {"max_attempts": 3, "first_interval_seconds": 0.2},
        "options": {
            "model": "test-model",
            "base_url": model.server.url,
            "api_key_env": KEY_ENV,
            "system_prompt": "You add numbers.",
            "tools": ["add", "fail"],
            "max_retries": 3,
            **options,
        },
    }


def write(tmp: Path, model: Model, policy: str | None = None) -> Path:
    config: dict[str, Any] = {
        **BASE,
        "tools": [
            {"name": "add", "kind": "python", "target": "examples.tools:add"},
            {"name": "fail", "kind": "python", "target": "examples.tools:fail"},
            agent_config(model),
        ],
    }
    if policy is not None:
        (tmp / "policies").mkdir()
        (tmp / "policies" / "default.yaml").write_text(policy)
        config["policy"] = {"dir": str(tmp / "policies")}
    path = tmp / "gateway.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def audit(gateway: GatewayProcess, tool: str, event: str) -> list[dict[str, Any]]:
    path = gateway.data_dir / "audit.jsonl"
    deadline = time.monotonic() + 10
    found: list[dict[str, Any]] = []
    while time.monotonic() < deadline:  # the audit log is written by a thread of its own
        records = [json.loads(line) for line in path.read_text().splitlines() if line]
        found = [r for r in records if r.get("tool") == tool and r.get("event") == event]
        if found:
            break
        time.sleep(0.1)
    return found


def first_step(messages: list[dict[str, Any]]) -> bool:
    return messages[-1]["role"] == "user"


async def test_tool_call_then_answer_usage_retry_after_and_memory(
    spawn_gateway: GatewayFactory, tmp_path: Path, model: Model
) -> None:
    gateway = spawn_gateway(config=write(tmp_path, model))
    async with mcp_session(gateway.url) as session:
        tools = {t.name: t for t in (await session.list_tools()).tools}
        assert tools["assistant"].inputSchema["required"] == ["message"]
        result = await session.call_tool("assistant", {"message": "add 2 and 3"})
        assert not result.isError, (result, gateway.log())
        assert result.structuredContent == {
            "answer": 'the tool said: {"result": 5.0}',
            "steps": 2,
            "tool_calls": 1,
        }
        # Two model calls' usage, reported with the result (for budgets).
        assert (result.meta or {})[USAGE_META] == {
            "prompt_tokens": 20,
            "completion_tokens": 10,
            "total_tokens": 30,
        }

        # 429 with Retry-After: the client waits and asks again.
        busy = await session.call_tool("assistant", {"message": "busy"})
        assert not busy.isError, busy
        assert model.count(lambda m: m[-1].get("content") == "busy") == 2

        # Memory: the second call of a conversation sees the first.
        for message in ("add 1 and 1", "what did I ask?"):
            remembered = await session.call_tool(
                "assistant", {"message": message, "context_id": "conversation-1"}
            )
            assert not remembered.isError, remembered
        assert remembered.structuredContent is not None
        assert remembered.structuredContent["answer"] == "you asked before: ['add 1 and 1']"

    # Over A2A the message's contextId is the conversation.
    async with a2a_client(gateway.base, path="/a2a/agents/assistant") as client:
        for asked in ("add 4 and 4", "and before?"):
            msg = a2a_message(data={"message": asked}, context_id="a2a-conversation")
            task = final_task(await collect(client, send(msg)))
        assert result_of(task)["answer"] == "you asked before: ['add 4 and 4']"

    first = model.server.requests[0]
    assert first["model"] == "test-model"
    assert first["messages"][0] == {"role": "system", "content": "You add numbers."}
    offered = {t["function"]["name"]: t["function"] for t in first["tools"]}
    assert set(offered) == {"add", "fail"}
    assert offered["add"]["parameters"]["required"] == ["a", "b"]
    assert model.server.headers[0]["authorization"] == "Bearer test-key-123"
    last = model.server.requests[-1]["messages"]
    # The remembered conversation includes the earlier tool call and its result.
    assert [m["role"] for m in last] == ["system", "user", "assistant", "tool", "assistant", "user"]
    # The tool ran through the dispatch path, as the agent acting for its caller.
    scheduled = audit(gateway, "add", "scheduled")
    assert scheduled and scheduled[0]["principal"] == AGENT_ID
    assert scheduled[0]["chain"] == [ANONYMOUS]
    assert "test-key-123" not in gateway.log()


async def test_a_denied_tool_is_a_refusal_the_model_sees(
    spawn_gateway: GatewayFactory, tmp_path: Path, model: Model
) -> None:
    gateway = spawn_gateway(config=write(tmp_path, model, POLICY))
    async with mcp_session(gateway.url) as session:
        result = await session.call_tool("assistant", {"message": "try fail"})
        assert not result.isError, (result, gateway.log())
        assert result.structuredContent is not None
        answer = result.structuredContent["answer"]
        assert answer.startswith("the tool said: ") and "fail is not for agents" in answer
        assert "denied" in answer
        # The same tool is the caller's own to call.
        direct = await session.call_tool("fail", {"message": "mine"})
        assert direct.isError and "mine" in direct.content[0].text  # type: ignore[union-attr]
    denied = audit(gateway, "fail", "denied")
    assert denied and denied[0]["principal"] == AGENT_ID and denied[0]["chain"] == [ANONYMOUS]


@pytest.mark.crash
async def test_sigkill_between_steps_repeats_no_finished_step(
    spawn_gateway: GatewayFactory, tmp_path: Path, model: Model
) -> None:
    config, data = write(tmp_path, model), tmp_path / "data"
    model.hold_after_tool = threading.Event()  # the model's second answer waits
    first = spawn_gateway(config=config, data_dir=data)
    async with mcp_session(first.url) as session:
        created = await session.experimental.call_tool_as_task(
            "assistant", {"message": "add 20 and 22"}
        )
        task_id = created.task.taskId
    deadline = time.monotonic() + 60
    while model.count(lambda m: m[-1]["role"] == "tool") < 1:  # model call 1 and the tool done
        assert time.monotonic() < deadline, first.log()
        time.sleep(0.05)
    first.kill()  # while the second model call is in flight
    model.hold_after_tool.set()

    second = spawn_gateway(config=config, data_dir=data)
    async with mcp_session(second.url) as session:
        with anyio.fail_after(90):
            result = await session.experimental.get_task_result(task_id, types.CallToolResult)
    assert not result.isError, (result, second.log())
    assert result.structuredContent == {
        "answer": 'the tool said: {"result": 42.0}',
        "steps": 2,
        "tool_calls": 1,
    }
    # The first model call and the tool call were saved before the kill: neither ran again.
    assert model.count(first_step) == 1
    assert len(audit(second, "add", "scheduled")) == 1
    assert model.count(lambda m: m[-1]["role"] == "tool") == 2  # the unfinished one, again
    # Usage of the saved step counts, the lost request does not.
    assert (result.meta or {})[USAGE_META]["total_tokens"] == 30


def test_options_are_checked_when_the_tool_loads() -> None:
    agent = adapter_for("agent")

    def prepare(**options: Any) -> Any:
        return agent.prepare(ToolConfig(name="a", kind="agent", target="a", options=options))

    with pytest.raises(ToolLoadError, match="option 'model' is required"):
        prepare(base_url="http://127.0.0.1:1/v1")
    with pytest.raises(ToolLoadError, match="unknown option 'modle'"):
        prepare(modle="m", model="m", base_url="http://x")
    with pytest.raises(ToolLoadError, match="'tools' lists 'a.b'"):
        prepare(model="m", base_url="http://x", tools=["a.b"])
    with pytest.raises(ToolLoadError, match="cannot list itself"):
        prepare(model="m", base_url="http://x", tools=["a"])
    with pytest.raises(ToolLoadError, match="max_steps"):
        prepare(model="m", base_url="http://x", max_steps=0)
    tool = prepare(model="m", base_url="http://x", tools=["add"])
    assert tool.spec.input_schema["required"] == ["message"]

    # A scripted model instead of an HTTP API.
    with pytest.raises(ToolLoadError, match="'base_url' is for a model behind an HTTP API"):
        prepare(script="examples.agents:analyst", base_url="http://x")
    with pytest.raises(ToolLoadError, match="'max_retries' is for a model behind an HTTP API"):
        prepare(script="examples.agents:analyst", max_retries=2)
    with pytest.raises(ToolLoadError, match="no module named 'examples.nope'"):
        prepare(script="examples.nope:analyst")
    with pytest.raises(
        ToolLoadError, match="names 'examples.agents:NUMBER', a str, not a function"
    ):
        prepare(script="examples.agents:NUMBER")
    with pytest.raises(ToolLoadError, match="must take one argument"):
        prepare(script="tests.adapters.targets:not_a_graph")
    with pytest.raises(ToolLoadError, match=r"'model' is required \(or 'script'"):
        prepare(tools=["add"])
    scripted = prepare(script="examples.agents:analyst", tools=["add"])
    assert scripted.spec.description == "An LLM agent (scripted: examples.agents:analyst)"


class MemoryStore:
    """Checkpoints in a dict (the scripted model's failures need no engine)."""

    def __init__(self) -> None:
        self.values: dict[str, Any] = {}

    async def aget(self, name: str) -> Any:
        return self.values.get(name)

    async def aput(self, name: str, value: Any) -> None:
        self.values[name] = json.loads(json.dumps(value))


async def test_a_scripted_model_refusing_or_answering_nonsense() -> None:
    def run(script: str) -> Any:
        tool = adapter_for("agent").prepare(
            ToolConfig(name="a", kind="agent", target="a", options={"script": script})
        )
        context = ToolContext("call-1", "exec-1", checkpoints=MemoryStore())  # type: ignore[arg-type]
        return tool.invoke({"message": "hello"}, context)

    # ModelError: a refusal for good, the tool's error (as a 4xx from an API).
    with pytest.raises(ToolError, match="agent a: the script will not answer 'scripted'"):
        await run("tests.adapters.targets:refusing_script")
    # Anything else is unexpected, retried by the tool's retry policy (as a 5xx).
    with pytest.raises(RuntimeError, match="returned a str, not a chat-completions response"):
        await run("tests.adapters.targets:text_script")
