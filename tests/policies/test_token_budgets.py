"""Token budgets on a real embedded sidecar's state API: refused once the period's charged usage
reaches the budget (no reservation: the last call overshoots), each call charged exactly once
even when its charge runs twice or concurrently, periods and scopes kept apart, and a refusal
(fail closed) when the store does not answer."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.sidecar.server import SidecarThread
from gateway.sidecar.settings import SidecarSettings
from policies.budgets import DaprBudgets, token_amount
from policies.limits import Admission, LimitExceeded

ALICE = "spiffe://acme.test/people/alice"
BOB = "spiffe://acme.test/people/bob"
BUDGET = {"tokens": 100, "per_seconds": 3600.0}


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0 * 86400 + 10  # 10 s into a period

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def sidecar(tmp_path: Path) -> Iterator[SidecarThread]:
    thread = SidecarThread(
        SidecarSettings(db_path=tmp_path / "s.db", grpc_listen="127.0.0.1:0", http_listen=None)
    )
    thread.start()
    yield thread
    thread.stop()


@pytest.fixture
def budgets(sidecar: SidecarThread) -> Iterator[DaprBudgets]:
    store = DaprBudgets(sidecar.grpc_address, clock=Clock())
    yield store
    store.close()


async def test_refused_once_the_charged_tokens_reach_the_budget(budgets: DaprBudgets) -> None:
    for call in ("t1", "t2"):
        charge = await budgets.check_tokens("acme", "chat", ALICE, BUDGET)
        assert await asyncio.to_thread(budgets.charge, charge, call, {"total_tokens": 40}) == 40
    # 80 of 100 used: admitted, and its 40 take the period to 120 (no reservation).
    charge = await budgets.check_tokens("acme", "chat", ALICE, BUDGET)
    await asyncio.to_thread(budgets.charge, charge, "t3", {"total_tokens": 40})
    with pytest.raises(LimitExceeded) as info:
        await budgets.check_tokens("acme", "chat", ALICE, BUDGET)
    assert info.value.limit == "budget"
    assert info.value.message == (
        "budget of chat for tenant acme reached (100 tokens per 3600 s, 120 used); retry in 3590 s"
    )
    # Another tool, another tenant: their own counters.
    await budgets.check_tokens("acme", "other", ALICE, BUDGET)
    await budgets.check_tokens("globex", "chat", ALICE, BUDGET)


async def test_a_repeated_charge_counts_once(budgets: DaprBudgets) -> None:
    charge = await budgets.check_tokens("acme", "chat", ALICE, BUDGET)
    usage = {"total_tokens": 60, "prompt_tokens": 50}
    assert await asyncio.to_thread(budgets.charge, charge, "task-1", usage) == 60
    # The activity retried (at least once delivery): nothing more is added.
    assert await asyncio.to_thread(budgets.charge, charge, "task-1", usage) == 0
    assert await asyncio.to_thread(budgets._read, charge["key"]) == 60
    await budgets.check_tokens("acme", "chat", ALICE, BUDGET)  # 60 < 100: still admitted


async def test_concurrent_charges_of_many_calls_lose_nothing(sidecar: SidecarThread) -> None:
    clock = Clock()
    first = DaprBudgets(sidecar.grpc_address, clock=clock)
    second = DaprBudgets(sidecar.grpc_address, clock=clock)
    try:
        charge = await first.check_tokens("acme", "chat", ALICE, {**BUDGET, "tokens": 10**6})
        usage = {"total_tokens": 7}
        # 20 calls, each charged twice at the same time by two gateway processes.
        jobs = [
            asyncio.to_thread(store.charge, charge, f"task-{i}", usage)
            for i in range(20)
            for store in (first, second)
        ]
        added = await asyncio.gather(*jobs)
        assert sum(added) == 140
        assert await asyncio.to_thread(first._read, charge["key"]) == 140
    finally:
        first.close()
        second.close()


async def test_the_charge_goes_to_the_period_the_call_started_in(budgets: DaprBudgets) -> None:
    clock = budgets.clock
    assert isinstance(clock, Clock)
    charge = await budgets.check_tokens("acme", "chat", ALICE, BUDGET)
    clock.now += 3600  # the call ends in the next period
    await asyncio.to_thread(budgets.charge, charge, "late", {"total_tokens": 500})
    await budgets.check_tokens("acme", "chat", ALICE, BUDGET)  # the new period is untouched
    clock.now -= 3600
    with pytest.raises(LimitExceeded):
        await budgets.check_tokens("acme", "chat", ALICE, BUDGET)


async def test_per_caller_and_usage_key(budgets: DaprBudgets) -> None:
    budget = {**BUDGET, "per": "caller", "usage_key": "completion_tokens"}
    charge = await budgets.check_tokens("acme", "chat", ALICE, budget)
    usage = {"total_tokens": 5, "completion_tokens": 100.2}
    assert await asyncio.to_thread(budgets.charge, charge, "a", usage) == 101  # rounded up
    with pytest.raises(LimitExceeded) as info:
        await budgets.check_tokens("acme", "chat", ALICE, budget)
    assert "per caller" in info.value.message
    await budgets.check_tokens("acme", "chat", BOB, budget)


def test_token_amount_ignores_what_is_not_a_count() -> None:
    assert token_amount({"total_tokens": 12}, "total_tokens") == 12
    assert token_amount({"total_tokens": "12"}, "total_tokens") == 0
    assert token_amount({"total_tokens": True}, "total_tokens") == 0
    assert token_amount({"total_tokens": float("nan")}, "total_tokens") == 0
    assert token_amount({"total_tokens": -3}, "total_tokens") == 0
    assert token_amount(None, "total_tokens") == 0


async def test_admission_checks_tokens_before_spending_calls(budgets: DaprBudgets) -> None:
    admission = Admission(budgets=budgets)
    both = {"budget": {"calls": 5, "tokens": 50, "per_seconds": 3600.0}}
    ticket = await admission.acquire("acme", ALICE, "chat", both)
    assert ticket.tokens is not None and ticket.budget_claim is not None
    await asyncio.to_thread(budgets.charge, ticket.tokens, "big", {"total_tokens": 50})
    with pytest.raises(LimitExceeded, match="50 tokens per 3600 s"):
        await admission.acquire("acme", ALICE, "chat", both)
    # The refused call spent no call: 4 of 5 remain for a budget of calls alone.
    calls_only = {"budget": {"calls": 5, "per_seconds": 3600.0}}
    for _ in range(4):
        ticket = await admission.acquire("acme", ALICE, "chat", calls_only)
        assert ticket.tokens is None
    with pytest.raises(LimitExceeded, match="5 calls per 3600 s"):
        await admission.acquire("acme", ALICE, "chat", calls_only)


async def test_an_unreachable_store_refuses(tmp_path: Path) -> None:
    budgets = DaprBudgets("127.0.0.1:9", clock=Clock())  # nothing listens there
    try:
        with pytest.raises(LimitExceeded) as info:
            await budgets.check_tokens("acme", "chat", ALICE, BUDGET)
        assert "cannot be checked now" in info.value.message
    finally:
        budgets.close()


def test_in_memory_admission_ignores_a_tokens_only_budget() -> None:
    # Without a budget store tokens cannot be counted; calls still are.
    admission = Admission()
    ticket = admission.admit("acme", ALICE, "chat", {"budget": BUDGET})
    assert ticket.tokens is None


def policy_check(tmp_path: Path, budget: str) -> subprocess.CompletedProcess[str]:
    (tmp_path / "acme.yaml").write_text(
        "tenant: acme\nmembers: [spiffe://acme.test/**]\ntools:\n  chat:\n"
        f"    call: [group:members]\n    obligations:\n      budget: {budget}\n"
    )
    return subprocess.run(
        [sys.executable, "-m", "gateway", "policy", "check", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize(
    "budget",
    [
        "{tokens: 5000, per_seconds: 86400}",
        "{calls: 10, tokens: 5000, per_seconds: 3600, per: caller, usage_key: completion_tokens}",
        "{calls: 10, per_seconds: 60}",
    ],
)
def test_policy_check_accepts_token_budgets(tmp_path: Path, budget: str) -> None:
    done = policy_check(tmp_path, budget)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize(
    ("budget", "error"),
    [
        (
            "{per_seconds: 60}",
            "acme.yaml:7: tools[chat].obligations.budget: a budget counts calls, tokens or both:"
            " give `calls: N` and/or `tokens: N`",
        ),
        ("{tokens: 0, per_seconds: 60}", "tools[chat].obligations.budget.tokens"),
        ("{tokens: 10, per_seconds: 60, usage_key: 'a b'}", "budget.usage_key"),
        ("{token: 10, per_seconds: 60}", "budget.token"),
    ],
)
def test_policy_check_refuses_bad_token_budgets(tmp_path: Path, budget: str, error: str) -> None:
    done = policy_check(tmp_path, budget)
    assert done.returncode != 0
    assert error in done.stdout + done.stderr, done.stdout + done.stderr
