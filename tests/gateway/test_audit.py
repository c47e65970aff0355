"""The audit log: records through the real dispatch path and policy engine (allow, deny with its
rule, limit refusals, approvals granted and denied, cancellation), redaction, audit levels, and
a writer that never gets in a call's way (a full disk, a full queue, a rotated file)."""

from __future__ import annotations

import asyncio
import json
import os
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from gateway.audit import REDACTED, AuditLog, redact
from gateway.dispatch import CallRequest, CallState, CallView, Dispatcher, DispatchError
from identity.principal import Principal
from policies.evaluator import PolicyEngine
from policies.loader import PolicyStore
from tests.gateway.conftest import running_dispatcher

CONFIG = """
engine:
  kind: embedded
tools:
  - name: add
    kind: python
    target: examples.tools:add
    timeout_seconds: 10
  - name: slow_echo
    kind: python
    target: examples.tools:slow_echo
    timeout_seconds: 30
  - name: word_count
    kind: python
    target: examples.tools:word_count
    timeout_seconds: 10
"""

POLICY = """
tenant: acme
members: [spiffe://acme.test/**]
groups:
  bosses: [spiffe://acme.test/people/boss]
tools:
  add:
    call: [group:members]
    deny:
      - when: "args.a < 0"
        reason: no negative numbers
    obligations:
      audit: full
      redact: [args.b]
      rate: {calls: 2, per_seconds: 3600}
  slow_echo:
    call: [group:members]
    approval:
      when: "args.text == 'needs a boss'"
      approvers: [group:bosses]
    obligations: {audit: standard}
  word_count:
    call: [group:members]
    obligations: {audit: minimal}
"""

ALICE = Principal(id="spiffe://acme.test/people/alice", tenant="acme", via="jwt-svid")
BOSS = Principal(id="spiffe://acme.test/people/boss", tenant="acme", via="mtls")


@pytest.fixture
async def setup(tmp_path: Path) -> AsyncIterator[tuple[Dispatcher, AuditLog, Path]]:
    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "acme.yaml").write_text(POLICY)
    engine = PolicyEngine(PolicyStore.open(policies))
    path = tmp_path / "audit" / "audit.jsonl"
    audit = AuditLog.open(path)
    async with running_dispatcher(CONFIG, tmp_path, policy=engine, audit=audit) as dispatcher:
        yield dispatcher, audit, path
    audit.close()


def records(audit: AuditLog, path: Path) -> list[dict[str, Any]]:
    assert audit.flush(30)
    return [json.loads(line) for line in path.read_text().splitlines()]


async def until(dispatcher: Dispatcher, view: CallView, state: CallState) -> CallView:
    for _ in range(300):
        view = await dispatcher.get(view.task_id, ALICE)
        if view.state == state:
            return view
        await asyncio.sleep(0.05)
    raise AssertionError(f"never reached {state}: {view}")


async def test_every_decision_is_recorded_with_its_rule(
    setup: tuple[Dispatcher, AuditLog, Path],
) -> None:
    dispatcher, audit, path = setup
    submit = dispatcher.submit
    ok = await submit(CallRequest("add", {"a": 1, "b": 41}, ALICE, "test"))
    done = await dispatcher.wait(ok.task_id, ALICE, 30)
    assert done.state == CallState.COMPLETED
    with pytest.raises(DispatchError):
        await submit(CallRequest("add", {"a": -1, "b": 7}, ALICE, "test"))
    await submit(CallRequest("add", {"a": 2, "b": 2}, ALICE, "test"))
    with pytest.raises(DispatchError) as limited:
        await submit(CallRequest("add", {"a": 3, "b": 3}, ALICE, "test"))
    assert limited.value.code == "limited"
    with pytest.raises(DispatchError):
        await submit(CallRequest("nope", {}, ALICE, "test"))

    got = records(audit, path)
    assert [(r["event"], r["outcome"]) for r in got] == [
        ("scheduled", "allow"),
        ("result", "completed"),
        ("denied", "deny"),
        ("scheduled", "allow"),
        ("limited", "limited"),
        ("refused", "refused"),
    ]
    allowed, result, denied, _, refused_limit, unknown = got
    for record in got:
        assert record["principal"] == ALICE.id and record["tenant"] == "acme"
        assert record["via"] == "jwt-svid" and record["time"].endswith("Z")
    assert allowed["rule"] == "acme.yaml:tools[add].call" and allowed["task"] == ok.task_id
    # `full`: the arguments, with the `redact` fields replaced.
    assert allowed["level"] == "full" and allowed["arguments"] == {"a": 1, "b": REDACTED}
    assert result["task"] == ok.task_id and result["result"] == {"result": 42.0}
    assert denied["rule"] == "acme.yaml:tools[add].deny[0]"
    assert denied["reason"] == "no negative numbers"
    assert denied["arguments"] == {"a": -1, "b": REDACTED}  # the tool's level holds for denials
    assert refused_limit["limit"] == "rate" and refused_limit["retry_after_seconds"] > 0
    assert "rate limit of add" in refused_limit["reason"]
    assert refused_limit["rule"] == "acme.yaml:tools[add].call"
    assert unknown["reason"] == "unknown_tool" and "arguments" not in unknown
    # The result is written once, however often the finished task is looked at.
    await dispatcher.get(ok.task_id, ALICE)
    assert [r["event"] for r in records(audit, path)].count("result") == 1


async def test_approvals_granted_and_denied(setup: tuple[Dispatcher, AuditLog, Path]) -> None:
    dispatcher, audit, path = setup
    args = {"text": "needs a boss", "seconds": 0}
    first = await dispatcher.submit(CallRequest("slow_echo", args, ALICE, "test"))
    second = await dispatcher.submit(CallRequest("slow_echo", args, ALICE, "test"))
    await until(dispatcher, first, CallState.INPUT_REQUIRED)
    await until(dispatcher, second, CallState.INPUT_REQUIRED)
    with pytest.raises(DispatchError):  # alice may not approve: nothing is recorded
        await dispatcher.decide(first.task_id, ALICE, True)
    await dispatcher.decide(first.task_id, BOSS, True, "fine")
    await dispatcher.decide(second.task_id, BOSS, False, "not today")
    assert (await until(dispatcher, first, CallState.COMPLETED)).result == {"result": args["text"]}
    await until(dispatcher, second, CallState.FAILED)
    plain = await dispatcher.submit(CallRequest("slow_echo", {"text": "x"}, ALICE, "test"))
    await dispatcher.cancel(plain.task_id, ALICE)

    got = [(r["event"], r["outcome"], r["principal"], r["task"]) for r in records(audit, path)]
    assert got == [
        ("scheduled", "approve", ALICE.id, first.task_id),
        ("scheduled", "approve", ALICE.id, second.task_id),
        ("approved", "approved", BOSS.id, first.task_id),
        ("rejected", "rejected", BOSS.id, second.task_id),
        ("scheduled", "allow", ALICE.id, plain.task_id),
        ("cancelled", "cancelled", ALICE.id, plain.task_id),
    ]
    every = records(audit, path)
    assert every[0]["rule"] == "acme.yaml:tools[slow_echo].approval"
    approved = every[2]
    assert approved["caller"] == ALICE.id and approved["reason"] == "fine"
    assert approved["rule"] == "acme.yaml:tools[slow_echo].approval"
    assert every[3]["reason"] == "not today"
    # `standard`: every decision, never the arguments, no results.
    assert all("arguments" not in r and r["level"] == "standard" for r in every)


async def test_minimal_keeps_refusals_only(setup: tuple[Dispatcher, AuditLog, Path]) -> None:
    dispatcher, audit, path = setup
    view = await dispatcher.submit(CallRequest("word_count", {"text": "a b"}, ALICE, "test"))
    await dispatcher.wait(view.task_id, ALICE, 30)
    stranger = Principal(id="spiffe://evil.test/x", tenant="acme", via="jwt-svid")
    with pytest.raises(DispatchError):
        await dispatcher.submit(CallRequest("word_count", {"text": "a"}, stranger, "test"))
    got = records(audit, path)
    assert [(r["event"], r["principal"]) for r in got] == [("refused", stranger.id)]


def test_redaction_paths() -> None:
    value: dict[str, Any] = {
        "card": {"number": "4111", "holder": "A"},
        "items": [{"sku": 1, "pin": 9}, {"sku": 2, "pin": 8}],
        "list": [1, 2, 3],
        "api_key": "k",
        "nested": {"accessToken": "t", "max_tokens": 5},
    }
    paths = ["args.card.number", "args.items[*].pin", "args.list[1]", "args.gone.deeper"]
    got = redact(value, paths, "args")
    assert got == {
        "card": {"number": REDACTED, "holder": "A"},
        "items": [{"sku": 1, "pin": REDACTED}, {"sku": 2, "pin": REDACTED}],
        "list": [1, REDACTED, 3],
        "api_key": REDACTED,  # named like a secret: always
        "nested": {"accessToken": REDACTED, "max_tokens": 5},
    }
    assert value["card"]["number"] == "4111"  # a copy: the call's arguments are untouched
    assert redact({"a": 1}, ["args"], "args") == REDACTED
    assert redact({"secret": 1}, ["result.secret"], "args") == {"secret": REDACTED}
    assert redact([{"x": 1}], ["result[0].x"], "result") == [{"x": REDACTED}]


def test_a_full_disk_drops_records_and_calls_go_on(caplog: pytest.LogCaptureFixture) -> None:
    if not Path("/dev/full").exists():
        pytest.skip("no /dev/full here")
    audit = AuditLog.open("/dev/full")
    for i in range(5):
        audit.record("denied", ALICE, "add", reason=str(i))  # never raises
    assert audit.flush(10)
    assert audit.write_errors >= 1 and audit.dropped == 5 and audit.written == 0
    assert "could not be written to /dev/full" in caplog.text
    audit.close()


def test_a_full_queue_drops_instead_of_waiting(tmp_path: Path) -> None:
    audit = AuditLog.open(tmp_path / "audit.jsonl", max_pending=2, echo=False)
    entered, gate = threading.Event(), threading.Event()
    original = audit._write

    def slow(lines: Any) -> None:  # a disk that stalls
        entered.set()
        gate.wait(30)
        original(lines)

    audit._write = slow  # type: ignore[method-assign]
    audit.record("denied", ALICE, "add", reason="first")
    assert entered.wait(30)  # the writer is stuck on the first record
    for i in range(20):
        audit.record("denied", ALICE, "add", reason=str(i))  # returns at once
    assert audit.dropped == 18  # two wait in the queue, the rest are dropped
    gate.set()
    audit.close()
    lines = (tmp_path / "audit.jsonl").read_text().splitlines()
    assert [json.loads(line)["reason"] for line in lines] == ["first", "0", "1"]
    assert os.stat(tmp_path / "audit.jsonl").st_mode & 0o077 == 0  # private to the gateway


def test_a_rotated_file_is_reopened(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    audit = AuditLog.open(path, echo=False)
    audit.record("denied", ALICE, "add")
    assert audit.flush()
    path.rename(tmp_path / "audit.jsonl.1")
    audit.record("refused", ALICE, "add")
    audit.close()
    assert json.loads(path.read_text())["event"] == "refused"
    assert json.loads((tmp_path / "audit.jsonl.1").read_text())["event"] == "denied"


def test_no_token_reaches_the_record(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    audit = AuditLog.open(path, echo=False)
    audit.record(
        "scheduled",
        ALICE,
        "add",
        arguments={"authorization": "Bearer eyJ.secret", "password": "p", "a": 1},
        audit={"level": "full"},
    )
    audit.close()
    text = path.read_text()
    assert "eyJ" not in text and '"p"' not in text and json.loads(text)["arguments"]["a"] == 1
