"""Prometheus metrics of one gateway, served at `/metrics` (prometheus-client).

    duragate_calls_total{tool,tenant,front_door,outcome}      calls by how they ended:
        completed | failed | timeout | not_approved | cancelled  (the workflow ended), or
        denied | limited | refused | unavailable                 (refused before it ran)
    duragate_call_duration_seconds{tool,front_door}           histogram, workflow start to end
    duragate_policy_decisions_total{rule,effect}              allow | approve | deny, by rule
    duragate_limits_hit_total{limit}                          rate | concurrency | budget
    duragate_authentications_total{method,outcome}           ok | unauthenticated | forbidden
    duragate_audit_records_dropped_total                      records the audit log lost
    duragate_engine_*                                         the embedded sidecar's own
        metrics (gateway.sidecar.metrics): workflows by status (tasks running, waiting for an
        approval or an input), approvals pending, queue depth, workflow turn latency

`/metrics` itself and the counting authenticator are in gateway/metrics_http.py.

Labels are bounded: a tool label is a configured tool's name (anything else is `other`), a
tenant one of the tenants that have a policy file (without policy files, the first
`MAX_LABEL_VALUES` tenants seen), rules come from the policy files; never a principal or task
id. Calls are counted where they end: refusals in the dispatcher, finished calls in the
workflow (once, outside replays), cancellations where the gateway cancels.

The embedded sidecar is another process: the gateway's `/metrics` fetches the sidecar's (from
its loopback HTTP listener, within `ENGINE_SCRAPE_TIMEOUT_SECONDS`) and serves both, so one
scrape target is enough; `duragate_engine_up` says whether that fetch worked. With
`engine.kind: dapr`, scrape daprd's own metrics endpoint as well.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable
from typing import Any

import httpx
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, Metric

from gateway import telemetry

log = logging.getLogger(__name__)

OTHER = "other"
MAX_LABEL_VALUES = 100
MAX_RULES = 1000
ENGINE_SCRAPE_TIMEOUT_SECONDS = 2.0
# Seconds: tool calls run from milliseconds (a function) to hours (a crew, an approval).
CALL_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 1800, 3600)
# The error types of a failed call (gateway.workflow.failure) that get an outcome of their own.
_OUTCOMES = {
    "timeout": "timeout",
    "not_approved": "not_approved",
    "approval_expired": "not_approved",
    "approval_mismatch": "not_approved",
    "cancelled": "cancelled",
}


class LabelGuard:
    """Keeps a label's values bounded: a value `allowed` admits, or (without `allowed`) one of
    the first `limit` distinct values seen; anything else is `other`."""

    def __init__(self, limit: int, allowed: Callable[[str], bool] | None = None) -> None:
        self.limit = limit
        self.allowed = allowed
        self._seen: set[str] = set()
        self._lock = threading.Lock()  # the workflow worker counts from its own threads

    def __call__(self, value: str | None) -> str:
        if not value:
            return "none"
        if self.allowed is not None:
            return value if self.allowed(value) else OTHER
        with self._lock:
            if value in self._seen:
                return value
            if len(self._seen) < self.limit:
                self._seen.add(value)
                return value
        return OTHER


class GatewayMetrics:
    """The gateway's counters and histograms, in a registry of its own (several gateways in
    one process, as tests run them, do not share series)."""

    def __init__(
        self,
        tools: Callable[[str], bool] | None = None,
        tenants: Callable[[str], bool] | None = None,
    ) -> None:
        self.registry = CollectorRegistry()
        self.tool = LabelGuard(MAX_LABEL_VALUES, tools)
        self.tenant = LabelGuard(MAX_LABEL_VALUES, tenants)
        self.rule = LabelGuard(MAX_RULES)
        self.method = LabelGuard(20)
        r = self.registry
        self.calls = Counter(
            "duragate_calls",
            "Calls by tool, tenant, front door and outcome.",
            ["tool", "tenant", "front_door", "outcome"],
            registry=r,
        )
        self.call_seconds = Histogram(
            "duragate_call_duration_seconds",
            "Calls from the start of their workflow to its end.",
            ["tool", "front_door"],
            buckets=CALL_BUCKETS,
            registry=r,
        )
        self.decisions = Counter(
            "duragate_policy_decisions",
            "Policy decisions by rule and effect (allow, approve, deny).",
            ["rule", "effect"],
            registry=r,
        )
        self.limits = Counter(
            "duragate_limits_hit", "Calls refused by a limit, by kind.", ["limit"], registry=r
        )
        self.authentications = Counter(
            "duragate_authentications",
            "Authentication results by method and outcome.",
            ["method", "outcome"],
            registry=r,
        )
        ProcessCollector(registry=r)
        self._audit_dropped: Callable[[], int] | None = None
        r.register(_Callbacks(self))
        # Where the sidecar's metrics are (`host:port`), or None (not embedded, not started).
        self.engine_address: Callable[[], str | None] = lambda: None

    # --- what the gateway reports ----------------------------------------------------------

    def watch_audit(self, dropped: Callable[[], int]) -> None:
        self._audit_dropped = dropped

    def call_refused(self, tool: str | None, tenant: str, front_door: str, outcome: str) -> None:
        self.calls.labels(self.tool(tool), self.tenant(tenant), front_door, outcome).inc()

    def call_ended(self, call: dict[str, Any], output: Any, seconds: float | None) -> None:
        """A call's workflow returned `output` after `seconds` (the workflow's own clock)."""
        tool = self.tool(str(call.get("tool", "")))
        tenant = self.tenant(str((call.get("principal") or {}).get("tenant", "")))
        front_door = str(call.get("front_door") or "none")
        self.calls.labels(tool, tenant, front_door, outcome_of(output)).inc()
        if seconds is not None and seconds >= 0:
            self.call_seconds.labels(tool, front_door).observe(seconds)

    def call_cancelled(self, tool: str, tenant: str, front_door: str | None) -> None:
        self.calls.labels(
            self.tool(tool), self.tenant(tenant), front_door or "none", "cancelled"
        ).inc()

    def decision(self, rule: str | None, effect: str) -> None:
        self.decisions.labels(self.rule(rule), effect).inc()

    def limit_hit(self, limit: str) -> None:
        self.limits.labels(limit if limit in ("rate", "concurrency", "budget") else OTHER).inc()

    def authentication(self, method: str, outcome: str) -> None:
        self.authentications.labels(self.method(method), outcome).inc()

    # --- exposition -------------------------------------------------------------------------

    async def exposition(self) -> bytes:
        """The text of a scrape: this gateway's metrics, then the embedded sidecar's."""
        own = generate_latest(self.registry)
        address = self.engine_address()
        if address is None:
            return own
        engine, up = b"", 0
        try:
            with telemetry.quiet():
                async with httpx.AsyncClient(timeout=ENGINE_SCRAPE_TIMEOUT_SECONDS) as client:
                    answer = await client.get(f"http://{address}/metrics")
            if answer.status_code == 200:
                engine, up = answer.content, 1
        except httpx.HTTPError as exc:
            log.debug("the sidecar's metrics did not come: %s", exc)
        status = (
            b"# HELP duragate_engine_up Whether the embedded sidecar's metrics were read.\n"
            b"# TYPE duragate_engine_up gauge\n"
            b"duragate_engine_up " + str(up).encode() + b"\n"
        )
        return own + status + engine


def outcome_of(output: Any) -> str:
    if isinstance(output, dict) and output.get("ok"):
        return "completed"
    error = output.get("error") if isinstance(output, dict) else None
    kind = error.get("type") if isinstance(error, dict) else None
    return _OUTCOMES.get(str(kind), "failed")


class _Callbacks:
    """Values read at scrape time from the objects that keep them."""

    def __init__(self, metrics: GatewayMetrics) -> None:
        self.metrics = metrics

    def describe(self) -> Iterable[Metric]:
        return []

    def collect(self) -> Iterable[Metric]:
        dropped = self.metrics._audit_dropped
        family = CounterMetricFamily(
            "duragate_audit_records_dropped",
            "Audit records dropped (the queue was full or a write failed).",
        )
        family.add_metric([], float(dropped() if dropped is not None else 0))
        yield family
