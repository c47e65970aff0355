"""The pieces of traces and metrics that need no gateway: which settings turn tracing on, the
W3C context a caller may send, label bounds, the sidecar's /metrics and its token, and CrewAI
not switching the gateway's tracing off."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from starlette.testclient import TestClient

from gateway import telemetry
from gateway.metrics import OTHER, GatewayMetrics, LabelGuard, outcome_of
from gateway.sidecar.health import create_health_app
from tests.gateway.conftest import REPO_ROOT, child_env

PARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


@pytest.mark.parametrize(
    ("environ", "wanted"),
    [
        ({}, []),
        ({"OTEL_SERVICE_NAME": "x"}, []),
        ({"OTEL_TRACES_EXPORTER": "none"}, []),
        ({"OTEL_TRACES_EXPORTER": "otlp"}, ["otlp"]),
        ({"OTEL_TRACES_EXPORTER": "otlp,console"}, ["otlp", "console"]),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}, ["otlp"]),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://c:4318/v1/traces"}, ["otlp"]),
        ({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_SDK_DISABLED": "true"}, []),
    ],
)
def test_which_settings_turn_tracing_on(environ: dict[str, str], wanted: list[str]) -> None:
    assert telemetry.wanted_exporters(environ) == wanted


def test_unsupported_settings_are_named() -> None:
    assert not telemetry.enabled()
    with pytest.raises(telemetry.TelemetryConfigError, match="http/json.*http/protobuf or grpc"):
        telemetry.setup(
            {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": "http/json"}
        )
    with pytest.raises(telemetry.TelemetryConfigError, match="'zipkin' is not supported"):
        telemetry.setup({"OTEL_TRACES_EXPORTER": "zipkin"})
    assert not telemetry.enabled()


def test_off_costs_nothing_and_passes_nothing_on() -> None:
    assert not telemetry.enabled()
    assert telemetry.setup({}) is False
    span = telemetry.start_span("x")
    assert not span.is_recording() and telemetry.carrier_of(span) == {}
    with telemetry.span("y") as inner:
        assert not inner.is_recording()
    assert telemetry.extract({"traceparent": PARENT}) is None
    assert telemetry.inject({}) == {}


def test_only_well_formed_trace_context_is_taken() -> None:
    meta = {"traceparent": PARENT, "tracestate": "a=1"}
    other = "00-" + "1" * 32 + "-" + "2" * 16 + "-01"
    assert telemetry.carrier_from(meta, {"traceparent": other}) == meta  # _meta first
    assert telemetry.carrier_from({}, {"traceparent": other}) == {"traceparent": other}
    for bad in ("", "garbage", PARENT.upper(), PARENT + "-extra", PARENT[:-1], 42):
        assert telemetry.carrier_from({"traceparent": bad}) == {}
    long_state = {"traceparent": PARENT, "tracestate": "a=" + "x" * 600}
    assert telemetry.carrier_from(long_state) == {"traceparent": PARENT}
    assert telemetry.trace_id_of({"traceparent": PARENT}) == "4bf92f3577b34da6a3ce929d0e0e4736"
    assert telemetry.trace_id_of({"traceparent": "nope"}) is None


def test_label_values_are_bounded() -> None:
    capped = LabelGuard(2)
    assert [capped(v) for v in ("a", "b", "c", "a", None)] == ["a", "b", OTHER, "a", "none"]
    known = LabelGuard(100, allowed=lambda v: v == "add")
    assert known("add") == "add" and known("nosuch") == OTHER
    metrics = GatewayMetrics(tools=lambda v: v == "add")
    for n in range(500):
        metrics.call_refused(f"guess-{n}", f"tenant-{n}", "mcp-http", "refused")
    series = {s.labels["tool"] for s in list(metrics.calls.collect())[0].samples}
    tenants = {s.labels["tenant"] for s in list(metrics.calls.collect())[0].samples}
    assert series == {OTHER} and len(tenants) <= 101


def test_outcomes_of_workflow_outputs() -> None:
    assert outcome_of({"ok": True, "result": 1}) == "completed"
    assert outcome_of({"ok": False, "error": {"type": "timeout"}}) == "timeout"
    assert outcome_of({"ok": False, "error": {"type": "approval_expired"}}) == "not_approved"
    assert outcome_of({"ok": False, "error": {"type": "tool_error"}}) == "failed"
    assert outcome_of(None) == "failed"


def test_sidecar_metrics_need_its_api_token_when_it_has_one() -> None:
    served = [b"duragate_engine_in_flight 0.0\n"]
    app = create_health_app(lambda: True, lambda: served[0], token="t0ken")
    with TestClient(app) as client:
        assert client.get("/metrics").status_code == 401
        assert client.get("/metrics", headers={"dapr-api-token": "wrong"}).status_code == 401
        ok = client.get("/metrics", headers={"dapr-api-token": "t0ken"})
        assert ok.status_code == 200 and ok.content == served[0]
        assert client.get("/v1.0/healthz").status_code == 204  # probes need no token
    with TestClient(create_health_app(lambda: True, lambda: served[0])) as client:
        assert client.get("/metrics").status_code == 200
    with TestClient(create_health_app(lambda: True)) as client:
        assert client.get("/metrics").status_code == 404


def test_crewai_does_not_switch_the_gateways_tracing_off(tmp_path: Path) -> None:
    """CrewAI's environment (set before it is imported) and the import itself leave the
    gateway's provider recording (a process of its own: tracing is set up once per process)."""
    script = textwrap.dedent(
        """
        import os
        from adapters import crewai as adapter
        from gateway import telemetry
        assert telemetry.setup({"OTEL_TRACES_EXPORTER": "console"})
        adapter.quiet_environment()
        assert "OTEL_SDK_DISABLED" not in os.environ
        import crewai  # noqa: F401
        with telemetry.span("after-crewai") as span:
            assert span.is_recording(), "crewai switched tracing off"
        telemetry.shutdown()
        print("RECORDING-OK")
        """
    )
    env = child_env()
    for name in list(env):
        if name.startswith(("OTEL_", "CREWAI_")):
            del env[name]
    env["CREWAI_STORAGE_DIR"] = str(tmp_path / "crewai")
    done = subprocess.run(
        [sys.executable, "-c", script],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "RECORDING-OK" in done.stdout
    assert '"name": "after-crewai"' in done.stdout  # the console exporter printed it
