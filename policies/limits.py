"""Admission: the rate, concurrency and budget obligations of a call, enforced before scheduling.

    admission = Admission()
    ticket = admission.admit("acme", principal.id, "add", decision.obligations, hold_seconds=70)
    ...                                  # schedule the call
    admission.bind(task_id, ticket)      # when it ends: admission.release(task_id)

`admit` raises `LimitExceeded(limit, retry_after_seconds, message)` naming the limit that
refused. All three limits count per (tenant, tool), as the policy file states them per tool:
- rate `{calls, per_seconds}`: a token bucket of `calls` tokens refilled at `calls/per_seconds`,
  kept as GCRA (one "theoretical arrival time" per key: O(1) memory, no timestamps list). A
  burst of `calls` goes through at once, then one call every `per_seconds/calls`: the long-run
  rate is exact, but a window of `per_seconds` right after an idle spell can see up to
  2*calls - 1 calls (the burst plus the refill), the usual token-bucket trade for O(1) state.
- concurrency `{max}`: tickets in flight. A ticket is released when its call ends; each carries
  an expiry (`hold_seconds`) so a release that never comes (a caller that stops polling, a
  crash of the front door) frees the slot eventually instead of blocking the tool forever.
- budget `{calls, per_seconds}`: calls per fixed period starting at the first call of the
  period. Counted in memory, per process: a durable counter in the state store would cost an
  engine round trip per call (the whole decision must stay under 500 µs) and has no atomic
  increment in the sidecar's state API yet. So a restart forgets what was spent and N gateway
  processes give N budgets; fine for overload protection, not yet for billing.

Checks come before any counting: a call refused by one limit spends nothing on the others.
Memory is bounded: at most `max_keys` (tenant, tool) keys, least recently used evicted (the
dispatcher only admits configured tools of tenants with a policy, so eviction needs an unusual
number of them), and bound tasks are dropped when their ticket expires.
Thread-safe (one lock, never held across an await), so also safe on one event loop.
"""

from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

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


@dataclass
class _KeyState:
    """What one (tenant, tool) has spent."""

    rate_tat: float = 0.0  # GCRA: when the bucket would be full again
    budget_start: float = -math.inf
    budget_used: int = 0
    in_flight: dict[int, float] = field(default_factory=dict)  # ticket number -> expiry


@dataclass
class Ticket:
    """One admitted call. `release()` frees its concurrency slot; `refund()` also gives back
    its rate token and budget unit (for a call that turned out to start nothing, such as an
    idempotent replay). Both are idempotent."""

    admission: Admission | None
    key: tuple[str, str]
    number: int
    rate_interval: float | None = None  # per_seconds/calls when a rate limit applied
    budget_start: float | None = None  # the budget period it was counted in
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
    ) -> None:
        if max_keys < 1:
            raise ValueError("max_keys must be at least 1")
        self.max_keys = max_keys
        self.clock = clock
        self._keys: OrderedDict[tuple[str, str], _KeyState] = OrderedDict()
        self._tasks: dict[str, Ticket] = {}
        self._lock = threading.Lock()
        self._numbers = 0

    def __len__(self) -> int:
        return len(self._keys)

    def admit(
        self,
        tenant: str,
        principal_id: str,
        tool: str,
        obligations: Mapping[str, Any],
        *,
        hold_seconds: float = 3600.0,
    ) -> Ticket:
        """Admit a call or raise LimitExceeded. `principal_id` is not part of any key today
        (limits are per tenant and tool); it is taken so per-caller limits need no new seam.
        `hold_seconds`: how long a concurrency slot stays taken if nobody releases it."""
        rate = obligations.get("rate")
        concurrency = obligations.get("concurrency")
        budget = obligations.get("budget")
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
            if budget:
                if now >= state.budget_start + budget["per_seconds"]:
                    state.budget_start, state.budget_used = now, 0
                if state.budget_used >= budget["calls"]:
                    per = f"{budget['calls']} calls per {_num(budget['per_seconds'])} s"
                    wait = state.budget_start + budget["per_seconds"] - now
                    raise self._refused("budget", key, per, wait)
            # Every limit agreed: now spend.
            self._numbers += 1
            ticket = Ticket(self, key, self._numbers)
            if interval is not None:
                state.rate_tat = max(state.rate_tat, now) + interval
                ticket.rate_interval = interval
            if budget:
                state.budget_used += 1
                ticket.budget_start = state.budget_start
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

    def _release(self, ticket: Ticket, *, refund: bool) -> None:
        with self._lock:
            state = self._keys.get(ticket.key)
            if state is None:  # evicted: nothing left to give back
                return
            state.in_flight.pop(ticket.number, None)
            if not refund:
                return
            if ticket.rate_interval is not None:
                state.rate_tat = max(state.rate_tat - ticket.rate_interval, 0.0)
            if ticket.budget_start == state.budget_start and state.budget_used > 0:
                state.budget_used -= 1

    @staticmethod
    def _refused(
        limit: str, key: tuple[str, str], detail: str, retry_after: float
    ) -> LimitExceeded:
        tenant, tool = key
        # Rounded up to a tenth (retrying at the advertised time must succeed), but not for
        # float noise: 0.1000000001 is 0.1.
        retry = max(math.ceil(retry_after * 10 - 1e-6) / 10, 0.1)
        name = _NAMES.get(limit, limit)
        message = (
            f"{name} of {tool} for tenant {tenant} reached ({detail}); retry in {_num(retry)} s"
        )
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
