"""Traces and metrics of a real gateway process.

- traces: the gateway exports OTLP/HTTP (protobuf) to a small receiver in this test, which
  decodes `ExportTraceServiceRequest`; an MCP call with a `traceparent` in `_meta` and an A2A
  call with one in its HTTP headers each make one trace (front door -> authentication, policy,
  admission, scheduling -> the tool's activity), a retried tool one activity span per attempt;
  no argument or token reaches an attribute; without OTEL variables nothing is sent;
- metrics: `/metrics` after MCP and A2A calls, a denial, a refused unknown tool; who may read it.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import threading
import time
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from mcp.shared.exceptions import McpError
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from prometheus_client.parser import text_string_to_metric_families

from tests.gateway.conftest import INIT, MCP_HEADERS, TEST_CONFIG, GatewayFactory, mcp_session

pytestmark = [pytest.mark.timeout(120)]

V1 = {"A2A-Version": "1.0"}
SECRET_ARGUMENT = "s3cr3t-" + secrets.token_hex(4)
POLICY = """
tenant: default
members:
  - spiffe://duragate.local/**
tools:
  add:
    call: [group:members]
    deny:
      - when: "args.a < 0"
        reason: no negative numbers
  flaky:
    call: [group:members]
  slow_echo:
    call: [group:members]
  ask_llm:
    call: [group:members]
"""


APPROVAL_POLICY = """
tenant: default
members:
  - spiffe://duragate.local/**
tools:
  slow_echo:
    call: [group:members]
    approval:
      approvers: [group:members]
      allow_self: true
      expires_seconds: 600
"""


# --- a small OTLP/HTTP receiver ---------------------------------------------------------------


class Receiver:
    """Collects the spans of every `POST /v1/traces` (OTLP/HTTP, protobuf)."""

    def __init__(self) -> None:
        self.spans: list[dict[str, Any]] = []
        self.llm_headers: list[dict[str, str]] = []
        self.requests = 0
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - the http.server hook
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if (
                    self.path.split("?")[0] == "/v1/chat/completions"
                ):  # an OpenAI-compatible LLM, too
                    receiver.llm_headers.append(dict(self.headers))
                    reply = json.dumps(
                        {"choices": [{"message": {"role": "assistant", "content": "forty-two"}}]}
                    ).encode()
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(reply)))
                    self.end_headers()
                    self.wfile.write(reply)
                    return
                request = ExportTraceServiceRequest()
                request.ParseFromString(body)
                receiver.add(request, self.path, self.headers.get("Content-Type", ""))
                answer = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def add(self, request: ExportTraceServiceRequest, path: str, content_type: str) -> None:
        assert path == "/v1/traces" and content_type == "application/x-protobuf"
        with self.lock:
            self.requests += 1
            for resource in request.resource_spans:
                service = {a.key: a.value.string_value for a in resource.resource.attributes}
                for scope in resource.scope_spans:
                    for span in scope.spans:
                        self.spans.append(
                            {
                                "name": span.name,
                                "trace_id": span.trace_id.hex(),
                                "span_id": span.span_id.hex(),
                                "parent": span.parent_span_id.hex(),
                                "kind": span.kind,
                                "status": span.status.code,
                                "attributes": {a.key: _value(a.value) for a in span.attributes},
                                "service": service.get("service.name"),
                                "start": span.start_time_unix_nano,
                                "end": span.end_time_unix_nano,
                            }
                        )

    def trace(self, trace_id: str) -> list[dict[str, Any]]:
        with self.lock:
            return [s for s in self.spans if s["trace_id"] == trace_id]

    def wait_for(self, trace_id: str, names: set[str], timeout: float = 30.0) -> list[dict]:
        """The spans of a trace, once every name in `names` is among them."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            spans = self.trace(trace_id)
            if names <= {s["name"] for s in spans}:
                return spans
            time.sleep(0.1)
        raise AssertionError(f"spans {names} of {trace_id} never came: {self.trace(trace_id)}")

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _value(value: Any) -> Any:
    kind = value.WhichOneof("value")
    return getattr(value, kind) if kind else None


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    found = Receiver()
    yield found
    found.close()


# --- helpers ------------------------------------------------------------------------------


def write_config(tmp_path: Path, *, policy: str | None = None, **changes: Any) -> Path:
    config = yaml.safe_load(TEST_CONFIG.read_text())
    for tool in config["tools"]:  # `flaky` retries: 3 attempts
        tool["timeout_seconds"] = 30
    config["tools"].append(
        {"name": "ask_llm", "kind": "python", "target": "tests.gateway.obs_tools:ask_llm"}
    )
    config["a2a"] = {
        "agents": [{"name": "math", "tools": ["add"]}, {"name": "slow", "tools": ["slow_echo"]}]
    }
    if policy:
        policies = tmp_path / "policies"
        policies.mkdir()
        (policies / "default.yaml").write_text(policy)
        config["policy"] = {"dir": str(policies)}
    config.update(changes)
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def tracing_env(monkeypatch: pytest.MonkeyPatch, receiver: Receiver) -> None:
    """What the gateway process inherits: OTLP over HTTP to the receiver, exported quickly."""
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "otlp")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.url)
    monkeypatch.setenv("OTEL_SERVICE_NAME", "duragate-under-test")
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "100")


def traceparent() -> tuple[str, str, str]:
    trace_id, parent_id = secrets.token_hex(16), secrets.token_hex(8)
    return f"00-{trace_id}-{parent_id}-01", trace_id, parent_id


def a2a_send(
    base: str,
    data: dict[str, Any],
    headers: dict[str, str],
    agent: str = "math",
    immediately: bool = False,
) -> dict[str, Any]:
    body = {
        "jsonrpc": "2.0",
        "id": 1,
        "method": "SendMessage",
        "params": {
            "message": {
                "messageId": uuid.uuid4().hex,
                "role": "ROLE_USER",
                "parts": [{"data": data}],
            },
            "configuration": {"returnImmediately": immediately},
        },
    }
    url = f"{base}/a2a/agents/{agent}"
    answer = httpx.post(url, json=body, headers={**V1, **headers}, timeout=60)
    answer.raise_for_status()
    result: dict[str, Any] = answer.json()
    return result


def audit_records(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def by_name(spans: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    return [s for s in spans if s["name"] == name]


def one(spans: list[dict[str, Any]], name: str) -> dict[str, Any]:
    found = by_name(spans, name)
    assert len(found) == 1, (name, spans)
    return found[0]


SERVER, INTERNAL = 2, 1  # opentelemetry.proto.trace.v1.Span.SpanKind
STATUS_ERROR = 2


def assert_no_secrets(spans: list[dict[str, Any]]) -> None:
    for span in spans:
        for key, value in span["attributes"].items():
            assert SECRET_ARGUMENT not in str(value), (span["name"], key)
            assert "authorization" not in key.lower() and "arguments" not in key, key


# --- traces -------------------------------------------------------------------------------


async def test_mcp_and_a2a_calls_are_one_trace_each(
    spawn_gateway: GatewayFactory,
    tmp_path: Path,
    receiver: Receiver,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    tracing_env(monkeypatch, receiver)
    gateway = spawn_gateway(config=write_config(tmp_path, policy=POLICY))

    # MCP: the caller's context in `_meta` (the HTTP session itself carries none).
    header, trace_id, caller_span = traceparent()
    async with mcp_session(gateway.url) as session:
        result = await session.call_tool(
            "slow_echo",
            {"text": SECRET_ARGUMENT, "seconds": 0},
            meta={"traceparent": header, "tracestate": "vendor=abc"},
        )
    assert not result.isError, result
    names = {
        "tools/call slow_echo",
        "duragate.authenticate",
        "duragate.policy",
        "duragate.admission",
        "duragate.schedule",
        "duragate.tool slow_echo",
    }
    spans = receiver.wait_for(trace_id, names)
    server = one(spans, "tools/call slow_echo")
    assert server["parent"] == caller_span and server["kind"] == SERVER
    assert server["service"] == "duragate-under-test"
    assert server["attributes"]["rpc.method"] == "tools/call"
    assert server["attributes"]["gen_ai.tool.name"] == "slow_echo"
    assert server["attributes"]["duragate.front_door"] == "mcp-http"
    assert server["attributes"]["duragate.outcome"] == "ok"
    for child in ("duragate.authenticate", "duragate.policy", "duragate.admission"):
        assert one(spans, child)["parent"] == server["span_id"], child
    assert one(spans, "duragate.schedule")["parent"] == server["span_id"]
    auth = one(spans, "duragate.authenticate")
    assert auth["attributes"] == {
        "duragate.auth.method": "anonymous",
        "duragate.auth.outcome": "ok",
    }
    assert server["start"] <= auth["start"] <= auth["end"] <= server["end"]
    policy = one(spans, "duragate.policy")["attributes"]
    assert policy["duragate.policy.effect"] == "allow"
    assert policy["duragate.policy.rule"].startswith("default.yaml")
    activity = one(spans, "duragate.tool slow_echo")
    # The activity ran in the worker, from the context in the workflow input.
    assert activity["parent"] == server["span_id"] and activity["kind"] == INTERNAL
    task_id = one(spans, "duragate.schedule")["attributes"]["duragate.task.id"]
    assert activity["attributes"]["duragate.task.id"] == task_id
    assert activity["attributes"]["gen_ai.operation.name"] == "execute_tool"
    assert_no_secrets(spans)
    # The audit log's decision names the trace.
    audit = tmp_path / "data" / "audit.jsonl"
    deadline = time.monotonic() + 30
    while not any(r.get("trace_id") == trace_id for r in audit_records(audit)):
        assert time.monotonic() < deadline, audit_records(audit)
        await asyncio.sleep(0.1)
    scheduled = [r for r in audit_records(audit) if r.get("trace_id") == trace_id]
    assert [(r["event"], r["task"]) for r in scheduled] == [("scheduled", task_id)]

    # A denial: the trace shows the rule and effect, the server span the error.
    header, trace_id, _ = traceparent()
    async with mcp_session(gateway.url) as session:
        with pytest.raises(McpError, match="no negative numbers"):
            await session.call_tool("add", {"a": -1, "b": 2}, meta={"traceparent": header})
    spans = receiver.wait_for(trace_id, {"tools/call add", "duragate.policy"})
    denied = one(spans, "duragate.policy")
    assert denied["attributes"]["duragate.policy.effect"] == "deny"
    assert "deny" in denied["attributes"]["duragate.policy.rule"]
    assert one(spans, "tools/call add")["status"] == STATUS_ERROR
    assert not by_name(spans, "duragate.schedule") and not by_name(spans, "duragate.tool add")

    # A2A: the caller's context in the HTTP headers; a secret header stays out of the trace.
    header, trace_id, caller_span = traceparent()
    answer = a2a_send(
        gateway.base,
        {"a": 2, "b": 3},
        {"traceparent": header, "X-Api-Key": SECRET_ARGUMENT},
    )
    assert answer["result"]["task"]["status"]["state"] == "TASK_STATE_COMPLETED", answer
    spans = receiver.wait_for(
        trace_id, {"SendMessage math", "duragate.authenticate", "duragate.tool add"}
    )
    server = one(spans, "SendMessage math")
    assert server["parent"] == caller_span and server["kind"] == SERVER
    assert server["attributes"]["duragate.front_door"] == "a2a"
    assert server["attributes"]["duragate.outcome"] == "TASK_STATE_COMPLETED"
    assert one(spans, "duragate.authenticate")["parent"] == server["span_id"]
    assert one(spans, "duragate.policy")["parent"] == server["span_id"]
    assert one(spans, "duragate.tool add")["parent"] == server["span_id"]
    assert_no_secrets(spans)


async def test_an_llm_call_is_a_genai_client_span_with_the_context_sent_on(
    spawn_gateway: GatewayFactory,
    tmp_path: Path,
    receiver: Receiver,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    tracing_env(monkeypatch, receiver)
    gateway = spawn_gateway(config=write_config(tmp_path))
    header, trace_id, _ = traceparent()
    async with mcp_session(gateway.url) as session:
        result = await session.call_tool(
            "ask_llm",
            {"prompt": "hi", "base_url": f"{receiver.url}/v1", "api_key": SECRET_ARGUMENT},
            meta={"traceparent": header},
        )
    assert not result.isError, result
    spans = receiver.wait_for(trace_id, {"duragate.tool ask_llm", "chat tiny-test-model"})
    activity = one(spans, "duragate.tool ask_llm")
    llm = one(spans, "chat tiny-test-model")
    assert llm["parent"] == activity["span_id"] and llm["kind"] == 3  # CLIENT
    assert llm["attributes"]["gen_ai.operation.name"] == "chat"
    assert llm["attributes"]["gen_ai.request.model"] == "tiny-test-model"
    assert llm["attributes"]["http.response.status_code"] == 200
    assert llm["attributes"]["url.full"] == f"{receiver.url}/v1/chat/completions"
    # The LLM server got the client span as its parent.
    [headers] = receiver.llm_headers
    sent = {k.lower(): v for k, v in headers.items()}["traceparent"]
    assert sent == f"00-{trace_id}-{llm['span_id']}-01"
    assert_no_secrets(spans)
    assert not any("sk-test-secret" in str(v) for s in spans for v in s["attributes"].values())


async def test_each_retry_is_a_span_and_no_context_starts_a_trace(
    spawn_gateway: GatewayFactory,
    tmp_path: Path,
    receiver: Receiver,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    tracing_env(monkeypatch, receiver)
    gateway = spawn_gateway(config=write_config(tmp_path))
    header, trace_id, _ = traceparent()
    async with mcp_session(gateway.url) as session:
        result = await session.call_tool(
            "flaky", {"key": uuid.uuid4().hex, "failures": 2}, meta={"traceparent": header}
        )
        assert not result.isError, result
        # Without a caller's context the front door starts a trace of its own.
        assert not (await session.call_tool("add", {"a": 1, "b": 1})).isError
    spans = receiver.wait_for(trace_id, {"tools/call flaky", "duragate.tool flaky"})
    deadline = time.monotonic() + 30
    while len(by_name(receiver.trace(trace_id), "duragate.tool flaky")) < 3:
        assert time.monotonic() < deadline, receiver.trace(trace_id)
        await asyncio.sleep(0.1)
    spans = receiver.trace(trace_id)
    attempts = by_name(spans, "duragate.tool flaky")
    server = one(spans, "tools/call flaky")
    assert len(attempts) == 3
    assert {a["parent"] for a in attempts} == {server["span_id"]}
    assert sorted(a["attributes"]["duragate.attempt"] for a in attempts) == [1, 2, 3]
    failed = [a for a in attempts if a["status"] == STATUS_ERROR]
    assert len(failed) == 2
    assert {a["attributes"]["error.type"] for a in failed} == {"RuntimeError"}
    deadline = time.monotonic() + 30
    while True:
        roots = [s for s in receiver.spans if s["name"] == "tools/call add" and s["parent"] == ""]
        if roots:
            break
        assert time.monotonic() < deadline, receiver.spans
        await asyncio.sleep(0.1)
    assert one(receiver.trace(roots[0]["trace_id"]), "duragate.tool add")


async def test_an_activity_after_a_restart_joins_the_callers_trace(
    spawn_gateway: GatewayFactory,
    tmp_path: Path,
    receiver: Receiver,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    tracing_env(monkeypatch, receiver)
    config = write_config(tmp_path)
    first = spawn_gateway(config=config)
    header, trace_id, _ = traceparent()
    answer = a2a_send(
        first.base,
        {"text": "still here", "seconds": 4},
        {"traceparent": header},
        agent="slow",
        immediately=True,
    )
    assert answer["result"]["task"]["status"]["state"] == "TASK_STATE_WORKING", answer
    spans = receiver.wait_for(trace_id, {"SendMessage slow", "duragate.schedule"})
    server = one(spans, "SendMessage slow")
    await asyncio.sleep(1.0)  # the activity is running now
    first.kill()  # SIGKILL: the attempt under way never ends, so its span is never sent
    assert by_name(receiver.trace(trace_id), "duragate.tool slow_echo") == []
    spawn_gateway(config=config)  # the same data directory: the workflow goes on
    spans = receiver.wait_for(trace_id, {"duragate.tool slow_echo"}, timeout=60)
    activity = one(spans, "duragate.tool slow_echo")
    # The new process never saw the request: the context came from the workflow input.
    assert activity["parent"] == server["span_id"]
    assert activity["status"] != STATUS_ERROR


async def test_nothing_is_sent_without_otel_settings(
    spawn_gateway: GatewayFactory,
    tmp_path: Path,
    receiver: Receiver,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in ("OTEL_TRACES_EXPORTER", "OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_SDK_DISABLED"):
        monkeypatch.delenv(name, raising=False)
    # The receiver listens where OTLP's default endpoint would be only in name: a gateway that
    # exported anyway would have to pick it up from somewhere, and this one has no setting.
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "")
    gateway = spawn_gateway(config=write_config(tmp_path))
    header, _, _ = traceparent()
    async with mcp_session(gateway.url) as session:
        result = await session.call_tool("add", {"a": 1, "b": 2}, meta={"traceparent": header})
        assert not result.isError
    gateway.stop()  # a stopping gateway flushes what it has: it must have nothing
    assert receiver.requests == 0 and receiver.spans == []
    assert "tracing on" not in gateway.log()


# --- metrics ------------------------------------------------------------------------------


def scrape(base: str, **kwargs: Any) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    answer = httpx.get(f"{base}/metrics", timeout=30, **kwargs)
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(answer.text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: dict[Any, float], name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def series(samples: dict[Any, float], name: str) -> list[dict[str, str]]:
    return [dict(labels) for (n, labels) in samples if n == name]


async def test_metrics_count_calls_decisions_and_refusals(
    spawn_gateway: GatewayFactory, tmp_path: Path
) -> None:
    gateway = spawn_gateway(config=write_config(tmp_path, policy=POLICY))
    async with mcp_session(gateway.url) as session:
        for n in range(2):
            assert not (await session.call_tool("add", {"a": n, "b": 1})).isError
        with pytest.raises(McpError):
            await session.call_tool("add", {"a": -1, "b": 1})
        for name in ("nosuch-one", "nosuch-two"):
            with pytest.raises(McpError):
                await session.call_tool(name, {})
    answer = a2a_send(gateway.base, {"a": 2, "b": 3}, {})
    assert answer["result"]["task"]["status"]["state"] == "TASK_STATE_COMPLETED", answer
    bad = httpx.post(
        gateway.url, json=INIT, headers={**MCP_HEADERS, "Authorization": "Bearer not-a-jwt"}
    )
    assert bad.status_code == 401

    samples = scrape(gateway.base)
    calls = "duragate_calls_total"
    done = {"tool": "add", "tenant": "default", "outcome": "completed"}
    assert value(samples, calls, front_door="mcp-http", **done) == 2
    assert value(samples, calls, front_door="a2a", **done) == 1
    denied = {"tool": "add", "tenant": "default", "front_door": "mcp-http", "outcome": "denied"}
    assert value(samples, calls, **denied) == 1
    # Unknown tool names make no series of their own: both count under `other`.
    refused = {"tenant": "default", "front_door": "mcp-http", "outcome": "refused"}
    assert value(samples, calls, tool="other", **refused) == 2
    assert not [s for s in series(samples, calls) if s["tool"].startswith("nosuch")]
    configured = {t["name"] for t in yaml.safe_load(TEST_CONFIG.read_text())["tools"]}
    assert all(s["tool"] in configured | {"other"} for s in series(samples, calls))
    # Latency: a histogram per tool and front door, with its buckets.
    count = "duragate_call_duration_seconds_count"
    assert value(samples, count, tool="add", front_door="mcp-http") == 2
    assert value(samples, count, tool="add", front_door="a2a") == 1
    buckets = [
        s for s in series(samples, "duragate_call_duration_seconds_bucket") if s["tool"] == "add"
    ]
    assert {"0.005", "1.0", "+Inf"} <= {b["le"] for b in buckets}
    # Decisions by rule and effect: the denial under the rule that made it.
    decisions = {
        (s["rule"], s["effect"]): value(samples, "duragate_policy_decisions_total", **s)
        for s in series(samples, "duragate_policy_decisions_total")
    }
    deny_rules = [rule for (rule, effect) in decisions if effect == "deny"]
    assert deny_rules == ["default.yaml:tools[add].deny[0]"], decisions
    assert decisions[(deny_rules[0], "deny")] == 1
    assert sum(v for (_, effect), v in decisions.items() if effect == "allow") == 3
    # Authentication results by method (every MCP request and the A2A one).
    assert value(samples, "duragate_authentications_total", method="anonymous", outcome="ok") > 4
    refused = {"method": "bearer", "outcome": "unauthenticated"}
    assert value(samples, "duragate_authentications_total", **refused) == 1
    assert value(samples, "duragate_audit_records_dropped_total") == 0
    # The embedded sidecar's metrics come with the gateway's.
    assert value(samples, "duragate_engine_up") == 1
    assert value(samples, "duragate_engine_workflows_finished_total", status="completed") >= 3
    assert value(samples, "duragate_engine_turn_duration_seconds_count") >= 6
    assert ("duragate_engine_queue_depth", (("kind", "activity"),)) in samples
    assert value(samples, "duragate_approvals_pending") == 0
    # No principal or task ids in any label.
    for name, labels in samples:
        for _, label_value in labels:
            assert not label_value.startswith("spiffe://"), (name, labels)


async def test_metrics_access_and_engine_gauges(
    spawn_gateway: GatewayFactory, tmp_path: Path
) -> None:
    # Loopback by default: the test reaches it over loopback; a foreign Host is refused.
    gateway = spawn_gateway(config=write_config(tmp_path, policy=APPROVAL_POLICY))
    answer = a2a_send(gateway.base, {"text": "ok?", "seconds": 0}, {}, "slow", immediately=True)
    task_id = answer["result"]["task"]["id"]
    deadline = time.monotonic() + 30
    while value(samples := scrape(gateway.base), "duragate_approvals_pending") < 1:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.1)
    assert value(samples, "duragate_engine_workflows", status="waiting_approval") == 1
    rule = "default.yaml:tools[slow_echo].approval"
    assert value(samples, "duragate_policy_decisions_total", rule=rule, effect="approve") == 1
    decided = httpx.post(f"{gateway.base}/approvals/{task_id}", json={"approve": True})
    assert decided.status_code == 200, decided.text
    done = {"tool": "slow_echo", "tenant": "default", "front_door": "a2a", "outcome": "completed"}
    while value(samples := scrape(gateway.base), "duragate_calls_total", **done) < 1:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.1)
    assert value(samples, "duragate_approvals_pending") == 0
    assert value(samples, "duragate_engine_workflows", status="waiting_approval") == 0
    rebinding = httpx.get(f"{gateway.base}/metrics", headers={"Host": "evil.example"})
    assert rebinding.status_code == 421
    # `authenticated`: an anonymous caller is not enough.
    second = tmp_path / "second"
    second.mkdir()
    config = write_config(second, observability={"metrics_access": "authenticated"})
    guarded = spawn_gateway(config=config, data_dir=second / "data")
    refused = httpx.get(f"{guarded.base}/metrics")
    assert refused.status_code == 403 and "anonymous" in refused.json()["message"]
    third = tmp_path / "third"
    third.mkdir()
    off = spawn_gateway(
        config=write_config(third, observability={"metrics": False}), data_dir=third / "data"
    )
    assert httpx.get(f"{off.base}/metrics").status_code == 404
