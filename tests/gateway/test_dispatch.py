"""The one dispatch path, end to end on the embedded engine: validate, decide, schedule, wait."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from gateway.dispatch import CallRequest, CallState, CallView, Dispatcher, DispatchError
from identity.principal import ANONYMOUS, Principal
from tests.gateway.conftest import running_dispatcher

CONFIG = """
identity:
  allow_anonymous: true
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
  - name: short_fuse
    kind: python
    target: examples.tools:slow_echo
    timeout_seconds: 0.5
  - name: flaky
    kind: python
    target: examples.tools:flaky
    timeout_seconds: 10
    retry:
      max_attempts: 3
      first_interval_seconds: 0.05
  - name: fail
    kind: python
    target: examples.tools:fail
    timeout_seconds: 10
    retry:
      max_attempts: 3
      first_interval_seconds: 0.05
"""

OTHER = Principal(id="spiffe://example.org/agents/other", tenant="default", via="test")


class DenyFail:
    """A policy that refuses the `fail` tool: the seam policies plug into."""

    def may_list(self, principal: Principal, tool: str) -> bool:
        return True

    def check_call(
        self, principal: Principal, tool: str, arguments: dict[str, Any]
    ) -> dict[str, Any] | None:
        if tool == "fail":
            raise DispatchError("denied", "policy: fail is not allowed")
        return None

    def may_approve(self, approver: Principal, tool: str, caller: dict[str, Any]) -> bool:
        return False


@pytest.fixture
async def dispatcher(tmp_path: Path) -> AsyncIterator[Dispatcher]:
    async with running_dispatcher(CONFIG, tmp_path) as d:
        yield d


async def call(d: Dispatcher, tool: str, args: dict[str, Any], **kw: Any) -> CallView:
    view = await d.submit(CallRequest(tool, args, ANONYMOUS, "test", **kw))
    return await d.wait(view.task_id, ANONYMOUS, 30)


async def test_call_completes_with_its_result(dispatcher: Dispatcher) -> None:
    view = await call(dispatcher, "add", {"a": 2, "b": 3})
    assert view.state == CallState.COMPLETED
    assert view.result == {"result": 5}  # non-object results are wrapped (MCP wants objects)
    assert len(view.task_id) == 32  # random, 128 bits


async def test_refusals_before_anything_is_scheduled(dispatcher: Dispatcher) -> None:
    with pytest.raises(DispatchError) as info:
        await dispatcher.submit(CallRequest("nope", {}, ANONYMOUS, "test"))
    assert info.value.code == "unknown_tool"
    with pytest.raises(DispatchError) as info:
        await dispatcher.submit(CallRequest("add", {"a": "x"}, ANONYMOUS, "test"))
    assert info.value.code == "invalid_arguments"
    assert "a" in info.value.message and "b" in info.value.message
    listed = await dispatcher.runtime.client.list_workflow_instance_ids()
    assert listed.instance_ids == []


async def test_policy_seam_denies_before_scheduling(dispatcher: Dispatcher) -> None:
    dispatcher.policy = DenyFail()
    with pytest.raises(DispatchError) as info:
        await dispatcher.submit(CallRequest("fail", {"message": "x"}, ANONYMOUS, "test"))
    assert info.value.code == "denied"
    listed = await dispatcher.runtime.client.list_workflow_instance_ids()
    assert listed.instance_ids == []


async def test_tool_error_is_not_retried(dispatcher: Dispatcher) -> None:
    view = await call(dispatcher, "fail", {"message": "it broke"})
    assert view.state == CallState.FAILED
    assert view.error is not None and view.error["type"] == "tool_error"
    assert view.error["message"] == "it broke"
    history = await dispatcher.runtime.client.get_workflow_history(view.task_id)
    assert [e.event_type.value for e in history].count("taskFailed") == 1


async def test_retry_succeeds_on_third_attempt(dispatcher: Dispatcher) -> None:
    key = uuid.uuid4().hex
    view = await call(dispatcher, "flaky", {"key": key, "failures": 2})
    assert view.state == CallState.COMPLETED, view.error
    history = await dispatcher.runtime.client.get_workflow_history(view.task_id)
    assert [e.event_type.value for e in history].count("taskFailed") == 2


async def test_timeout_fails_the_call(dispatcher: Dispatcher) -> None:
    view = await call(dispatcher, "short_fuse", {"text": "x", "seconds": 5})
    assert view.state == CallState.FAILED
    assert view.error is not None and view.error["type"] == "timeout"


async def test_idempotent_replay_and_conflict(dispatcher: Dispatcher) -> None:
    first = await call(dispatcher, "add", {"a": 1, "b": 1}, idempotency_key="k-1")
    again = await dispatcher.submit(
        CallRequest("add", {"a": 1, "b": 1}, ANONYMOUS, "test", idempotency_key="k-1")
    )
    assert again.task_id == first.task_id and again.replayed and again.result == {"result": 2}
    with pytest.raises(DispatchError) as info:
        await dispatcher.submit(
            CallRequest("add", {"a": 1, "b": 2}, ANONYMOUS, "test", idempotency_key="k-1")
        )
    assert info.value.code == "idempotency_conflict"


async def test_cancel_terminates_the_workflow(dispatcher: Dispatcher) -> None:
    view = await dispatcher.submit(
        CallRequest("slow_echo", {"text": "hi", "seconds": 20}, ANONYMOUS, "test")
    )
    cancelled = await dispatcher.cancel(view.task_id, ANONYMOUS)
    assert cancelled.state == CallState.CANCELLED
    state = await dispatcher.runtime.client.get_workflow_state(view.task_id)
    assert state is not None and state.runtime_status.name == "TERMINATED"


async def test_tasks_are_visible_to_their_owner_only(dispatcher: Dispatcher) -> None:
    view = await call(dispatcher, "add", {"a": 1, "b": 2})
    with pytest.raises(DispatchError) as info:
        await dispatcher.get(view.task_id, OTHER)
    assert info.value.code == "not_found"
    with pytest.raises(DispatchError):
        await dispatcher.cancel(view.task_id, OTHER)
    mine, _ = await dispatcher.list(ANONYMOUS)
    theirs, _ = await dispatcher.list(OTHER)
    assert view.task_id in {v.task_id for v in mine} and theirs == []


async def test_an_agent_sees_only_what_it_did_for_the_same_people(
    dispatcher: Dispatcher,
) -> None:
    for_alice = Principal(OTHER.id, "default", "mtls", chain=("spiffe://example.org/user/alice",))
    for_bob = Principal(OTHER.id, "default", "mtls", chain=("spiffe://example.org/user/bob",))
    view = await dispatcher.submit(CallRequest("add", {"a": 1, "b": 1}, for_alice, "test"))
    assert (await dispatcher.get(view.task_id, for_alice)).task_id == view.task_id
    for stranger in (for_bob, OTHER):  # acting for someone else, or for no one
        with pytest.raises(DispatchError) as info:
            await dispatcher.get(view.task_id, stranger)
        assert info.value.code == "not_found"
        listed, _ = await dispatcher.list(stranger)
        assert view.task_id not in {v.task_id for v in listed}


async def test_progress_reaches_the_waiting_front_door(dispatcher: Dispatcher) -> None:
    updates: list[CallView] = []

    async def on_update(view: CallView) -> None:
        updates.append(CallView(**vars(view)))

    view = await dispatcher.submit(
        CallRequest("slow_echo", {"text": "hi", "seconds": 0.6}, ANONYMOUS, "test")
    )
    done = await dispatcher.wait(view.task_id, ANONYMOUS, 30, on_update)
    assert done.state == CallState.COMPLETED
    progress = [u.progress for u in updates if u.progress is not None]
    assert len(progress) >= 3 and progress == sorted(progress)


async def test_wait_with_a_bound_returns_a_running_view(dispatcher: Dispatcher) -> None:
    view = await dispatcher.submit(
        CallRequest("slow_echo", {"text": "hi", "seconds": 3}, ANONYMOUS, "test")
    )
    early = await dispatcher.wait(view.task_id, ANONYMOUS, 0.3)
    assert early.state == CallState.WORKING
    done = await dispatcher.wait(view.task_id, ANONYMOUS, 30)
    assert done.state == CallState.COMPLETED


async def test_many_concurrent_calls(dispatcher: Dispatcher) -> None:
    views = await asyncio.gather(*(call(dispatcher, "add", {"a": i, "b": 1}) for i in range(40)))
    assert [v.result["result"] for v in views] == [i + 1 for i in range(40)]


class NeedsApproval:
    """A policy that makes every `add` wait for a person (the approval seam)."""

    def __init__(self, expires: float = 60) -> None:
        self.expires = expires

    def may_list(self, principal: Principal, tool: str) -> bool:
        return True

    def check_call(
        self, principal: Principal, tool: str, arguments: dict[str, Any]
    ) -> dict[str, Any] | None:
        return {"approval": {"expires_seconds": self.expires}} if tool == "add" else None

    def may_approve(self, approver: Principal, tool: str, caller: dict[str, Any]) -> bool:
        return approver.id == APPROVER.id


APPROVER = Principal(id="spiffe://example.org/user/alice", tenant="default", via="test")


async def waiting(d: Dispatcher, args: dict[str, Any]) -> CallView:
    view = await d.submit(CallRequest("add", args, ANONYMOUS, "test"))
    for _ in range(100):
        view = await d.get(view.task_id, ANONYMOUS)
        if view.state == CallState.INPUT_REQUIRED:
            return view
        await asyncio.sleep(0.05)
    raise AssertionError(f"never waited for approval: {view}")


async def test_approval_seam_waits_then_runs(dispatcher: Dispatcher) -> None:
    dispatcher.policy = NeedsApproval()
    view = await waiting(dispatcher, {"a": 1, "b": 2})
    assert view.message == "add is waiting for approval"
    with pytest.raises(DispatchError) as info:  # not someone the policy lets approve
        await dispatcher.decide(view.task_id, OTHER, True)
    assert info.value.code == "not_found"
    await dispatcher.decide(view.task_id, APPROVER, True, "looks fine")
    done = await dispatcher.wait(view.task_id, ANONYMOUS, 30)
    assert done.state == CallState.COMPLETED and done.result == {"result": 3}
    with pytest.raises(DispatchError) as info:
        await dispatcher.decide(view.task_id, APPROVER, True)
    assert info.value.code == "not_waiting"


async def test_approval_seam_rejection_and_expiry(dispatcher: Dispatcher) -> None:
    dispatcher.policy = NeedsApproval()
    view = await waiting(dispatcher, {"a": 1, "b": 2})
    await dispatcher.decide(view.task_id, APPROVER, False, "not today")
    done = await dispatcher.wait(view.task_id, ANONYMOUS, 30)
    assert done.state == CallState.FAILED and done.error is not None
    assert done.error["type"] == "not_approved" and "not today" in done.error["message"]

    dispatcher.policy = NeedsApproval(expires=0.3)
    view = await waiting(dispatcher, {"a": 5, "b": 5})
    done = await dispatcher.wait(view.task_id, ANONYMOUS, 30)
    assert done.state == CallState.FAILED and done.error is not None
    assert done.error["type"] == "approval_expired"


class RecordingAudit:
    def __init__(self) -> None:
        self.events: list[tuple[str, str, str | None]] = []

    def record(self, event: str, principal: Principal, tool: str | None, **details: Any) -> None:
        self.events.append((event, principal.id, tool))


async def test_audit_seam_sees_every_decision(dispatcher: Dispatcher) -> None:
    audit = RecordingAudit()
    dispatcher.audit = audit
    dispatcher.policy = DenyFail()
    view = await call(dispatcher, "add", {"a": 1, "b": 1})
    with pytest.raises(DispatchError):
        await dispatcher.submit(CallRequest("fail", {"message": "x"}, ANONYMOUS, "test"))
    with pytest.raises(DispatchError):
        await dispatcher.submit(CallRequest("nope", {}, ANONYMOUS, "test"))
    long = await dispatcher.submit(
        CallRequest("slow_echo", {"text": "x", "seconds": 20}, ANONYMOUS, "test")
    )
    await dispatcher.cancel(long.task_id, ANONYMOUS)
    assert [e[0] for e in audit.events] == [
        "scheduled",
        "denied",
        "refused",
        "scheduled",
        "cancelled",
    ]
    assert audit.events[0] == ("scheduled", ANONYMOUS.id, "add") and view.terminal
