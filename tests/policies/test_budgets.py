"""Durable budgets on a real embedded sidecar's state API: etag-checked increments that two
budget stores (two gateway processes) share without double spending, units given back, periods,
per-caller scope, and a refusal (fail closed) when the store does not answer."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest

from gateway.sidecar.server import SidecarThread
from gateway.sidecar.settings import SidecarSettings
from policies.budgets import STORE, DaprBudgets, lease_size
from policies.limits import Admission, LimitExceeded

ALICE = "spiffe://acme.test/people/alice"
BOB = "spiffe://acme.test/people/bob"


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0 * 86400  # a period boundary

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def sidecar(tmp_path: Path) -> Iterator[SidecarThread]:
    """An embedded sidecar serving gRPC only, as the gateway starts it."""
    thread = SidecarThread(
        SidecarSettings(db_path=tmp_path / "s.db", grpc_listen="127.0.0.1:0", http_listen=None)
    )
    thread.start()
    yield thread
    thread.stop()


async def outcomes(budgets: list[DaprBudgets], n: int, budget: Mapping[str, object]) -> list[bool]:
    async def one(i: int) -> bool:
        try:
            await budgets[i % len(budgets)].spend("acme", "add", ALICE, budget)
            return True
        except LimitExceeded:
            return False

    return list(await asyncio.gather(*(one(i) for i in range(n))))


async def test_two_stores_on_one_sidecar_never_overspend(sidecar: SidecarThread) -> None:
    clock = Clock()
    first = DaprBudgets(sidecar.grpc_address, clock=clock)
    second = DaprBudgets(sidecar.grpc_address, clock=clock)
    budget = {"calls": 7, "per_seconds": 3600.0}
    try:
        got = await outcomes([first, second], 30, budget)
        assert got.count(True) == 7  # concurrent writers, each unit spent exactly once
        with pytest.raises(LimitExceeded) as info:
            await first.spend("acme", "add", ALICE, budget)
        assert info.value.limit == "budget"
        assert info.value.message == (
            "budget of add for tenant acme reached (7 calls per 3600 s); retry in 3600 s"
        )
        clock.now += 1800
        with pytest.raises(LimitExceeded) as info:
            await second.spend("acme", "add", ALICE, budget)
        assert info.value.retry_after_seconds == 1800  # the period's end, the same for all
        clock.now += 1800  # the next period
        assert (await outcomes([first, second], 10, budget)).count(True) == 7
        # Another tool, another tenant: their own counters.
        await first.spend("acme", "other", ALICE, budget)
        await first.spend("beta", "add", ALICE, budget)
    finally:
        first.close()
        second.close()


async def test_a_unit_given_back_can_be_spent_again(sidecar: SidecarThread) -> None:
    budgets = DaprBudgets(sidecar.grpc_address)
    budget = {"calls": 1, "per_seconds": 3600.0}
    try:
        claim = await budgets.spend("acme", "add", ALICE, budget)
        with pytest.raises(LimitExceeded):
            await budgets.spend("acme", "add", ALICE, budget)
        await budgets.give_back(claim)
        await budgets.spend("acme", "add", ALICE, budget)
    finally:
        budgets.close()


async def test_per_caller_budgets(sidecar: SidecarThread) -> None:
    budgets = DaprBudgets(sidecar.grpc_address)
    budget = {"calls": 1, "per_seconds": 3600.0, "per": "caller"}
    try:
        await budgets.spend("acme", "add", ALICE, budget)
        await budgets.spend("acme", "add", BOB, budget)  # bob has his own
        with pytest.raises(LimitExceeded) as info:
            await budgets.spend("acme", "add", ALICE, budget)
        assert "(1 calls per 3600 s per caller)" in info.value.message
    finally:
        budgets.close()


async def test_admission_refunds_and_gives_back(sidecar: SidecarThread) -> None:
    budgets = DaprBudgets(sidecar.grpc_address)
    admission = Admission(budgets=budgets)
    both = {"budget": {"calls": 1, "per_seconds": 3600.0}, "concurrency": {"max": 5}}
    try:
        ticket = await admission.acquire("acme", ALICE, "add", both)
        with pytest.raises(LimitExceeded) as info:
            await admission.acquire("acme", ALICE, "add", both)
        assert info.value.limit == "budget"
        assert admission.in_flight("acme", "add") == 1  # the refused call holds no slot
        ticket.refund()  # a call that started nothing: the unit comes back (in the background)
        for _ in range(100):
            try:
                await admission.acquire("acme", ALICE, "add", both)
                break
            except LimitExceeded:
                await asyncio.sleep(0.05)
        else:
            raise AssertionError("the refunded unit never came back")
    finally:
        budgets.close()


async def test_an_unreachable_store_refuses(tmp_path: Path) -> None:
    budgets = DaprBudgets("127.0.0.1:9")  # nothing listens there
    try:
        with pytest.raises(LimitExceeded) as info:
            await budgets.spend("acme", "add", ALICE, {"calls": 5, "per_seconds": 60.0})
        assert info.value.limit == "budget"
        assert "budget of add for tenant acme cannot be checked now: UNAVAILABLE" in (
            info.value.message
        )
        assert info.value.retry_after_seconds == 1.0
    finally:
        budgets.close()


async def spend_until_refused(budgets: DaprBudgets, budget: Mapping[str, object]) -> int:
    spent = 0
    while True:
        try:
            await budgets.spend("acme", "add", ALICE, budget)
        except LimitExceeded:
            return spent
        spent += 1


def taken(budgets: DaprBudgets, clock: Clock, per: float) -> int:
    key = budgets.key("acme", "add", "tenant", per, int(clock.now // per))
    return int(budgets._connected().get_state(STORE, key).data or 0)


async def test_blocks_of_units_are_never_spent_twice(sidecar: SidecarThread) -> None:
    """With 1000 calls a period a process takes 10 units at a time: two processes spending
    in turn get exactly 1000 between them."""
    clock = Clock()
    budget = {"calls": 1000, "per_seconds": 3600.0}
    assert lease_size(1000) == 10 and lease_size(150) == 1 and lease_size(10**9) == 50
    first = DaprBudgets(sidecar.grpc_address, clock=clock)
    second = DaprBudgets(sidecar.grpc_address, clock=clock)
    try:
        got = await outcomes([first, second], 1100, budget)
        assert got.count(True) == 1000
        assert taken(first, clock, 3600.0) == 1000
    finally:
        first.close()
        second.close()


async def test_a_clean_stop_returns_its_block_and_a_crash_loses_at_most_it(
    sidecar: SidecarThread,
) -> None:
    clock = Clock()
    budget = {"calls": 1000, "per_seconds": 3600.0}
    stopped = DaprBudgets(sidecar.grpc_address, clock=clock)
    await stopped.spend("acme", "add", ALICE, budget)  # takes a block of 10, spends 1
    assert taken(stopped, clock, 3600.0) == 10
    stopped.close()  # gives the 9 unspent units back
    crashed = DaprBudgets(sidecar.grpc_address, clock=clock)
    try:
        assert taken(crashed, clock, 3600.0) == 1
        await crashed.spend("acme", "add", ALICE, budget)  # takes 10, then "dies": no close
        survivor = DaprBudgets(sidecar.grpc_address, clock=clock)
        try:
            # 1 + 10 taken: the crashed process's 9 unspent units are lost, never double spent.
            assert await spend_until_refused(survivor, budget) == 989
        finally:
            survivor.close()
    finally:
        crashed._leases.clear()  # what a crash does to its blocks
        crashed.close()
