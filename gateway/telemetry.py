"""OpenTelemetry traces: one trace per call, set up from the standard `OTEL_*` variables.

    telemetry.setup()                       # once per process (Gateway.start); off unless asked
    span = telemetry.start_span("tools/call add", parent=telemetry.extract(headers), kind=SERVER)
    carrier = telemetry.carrier_of(span)    # {"traceparent": ...}: into the workflow input
    with telemetry.span("duragate.policy", parent=telemetry.extract(carrier)) as s: ...

Tracing is on when `OTEL_TRACES_EXPORTER` names an exporter (`otlp`, `console`; `none` is off)
or, without it, when an OTLP endpoint is set (`OTEL_EXPORTER_OTLP_ENDPOINT` or
`OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`). `OTEL_EXPORTER_OTLP_[TRACES_]PROTOCOL` picks
`http/protobuf` (the default) or `grpc`; the exporters read their own endpoint, headers,
timeout, compression and certificate variables; the sampler comes from `OTEL_TRACES_SAMPLER`
(+ `_ARG`), the batch settings from `OTEL_BSP_*`, the resource from `OTEL_SERVICE_NAME` and
`OTEL_RESOURCE_ATTRIBUTES` (`service.name` defaults to `duragate`). With none of them set
nothing is built or exported, and every hook here is a constant-time no-op.

The gateway keeps its own `TracerProvider` instead of installing a global one: a library in
the same process (CrewAI builds providers of its own) can neither replace it nor switch it off,
and libraries that trace through the global API (a2a-sdk) add no spans to the gateway's traces.
`OTEL_SDK_DISABLED=true` is the one documented switch that turns it off (the CrewAI adapter
never sets it). Outbound httpx calls (remote MCP and A2A servers, LLM APIs, push webhooks) get
client spans and a `traceparent` header through the OTel httpx instrumentation, with this
provider.

What goes into span attributes is chosen here and in the hooks, never copied wholesale: no
arguments, results, tokens, error messages or principal IDs (the audit log, keyed by trace id,
holds who called). An exception marks its span as an error with `error.type` only.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
from collections.abc import Iterator, Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import httpx
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import INVALID_SPAN, Span, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

log = logging.getLogger(__name__)

SERVICE_NAME = "duragate"
INSTRUMENTATION = "duragate"
# The W3C headers (and MCP `_meta` keys) a trace context travels in.
TRACE_KEYS = ("traceparent", "tracestate")
# traceparent: version-traceid-parentid-flags, lower-case hex (W3C Trace Context, level 1).
_TRACEPARENT = re.compile(r"[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}")
_MAX_TRACESTATE = 512
_PROTOCOLS = ("http/protobuf", "grpc")

_propagator = TraceContextTextMapPropagator()
_tracer: trace.Tracer | None = None
_provider: Any = None  # opentelemetry.sdk.trace.TracerProvider, imported only when on
_instrumented: Any = None


class TelemetryConfigError(ValueError):
    """An `OTEL_*` setting the gateway cannot honour (named in the message)."""


def enabled() -> bool:
    return _tracer is not None


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


def wanted_exporters(environ: Mapping[str, str]) -> list[str]:
    """The exporters the environment asks for; [] means tracing stays off."""
    if _truthy(environ.get("OTEL_SDK_DISABLED")):
        return []
    named = environ.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if named:
        exporters = [e.strip() for e in named.split(",") if e.strip()]
        return [] if exporters == ["none"] else [e for e in exporters if e != "none"]
    if environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or environ.get(
        "OTEL_EXPORTER_OTLP_ENDPOINT"
    ):
        return ["otlp"]
    return []


def _exporter(name: str, environ: Mapping[str, str]) -> Any:
    if name == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        return ConsoleSpanExporter()
    if name != "otlp":
        raise TelemetryConfigError(
            f"OTEL_TRACES_EXPORTER={name!r} is not supported: use otlp, console or none"
        )
    protocol = (
        environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
        or environ.get("OTEL_EXPORTER_OTLP_PROTOCOL")
        or "http/protobuf"
    ).strip()
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (
            OTLPSpanExporter as GrpcExporter,
        )

        return GrpcExporter()
    if protocol == "http/protobuf":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
            OTLPSpanExporter as HttpExporter,
        )

        return HttpExporter()
    raise TelemetryConfigError(
        f"OTEL_EXPORTER_OTLP_PROTOCOL={protocol!r} is not supported: use " + " or ".join(_PROTOCOLS)
    )


def setup(environ: Mapping[str, str] | None = None) -> bool:
    """Build the tracer provider if the environment asks for traces; True when tracing is on.
    Idempotent: the first call in a process decides. Raises TelemetryConfigError for a setting
    that cannot work (an unknown exporter or protocol)."""
    global _tracer, _provider
    if _tracer is not None:
        return True
    environ = os.environ if environ is None else environ
    names = wanted_exporters(environ)
    if not names:
        if _truthy(environ.get("OTEL_SDK_DISABLED")) and environ.get("OTEL_TRACES_EXPORTER"):
            log.warning("OTEL_SDK_DISABLED is set: no traces are exported")
        return False
    exporters = [_exporter(name, environ) for name in names]
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    attributes = {} if environ.get("OTEL_SERVICE_NAME") else {"service.name": SERVICE_NAME}
    from gateway import __version__

    attributes["service.version"] = __version__
    # Resource.create merges OTEL_RESOURCE_ATTRIBUTES and OTEL_SERVICE_NAME over these.
    provider = TracerProvider(resource=Resource.create(attributes))
    for exporter in exporters:
        provider.add_span_processor(BatchSpanProcessor(exporter))
    _provider = provider
    _tracer = provider.get_tracer(INSTRUMENTATION)
    _instrument_httpx(provider)
    log.info("tracing on: exporters %s", ", ".join(names))
    return True


def _instrument_httpx(provider: Any) -> None:
    global _instrumented
    try:
        from opentelemetry.instrumentation.httpx import HTTPXClientInstrumentor
    except ImportError:  # optional: upstream spans come from the adapters' own hooks then
        log.info("opentelemetry-instrumentation-httpx is not installed: no httpx client spans")
        return

    async def async_hook(span: Span, request: Any) -> None:
        genai_request(span, request)

    # The stable HTTP conventions (`http.request.method`, `http.response.status_code`,
    # `url.full`), unless the environment chose otherwise; read when instrumenting.
    os.environ.setdefault("OTEL_SEMCONV_STABILITY_OPT_IN", "http")
    instrumentor = HTTPXClientInstrumentor()
    instrumentor.instrument(
        tracer_provider=provider, request_hook=genai_request, async_request_hook=async_hook
    )
    _instrumented = instrumentor


# LLM APIs recognised in outbound httpx calls, by path: (operation, provider or None).
_LLM_PATHS = (
    ("/chat/completions", "chat"),
    ("/v1/messages", "chat"),
    (":generateContent", "generate_content"),
    ("/v1/responses", "chat"),
    ("/embeddings", "embeddings"),
)
_LLM_PROVIDERS = {
    "api.openai.com": "openai",
    "api.anthropic.com": "anthropic",
    "generativelanguage.googleapis.com": "gcp.gemini",
    "api.mistral.ai": "mistral_ai",
}
_MAX_LLM_BODY = 1 << 20


def genai_request(span: Span, request: Any) -> None:
    """An outbound httpx call: its URL without query string or credentials; a call to an LLM
    API named and described per the GenAI semantic conventions (operation, provider, requested
    model; never the prompt)."""
    if not span.is_recording():
        return
    url = request.url if isinstance(request.url, httpx.URL) else None
    if url is None:
        return
    # Query strings carry API keys (`?key=...`) and signatures: the URL goes without them.
    span.set_attribute("url.full", str(url.copy_with(query=None, fragment=None, userinfo=b"")))
    if request.method != b"POST":
        return
    operation = next((op for suffix, op in _LLM_PATHS if url.path.endswith(suffix)), None)
    if operation is None:
        return
    span.set_attribute("gen_ai.operation.name", operation)
    provider = _LLM_PROVIDERS.get(url.host)
    if provider is not None:
        span.set_attribute("gen_ai.provider.name", provider)
    model = _requested_model(request.stream)
    if model is not None:
        span.set_attribute("gen_ai.request.model", model)
    span.update_name(f"{operation} {model}" if model else operation)


def _requested_model(stream: Any) -> str | None:
    # A JSON body httpx holds in memory (ByteStream); a streamed upload is not read.
    if not isinstance(stream, httpx.ByteStream):
        return None
    body = b"".join(stream)
    if len(body) > _MAX_LLM_BODY:
        return None
    try:
        model = json.loads(body).get("model")
    except (ValueError, AttributeError):
        return None
    return model[:128] if isinstance(model, str) and model else None


def shutdown() -> None:
    """Export what is pending and stop (tests; the process's exit does it too)."""
    global _tracer, _provider, _instrumented
    provider, _provider, _tracer = _provider, None, None
    instrumentor, _instrumented = _instrumented, None
    if instrumentor is not None:
        instrumentor.uninstrument()
    if provider is not None:
        provider.shutdown()


def flush(timeout_seconds: float = 5.0) -> None:
    """Export the spans that are pending (a gateway that stops)."""
    if _provider is not None:
        _provider.force_flush(int(timeout_seconds * 1000))


# --- the W3C trace context -----------------------------------------------------------------


def carrier_from(*sources: Mapping[str, Any] | None) -> dict[str, str]:
    """The trace context of the first source that carries a well-formed `traceparent` (MCP
    `_meta` before HTTP headers), as a carrier; {} when none does. Malformed values are
    dropped, never passed on."""
    for source in sources:
        if not source:
            continue
        parent = source.get("traceparent")
        if not isinstance(parent, str) or not _TRACEPARENT.fullmatch(parent.strip()):
            continue
        carrier = {"traceparent": parent.strip()}
        state = source.get("tracestate")
        if isinstance(state, str) and 0 < len(state) <= _MAX_TRACESTATE:
            carrier["tracestate"] = state
        return carrier
    return {}


def extract(carrier: Mapping[str, str] | None) -> Context | None:
    """The context of a carrier (None when tracing is off or the carrier is empty)."""
    if _tracer is None or not carrier:
        return None
    return _propagator.extract(dict(carrier))


def carrier_of(span: Span) -> dict[str, str]:
    """`{"traceparent": ..., "tracestate": ...}` naming `span` as parent ({} when off)."""
    if _tracer is None or not span.get_span_context().is_valid:
        return {}
    carrier: dict[str, str] = {}
    _propagator.inject(carrier, context=trace.set_span_in_context(span))
    return carrier


def inject(carrier: dict[str, Any]) -> dict[str, Any]:
    """Add the current span's context to `carrier` (an MCP `_meta`, a header dict): for
    outbound calls that the httpx instrumentation does not see. Returns the carrier."""
    if _tracer is not None:
        _propagator.inject(carrier)
    return carrier


def trace_id_of(carrier: Mapping[str, str] | None) -> str | None:
    """The trace id (32 hex digits) a carrier names, or None."""
    parent = (carrier or {}).get("traceparent", "")
    return parent[3:35] if _TRACEPARENT.fullmatch(parent) else None


# The trace of the call being dispatched, for the audit records written meanwhile.
_call_trace: ContextVar[str | None] = ContextVar("duragate_call_trace", default=None)


@contextlib.contextmanager
def call_trace(carrier: Mapping[str, str] | None) -> Iterator[None]:
    token = _call_trace.set(trace_id_of(carrier))
    try:
        yield
    finally:
        _call_trace.reset(token)


def call_trace_id() -> str | None:
    return _call_trace.get()


# --- spans ------------------------------------------------------------------------------------

_NOOP: contextlib.nullcontext[Span] = contextlib.nullcontext(INVALID_SPAN)


def start_span(
    name: str,
    *,
    parent: Context | None = None,
    kind: SpanKind = SpanKind.INTERNAL,
    attributes: Mapping[str, Any] | None = None,
    start_time: int | None = None,
) -> Span:
    """A span that is not made current (for front doors, whose work crosses tasks and
    generators): end it with `end()`; its children name it through `carrier_of`."""
    if _tracer is None:
        return INVALID_SPAN
    return _tracer.start_span(
        name,
        context=parent,
        kind=kind,
        attributes=_clean(attributes),
        start_time=start_time,
        record_exception=False,
        set_status_on_exception=False,
    )


@contextlib.contextmanager
def _current(
    name: str, parent: Context | None, kind: SpanKind, attributes: Mapping[str, Any] | None
) -> Iterator[Span]:
    assert _tracer is not None
    with _tracer.start_as_current_span(
        name,
        context=parent,
        kind=kind,
        attributes=_clean(attributes),
        record_exception=False,
        set_status_on_exception=False,
    ) as current:
        try:
            yield current
        except Exception as exc:
            failed(current, exc)
            raise


def span(
    name: str,
    *,
    parent: Context | None = None,
    kind: SpanKind = SpanKind.INTERNAL,
    attributes: Mapping[str, Any] | None = None,
) -> contextlib.AbstractContextManager[Span]:
    """A span made current for the `with` block (within one task); a no-op when off."""
    if _tracer is None:
        return _NOOP
    return _current(name, parent, kind, attributes)


def failed(span: Span, exc: BaseException | str) -> None:
    """Mark `span` as failed: its type (or a dispatch error's code), never its message."""
    if not span.is_recording():
        return
    code = getattr(exc, "code", None)
    kind = exc if isinstance(exc, str) else code if isinstance(code, str) else type(exc).__name__
    span.set_attribute("error.type", str(kind))
    span.set_status(Status(StatusCode.ERROR))


def _clean(attributes: Mapping[str, Any] | None) -> dict[str, Any] | None:
    if not attributes:
        return None
    return {k: v for k, v in attributes.items() if v is not None}


@dataclass(frozen=True)
class AuthTiming:
    """When and how a request was authenticated (by the HTTP layer, before the protocol
    handler that opens the call's trace): recorded as a child span of the front door's."""

    start_ns: int
    end_ns: int
    method: str
    outcome: str = "ok"


# Where the HTTP layer leaves an AuthTiming (ASGI scope key).
AUTH_SCOPE_KEY = "duragate.auth_timing"
# The last authentication of this task (set by the authenticator, read by the HTTP layer that
# awaited it and put into the request's scope: the protocol handler runs in another task).
_last_auth: ContextVar[AuthTiming | None] = ContextVar("duragate_auth_timing", default=None)


def note_auth(timing: AuthTiming) -> None:
    _last_auth.set(timing)


def last_auth() -> AuthTiming | None:
    return _last_auth.get()


def auth_span(parent: Span, timing: AuthTiming | None) -> None:
    """The authentication of the request, as a finished child of `parent`."""
    if _tracer is None or timing is None or not parent.is_recording():
        return
    child = _tracer.start_span(
        "duragate.authenticate",
        context=trace.set_span_in_context(parent),
        attributes={"duragate.auth.method": timing.method, "duragate.auth.outcome": timing.outcome},
        start_time=timing.start_ns,
    )
    child.end(end_time=timing.end_ns)


def front_door_span(
    name: str,
    *,
    carrier: Mapping[str, str],
    auth: AuthTiming | None,
    attributes: Mapping[str, Any],
) -> Span:
    """The server span of one call at a front door, continuing the caller's trace, starting
    when its authentication did."""
    if _tracer is None:
        return INVALID_SPAN
    server = start_span(
        name,
        parent=extract(carrier),
        kind=SpanKind.SERVER,
        attributes=attributes,
        start_time=auth.start_ns if auth is not None else None,
    )
    auth_span(server, auth)
    return server


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """No client spans for the calls inside (the gateway's own plumbing, e.g. a metrics
    scrape of the sidecar)."""
    if _instrumented is None:
        yield
        return
    from opentelemetry.instrumentation.utils import suppress_instrumentation

    with suppress_instrumentation():
        yield
