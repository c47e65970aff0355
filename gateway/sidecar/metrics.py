"""The embedded sidecar's Prometheus metrics, served at `GET /metrics` on its HTTP listener
(the gateway's own `/metrics` includes them: gateway/metrics.py).

    duragate_engine_workflows{status}        live workflow instances: pending, running,
        waiting_approval, input_required (a Duragate call waiting for a person), suspended, stalled
    duragate_engine_workflows_finished_total{status}   completed | failed | terminated | ...
    duragate_approvals_pending               calls waiting for an approval
    duragate_engine_queue_depth{kind}        turns (instances ready for a turn) and activities
        waiting for a worker
    duragate_engine_in_flight                work items handed to workers, not yet answered
    duragate_engine_worker_streams           connected workers
    duragate_engine_turn_duration_seconds    a workflow turn: handed to a worker until answered

Everything is read from the engine's memory at scrape time (one pass over the live instances,
no database query), in a registry of its own: a sidecar run as a thread of the gateway does not
mix its series with the gateway's.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from .engine import Engine, status_name
from .protos import pb

TURN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
# The custom status the gateway's workflow shows while it waits for a person (gateway.workflow).
_WAITING = (('"waiting_approval"', "waiting_approval"), ('"input_required"', "input_required"))
_LIVE = ("pending", "running", "waiting_approval", "input_required", "suspended", "stalled")


class EngineMetrics:
    def __init__(self, engine: Callable[[], Engine | None]) -> None:
        self.registry = CollectorRegistry()
        self._engine = engine
        self.turns = Histogram(
            "duragate_engine_turn_duration_seconds",
            "Workflow turns, from their dispatch to a worker until its answer.",
            buckets=TURN_BUCKETS,
            registry=self.registry,
        )
        self.registry.register(_EngineCollector(engine))

    def attach(self, engine: Engine) -> None:
        engine.turn_observer = self.turns.observe

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


def _live_status(status: int, custom: str) -> str:
    if status == pb.ORCHESTRATION_STATUS_RUNNING:
        for marker, name in _WAITING:
            if marker in custom:
                return name
    return status_name(status).lower()


class _EngineCollector:
    def __init__(self, engine: Callable[[], Engine | None]) -> None:
        self._engine = engine

    def describe(self) -> Iterable[Metric]:
        return []

    def collect(self) -> Iterable[Metric]:
        engine = self._engine()
        if engine is None:
            return
        live = dict.fromkeys(_LIVE, 0)
        for status, _name, custom in engine.live_states():
            key = _live_status(status, custom)
            live[key] = live.get(key, 0) + 1
        workflows = GaugeMetricFamily(
            "duragate_engine_workflows", "Live workflow instances by status.", labels=["status"]
        )
        for key, count in live.items():
            workflows.add_metric([key], count)
        yield workflows
        yield GaugeMetricFamily(
            "duragate_approvals_pending",
            "Calls waiting for a person's approval.",
            value=live["waiting_approval"],
        )
        finished = CounterMetricFamily(
            "duragate_engine_workflows_finished",
            "Workflow instances finished since the sidecar started, by status.",
            labels=["status"],
        )
        for status, count in sorted(engine.finished_counts.items()):
            finished.add_metric([status_name(status).lower()], count)
        yield finished
        stats = engine.stats()
        depth = GaugeMetricFamily(
            "duragate_engine_queue_depth",
            "Work waiting for a worker: instances ready for a turn, activities.",
            labels=["kind"],
        )
        depth.add_metric(["turn"], stats["ready_instances"])
        depth.add_metric(["activity"], stats["queued_activities"])
        yield depth
        yield GaugeMetricFamily(
            "duragate_engine_in_flight",
            "Work items handed to workers and not answered yet.",
            value=stats["in_flight"],
        )
        yield GaugeMetricFamily(
            "duragate_engine_worker_streams", "Connected workers.", value=stats["streams"]
        )
