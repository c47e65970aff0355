"""Admission on a fake clock: rate, concurrency, budget, refunds and the bound on keys."""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import Any

import pytest

from policies.limits import Admission, LimitExceeded, Ticket


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def admission(clock: Clock) -> Admission:
    return Admission(clock=clock)


RATE = {"rate": {"calls": 3, "per_seconds": 6}}  # one token every 2 s, burst 3


def admit(a: Admission, obligations: Mapping[str, Any], tool: str = "add", **kw: float) -> Ticket:
    return a.admit("acme", "spiffe://acme.test/a", tool, obligations, **kw)


def refusal(a: Admission, obligations: Mapping[str, Any], tool: str = "add") -> LimitExceeded:
    with pytest.raises(LimitExceeded) as info:
        admit(a, obligations, tool)
    return info.value


def test_no_limits_touch_no_state(admission: Admission) -> None:
    for _ in range(100):
        admit(admission, {"timeout_seconds": 5}).release()
    assert len(admission) == 0


def test_rate_burst_then_one_per_interval(admission: Admission, clock: Clock) -> None:
    for _ in range(3):
        admit(admission, RATE)
    exc = refusal(admission, RATE)
    assert exc.limit == "rate"
    assert exc.retry_after_seconds == pytest.approx(2.0)
    assert exc.message == (
        "rate limit of add for tenant acme reached (3 calls per 6 s); retry in 2 s"
    )
    clock.now += 1.9
    assert refusal(admission, RATE).retry_after_seconds == pytest.approx(0.1)
    clock.now += 0.1  # at the advertised time the call goes through, and only one
    admit(admission, RATE)
    refusal(admission, RATE)
    clock.now += 6  # a full period refills the whole bucket
    for _ in range(3):
        admit(admission, RATE)
    refusal(admission, RATE)


def test_rate_is_per_tenant_and_tool(admission: Admission) -> None:
    for _ in range(3):
        admit(admission, RATE)
    refusal(admission, RATE)
    admit(admission, RATE, tool="other")
    admission.admit("globex", "spiffe://globex.test/a", "add", RATE)


def test_rate_never_admits_more_than_calls_per_window(admission: Admission, clock: Clock) -> None:
    admitted: list[float] = []
    for step in range(600):  # 60 s, trying every 0.1 s
        clock.now = 1000.0 + step * 0.1
        try:
            admit(admission, RATE)
            admitted.append(clock.now)
        except LimitExceeded:
            pass
    for i, start in enumerate(admitted):
        within = [t for t in admitted[i:] if t < start + 6 - 1e-9]
        assert len(within) <= 2 * 3 - 1  # token bucket: the burst plus the refill meanwhile
    assert 29 <= len(admitted) <= 33  # 3 at once, then one every 2 s


def test_concurrency_acquire_release(admission: Admission) -> None:
    limit = {"concurrency": {"max": 2}}
    first, second = admit(admission, limit), admit(admission, limit)
    exc = refusal(admission, limit)
    assert exc.limit == "concurrency" and exc.retry_after_seconds == 1.0
    assert "concurrency limit of add for tenant acme reached (2 calls in flight)" in exc.message
    first.release()
    first.release()  # idempotent: frees one slot, not two
    assert admission.in_flight("acme", "add") == 1
    third = admit(admission, limit)
    refusal(admission, limit)
    second.release()
    third.release()
    assert admission.in_flight("acme", "add") == 0


def test_concurrency_release_by_task_id(admission: Admission) -> None:
    limit = {"concurrency": {"max": 1}}
    admission.bind("task-1", admit(admission, limit))
    refusal(admission, limit)
    admission.release("task-1")
    admission.release("task-1")
    admission.release("never-seen")
    admit(admission, limit)


def test_concurrency_slot_expires(admission: Admission, clock: Clock) -> None:
    limit = {"concurrency": {"max": 1}}
    admit(admission, limit, hold_seconds=40)  # never released: a lost release
    clock.now += 39.9
    refusal(admission, limit)
    clock.now += 0.1
    late = admit(admission, limit, hold_seconds=40)
    assert admission.in_flight("acme", "add") == 1
    late.release()


def test_budget_exhaustion_and_new_period(admission: Admission, clock: Clock) -> None:
    budget = {"budget": {"calls": 5, "per_seconds": 3600}}
    for _ in range(5):
        admit(admission, budget)
    clock.now += 600
    exc = refusal(admission, budget)
    assert exc.limit == "budget" and exc.retry_after_seconds == pytest.approx(3000)
    assert exc.message == (
        "budget of add for tenant acme reached (5 calls per 3600 s); retry in 3000 s"
    )
    clock.now += 3000
    for _ in range(5):
        admit(admission, budget)
    refusal(admission, budget)


def test_a_refusal_spends_nothing_elsewhere(admission: Admission) -> None:
    both = {"concurrency": {"max": 1}, "budget": {"calls": 2, "per_seconds": 60}, **RATE}
    held = admit(admission, both)
    for _ in range(5):
        assert refusal(admission, both).limit == "concurrency"
    held.release()
    admit(admission, both).release()  # the budget's second call: the refusals cost nothing
    assert refusal(admission, both).limit == "budget"


def test_refund_gives_everything_back(admission: Admission) -> None:
    both = {"concurrency": {"max": 1}, "budget": {"calls": 1, "per_seconds": 60}}
    admit(admission, both).refund()
    admit(admission, both).refund()
    for _ in range(3):
        admit(admission, RATE).refund()
    for _ in range(3):
        admit(admission, RATE)
    refusal(admission, RATE)


def test_keys_are_bounded_lru(clock: Clock) -> None:
    admission = Admission(max_keys=3, clock=clock)
    limit = {"budget": {"calls": 1, "per_seconds": 60}}
    for tool in ("a", "b", "c"):
        admit(admission, limit, tool=tool)
    refusal(admission, limit, tool="a")  # touches "a": "b" is now the oldest
    admit(admission, limit, tool="d")
    assert len(admission) == 3
    refusal(admission, limit, tool="a")  # kept
    refusal(admission, limit, tool="c")
    admit(admission, limit, tool="b")  # evicted, so forgotten


def test_threads_admit_exactly_the_limit() -> None:
    admission = Admission()  # the real clock: 50 calls per hour cannot refill during the test
    limit = {"rate": {"calls": 50, "per_seconds": 3600}, "budget": {"calls": 60, "per_seconds": 60}}
    admitted: list[Ticket] = []
    refused: list[LimitExceeded] = []
    start = threading.Barrier(8)

    def worker() -> None:
        start.wait()
        for _ in range(25):
            try:
                admitted.append(admit(admission, limit))
            except LimitExceeded as exc:
                refused.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(admitted) == 50 and len(refused) == 150
    assert {e.limit for e in refused} == {"rate"}
