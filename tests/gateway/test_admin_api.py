"""The admin API end to end: a gateway process with two tenants' policy files and JWT-SVID
callers; httpx for the admin API, the real MCP client for the calls it shows.

Who is who:
- ROOT is a global admin (`admin.principals` in gateway.yaml); no policy names it an approver;
- LEAD administers tenant team-a (`admins:` in team-a.yaml) and approves its slow_echo calls;
- ALICE calls tools in team-a and is no admin; BOB calls tools in team-b.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from mcp import types

from identity.dev_ca import DevCA
from tests.gateway.conftest import TEST_CONFIG, GatewayFactory, GatewayProcess
from tests.gateway.test_auth_jwt import session_as

pytestmark = [pytest.mark.timeout(180)]

ROOT = "spiffe://example.org/ops/root"
LEAD = "spiffe://example.org/team-a/lead"
ALICE = "spiffe://example.org/team-a/alice"
BOB = "spiffe://example.org/team-b/bob"

TEAM_A = """
tenant: team-a
members: [spiffe://example.org/team-a/**]
groups:
  leads: [spiffe://example.org/team-a/lead]
admins: [group:leads]
tools:
  add:
    call: [group:members]
  flaky:
    call: [group:members]
  slow_echo:
    call: [group:members]
    approval:
      approvers: [group:leads]
      expires_seconds: 600
    obligations:
      redact: [args.text]
"""
TEAM_B = """
tenant: team-b
members: [spiffe://example.org/team-b/**]
tools:
  add:
    call: [group:members]
"""


@dataclass
class Setup:
    gateway: GatewayProcess
    ca: DevCA
    policies: Path
    tasks: dict[str, str]  # what each call is -> its task id

    def headers(self, spiffe_id: str) -> dict[str, str]:
        token = self.ca.issue_jwt_svid(spiffe_id, "duragate", ttl=timedelta(minutes=10))
        return {"Authorization": f"Bearer {token}"}

    def get(self, who: str, path: str, **params: Any) -> httpx.Response:
        url = f"{self.gateway.base}{path}"
        return httpx.get(url, params=params, headers=self.headers(who), timeout=30)

    def post(self, who: str, path: str, body: Any) -> httpx.Response:
        url = f"{self.gateway.base}{path}"
        return httpx.post(url, json=body, headers=self.headers(who), timeout=30)

    def token(self, who: str) -> str:
        return self.ca.issue_jwt_svid(who, "duragate", ttl=timedelta(minutes=10))


def _config(tmp: Path) -> Path:
    config = yaml.safe_load(TEST_CONFIG.read_text())
    config["identity"] = {
        "trust_domain": "example.org",
        "allow_anonymous": False,
        "audience": "duragate",
        "bundles": {"example.org": "ca/bundle.json"},
        "tenants": [
            {"match": "spiffe://example.org/team-a/**", "tenant": "team-a"},
            {"match": "spiffe://example.org/team-b/**", "tenant": "team-b"},
        ],
    }
    config["policy"] = {"dir": "policies"}
    config["admin"] = {"principals": ["spiffe://example.org/ops/*"]}
    path = tmp / "gateway.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


async def _start_calls(setup: Setup) -> None:
    url = setup.gateway.url
    async with session_as(url, setup.token(ALICE)) as session:
        done = await session.call_tool("add", {"a": 1, "b": 2})
        assert not done.isError, done
        retried = await session.call_tool("flaky", {"key": "admin-timeline", "failures": 2})
        assert not retried.isError, retried
        waiting = await session.experimental.call_tool_as_task(
            "slow_echo", {"text": "secret words", "seconds": 0}
        )
        denied = await session.experimental.call_tool_as_task(
            "slow_echo", {"text": "no", "seconds": 0}
        )
    async with session_as(url, setup.token(BOB)) as session:
        assert not (await session.call_tool("add", {"a": 5, "b": 5})).isError
    setup.tasks["waiting"] = waiting.task.taskId
    setup.tasks["denied"] = denied.task.taskId


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    tmp = tmp_path_factory.mktemp("admin")
    ca = DevCA.create(tmp / "ca", "example.org")
    policies = tmp / "policies"
    policies.mkdir()
    (policies / "team-a.yaml").write_text(TEAM_A)
    (policies / "team-b.yaml").write_text(TEAM_B)
    factory = GatewayFactory(tmp)
    try:
        gateway = factory(_config(tmp))
        ready = Setup(gateway, ca, policies, {})
        asyncio.run(_start_calls(ready))
        # Task ids of the plain calls, from the global admin's list.
        listed = ready.get(ROOT, "/admin/api/calls", limit=200).json()["calls"]
        for call in listed:
            if call["state"] == "completed":
                ready.tasks[f"{call['tool']}:{call['tenant']}"] = call["task_id"]
        yield ready
    finally:
        factory.stop_all()


def _wait_pending(setup: Setup, task_id: str) -> list[dict[str, Any]]:
    deadline = time.monotonic() + 30
    while True:
        found = setup.get(LEAD, "/admin/api/approvals").json()["approvals"]
        if any(a["task_id"] == task_id for a in found):
            return found
        assert time.monotonic() < deadline, setup.gateway.log()
        time.sleep(0.2)


# --- the document and who may come in ------------------------------------------------------


def test_openapi_document(setup: Setup) -> None:
    answer = httpx.get(f"{setup.gateway.base}/admin/openapi.json")
    assert answer.status_code == 200
    doc = answer.json()
    assert doc["openapi"] == "3.1.0"
    assert "/admin/api/calls/{task_id}" in doc["paths"]
    assert "CallDetail" in doc["components"]["schemas"]


def test_no_credentials_is_401_with_a_challenge(setup: Setup) -> None:
    answer = httpx.get(f"{setup.gateway.base}/admin/api/calls")
    assert answer.status_code == 401
    assert answer.headers["www-authenticate"].startswith('Bearer realm="duragate"')


def test_a_non_admin_is_refused_with_the_reason(setup: Setup) -> None:
    for path in ("/admin/api/calls", "/admin/api/approvals", "/admin/api/audit"):
        answer = setup.get(ALICE, path)
        assert answer.status_code == 403, answer.text
        assert "is not an admin" in answer.json()["message"]
        assert ALICE in answer.json()["message"]
    refused = setup.post(ALICE, f"/admin/api/approvals/{setup.tasks['waiting']}/approve", {})
    assert refused.status_code == 403


def test_dns_rebinding_and_non_json_posts_are_refused(setup: Setup) -> None:
    headers = {**setup.headers(ROOT), "Host": "evil.example"}
    answer = httpx.get(f"{setup.gateway.base}/admin/api/calls", headers=headers)
    assert answer.status_code == 421
    origin = {**setup.headers(ROOT), "Origin": "http://evil.example"}
    answer = httpx.get(f"{setup.gateway.base}/admin/api/calls", headers=origin)
    assert answer.status_code == 403
    form = httpx.post(
        f"{setup.gateway.base}/admin/api/approvals/{setup.tasks['waiting']}/approve",
        content=b"reason=x",
        headers={**setup.headers(LEAD), "Content-Type": "application/x-www-form-urlencoded"},
    )
    assert form.status_code == 400 and form.json()["parameter"] == "content-type"


def test_me(setup: Setup) -> None:
    assert setup.get(ROOT, "/admin/api/me").json()["scope"] == "global"
    lead = setup.get(LEAD, "/admin/api/me").json()
    assert lead["scope"] == "tenant" and lead["tenants"] == ["team-a"]


# --- calls --------------------------------------------------------------------------------


def test_global_admin_sees_every_tenant_and_filters(setup: Setup) -> None:
    calls = setup.get(ROOT, "/admin/api/calls", limit=200).json()["calls"]
    assert {c["tenant"] for c in calls} == {"team-a", "team-b"}
    assert len(calls) == 5
    only_b = setup.get(ROOT, "/admin/api/calls", tenant="team-b").json()["calls"]
    assert [c["principal"] for c in only_b] == [BOB]
    echo = setup.get(ROOT, "/admin/api/calls", tool="slow_echo").json()["calls"]
    assert {c["task_id"] for c in echo} >= {setup.tasks["waiting"]}
    assert all(c["tool"] == "slow_echo" for c in echo)
    done = setup.get(ROOT, "/admin/api/calls", status="completed").json()["calls"]
    assert {c["tool"] for c in done} >= {"add", "flaky"}
    assert all(c["state"] == "completed" for c in done)
    future = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
    assert setup.get(ROOT, "/admin/api/calls", since=future).json()["calls"] == []
    assert len(setup.get(ROOT, "/admin/api/calls", until=future).json()["calls"]) == 5


def test_pagination_visits_every_call_once(setup: Setup) -> None:
    everything = {c["task_id"] for c in setup.get(ROOT, "/admin/api/calls").json()["calls"]}
    seen: list[str] = []
    cursor: str | None = None
    for _ in range(20):
        params: dict[str, Any] = {"limit": 2}
        if cursor:
            params["cursor"] = cursor
        page = setup.get(ROOT, "/admin/api/calls", **params).json()
        assert len(page["calls"]) <= 2
        seen += [c["task_id"] for c in page["calls"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert sorted(seen) == sorted(everything)


def test_a_tenant_admin_sees_only_its_tenant(setup: Setup) -> None:
    calls = setup.get(LEAD, "/admin/api/calls").json()["calls"]
    assert calls and {c["tenant"] for c in calls} == {"team-a"}
    other = setup.get(LEAD, "/admin/api/calls", tenant="team-b")
    assert other.status_code == 403 and "not 'team-b'" in other.json()["message"]
    bobs = setup.tasks["add:team-b"]
    refused = setup.get(LEAD, f"/admin/api/calls/{bobs}")
    assert refused.status_code == 404 and "tenant team-a" in refused.json()["message"]
    assert setup.get(ROOT, f"/admin/api/calls/{bobs}").status_code == 200
    audit = setup.get(LEAD, "/admin/api/audit", limit=500).json()["records"]
    assert audit and {r["tenant"] for r in audit} == {"team-a"}


def test_call_detail_shows_retries_and_timings(setup: Setup) -> None:
    task = setup.tasks["flaky:team-a"]
    detail = setup.get(ROOT, f"/admin/api/calls/{task}").json()
    assert detail["state"] == "completed" and detail["principal"] == ALICE
    attempts = [(a["attempt"], a["outcome"]) for a in detail["activities"]]
    assert attempts == [(1, "failed"), (2, "failed"), (3, "completed")], detail["activities"]
    assert "failure 1 of 2" in detail["activities"][0]["error"]
    assert all(a["duration_ms"] is not None and a["duration_ms"] >= 0 for a in detail["activities"])
    assert [t["purpose"] for t in detail["timers"]].count("retry") == 2, detail["timers"]
    kinds = [h["kind"] for h in detail["history"]]
    assert kinds[0] in ("workflowStarted", "executionStarted") and "executionCompleted" in kinds
    assert detail["duration_ms"] > 0


def test_unknown_and_bad_ids(setup: Setup) -> None:
    assert setup.get(ROOT, "/admin/api/calls/0123456789abcdef").status_code == 404
    assert setup.get(ROOT, "/admin/api/calls/a%20b").status_code == 404
    assert setup.post(LEAD, "/admin/api/approvals/nope/approve", {}).status_code == 404


@pytest.mark.parametrize(
    ("params", "parameter"),
    [
        ({"limit": "0"}, "limit"),
        ({"limit": "many"}, "limit"),
        ({"status": "sleeping"}, "status"),
        ({"since": "yesterday"}, "since"),
        ({"cursor": "not-a-cursor"}, "cursor"),
        ({"tenant": "Not A Tenant"}, "tenant"),
        ({"tennant": "team-a"}, "tennant"),
    ],
)
def test_bad_parameters_are_400_naming_them(
    setup: Setup, params: dict[str, str], parameter: str
) -> None:
    answer = setup.get(ROOT, "/admin/api/calls", **params)
    assert answer.status_code == 400, answer.text
    assert answer.json()["parameter"] == parameter


# --- approvals ----------------------------------------------------------------------------


def test_approvals_list_approve_and_deny(setup: Setup) -> None:
    waiting, denied = setup.tasks["waiting"], setup.tasks["denied"]
    pending = {a["task_id"]: a for a in _wait_pending(setup, waiting)}
    assert pending[waiting]["may_decide"] and pending[waiting]["principal"] == ALICE
    # The global admin sees it but the policy names only the leads as approvers.
    listed = setup.get(ROOT, "/admin/api/approvals").json()["approvals"]
    seen_by_root = {a["task_id"]: a for a in listed}
    assert not seen_by_root[waiting]["may_decide"]
    assert "approver" in seen_by_root[waiting]["why_not"]
    refused = setup.post(ROOT, f"/admin/api/approvals/{waiting}/approve", {"reason": "root"})
    assert refused.status_code == 403 and "approver" in refused.json()["message"]

    # Arguments are redacted as the audit log does (the policy redacts args.text).
    detail = setup.get(LEAD, f"/admin/api/calls/{waiting}").json()
    assert detail["arguments"]["text"] == "[redacted]" and detail["waiting_for"] == "approval"

    no_reason = setup.post(LEAD, f"/admin/api/approvals/{denied}/deny", {})
    assert no_reason.status_code == 400 and no_reason.json()["parameter"] == "reason"
    answer = setup.post(LEAD, f"/admin/api/approvals/{denied}/deny", {"reason": "not today"})
    assert answer.status_code == 200 and answer.json()["approved"] is False
    answer = setup.post(LEAD, f"/admin/api/approvals/{waiting}/approve", {"reason": "fine"})
    assert answer.status_code == 200 and answer.json()["approved"] is True
    # The workflow takes the decision asynchronously: once it has, the call waits no more.
    deadline = time.monotonic() + 60
    while setup.get(LEAD, f"/admin/api/calls/{waiting}").json()["state"] == "input_required":
        assert time.monotonic() < deadline, setup.gateway.log()
        time.sleep(0.2)
    again = setup.post(LEAD, f"/admin/api/approvals/{waiting}/approve", {})
    assert again.status_code == 409 and again.json()["error"] == "not_waiting"

    async def results() -> tuple[types.CallToolResult, types.CallToolResult]:
        async with session_as(setup.gateway.url, setup.token(ALICE)) as session:
            ok = await session.experimental.get_task_result(waiting, types.CallToolResult)
            no = await session.experimental.get_task_result(denied, types.CallToolResult)
            return ok, no

    ok, no = asyncio.run(results())
    assert ok.structuredContent == {"result": "secret words"}
    assert no.isError and "not today" in no.content[0].text  # type: ignore[union-attr]
    detail = setup.get(LEAD, f"/admin/api/calls/{waiting}").json()
    assert detail["state"] == "completed"
    decision = [e for e in detail["events"] if e["name"] == "duragate.approval"]
    assert decision and decision[0]["detail"] == {"approved": True, "by": LEAD, "reason": "fine"}
    assert detail["result"] == {"result": "secret words"}  # the policy redacts only args.text


# --- policies, tools, audit ---------------------------------------------------------------


def test_policy_status_with_a_broken_file(setup: Setup) -> None:
    status = setup.get(ROOT, "/admin/api/policies").json()
    files = {f["file"]: f for f in status["files"]}
    assert set(files) == {"team-a.yaml", "team-b.yaml"} and status["enabled"]
    assert files["team-a.yaml"]["admins"] == ["group:leads"] and not files["team-a.yaml"]["errors"]
    broken = setup.policies / "team-b.yaml"
    good = broken.read_text()
    broken.write_text(good + "  nonsense: {call: [group:nobody]}\n")
    try:
        deadline = time.monotonic() + 30
        while True:
            files = {f["file"]: f for f in setup.get(ROOT, "/admin/api/policies").json()["files"]}
            if files["team-b.yaml"]["errors"]:
                break
            assert time.monotonic() < deadline
            time.sleep(0.3)
        assert files["team-b.yaml"]["loaded"]  # the last good version stays in force
        assert "nobody" in files["team-b.yaml"]["errors"][0]
        lead = setup.get(LEAD, "/admin/api/policies").json()
        assert [f["file"] for f in lead["files"]] == ["team-a.yaml"]
    finally:
        broken.write_text(good)


def test_tools(setup: Setup) -> None:
    every = {t["name"] for t in setup.get(ROOT, "/admin/api/tools").json()["tools"]}
    assert {"add", "slow_echo", "flaky", "fail", "word_count"} <= every
    named = {t["name"] for t in setup.get(LEAD, "/admin/api/tools").json()["tools"]}
    assert named == {"add", "flaky", "slow_echo"}
    add = next(t for t in setup.get(ROOT, "/admin/api/tools").json()["tools"] if t["name"] == "add")
    assert add["kind"] == "python" and "a" in add["input_schema"]["properties"]


def test_audit_query_newest_first_with_filters_and_cursor(setup: Setup) -> None:
    records = setup.get(ROOT, "/admin/api/audit", limit=500).json()["records"]
    assert records
    times = [r["time"] for r in records]
    assert times == sorted(times, reverse=True)
    scheduled = setup.get(ROOT, "/admin/api/audit", event="scheduled", tenant="team-b").json()
    assert scheduled["records"] and all(
        r["event"] == "scheduled" and r["tenant"] == "team-b" for r in scheduled["records"]
    )
    by_tool = setup.get(ROOT, "/admin/api/audit", tool="flaky").json()["records"]
    assert by_tool and {r["tool"] for r in by_tool} == {"flaky"}
    paged: list[dict[str, Any]] = []
    cursor = None
    for _ in range(len(records) + 2):
        params: dict[str, Any] = {"limit": 1}
        if cursor:
            params["cursor"] = cursor
        page = setup.get(ROOT, "/admin/api/audit", **params).json()
        paged += page["records"]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    # Nothing writes audit records meanwhile: the pages add up to the whole query.
    assert paged == records
    past = (datetime.now(UTC) - timedelta(days=1)).isoformat()
    assert setup.get(ROOT, "/admin/api/audit", until=past).json()["records"] == []
