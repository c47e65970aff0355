"""Admission in the dispatch path, on a real embedded engine: rate, concurrency and budget
obligations refuse before anything is scheduled, say which limit and when to retry, and
concurrency slots come back when calls end."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from gateway.dispatch import CallRequest, CallState, CallView, Dispatcher, DispatchError
from gateway.mcp_front import dispatch_error
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
"""


class Obliging:
    """A policy that allows everything and attaches fixed obligations per tool."""

    def __init__(self, obligations: dict[str, dict[str, Any]]) -> None:
        self.obligations = obligations

    def may_list(self, principal: Principal, tool: str) -> bool:
        return True

    def check_call(
        self, principal: Principal, tool: str, arguments: dict[str, Any]
    ) -> dict[str, Any] | None:
        return self.obligations.get(tool)

    def may_approve(self, approver: Principal, tool: str, caller: dict[str, Any]) -> bool:
        return False


class Recorder:
    def __init__(self) -> None:
        self.events: list[tuple[str, str | None, dict[str, Any]]] = []

    def record(self, event: str, principal: Principal, tool: str | None, **details: Any) -> None:
        self.events.append((event, tool, details))


@pytest.fixture
async def dispatcher(tmp_path: Path) -> AsyncIterator[Dispatcher]:
    async with running_dispatcher(CONFIG, tmp_path, audit=Recorder()) as d:
        yield d


def submit(d: Dispatcher, tool: str, args: dict[str, Any], **kw: Any) -> Any:
    return d.submit(CallRequest(tool, args, ANONYMOUS, "test", **kw))


async def scheduled(d: Dispatcher) -> int:
    return len((await d.runtime.client.list_workflow_instance_ids()).instance_ids)


async def refused(d: Dispatcher, tool: str, args: dict[str, Any], **kw: Any) -> DispatchError:
    with pytest.raises(DispatchError) as info:
        await submit(d, tool, args, **kw)
    assert info.value.code == "limited", info.value.message
    return info.value


async def test_rate_limit_under_concurrent_calls(dispatcher: Dispatcher) -> None:
    dispatcher.policy = Obliging({"add": {"rate": {"calls": 3, "per_seconds": 3600}}})
    outcomes = await asyncio.gather(
        *(submit(dispatcher, "add", {"a": i, "b": 1}) for i in range(10)), return_exceptions=True
    )
    admitted = [o for o in outcomes if isinstance(o, CallView)]
    errors = [o for o in outcomes if isinstance(o, DispatchError)]
    assert len(admitted) == 3 and len(errors) == 7
    for exc in errors:
        assert exc.code == "limited"
        assert exc.message == (
            f"rate limit of add for tenant {ANONYMOUS.tenant} reached (3 calls per 3600 s); "
            "retry in 1200 s"
        )
        assert exc.data == {"limit": "rate", "retry_after_seconds": 1200.0}
    assert await scheduled(dispatcher) == 3  # a refused call schedules nothing
    audit = dispatcher.audit
    assert isinstance(audit, Recorder)
    limited = [e for e in audit.events if e[0] == "limited"]
    assert len(limited) == 7
    details = limited[0][2]
    assert (details["limit"], details["retry_after_seconds"]) == ("rate", 1200.0)
    assert details["reason"] == errors[0].message


async def test_concurrency_limit_with_slow_calls(dispatcher: Dispatcher) -> None:
    dispatcher.policy = Obliging({"slow_echo": {"concurrency": {"max": 2}}})
    slow = {"text": "x", "seconds": 0.4}
    first = await submit(dispatcher, "slow_echo", slow)
    second = await submit(dispatcher, "slow_echo", slow)
    exc = await refused(dispatcher, "slow_echo", slow)
    assert exc.data == {"limit": "concurrency", "retry_after_seconds": 1.0}
    assert "(2 calls in flight)" in exc.message
    assert await scheduled(dispatcher) == 2
    assert dispatcher.admission.in_flight(ANONYMOUS.tenant, "slow_echo") == 2
    # A plain call: the front door's wait sees it end and frees the slot.
    done = await dispatcher.wait(first.task_id, ANONYMOUS, 30)
    assert done.state == CallState.COMPLETED
    third = await submit(dispatcher, "slow_echo", slow)
    await refused(dispatcher, "slow_echo", slow)
    # A task call: the first get that sees it terminal frees the slot.
    while not (await dispatcher.get(second.task_id, ANONYMOUS)).terminal:
        await asyncio.sleep(0.05)
    assert dispatcher.admission.in_flight(ANONYMOUS.tenant, "slow_echo") == 1
    # A cancel frees it at once.
    await dispatcher.cancel(third.task_id, ANONYMOUS)
    assert dispatcher.admission.in_flight(ANONYMOUS.tenant, "slow_echo") == 0
    views = await asyncio.gather(*(submit(dispatcher, "slow_echo", slow) for _ in range(2)))
    for view in views:
        assert (await dispatcher.wait(view.task_id, ANONYMOUS, 30)).terminal
    assert dispatcher.admission.in_flight(ANONYMOUS.tenant, "slow_echo") == 0


async def test_budget_exhaustion(dispatcher: Dispatcher) -> None:
    dispatcher.policy = Obliging({"add": {"budget": {"calls": 2, "per_seconds": 86400}}})
    for i in range(2):
        await submit(dispatcher, "add", {"a": i, "b": 1})
    exc = await refused(dispatcher, "add", {"a": 9, "b": 1})
    assert exc.data is not None and exc.data["limit"] == "budget"
    assert 86000 < exc.data["retry_after_seconds"] <= 86400
    assert exc.message.startswith(
        f"budget of add for tenant {ANONYMOUS.tenant} reached (2 calls per 86400 s); retry in "
    )
    assert await scheduled(dispatcher) == 2
    await submit(dispatcher, "slow_echo", {"text": "x", "seconds": 0})  # other tools unaffected


async def test_idempotent_replays_spend_nothing(dispatcher: Dispatcher) -> None:
    dispatcher.policy = Obliging({"add": {"budget": {"calls": 2, "per_seconds": 3600}}})
    args = {"a": 1, "b": 2}
    first = await submit(dispatcher, "add", args, idempotency_key="k1")
    await dispatcher.wait(first.task_id, ANONYMOUS, 30)
    again = await submit(dispatcher, "add", args, idempotency_key="k1")
    assert again.replayed and again.task_id == first.task_id
    await submit(dispatcher, "add", args, idempotency_key="k2")  # the budget's second call
    await refused(dispatcher, "add", args, idempotency_key="k3")
    # Budget spent, yet a replay still shows the stored call; other arguments still conflict.
    late = await submit(dispatcher, "add", args, idempotency_key="k1")
    assert late.replayed and late.state == CallState.COMPLETED and late.result == {"result": 3}
    with pytest.raises(DispatchError) as info:
        await submit(dispatcher, "add", {"a": 5, "b": 5}, idempotency_key="k1")
    assert info.value.code == "idempotency_conflict"
    assert await scheduled(dispatcher) == 2


async def test_calls_without_limits_are_not_tracked(dispatcher: Dispatcher) -> None:
    view = await submit(dispatcher, "add", {"a": 1, "b": 1})
    assert (await dispatcher.wait(view.task_id, ANONYMOUS, 30)).state == CallState.COMPLETED
    assert len(dispatcher.admission) == 0


def test_mcp_maps_limited_to_its_own_error() -> None:
    exc = DispatchError(
        "limited", "rate limit of add ...", {"limit": "rate", "retry_after_seconds": 12.0}
    )
    error = dispatch_error(exc).error
    assert error.code == -32004
    assert error.message == "rate limit of add ..."
    assert error.data == {"type": "limited", "limit": "rate", "retry_after_seconds": 12.0}
