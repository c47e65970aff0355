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
with `dapr.clients.DaprClient`: the count of units taken is read with its etag and written back
higher with that etag (first-write concurrency; a missing key is written insert-only). A writer
that lost a race gets ABORTED and reads again, so several gateway processes sharing one sidecar
(or one daprd and its store) never take the same unit twice. Within one process, spends of one
key also wait for each other, so they do not race each other into retries. Keys expire (state
TTL) one period after their period ends.

Leases: a store round trip costs a millisecond or two, so a process takes units in small blocks
and spends them locally: 1 % of the budget at a time, at most 50, and one at a time below 200
calls per period (then every call is counted in the store). Units given back return to the
block; `close()` (a clean stop) returns unspent blocks to the store. A process that dies loses
its unspent block (those units count as spent: at most 1 % of the budget per process), and
while another process holds units, this one may be refused a little early. Both err on the
side of the budget.

Tokens (`budget: {tokens, per_seconds, per, usage_key}`, alone or with `calls`): the usage the
tools report, figure `usage_key`, summed per (tenant, tool, scope, period) under a key of its
own. Before a call, `check_tokens` reads the sum and refuses the call once it reaches `tokens`;
nothing is reserved (the usage is not known before the call), so the calls admitted while the
sum is below the budget may together overshoot it by their own usage. It returns the charge
(the key of the period the call started in) that travels in the call's workflow input; after
the tool answered, the workflow's activity `duragate.charge` calls `charge`, which adds the
usage and writes a per-call marker in one state transaction: the counter's etag must not have
changed and the marker must not exist (first-write). An activity that runs again (at least
once delivery, a retry after a crash) finds the marker and charges nothing, so each call is
charged exactly once. No lease: every check and every charge is a store round trip.

Fail closed: when the store cannot be read or written, the call is refused as over budget for
now ("cannot be checked"), with a short retry delay. A unit given back after a call that started
nothing (an idempotent replay, a scheduling error) is decremented the same way; if that fails
the unit stays spent (the safe side for a budget).

The SDK client is synchronous (its async twin hides the gRPC status an etag conflict needs), so
its calls run in worker threads, never on the event loop.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import grpc
from dapr.clients import DaprClient
from dapr.clients.exceptions import DaprGrpcError
from dapr.clients.grpc._state import Concurrency, StateOptions
from dapr.proto import api_v1, common_v1

from gateway.state_client import without_http_probe
from policies.limits import refusal

log = logging.getLogger(__name__)

STORE = "statestore"
KEY_PREFIX = "duragate-budget"
TOKENS_PREFIX = "duragate-budget-tokens"
# Etag conflicts in a row before giving up (each is another process winning a race).
MAX_ATTEMPTS = 32
# When the store does not answer: try again soon.
UNAVAILABLE_RETRY_SECONDS = 1.0
# Units taken from the store at a time: calls // LEASE_DIVISOR, between 1 and MAX_LEASE.
LEASE_DIVISOR = 100
MAX_LEASE = 50
MAX_LEASES = 10_000  # (tenant, tool, scope) blocks held in memory; the oldest is let go
FIRST_WRITE = StateOptions(concurrency=Concurrency.first_write)


@dataclass(frozen=True)
class Claim:
    """One unit spent in one period, for `give_back`."""

    key: str
    ttl_seconds: int


@dataclass
class _Lease:
    """Units of one key taken from the store and not spent yet."""

    key: str
    ttl_seconds: int
    expires_at: float  # the end of its period (wall clock)
    remaining: int = 0


def lease_size(calls: int) -> int:
    return max(1, min(MAX_LEASE, calls // LEASE_DIVISOR))


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
        self._leases: OrderedDict[str, _Lease] = OrderedDict()
        self._leases_lock = threading.Lock()  # close() runs in a worker thread

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
        if self._take(key):
            return Claim(key, ttl)
        lock = self._locks.get(key)
        if lock is None:
            lock = self._locks[key] = asyncio.Lock()
        async with lock:
            if self._take(key):  # another spend of this process took a block meanwhile
                return Claim(key, ttl)
            calls = int(budget["calls"])
            spent = await asyncio.to_thread(self._increment, key, calls, lease_size(calls), ttl)
            if spent.ok:
                self._keep(_Lease(key, ttl, (period + 1) * per, spent.taken - 1))
                return Claim(key, ttl)
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

    async def check_tokens(
        self, tenant: str, tool: str, principal_id: str, budget: Mapping[str, Any]
    ) -> dict[str, Any]:
        """Refuse (LimitExceeded("budget", ...)) when the period's tokens reach the budget;
        otherwise return the charge for `charge` after the call (JSON: it travels in the call's
        workflow input)."""
        per = float(budget["per_seconds"])
        now = self.clock()
        period = math.floor(now / per)
        scope = scope_of(budget, principal_id)
        key = f"{TOKENS_PREFIX}/{tenant}/{tool}/{scope}/{per:g}/{period}"
        tokens = int(budget["tokens"])
        try:
            spent = await asyncio.to_thread(self._read, key)
        except Exception as exc:  # noqa: BLE001 - fail closed, with the reason
            log.warning("budget %s: the state store failed: %s", key, exc)
            raise refusal(
                "budget",
                tenant,
                tool,
                f"cannot be checked now: {_describe(exc)}",
                UNAVAILABLE_RETRY_SECONDS,
                reached=False,
            ) from None
        if spent >= tokens:
            detail = f"{tokens} tokens per {per:g} s, {spent} used" + (
                " per caller" if scope != "tenant" else ""
            )
            raise refusal("budget", tenant, tool, detail, (period + 1) * per - now)
        return {
            "key": key,
            "usage_key": str(budget.get("usage_key", "total_tokens")),
            # The counter and the markers expire one period after the period ends.
            "expires_at": (period + 2) * per,
        }

    def charge(self, charge: Mapping[str, Any], instance_id: str, usage: Mapping[str, Any]) -> int:
        """Add the usage of call `instance_id` to its period's counter, once: a second charge
        of the same call (a repeated activity) adds nothing. Returns the tokens added. Blocking
        (run it in a worker thread); raises when the store fails, for the activity to retry."""
        amount = token_amount(usage, str(charge["usage_key"]))
        if amount <= 0:
            return 0
        key = str(charge["key"])
        marker = f"{key}/charged/{instance_id}"
        ttl = max(1, math.ceil(float(charge["expires_at"]) - self.clock()))
        client = self._connected()
        last: Exception | None = None
        for attempt in range(MAX_ATTEMPTS):
            # The counter first, then the marker: a charge that commits in between changes the
            # counter's etag, so this one's transaction fails and reads again.
            got = client.get_state(self.store, key)
            if client.get_state(self.store, marker).data:
                return 0  # charged already
            request = api_v1.ExecuteStateTransactionRequest(
                storeName=self.store,
                operations=[
                    _upsert(key, str(_count(got.data) + amount), got.etag or None, ttl),
                    _upsert(marker, str(amount), None, ttl),
                ],
            )
            try:
                # The SDK's transaction operations carry no concurrency option (first-write),
                # so the request is built here and sent on the client's own stub.
                client._stub.ExecuteStateTransaction(request)
                return amount
            except grpc.RpcError as exc:
                # A lost race fails the transaction as Aborted or (daprd) Internal: read again.
                if exc.code() not in (grpc.StatusCode.ABORTED, grpc.StatusCode.INTERNAL):
                    raise
                last = exc
            time.sleep(0.001 * (attempt + 1))
        raise RuntimeError(f"budget {key}: the charge kept failing: {last}")

    async def give_back(self, claim: Claim) -> None:
        """Return one unit: to this process's block if it still has one for that period, else
        to the store (best effort: on failure it stays spent)."""
        with self._leases_lock:
            lease = self._leases.get(claim.key)
            if lease is not None:
                lease.remaining += 1
                return
        try:
            await asyncio.to_thread(self._decrement, claim.key, 1, claim.ttl_seconds)
        except Exception as exc:  # noqa: BLE001 - a unit left spent is the safe side
            log.warning("budget unit of %s not given back: %s", claim.key, exc)

    def close(self) -> None:
        """Return unspent blocks to the store (a clean stop loses nothing), then disconnect."""
        with self._leases_lock:
            leases, self._leases = list(self._leases.values()), OrderedDict()
        now = self.clock()
        for lease in leases:
            self._return(lease, now)
        with self._client_lock:
            client, self._client = self._client, None
        if client is not None:
            client.close()

    # --- this process's blocks --------------------------------------------------------------

    def _take(self, key: str) -> bool:
        with self._leases_lock:
            lease = self._leases.get(key)
            if lease is None or lease.remaining <= 0:
                return False
            lease.remaining -= 1
            return True

    def _keep(self, lease: _Lease) -> None:
        """Hold a new block; beyond MAX_LEASES the oldest is let go (its units count as spent).
        A block of an ended period is simply never asked for again."""
        with self._leases_lock:
            self._leases[lease.key] = lease
            self._leases.move_to_end(lease.key)
            while len(self._leases) > MAX_LEASES:
                self._leases.popitem(last=False)

    def _return(self, lease: _Lease, now: float) -> None:
        if lease.remaining <= 0 or now >= lease.expires_at:
            return
        try:
            self._decrement(lease.key, lease.remaining, lease.ttl_seconds)
        except Exception as exc:  # noqa: BLE001 - units left spent are the safe side
            log.warning("%d budget unit(s) of %s not returned: %s", lease.remaining, lease.key, exc)

    # --- in worker threads ------------------------------------------------------------------

    def _increment(self, key: str, calls: int, block: int, ttl: int) -> _Spent:
        """Take up to `block` units (at least one) of `calls`; `taken` says how many."""
        try:
            client = self._connected()
            for attempt in range(MAX_ATTEMPTS):
                got = client.get_state(self.store, key)
                used = _count(got.data)
                if used >= calls:
                    return _Spent(False)
                taken = min(block, calls - used)
                try:
                    client.save_state(
                        self.store,
                        key,
                        str(used + taken),
                        etag=got.etag or None,
                        options=FIRST_WRITE,
                        state_metadata={"ttlInSeconds": str(ttl)},
                    )
                    return _Spent(True, taken=taken)
                except DaprGrpcError as exc:
                    if exc.code() != grpc.StatusCode.ABORTED:  # not a lost race
                        raise
                time.sleep(0.001 * (attempt + 1))
            return _Spent(False, "too many concurrent updates")
        except Exception as exc:  # noqa: BLE001 - fail closed, with the reason
            log.warning("budget %s: the state store failed: %s", key, exc)
            return _Spent(False, _describe(exc))

    def _decrement(self, key: str, units: int, ttl: int) -> None:
        client = self._connected()
        for _ in range(MAX_ATTEMPTS):
            got = client.get_state(self.store, key)
            used = _count(got.data)
            if used <= 0 or not got.etag:
                return
            try:
                client.save_state(
                    self.store,
                    key,
                    str(max(used - units, 0)),
                    etag=got.etag,
                    options=FIRST_WRITE,
                    state_metadata={"ttlInSeconds": str(ttl)},
                )
                return
            except DaprGrpcError as exc:
                if exc.code() != grpc.StatusCode.ABORTED:
                    raise

    def _read(self, key: str) -> int:
        return _count(self._connected().get_state(self.store, key).data)

    def _connected(self) -> DaprClient:
        with self._client_lock:
            if self._client is None:
                with without_http_probe():
                    self._client = DaprClient(self.address)
            return self._client


@dataclass(frozen=True)
class _Spent:
    ok: bool
    error: str | None = None
    taken: int = 0


def token_amount(usage: Mapping[str, Any] | None, usage_key: str) -> int:
    """The tokens a call's usage counts for: figure `usage_key`, rounded up; 0 when the tool
    reported none (or not a number)."""
    value = (usage or {}).get(usage_key)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return 0
    return max(0, math.ceil(value))


def _upsert(key: str, value: str, etag: str | None, ttl: int) -> Any:
    """A transaction upsert: over version `etag`, or insert-only (first-write, no etag)."""
    return api_v1.TransactionalStateOperation(
        operationType="upsert",
        request=common_v1.StateItem(
            key=key,
            value=value.encode(),
            etag=common_v1.Etag(value=etag) if etag else None,
            options=common_v1.StateOptions(
                concurrency=common_v1.StateOptions.CONCURRENCY_FIRST_WRITE
            ),
            metadata={"ttlInSeconds": str(ttl)},
        ),
    )


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
