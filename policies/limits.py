"""Admission: the rate, concurrency and budget obligations of a call, enforced before scheduling.

    admission = Admission(budgets=DaprBudgets(address))    # or Admission(): all in memory
    ticket = await admission.acquire("acme", principal.id, "add", obligations, hold_seconds=70)
    ...                                  # schedule the call
    admission.bind(task_id, ticket)      # when it ends: admission.release(task_id)

`acquire` and `admit` raise `LimitExceeded(limit, retry_after_seconds, message)` naming the
limit that refused. The limits count per (tenant, tool), as the policy file states them per
tool (a budget may also count per caller):
- rate `{calls, per_seconds}`: a token bucket of `calls` tokens refilled at `calls/per_seconds`,
  kept as GCRA (one "theoretical arrival time" per key: O(1) memory, no timestamps list). A
  burst of `calls` goes through at once, then one call every `per_seconds/calls`: the long-run
  rate is exact, but a window of `per_seconds` right after an idle spell can see up to
  2*calls - 1 calls (the burst plus the refill), the usual token-bucket trade for O(1) state.
- concurrency `{max}`: tickets in flight. A ticket is released when its call ends; each carries
  an expiry (`hold_seconds`) so a release that never comes (a caller that stops polling, a
  crash of the front door) frees the slot eventually instead of blocking the tool forever.
- budget `{calls, tokens, per_seconds, per, usage_key}`: calls and/or tokens per period, per
  tenant and tool (`per: tenant`) or per calling principal too (`per: caller`). Tokens need a
  budget store: `acquire` refuses a call once the period's reported usage reaches `tokens`
  and puts the charge for after the call on the ticket (`Ticket.tokens`); in memory (no store)
  only calls are counted. With a budget store (`policies.budgets`, what
  the gateway uses: the sidecar's state store, etag-checked) the counters survive restarts and
  are shared by every gateway process on that store; periods are then fixed wall-clock windows
  from the epoch. Without one (tests, benchmarks) they are counted here, in memory, per
  process, in periods starting at the first call of the period.
Rate and concurrency stay in memory, per process: a restart forgets them, and N gateway
processes give N times the rate and concurrency (they protect each process from overload).

`acquire` (async) is the dispatcher's entry: `admit`'s in-memory checks, then the durable
budget; a budget refusal gives back what `admit` took.

Checks come before any counting: a call refused by one limit spends nothing on the others.
Memory is bounded: at most `max_keys` (tenant, tool) keys, least recently used evicted (the
dispatcher only admits configured tools of tenants with a policy, so eviction needs an unusual
number of them), and bound tasks are dropped when their ticket expires.
Thread-safe (one lock, never held across an await), so also safe on one event loop.
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

DEFAULT_MAX_KEYS = 10_000
# Beyond the longest a call can legitimately run: scheduling delay, activity start-up.
HOLD_MARGIN_SECONDS = 60.0
# Calls in flight give no date for a free slot: suggest trying again soon.
CONCURRENCY_RETRY_SECONDS = 1.0


class LimitExceeded(Exception):
    """A call refused by `limit` ("rate", "concurrency" or "budget"); try again after
    `retry_after_seconds`."""

    def __init__(self, limit: str, retry_after_seconds: float, message: str) -> None:
        super().__init__(message)
        self.limit = limit
        self.retry_after_seconds = retry_after_seconds
        self.message = message


class BudgetStore(Protocol):
    """Durable budget counters (policies.budgets.DaprBudgets)."""

    async def spend(
        self, tenant: str, tool: str, principal_id: str, budget: Mapping[str, Any]
    ) -> Any:
        """Spend one unit or raise LimitExceeded; returns a claim for `give_back`."""

    async def give_back(self, claim: Any) -> None: ...

    async def check_tokens(
        self, tenant: str, tool: str, principal_id: str, budget: Mapping[str, Any]
    ) -> Any:
        """Raise LimitExceeded when the period's tokens reach the budget; returns the charge
        the call's workflow makes after the call."""


@dataclass
class _KeyState:
    """What one (tenant, tool) has spent."""

    rate_tat: float = 0.0  # GCRA: when the bucket would be full again
    in_flight: dict[int, float] = field(default_factory=dict)  # ticket number -> expiry


@dataclass
class _Budget:
    """What one (tenant, tool, scope) has spent of an in-memory budget."""

    start: float = -math.inf
    used: int = 0


@dataclass
class Ticket:
    """One admitted call. `release()` frees its concurrency slot; `refund()` also gives back
    its rate token and budget unit (for a call that turned out to start nothing, such as an
    idempotent replay). Both are idempotent."""

    admission: Admission | None
    key: tuple[str, str]
    number: int
    rate_interval: float | None = None  # per_seconds/calls when a rate limit applied
    budget_key: tuple[str, str, str] | None = None  # the in-memory budget it was counted in
    budget_start: float | None = None  # and the period
    budget_claim: Any = None  # a unit of a durable budget (BudgetStore.spend)
    tokens: Any = None  # the token charge for after the call (BudgetStore.check_tokens)
    holds_slot: bool = False
    expires_at: float = math.inf
    _done: bool = False

    def release(self) -> None:
        if self.admission is not None and not self._done:
            self._done = True
            self.admission._release(self, refund=False)

    def refund(self) -> None:
        if self.admission is not None and not self._done:
            self._done = True
            self.admission._release(self, refund=True)


NO_LIMITS = Ticket(None, ("", ""), 0)


class Admission:
    def __init__(
        self,
        *,
        max_keys: int = DEFAULT_MAX_KEYS,
        clock: Callable[[], float] = time.monotonic,
        budgets: BudgetStore | None = None,
    ) -> None:
        if max_keys < 1:
            raise ValueError("max_keys must be at least 1")
        self.max_keys = max_keys
        self.clock = clock
        self.budgets = budgets
        self._keys: OrderedDict[tuple[str, str], _KeyState] = OrderedDict()
        self._budgets: OrderedDict[tuple[str, str, str], _Budget] = OrderedDict()
        self._returns: set[asyncio.Task[None]] = set()  # durable units being given back
        self._tasks: dict[str, Ticket] = {}
        self._lock = threading.Lock()
        self._numbers = 0

    def __len__(self) -> int:
        return len(self._keys)

    async def acquire(
        self,
        tenant: str,
        principal_id: str,
        tool: str,
        obligations: Mapping[str, Any],
        *,
        hold_seconds: float = 3600.0,
    ) -> Ticket:
        """`admit`, then the durable budget when there is a budget store; raises
        LimitExceeded naming the limit. A budget refusal gives back what `admit` took."""
        ticket = self.admit(tenant, principal_id, tool, obligations, hold_seconds=hold_seconds)
        budget = obligations.get("budget")
        if budget and self.budgets is not None:
            try:
                # Tokens first: only checked, so a refusal there has spent no call.
                tokens = None
                if budget.get("tokens"):
                    tokens = await self.budgets.check_tokens(tenant, tool, principal_id, budget)
                claim = None
                if budget.get("calls"):
                    claim = await self.budgets.spend(tenant, tool, principal_id, budget)
            except BaseException:
                ticket.refund()
                raise
            if ticket is NO_LIMITS:
                ticket = Ticket(self, (tenant, tool), 0)
            ticket.budget_claim = claim
            ticket.tokens = tokens
        return ticket

    def admit(
        self,
        tenant: str,
        principal_id: str,
        tool: str,
        obligations: Mapping[str, Any],
        *,
        hold_seconds: float = 3600.0,
    ) -> Ticket:
        """Admit a call against the limits kept in memory, or raise LimitExceeded: rate,
        concurrency, and the budget only when there is no budget store (`acquire` checks a
        durable one). `principal_id` keys budgets with `per: caller`. `hold_seconds`: how long
        a concurrency slot stays taken if nobody releases it."""
        rate = obligations.get("rate")
        concurrency = obligations.get("concurrency")
        budget = obligations.get("budget") if self.budgets is None else None
        if budget and not budget.get("calls"):
            budget = None  # tokens alone: counted only with a budget store
        if not (rate or concurrency or budget):
            return NO_LIMITS  # the common case touches no shared state
        key = (tenant, tool)
        with self._lock:
            now = self.clock()
            state = self._state(key)
            if concurrency:
                _expire(state, now)
                if len(state.in_flight) >= concurrency["max"]:
                    raise self._refused(
                        "concurrency",
                        key,
                        f"{concurrency['max']} calls in flight",
                        CONCURRENCY_RETRY_SECONDS,
                    )
            interval: float | None = None
            if rate:
                interval = rate["per_seconds"] / rate["calls"]
                tat = max(state.rate_tat, now)
                # GCRA: admit while the bucket, after this call, holds at most `calls` tokens'
                # worth of debt, i.e. the new arrival time is within per_seconds of now.
                wait = tat + interval - now - rate["per_seconds"]
                if wait > 1e-9:
                    per = f"{rate['calls']} calls per {_num(rate['per_seconds'])} s"
                    raise self._refused("rate", key, per, wait)
            spent: _Budget | None = None
            if budget:
                caller = budget.get("per", "tenant") == "caller"
                budget_key = (tenant, tool, principal_id if caller else "")
                spent = self._budget(budget_key)
                if now >= spent.start + budget["per_seconds"]:
                    spent.start, spent.used = now, 0
                if spent.used >= budget["calls"]:
                    per = f"{budget['calls']} calls per {_num(budget['per_seconds'])} s"
                    per += " per caller" if caller else ""
                    wait = spent.start + budget["per_seconds"] - now
                    raise self._refused("budget", key, per, wait)
            # Every limit agreed: now spend.
            self._numbers += 1
            ticket = Ticket(self, key, self._numbers)
            if interval is not None:
                state.rate_tat = max(state.rate_tat, now) + interval
                ticket.rate_interval = interval
            if spent is not None:
                spent.used += 1
                ticket.budget_key, ticket.budget_start = budget_key, spent.start
            if concurrency:
                ticket.holds_slot = True
                ticket.expires_at = now + hold_seconds
                state.in_flight[ticket.number] = ticket.expires_at
            return ticket

    def bind(self, task_id: str, ticket: Ticket) -> None:
        """Remember the ticket of a scheduled call, for `release(task_id)` when it ends. Only
        tickets holding a slot matter; the others have nothing left to give back."""
        if not ticket.holds_slot:
            return
        with self._lock:
            if len(self._tasks) >= self.max_keys:
                now = self.clock()
                self._tasks = {t: k for t, k in self._tasks.items() if k.expires_at > now}
            self._tasks[task_id] = ticket

    def release(self, task_id: str) -> None:
        """The call `task_id` has ended (or was cancelled): free its slot. Unknown ids, and
        calls already released, are ignored: every view of a terminal task may call this."""
        with self._lock:
            ticket = self._tasks.pop(task_id, None)
        if ticket is not None:
            ticket.release()

    def in_flight(self, tenant: str, tool: str) -> int:
        with self._lock:
            state = self._keys.get((tenant, tool))
            if state is None:
                return 0
            _expire(state, self.clock())
            return len(state.in_flight)

    # --- internals ------------------------------------------------------------------------

    def _state(self, key: tuple[str, str]) -> _KeyState:
        state = self._keys.get(key)
        if state is None:
            state = self._keys[key] = _KeyState()
            if len(self._keys) > self.max_keys:
                self._keys.popitem(last=False)
        else:
            self._keys.move_to_end(key)
        return state

    def _budget(self, key: tuple[str, str, str]) -> _Budget:
        found = self._budgets.get(key)
        if found is None:
            found = self._budgets[key] = _Budget()
            if len(self._budgets) > self.max_keys:
                self._budgets.popitem(last=False)
        else:
            self._budgets.move_to_end(key)
        return found

    def _release(self, ticket: Ticket, *, refund: bool) -> None:
        if refund and ticket.budget_claim is not None and self.budgets is not None:
            self._give_back(ticket.budget_claim)
        with self._lock:
            if refund and ticket.budget_key is not None:
                spent = self._budgets.get(ticket.budget_key)
                if spent is not None and spent.start == ticket.budget_start and spent.used > 0:
                    spent.used -= 1
            state = self._keys.get(ticket.key)
            if state is None:  # evicted: nothing left to give back
                return
            state.in_flight.pop(ticket.number, None)
            if refund and ticket.rate_interval is not None:
                state.rate_tat = max(state.rate_tat - ticket.rate_interval, 0.0)

    def _give_back(self, claim: Any) -> None:
        """Return a durable budget unit in the background (refunds come from sync code)."""
        assert self.budgets is not None
        try:
            task = asyncio.get_running_loop().create_task(self.budgets.give_back(claim))
        except RuntimeError:  # no loop: the unit stays spent, the safe side
            return
        self._returns.add(task)
        task.add_done_callback(self._returns.discard)

    @staticmethod
    def _refused(
        limit: str, key: tuple[str, str], detail: str, retry_after: float
    ) -> LimitExceeded:
        return refusal(limit, key[0], key[1], detail, retry_after)


def refusal(
    limit: str,
    tenant: str,
    tool: str,
    detail: str,
    retry_after: float,
    *,
    reached: bool = True,
) -> LimitExceeded:
    """The refusal of a call by `limit`, saying when to retry. `reached=False`: the limit
    could not be checked (`detail` says why), which refuses too."""
    # Rounded up to a tenth (retrying at the advertised time must succeed), but not for
    # float noise: 0.1000000001 is 0.1.
    retry = max(math.ceil(retry_after * 10 - 1e-6) / 10, 0.1)
    name = _NAMES.get(limit, limit)
    what = f"reached ({detail})" if reached else f"{detail}"
    message = f"{name} of {tool} for tenant {tenant} {what}; retry in {_num(retry)} s"
    return LimitExceeded(limit, retry, message)


def call_hold_seconds(call: Mapping[str, Any]) -> float:
    """How long a call's concurrency slot may stay taken without a release: the longest the
    call can run (every attempt timing out, the back-off between attempts, an approval wait
    until it expires) plus a margin. Only a safety net; normally the end of the call frees it."""
    timeout = float(call.get("timeout_seconds") or 0)
    retry = call.get("retry") or {}
    attempts = int(retry.get("max_attempts", 1))
    gap = float(retry.get("first_interval_seconds", 1.0))
    gaps = 0.0
    for _ in range(attempts - 1):
        gaps += min(gap, float(retry.get("max_interval_seconds", 60.0)))
        gap *= float(retry.get("backoff_coefficient", 2.0))
    approval = call.get("approval") or {}
    waiting = float(approval.get("expires_seconds") or 0)
    return timeout * attempts + gaps + waiting + HOLD_MARGIN_SECONDS


_NAMES = {"rate": "rate limit", "concurrency": "concurrency limit", "budget": "budget"}


def _expire(state: _KeyState, now: float) -> None:
    expired = [n for n, expiry in state.in_flight.items() if expiry <= now]
    for number in expired:
        del state.in_flight[number]


def _num(value: float) -> str:
    return f"{value:g}"
