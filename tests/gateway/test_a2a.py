"""The A2A front door end to end: gateway processes, the a2a-sdk client over both bindings
(JSON-RPC and HTTP+JSON), httpx for the raw protocol checks, a local webhook for pushes.

- an anonymous gateway (module-scoped) for cards, send, stream, get, list, cancel, subscribe,
  push and malformed requests;
- a gateway with JWT-SVIDs and tenant policies for denial, input-required approvals and
  cross-tenant attempts;
- SIGKILL and restart: the task survives and its push is delivered after the restart.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from a2a.client import A2ACardResolver, Client, ClientConfig, ClientFactory
from a2a.client.errors import A2AClientError
from a2a.types import (
    AgentCard,
    CancelTaskRequest,
    GetTaskRequest,
    ListTaskPushNotificationConfigsRequest,
    ListTasksRequest,
    Message,
    Part,
    Role,
    SendMessageConfiguration,
    SendMessageRequest,
    StreamResponse,
    SubscribeToTaskRequest,
    Task,
    TaskPushNotificationConfig,
    TaskState,
)
from a2a.utils.errors import A2AError
from google.protobuf import struct_pb2
from google.protobuf.json_format import MessageToDict

from gateway.a2a_agents import check_agents
from gateway.config import ConfigError, parse_config
from identity.dev_ca import DevCA
from tests.gateway.conftest import TEST_CONFIG, GatewayFactory, GatewayProcess
from tests.webhook import Webhook

pytestmark = [pytest.mark.timeout(90)]

BINDINGS = ["JSONRPC", "HTTP+JSON"]
# What the client raises: the server's A2A error, or its own for transport failures.
ERRORS = (A2AError, A2AClientError)
V1 = {"A2A-Version": "1.0"}


# --- helpers ------------------------------------------------------------------------------


def base_config(**changes: Any) -> dict[str, Any]:
    config = yaml.safe_load(TEST_CONFIG.read_text())
    config["tools"].append(  # an agent-like kind: an A2A agent of its own
        {"name": "review", "kind": "langgraph", "target": "examples.graphs:build_review"}
    )
    config["a2a"] = {
        "agents": [{"name": "math", "description": "Arithmetic.", "tools": ["add"]}],
        "push": {"allowed_hosts": ["127.0.0.1"], "first_retry_seconds": 0.2},
    }
    config.update(changes)
    return config


def write(tmp: Path, config: dict[str, Any]) -> Path:
    path = tmp / "gateway.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def message(
    skill: str | None = None,
    data: dict[str, Any] | None = None,
    text: str | None = None,
    task_id: str = "",
    context_id: str = "",
) -> Message:
    msg = Message(
        message_id=uuid.uuid4().hex, role=Role.ROLE_USER, task_id=task_id, context_id=context_id
    )
    if data is not None:
        value = struct_pb2.Value()
        value.struct_value.update(data)
        msg.parts.append(Part(data=value))
    if text is not None:
        msg.parts.append(Part(text=text))
    if skill is not None:
        msg.metadata.update({"skill": skill})
    return msg


def send(
    msg: Message, immediately: bool = False, push: TaskPushNotificationConfig | None = None
) -> SendMessageRequest:
    config = SendMessageConfiguration(return_immediately=immediately)
    if push is not None:
        config.task_push_notification_config.CopyFrom(push)
    return SendMessageRequest(message=msg, configuration=config)


async def card_of(base: str, path: str = "", headers: dict[str, str] | None = None) -> AgentCard:
    async with httpx.AsyncClient(headers=headers or {}) as http:
        return await A2ACardResolver(http, base + path).get_agent_card()


@asynccontextmanager
async def a2a_client(
    base: str,
    binding: str = "JSONRPC",
    path: str = "",
    streaming: bool = False,
    token: str | None = None,
) -> AsyncIterator[Client]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with httpx.AsyncClient(headers=headers, timeout=60) as http:
        card = await A2ACardResolver(http, base + path).get_agent_card()
        config = ClientConfig(
            httpx_client=http, streaming=streaming, supported_protocol_bindings=[binding]
        )
        client = ClientFactory(config).create(card)
        try:
            yield client
        finally:
            await client.close()


async def collect(client: Client, request: SendMessageRequest) -> list[StreamResponse]:
    return [event async for event in client.send_message(request)]


def final_task(events: list[StreamResponse]) -> Task:
    tasks = [e.task for e in events if e.HasField("task")]
    assert tasks, events
    return tasks[-1]


def result_of(task: Task) -> Any:
    assert task.artifacts, task
    return MessageToDict(task.artifacts[0].parts[0].data)


async def poll(client: Client, task_id: str, until: set[int], timeout: float = 30) -> Task:
    deadline = time.monotonic() + timeout
    while True:
        task = await client.get_task(GetTaskRequest(id=task_id))
        if task.status.state in until:
            return task
        assert time.monotonic() < deadline, task
        time.sleep(0.1)


def rpc(
    base: str, method: str, params: Any, headers: dict[str, str] | None = None
) -> dict[str, Any]:
    body = {"jsonrpc": "2.0", "id": 7, "method": method, "params": params}
    response = httpx.post(f"{base}/a2a", json=body, headers={**V1, **(headers or {})}, timeout=30)
    assert response.status_code == 200, response.text
    answer: dict[str, Any] = response.json()
    return answer


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    tmp = tmp_path_factory.mktemp("a2a")
    factory = GatewayFactory(tmp)
    yield factory(config=write(tmp, base_config()))
    factory.stop_all()


# --- cards --------------------------------------------------------------------------------


async def test_cards_list_skills_agents_and_bindings(gateway: GatewayProcess) -> None:
    directory = await card_of(gateway.base)
    assert directory.name == "duragate"
    skills = {s.id for s in directory.skills}
    assert {"add", "slow_echo", "fail"} <= skills
    bindings = {i.protocol_binding: i.url for i in directory.supported_interfaces}
    assert bindings == {
        "JSONRPC": f"{gateway.base}/a2a",
        "HTTP+JSON": f"{gateway.base}/a2a/rest",
    }
    assert directory.capabilities.streaming and directory.capabilities.push_notifications
    listed = MessageToDict(directory.capabilities.extensions[0].params)["agents"]
    assert [a["name"] for a in listed] == ["math", "review"]
    math = await card_of(gateway.base, "/a2a/agents/math")
    assert [s.id for s in math.skills] == ["add"]
    assert math.supported_interfaces[0].url == f"{gateway.base}/a2a/agents/math"
    missing = httpx.get(f"{gateway.base}/a2a/agents/nope/.well-known/agent-card.json")
    assert missing.status_code == 404


# --- send, stream, get, list, cancel, subscribe -------------------------------------------


@pytest.mark.parametrize("binding", BINDINGS)
async def test_send_blocking_and_errors(gateway: GatewayProcess, binding: str) -> None:
    async with a2a_client(gateway.base, binding) as client:
        task = final_task(await collect(client, send(message("add", {"a": 2, "b": 3}))))
        assert task.status.state == TaskState.TASK_STATE_COMPLETED
        assert result_of(task) == {"result": 5.0}
        assert task.context_id
        # A tool that fails: a FAILED task with the tool's message.
        failed = final_task(await collect(client, send(message("fail", {"message": "boom"}))))
        assert failed.status.state == TaskState.TASK_STATE_FAILED
        assert "boom" in failed.status.message.parts[0].text
        # Arguments that break the schema: invalid params naming the field, nothing runs.
        with pytest.raises(ERRORS) as info:
            await collect(client, send(message("add", {"a": "two", "b": 3})))
        assert "a" in str(info.value) and "invalid arguments" in str(info.value)
        with pytest.raises(ERRORS, match="unknown skill"):
            await collect(client, send(message("nope", {})))
        with pytest.raises(ERRORS, match="several skills"):
            await collect(client, send(message(None, {"a": 1, "b": 2})))
    # On the one-skill agent the skill is implied, and text works for a one-string tool.
    async with a2a_client(gateway.base, binding, "/a2a/agents/math") as client:
        task = final_task(await collect(client, send(message(None, {"a": 1, "b": 1}))))
        assert result_of(task) == {"result": 2.0}
        with pytest.raises(ERRORS, match="unknown skill"):
            await collect(client, send(message("slow_echo", {"text": "x"})))


@pytest.mark.parametrize("binding", BINDINGS)
async def test_stream_reports_progress_then_the_result(
    gateway: GatewayProcess, binding: str
) -> None:
    async with a2a_client(gateway.base, binding, streaming=True) as client:
        events = await collect(
            client, send(message("slow_echo", {"text": "streamed", "seconds": 0.6}))
        )
    kinds = [e.WhichOneof("payload") for e in events]
    assert kinds[0] == "task" and events[0].task.status.state == TaskState.TASK_STATE_WORKING
    updates = [e.status_update for e in events if e.HasField("status_update")]
    assert any("of 0.6 s" in u.status.message.parts[0].text for u in updates), events
    artifact = next(e.artifact_update for e in events if e.HasField("artifact_update"))
    assert MessageToDict(artifact.artifact.parts[0].data) == {"result": "streamed"}
    assert updates[-1].status.state == TaskState.TASK_STATE_COMPLETED
    assert kinds[-1] == "status_update"


@pytest.mark.parametrize("binding", BINDINGS)
async def test_get_list_cancel_subscribe(gateway: GatewayProcess, binding: str) -> None:
    context = uuid.uuid4().hex
    async with a2a_client(gateway.base, binding) as client:
        slow = final_task(
            await collect(
                client,
                send(
                    message("slow_echo", {"text": "x", "seconds": 60}, context_id=context),
                    immediately=True,
                ),
            )
        )
        assert slow.status.state == TaskState.TASK_STATE_WORKING
        quick = final_task(
            await collect(
                client,
                send(message("add", {"a": 1, "b": 2}, context_id=context), immediately=True),
            )
        )
        done = await poll(client, quick.id, {TaskState.TASK_STATE_COMPLETED})
        assert result_of(done) == {"result": 3.0}
        # Anonymous callers are all one principal: listing would share their tasks, so they
        # see none (ids still reach their own); listing is tested with identities below.
        assert list((await client.list_tasks(ListTasksRequest(context_id=context))).tasks) == []

        cancelled = await client.cancel_task(CancelTaskRequest(id=slow.id))
        assert cancelled.status.state == TaskState.TASK_STATE_CANCELED
        with pytest.raises(ERRORS, match="already"):
            await client.cancel_task(CancelTaskRequest(id=slow.id))
        with pytest.raises(ERRORS):
            await client.get_task(GetTaskRequest(id="no-such-task"))
        started = final_task(
            await collect(
                client, send(message("slow_echo", {"text": "sub", "seconds": 3}), immediately=True)
            )
        )

    async with a2a_client(gateway.base, binding, streaming=True) as client:
        with pytest.raises(ERRORS):  # already completed: nothing to subscribe to
            async for _ in client.subscribe(SubscribeToTaskRequest(id=quick.id)):
                pass
        events = [e async for e in client.subscribe(SubscribeToTaskRequest(id=started.id))]
    assert events[0].HasField("task") and events[0].task.id == started.id
    assert events[-1].status_update.status.state == TaskState.TASK_STATE_COMPLETED


# --- push ---------------------------------------------------------------------------------


async def test_push_notifications_with_token(gateway: GatewayProcess, webhook: Webhook) -> None:
    push = TaskPushNotificationConfig(url=webhook.url, token="secret-token-1")
    async with a2a_client(gateway.base) as client:
        task = final_task(
            await collect(
                client,
                send(
                    message("slow_echo", {"text": "p", "seconds": 0.3}), immediately=True, push=push
                ),
            )
        )
        headers = webhook.wait_for(task.id, "TASK_STATE_COMPLETED")
        assert headers["x-a2a-notification-token"] == "secret-token-1"
        configs = await client.list_task_push_notification_configs(
            ListTaskPushNotificationConfigsRequest(task_id=task.id)
        )
        assert [c.url for c in configs.configs] == [webhook.url]
    assert "TASK_STATE_WORKING" in webhook.states(task.id)
    # Pushes to internal addresses the operator did not allow are refused up front.
    reply = rpc(
        gateway.base,
        "CreateTaskPushNotificationConfig",
        {"taskId": task.id, "url": "http://10.0.0.1/hook"},
    )
    assert reply["error"]["code"] == -32602 and "not allowed" in reply["error"]["message"]


async def test_task_and_push_survive_a_sigkill(
    spawn_gateway: GatewayFactory, tmp_path: Path, webhook: Webhook
) -> None:
    config = write(tmp_path, base_config())
    data = tmp_path / "data"
    first = spawn_gateway(config=config, data_dir=data)
    push = TaskPushNotificationConfig(url=webhook.url, token="t")
    async with a2a_client(first.base) as client:
        task = final_task(
            await collect(
                client,
                send(
                    message("slow_echo", {"text": "survived", "seconds": 3}),
                    immediately=True,
                    push=push,
                ),
            )
        )
    webhook.wait_for(task.id, "TASK_STATE_WORKING")
    first.kill()
    second = spawn_gateway(config=config, data_dir=data)
    webhook.wait_for(task.id, "TASK_STATE_COMPLETED", timeout=60)
    async with a2a_client(second.base) as client:
        done = await client.get_task(GetTaskRequest(id=task.id))
    assert done.status.state == TaskState.TASK_STATE_COMPLETED
    assert result_of(done) == {"result": "survived"}


# --- protocol misuse ----------------------------------------------------------------------


def test_malformed_requests_get_protocol_errors(gateway: GatewayProcess) -> None:
    url = f"{gateway.base}/a2a"
    bad_json = httpx.post(url, content=b"{nope", headers={**V1, "Content-Type": "application/json"})
    assert bad_json.json()["error"]["code"] == -32700
    unknown = rpc(gateway.base, "NoSuchMethod", {})
    assert unknown["error"]["code"] == -32601
    no_message = rpc(gateway.base, "SendMessage", {})
    assert no_message["error"]["code"] == -32602
    not_object = rpc(
        gateway.base,
        "SendMessage",
        {
            "message": {
                "messageId": "m",
                "role": "ROLE_USER",
                "parts": [{"data": [1, 2]}],
                "metadata": {"skill": "add"},
            }
        },
    )
    assert not_object["error"]["code"] == -32602 and "object" in not_object["error"]["message"]
    # 1.0 method names need the 1.0 version header; an unknown version is refused.
    body = {"jsonrpc": "2.0", "id": 1, "method": "GetTask", "params": {"id": "x"}}
    assert httpx.post(url, json=body).json()["error"]["code"] == -32009
    future = httpx.post(url, json=body, headers={"A2A-Version": "9.9"}).json()
    assert future["error"]["code"] == -32009
    # The 0.3 method names are still served.
    legacy = httpx.post(
        url,
        json={
            "jsonrpc": "2.0",
            "id": 2,
            "method": "message/send",
            "params": {
                "message": {
                    "messageId": uuid.uuid4().hex,
                    "role": "user",
                    "kind": "message",
                    "parts": [{"kind": "data", "data": {"a": 2, "b": 2}}],
                    "metadata": {"skill": "add"},
                }
            },
        },
    ).json()
    assert legacy["result"]["status"]["state"] == "completed"
    too_big = httpx.post(url, content=b"x" * 70_000, headers=V1)
    assert too_big.status_code == 413
    rebinding = httpx.post(url, json=body, headers={**V1, "Host": "evil.example"})
    assert rebinding.status_code in (400, 403, 421)


# --- identity, policy, approvals and tenants ----------------------------------------------

ALICE = "spiffe://example.org/team-a/alice"
BOB = "spiffe://example.org/team-a/bob"
MALLORY = "spiffe://partner.org/mallory"
TEAM_A = """
tenant: team-a
members: [spiffe://example.org/team-a/**]
tools:
  add: {call: [group:members]}
  slow_echo: {call: [group:members]}
  word_count:
    call: [group:members]
    approval:
      approvers: [spiffe://example.org/team-a/bob]
      expires_seconds: 600
  fail:
    call: [group:members]
    deny: [{when: "args.message == 'forbidden'", reason: that message is switched off here}]
"""
PARTNER = """
tenant: partner.org
members: [spiffe://partner.org/**]
tools:
  add: {call: [group:members]}
  slow_echo: {call: [group:members]}
"""


@dataclass
class Secured:
    gateway: GatewayProcess
    ca: DevCA
    partner: DevCA

    def token(self, spiffe_id: str) -> str:
        ca = self.partner if spiffe_id.startswith("spiffe://partner.org") else self.ca
        return ca.issue_jwt_svid(spiffe_id, "duragate", ttl=timedelta(minutes=10))


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Secured]:
    tmp = tmp_path_factory.mktemp("a2a-secured")
    ca = DevCA.create(tmp / "ca-example", "example.org")
    partner = DevCA.create(tmp / "ca-partner", "partner.org")
    policies = tmp / "policies"
    policies.mkdir()
    (policies / "team-a.yaml").write_text(TEAM_A)
    (policies / "partner.org.yaml").write_text(PARTNER)
    config = base_config(
        identity={
            "trust_domain": "example.org",
            "allow_anonymous": False,
            "audience": "duragate",
            "bundles": {
                "example.org": str(tmp / "ca-example" / "bundle.json"),
                "partner.org": str(tmp / "ca-partner" / "bundle.json"),
            },
            "tenants": [{"match": "spiffe://example.org/team-a/**", "tenant": "team-a"}],
        },
        policy={"dir": str(policies)},
    )
    factory = GatewayFactory(tmp)
    yield Secured(factory(config=write(tmp, config)), ca, partner)
    factory.stop_all()


async def test_unauthenticated_callers_are_refused(secured: Secured) -> None:
    base = secured.gateway.base
    refused = httpx.post(
        f"{base}/a2a",
        json={"jsonrpc": "2.0", "id": 1, "method": "GetTask", "params": {"id": "x"}},
        headers=V1,
    )
    assert refused.status_code == 401 and refused.headers["www-authenticate"].startswith("Bearer")
    forged = httpx.post(
        f"{base}/a2a/rest/message:send", json={}, headers={**V1, "Authorization": "Bearer a.b.c"}
    )
    assert forged.status_code == 401
    # The card still says how to authenticate, and shows no skills to a stranger.
    card = await card_of(base)
    assert "jwt_svid" in card.security_schemes and not card.skills
    alice_card = await card_of(base, headers={"Authorization": f"Bearer {secured.token(ALICE)}"})
    assert {s.id for s in alice_card.skills} == {"add", "slow_echo", "word_count", "fail"}


@pytest.mark.parametrize("binding", BINDINGS)
async def test_policy_denial_is_a_rejected_task(secured: Secured, binding: str) -> None:
    async with a2a_client(secured.gateway.base, binding, token=secured.token(ALICE)) as client:
        rejected = final_task(
            await collect(client, send(message("fail", {"message": "forbidden"})))
        )
        assert rejected.status.state == TaskState.TASK_STATE_REJECTED
        assert "switched off" in rejected.status.message.parts[0].text
        # Nothing was stored for it.
        with pytest.raises(ERRORS):
            await client.get_task(GetTaskRequest(id=rejected.id))
        # A tool the tenant's policy does not name is not even a skill.
        with pytest.raises(ERRORS, match="unknown skill"):
            await collect(client, send(message("flaky", {"key": "k"})))


async def test_input_required_answered_by_an_approver(secured: Secured) -> None:
    base = secured.gateway.base
    async with a2a_client(base, token=secured.token(ALICE)) as alice:
        waiting = final_task(
            await collect(alice, send(message("word_count", {"text": "one two three"})))
        )
        assert waiting.status.state == TaskState.TASK_STATE_INPUT_REQUIRED
        assert "approval" in waiting.status.message.parts[0].text
        # The caller may not approve its own call.
        with pytest.raises(ERRORS, match="may not"):
            await collect(alice, send(message(text="approve", task_id=waiting.id)))
    async with a2a_client(base, token=secured.token(BOB)) as bob:
        answered = final_task(
            await collect(
                bob, send(message(data={"approve": True, "reason": "fine"}, task_id=waiting.id))
            )
        )
        assert "approved by" in answered.status.message.parts[0].text
    assert answered.id == waiting.id
    async with a2a_client(base, token=secured.token(ALICE)) as alice:
        done = await poll(alice, waiting.id, {TaskState.TASK_STATE_COMPLETED})
    assert result_of(done)["words"] == 3


@pytest.mark.parametrize("binding", BINDINGS)
async def test_other_tenants_cannot_touch_a_task(secured: Secured, binding: str) -> None:
    base = secured.gateway.base
    async with a2a_client(base, binding, token=secured.token(ALICE)) as alice:
        task = final_task(
            await collect(
                alice, send(message("slow_echo", {"text": "mine", "seconds": 30}), immediately=True)
            )
        )
    for intruder in (MALLORY, BOB):  # another tenant, and another caller of the same tenant
        async with a2a_client(base, binding, token=secured.token(intruder)) as other:
            with pytest.raises(ERRORS):
                await other.get_task(GetTaskRequest(id=task.id))
            with pytest.raises(ERRORS):
                await other.cancel_task(CancelTaskRequest(id=task.id))
            with pytest.raises(ERRORS):
                await collect(other, send(message(text="approve", task_id=task.id)))
            listed = await other.list_tasks(ListTasksRequest())
            assert task.id not in {t.id for t in listed.tasks}
        async with a2a_client(
            base, binding, streaming=True, token=secured.token(intruder)
        ) as other:
            with pytest.raises(ERRORS):
                async for _ in other.subscribe(SubscribeToTaskRequest(id=task.id)):
                    pass
    async with a2a_client(base, binding, token=secured.token(ALICE)) as alice:
        still = await alice.get_task(GetTaskRequest(id=task.id))
        assert still.status.state == TaskState.TASK_STATE_WORKING
        await alice.cancel_task(CancelTaskRequest(id=task.id))


# --- configuration ------------------------------------------------------------------------


def test_agent_config_errors_name_the_line(tmp_path: Path) -> None:
    text = TEST_CONFIG.read_text() + (
        "a2a:\n  agents:\n    - name: maths\n      tools: [add, nosuch]\n"
    )
    config = parse_config(text, "gw.yaml", tmp_path)
    with pytest.raises(ConfigError) as info:
        check_agents(config)
    assert "gw.yaml:" in str(info.value) and "no tool named 'nosuch'" in str(info.value)
    bad_name = (
        TEST_CONFIG.read_text() + "a2a:\n  agents:\n    - name: Bad/Name\n      tools: [add]\n"
    )
    with pytest.raises(ConfigError, match="not a valid agent name"):
        parse_config(bad_name, "gw.yaml", tmp_path)
    twice = TEST_CONFIG.read_text() + (
        "a2a:\n  agents:\n    - {name: a, tools: [add]}\n    - {name: a, tools: [add]}\n"
    )
    with pytest.raises(ConfigError, match="defined twice"):
        parse_config(twice, "gw.yaml", tmp_path)
    typo = TEST_CONFIG.read_text() + "a2a:\n  push:\n    allowed_host: [x]\n"
    with pytest.raises(ConfigError, match="allowed_host"):
        parse_config(typo, "gw.yaml", tmp_path)


@pytest.mark.parametrize("binding", BINDINGS)
async def test_input_required_from_a_graph_interrupt(gateway: GatewayProcess, binding: str) -> None:
    text = "Durable waits are workflow events. The rest is detail."
    async with a2a_client(gateway.base, binding, "/a2a/agents/review") as client:
        waiting = final_task(await collect(client, send(message(None, {"text": text}))))
        assert waiting.status.state == TaskState.TASK_STATE_INPUT_REQUIRED, waiting
        assert "Publish this summary?" in waiting.status.message.parts[0].text
        answer = message(data={"approve": True, "note": "ship it"}, task_id=waiting.id)
        done = final_task(await collect(client, send(answer)))
        assert done.id == waiting.id
        assert done.status.state == TaskState.TASK_STATE_COMPLETED, done
        assert result_of(done) == {
            "summary": "Durable waits are workflow events.",
            "status": "approved",
            "reviewer_note": "ship it",
        }
        with pytest.raises(ERRORS, match="completed"):  # nothing waits any more
            await collect(client, send(message(data={"approve": False}, task_id=waiting.id)))


@pytest.mark.parametrize("binding", BINDINGS)
async def test_list_filters_and_replay_for_an_identified_caller(
    secured: Secured, binding: str
) -> None:
    context = uuid.uuid4().hex
    async with a2a_client(secured.gateway.base, binding, token=secured.token(ALICE)) as client:
        slow = final_task(
            await collect(
                client,
                send(
                    message("slow_echo", {"text": "x", "seconds": 60}, context_id=context),
                    immediately=True,
                ),
            )
        )
        msg = message("add", {"a": 4, "b": 4}, context_id=context)
        quick = final_task(await collect(client, send(msg)))
        assert result_of(quick) == {"result": 8.0}
        # The same message again (a client retrying): the same task, not a second run.
        again = final_task(await collect(client, send(msg)))
        assert again.id == quick.id and result_of(again) == {"result": 8.0}
        listed = await client.list_tasks(ListTasksRequest(context_id=context))
        assert {t.id for t in listed.tasks} == {slow.id, quick.id}
        working = await client.list_tasks(
            ListTasksRequest(context_id=context, status=TaskState.TASK_STATE_WORKING)
        )
        assert [t.id for t in working.tasks] == [slow.id]
        await client.cancel_task(CancelTaskRequest(id=slow.id))
    deadline = time.monotonic() + 10
    audit = secured.gateway.data_dir / "audit.jsonl"
    while True:  # the audit log is written by a thread of its own: give it a moment
        records = [json.loads(line) for line in audit.read_text().splitlines()]
        events = [r["event"] for r in records if r.get("task") == quick.id]
        if "replayed" in events or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert events.count("scheduled") == 1 and "replayed" in events, events  # it ran once


async def test_push_delivery_retries_and_gives_up_on_a_refusal(
    gateway: GatewayProcess, webhook: Webhook
) -> None:
    push = TaskPushNotificationConfig(url=webhook.url, token="t")
    webhook.refusals = [503, 503]  # down twice: retried with backoff, then delivered
    async with a2a_client(gateway.base) as client:
        task = final_task(
            await collect(
                client, send(message("add", {"a": 1, "b": 1}), immediately=True, push=push)
            )
        )
        webhook.wait_for(task.id, "TASK_STATE_COMPLETED")
        assert webhook.refused == [503, 503]
        # A webhook that refuses for good (410 Gone) is not asked again.
        webhook.refused.clear()
        webhook.refusals = [410] * 5
        gone = final_task(
            await collect(
                client, send(message("add", {"a": 2, "b": 2}), immediately=True, push=push)
            )
        )
        await poll(client, gone.id, {TaskState.TASK_STATE_COMPLETED})
    time.sleep(2)  # room for retries that must not come
    assert 1 <= len(webhook.refused) <= 2, webhook.refused  # one per state at most, never retried
    assert webhook.states(gone.id) == []
