"""Budgets that survive a restart: calls per period, counted in the sidecar's state store.

    budgets = DaprBudgets(runtime.address)             # the embedded sidecar, or a daprd
    admission = Admission(budgets=budgets)             # policies.limits sends budgets here
    claim = await budgets.spend("acme", "add", "tenant", {"calls": 100, "per_seconds": 86400})
    await budgets.give_back(claim)                     # a call that started nothing

A budget obligation (`budget: {calls, per_seconds, per}`) allows `calls` calls per period of
`per_seconds`, per tenant and tool (`per: tenant`, the default) or per calling principal too
(`per: caller`). Periods are fixed windows of wall-clock time from the Unix epoch (86400 s is a
UTC day), so every gateway process and every restart agrees on which period a call falls in.

Each (tenant, tool, scope, period) is one key of the state store `statestore`, read and written
with `dapr.clients.DaprClient`: the count is read with its etag and written back one higher
with that etag (first-write concurrency; a missing key is written insert-only). A writer that
lost a race gets ABORTED and reads again, so several gateway processes sharing one sidecar (or
one daprd and its store) never spend the same unit twice. Within one process, spends of one key
also wait for each other, so they do not race each other into retries. Keys expire (state TTL)
one period after their period ends.

Fail closed: when the store cannot be read or written, the call is refused as over budget for
now ("cannot be checked"), with a short retry delay. A unit given back after a call that started
nothing (an idempotent replay, a scheduling error) is decremented the same way; if that fails
the unit stays spent (the safe side for a budget).

The SDK client is synchronous (its async twin hides the gRPC status an etag conflict needs), so
its calls run in worker threads, never on the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import math
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import grpc
from dapr.clients import DaprClient
from dapr.clients.exceptions import DaprGrpcError
from dapr.clients.grpc._state import Concurrency, StateOptions
from dapr.clients.health import DaprHealth

from policies.limits import refusal

log = logging.getLogger(__name__)

STORE = "statestore"
KEY_PREFIX = "duragate-budget"
# Etag conflicts in a row before giving up (each is another process winning a race).
MAX_ATTEMPTS = 32
# When the store does not answer: try again soon.
UNAVAILABLE_RETRY_SECONDS = 1.0
FIRST_WRITE = StateOptions(concurrency=Concurrency.first_write)


@dataclass(frozen=True)
class Claim:
    """One unit spent in one period, for `give_back`."""

    key: str
    ttl_seconds: int


def scope_of(budget: Mapping[str, Any], principal_id: str) -> str:
    """The principal part of the key: the whole tenant, or one caller (hashed: SPIFFE IDs are
    long and contain '/')."""
    if budget.get("per", "tenant") == "caller":
        return "caller-" + hashlib.sha256(principal_id.encode()).hexdigest()[:32]
    return "tenant"


class DaprBudgets:
    """Budget counters in a Dapr state store. Thread-safe; one per gateway process."""

    def __init__(
        self,
        address: str,
        *,
        store: str = STORE,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.address = address
        self.store = store
        self.clock = clock
        self._client: DaprClient | None = None
        self._client_lock = threading.Lock()
        self._locks: weakref.WeakValueDictionary[str, asyncio.Lock] = weakref.WeakValueDictionary()

    def key(self, tenant: str, tool: str, scope: str, per_seconds: float, period: int) -> str:
        return f"{KEY_PREFIX}/{tenant}/{tool}/{scope}/{per_seconds:g}/{period}"

    async def spend(
        self, tenant: str, tool: str, principal_id: str, budget: Mapping[str, Any]
    ) -> Claim:
        """Spend one unit of the budget or raise LimitExceeded("budget", ...)."""
        per = float(budget["per_seconds"])
        now = self.clock()
        period = math.floor(now / per)
        scope = scope_of(budget, principal_id)
        key = self.key(tenant, tool, scope, per, period)
        ttl = max(1, math.ceil((period + 2) * per - now))  # one period past its end
        lock = self._locks.get(key)
        if lock is None:
            lock = self._locks[key] = asyncio.Lock()
        async with lock:
            spent = await asyncio.to_thread(self._increment, key, int(budget["calls"]), ttl)
        if not spent.ok:
            if spent.error is not None:
                raise refusal(
                    "budget",
                    tenant,
                    tool,
                    f"cannot be checked now: {spent.error}",
                    UNAVAILABLE_RETRY_SECONDS,
                    reached=False,
                )
            detail = f"{budget['calls']} calls per {per:g} s" + (
                " per caller" if scope != "tenant" else ""
            )
            raise refusal("budget", tenant, tool, detail, (period + 1) * per - now)
        return Claim(key, ttl)

    async def give_back(self, claim: Claim) -> None:
        """Return one unit (best effort: on failure it stays spent)."""
        try:
            await asyncio.to_thread(self._decrement, claim)
        except Exception as exc:  # noqa: BLE001 - a unit left spent is the safe side
            log.warning("budget unit of %s not given back: %s", claim.key, exc)

    def close(self) -> None:
        with self._client_lock:
            client, self._client = self._client, None
        if client is not None:
            client.close()

    # --- in worker threads ------------------------------------------------------------------

    def _increment(self, key: str, calls: int, ttl: int) -> _Spent:
        try:
            client = self._connected()
            for attempt in range(MAX_ATTEMPTS):
                got = client.get_state(self.store, key)
                used = _count(got.data)
                if used >= calls:
                    return _Spent(False)
                try:
                    client.save_state(
                        self.store,
                        key,
                        str(used + 1),
                        etag=got.etag or None,
                        options=FIRST_WRITE,
                        state_metadata={"ttlInSeconds": str(ttl)},
                    )
                    return _Spent(True)
                except DaprGrpcError as exc:
                    if exc.code() != grpc.StatusCode.ABORTED:  # not a lost race
                        raise
                time.sleep(0.001 * (attempt + 1))
            return _Spent(False, "too many concurrent updates")
        except Exception as exc:  # noqa: BLE001 - fail closed, with the reason
            log.warning("budget %s: the state store failed: %s", key, exc)
            return _Spent(False, _describe(exc))

    def _decrement(self, claim: Claim) -> None:
        client = self._connected()
        for _ in range(MAX_ATTEMPTS):
            got = client.get_state(self.store, claim.key)
            used = _count(got.data)
            if used <= 0 or not got.etag:
                return
            try:
                client.save_state(
                    self.store,
                    claim.key,
                    str(used - 1),
                    etag=got.etag,
                    options=FIRST_WRITE,
                    state_metadata={"ttlInSeconds": str(claim.ttl_seconds)},
                )
                return
            except DaprGrpcError as exc:
                if exc.code() != grpc.StatusCode.ABORTED:
                    raise

    def _connected(self) -> DaprClient:
        with self._client_lock:
            if self._client is None:
                with _without_http_probe():
                    self._client = DaprClient(self.address)
            return self._client


@dataclass(frozen=True)
class _Spent:
    ok: bool
    error: str | None = None


def _count(data: bytes | str | None) -> int:
    if not data:
        return 0
    try:
        return max(int(data), 0)
    except ValueError:
        # Not ours, or damaged: count it as spent rather than start again from zero.
        return 2**62


def _describe(exc: Exception) -> str:
    if isinstance(exc, DaprGrpcError):
        return f"{exc.code().name}: {exc.details()}"
    return f"{type(exc).__name__}: {exc}"


_probe_lock = threading.Lock()


@contextlib.contextmanager
def _without_http_probe() -> Iterator[None]:
    """DaprClient's constructor waits for daprd's HTTP health endpoint. The gateway reaches
    the sidecar over gRPC only (the embedded one serves no HTTP), and its engine has already
    answered by the time budgets are used, so the probe is skipped while the client is built."""
    with _probe_lock:
        original = DaprHealth.__dict__["wait_for_sidecar"]
        DaprHealth.wait_for_sidecar = staticmethod(lambda: None)  # type: ignore[method-assign]
        try:
            yield
        finally:
            DaprHealth.wait_for_sidecar = original  # type: ignore[method-assign]
