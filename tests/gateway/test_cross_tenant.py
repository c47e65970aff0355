"""Tenant isolation on every operation, through the real mcp client and HTTP with JWT-SVIDs from
a development CA: a principal of tenant B tries tenant A's tools, tasks and approvals. Each
attempt is refused (or sees nothing), an id of A's answers exactly as an unknown id does, and
A's calls are left as they were.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import httpx
import pytest
from mcp import ClientSession, McpError, types
from mcp.client.streamable_http import streamable_http_client

from identity.dev_ca import DevCA
from tests.gateway.conftest import REPO_ROOT, TEST_CONFIG, GatewayFactory, GatewayProcess, child_env

pytestmark = [
    pytest.mark.timeout(120),
    pytest.mark.filterwarnings("ignore:The experimental tasks API:DeprecationWarning"),
]

ALICE = "spiffe://example.org/team-a/alice"
BOSS = "spiffe://example.org/team-a/boss"  # approves team-a's payments
MALLORY = "spiffe://example.org/team-b/mallory"  # tenant team-b, an approver there

IDENTITY = """\
identity:
  trust_domain: example.org
  allow_anonymous: false
  audience: duragate
  bundles:
    example.org: ca/bundle.json
  tenants:
    - match: spiffe://example.org/team-a/**
      tenant: team-a
    - match: spiffe://example.org/team-b/**
      tenant: team-b
"""

TEAM_A = """
tenant: team-a
members: [spiffe://example.org/team-a/**]
tools:
  add:
    call: [group:members]
  slow_echo:
    call: [group:members]
    approval:
      when: "args.text == 'approve me'"
      approvers: [spiffe://example.org/team-a/boss]
"""

# Team B may call slow_echo too and approves its own calls: still nothing of team A's.
TEAM_B = """
tenant: team-b
members: [spiffe://example.org/team-b/**]
tools:
  word_count:
    call: [group:members]
  slow_echo:
    call: [group:members]
    approval:
      when: "args.text == 'approve me'"
      approvers: [group:members]
      allow_self: true
"""

UNKNOWN_ID = "0" * 32


@dataclass
class Setup:
    gateway: GatewayProcess
    ca: DevCA

    def token(self, spiffe_id: str) -> str:
        return self.ca.issue_jwt_svid(spiffe_id, "duragate", timedelta(minutes=10))

    def http(self, spiffe_id: str) -> httpx.Client:
        headers = {"Authorization": f"Bearer {self.token(spiffe_id)}"}
        return httpx.Client(base_url=self.gateway.base, headers=headers, timeout=30)

    def audit(self) -> list[dict[str, Any]]:
        path = self.gateway.data_dir / "audit.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()]

    def audited(self, count: int, **match: str) -> list[dict[str, Any]]:
        """The records matching `match`, once there are `count` (the gateway writes its audit
        log from a background thread)."""
        deadline = time.monotonic() + 30
        while True:
            found = [r for r in self.audit() if all(r.get(k) == v for k, v in match.items())]
            if len(found) >= count or time.monotonic() > deadline:
                return found
            time.sleep(0.1)


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    tmp = tmp_path_factory.mktemp("tenants")
    ca = DevCA.create(tmp / "ca", "example.org")
    policies = tmp / "policies"
    policies.mkdir()
    (policies / "team-a.yaml").write_text(TEAM_A)
    (policies / "team-b.yaml").write_text(TEAM_B)
    text = TEST_CONFIG.read_text()
    assert "identity:\n  allow_anonymous: true\n" in text
    text = text.replace("identity:\n  allow_anonymous: true\n", IDENTITY)
    config = tmp / "gateway.yaml"
    config.write_text(text + f"\npolicy:\n  dir: {policies}\n")
    factory = GatewayFactory(tmp)
    try:
        yield Setup(factory(config), ca)
    finally:
        factory.stop_all()


@asynccontextmanager
async def session_as(setup: Setup, spiffe_id: str) -> AsyncIterator[ClientSession]:
    headers = {"Authorization": f"Bearer {setup.token(spiffe_id)}"}
    async with httpx.AsyncClient(headers=headers, timeout=httpx.Timeout(30, read=300)) as http:
        async with streamable_http_client(setup.gateway.url, http_client=http) as streams:
            async with ClientSession(streams[0], streams[1]) as session:
                await session.initialize()
                yield session


@dataclass
class Tasks:
    working: str  # a long call of Alice's
    waiting: str  # a call of Alice's waiting for the boss's approval


@pytest.fixture(scope="module")
def alices(setup: Setup) -> Tasks:
    """Alice's calls, made once for the module (on a loop of their own)."""
    return asyncio.run(_alices(setup))


async def _alices(setup: Setup) -> Tasks:
    async with session_as(setup, ALICE) as session:
        working = await session.experimental.call_tool_as_task(
            "slow_echo", {"text": "long", "seconds": 60}
        )
        waiting = await session.experimental.call_tool_as_task(
            "slow_echo", {"text": "approve me", "seconds": 0}
        )
        tasks = Tasks(working.task.taskId, waiting.task.taskId)
        deadline = time.monotonic() + 30
        while (await session.experimental.get_task(tasks.waiting)).status != "input_required":
            assert time.monotonic() < deadline, setup.gateway.log()
            await asyncio.sleep(0.1)
    return tasks


async def alices_states(setup: Setup, tasks: Tasks) -> tuple[str, str]:
    async with session_as(setup, ALICE) as session:
        working = await session.experimental.get_task(tasks.working)
        waiting = await session.experimental.get_task(tasks.waiting)
    return working.status, waiting.status


def same_refusal(theirs: McpError, unknown: McpError, their_id: str) -> None:
    """An id of another tenant is answered exactly as an id that does not exist."""
    assert theirs.error.code == unknown.error.code == types.INVALID_PARAMS
    assert theirs.error.message == unknown.error.message.replace(UNKNOWN_ID, their_id)
    assert theirs.error.message == f"no task {their_id!r}"
    assert theirs.error.data == unknown.error.data


async def test_tools_list_shows_only_the_own_tenants_tools(setup: Setup) -> None:
    async with session_as(setup, ALICE) as session:
        assert {t.name for t in (await session.list_tools()).tools} == {"add", "slow_echo"}
    async with session_as(setup, MALLORY) as session:
        assert {t.name for t in (await session.list_tools()).tools} == {"word_count", "slow_echo"}


async def test_calling_another_tenants_tool_is_an_unknown_tool(setup: Setup) -> None:
    async with session_as(setup, MALLORY) as session:
        with pytest.raises(McpError) as theirs:
            await session.call_tool("add", {"a": 1, "b": 2})
        with pytest.raises(McpError) as unknown:
            await session.call_tool("no_such_tool", {})
        with pytest.raises(McpError) as as_task:
            await session.experimental.call_tool_as_task("add", {"a": 1, "b": 2})
    assert theirs.value.error.code == unknown.value.error.code == types.INVALID_PARAMS
    assert theirs.value.error.message == "unknown tool 'add'"
    assert as_task.value.error.message == "unknown tool 'add'"
    records = setup.audited(2, principal=MALLORY, tool="add")
    assert [r["event"] for r in records] == ["refused", "refused"]  # and nothing scheduled
    assert all(r["tenant"] == "team-b" for r in records)


async def test_tasks_of_another_tenant_behave_like_unknown_ids(setup: Setup, alices: Tasks) -> None:
    async with session_as(setup, MALLORY) as session:
        tasks = session.experimental
        with pytest.raises(McpError) as unknown:
            await tasks.get_task(UNKNOWN_ID)
        for their_id in (alices.working, alices.waiting):
            with pytest.raises(McpError) as got:
                await tasks.get_task(their_id)
            same_refusal(got.value, unknown.value, their_id)
            with pytest.raises(McpError) as result:  # refused at once, not after waiting
                await tasks.get_task_result(their_id, types.CallToolResult)
            same_refusal(result.value, unknown.value, their_id)
            with pytest.raises(McpError) as cancelled:
                await tasks.cancel_task(their_id)
            same_refusal(cancelled.value, unknown.value, their_id)
        # Mallory's own task shows in her list; none of Alice's do.
        own = await tasks.call_tool_as_task("slow_echo", {"text": "mine", "seconds": 0})
        listed = {t.taskId for t in (await tasks.list_tasks()).tasks}
    assert own.task.taskId in listed
    assert alices.working not in listed and alices.waiting not in listed
    # Nothing changed for Alice.
    assert await alices_states(setup, alices) == ("working", "input_required")
    assert not [r for r in setup.audit() if r["event"] == "cancelled"]


async def test_approvals_of_another_tenant_are_invisible_and_refused(
    setup: Setup, alices: Tasks
) -> None:
    with setup.http(MALLORY) as mallory:
        listed = mallory.get("/approvals")
        assert listed.status_code == 200
        assert alices.waiting not in {a["task_id"] for a in listed.json()["approvals"]}
        unknown = mallory.post(f"/approvals/{UNKNOWN_ID}", json={"approve": True})
        for approve in (True, False):
            theirs = mallory.post(
                f"/approvals/{alices.waiting}", json={"approve": approve, "reason": "mine now"}
            )
            assert theirs.status_code == unknown.status_code == 404
            assert theirs.json() == {
                **unknown.json(),
                "message": unknown.json()["message"].replace(UNKNOWN_ID, alices.waiting),
            }
    with setup.http(ALICE) as alice:  # not hers to approve either (she is no approver)
        assert alice.post(f"/approvals/{alices.waiting}", json={"approve": True}).status_code == 404
    with setup.http(BOSS) as boss:  # the one who may does see it
        assert alices.waiting in {a["task_id"] for a in boss.get("/approvals").json()["approvals"]}
    assert await alices_states(setup, alices) == ("working", "input_required")
    assert not [r for r in setup.audit() if r["event"] in ("approved", "rejected")]

    # The CLI speaks the same API: refused the same way.
    done = subprocess.run(
        [sys.executable, "-m", "gateway", "approvals", "approve", alices.waiting]
        + ["--url", setup.gateway.url, "--token", setup.token(MALLORY)],
        cwd=REPO_ROOT,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1 and "no task" in done.stderr
    assert await alices_states(setup, alices) == ("working", "input_required")


async def test_idempotency_keys_belong_to_their_caller(setup: Setup) -> None:
    """A key is per tenant (another tenant's same key is another call) and, within a tenant,
    per caller: another caller reusing it gets neither the call nor its result."""
    key = {"io.duragate/idempotency-key": "invoice-42"}
    async with session_as(setup, ALICE) as session:
        first = await session.call_tool("slow_echo", {"text": "alice's", "seconds": 0}, meta=key)
        assert first.structuredContent == {"result": "alice's"}
    async with session_as(setup, MALLORY) as session:  # another tenant: its own call
        other = await session.call_tool("slow_echo", {"text": "mallory's", "seconds": 0}, meta=key)
        assert other.structuredContent == {"result": "mallory's"}
    async with session_as(setup, BOSS) as session:  # same tenant, another caller
        with pytest.raises(McpError) as info:
            await session.call_tool("slow_echo", {"text": "alice's", "seconds": 0}, meta=key)
    assert info.value.error.code == types.INVALID_PARAMS
    assert "another caller" in info.value.error.message
    assert "alice's" not in str(info.value.error)
