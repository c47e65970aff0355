"""Calls as the admin API shows them: a bounded scan of the workflow instances, and one call's
timeline read from its workflow history.

The engine lists instance ids in its own order (the embedded one by id; ids are random), a page
at a time, and offers no query by tenant, tool or time that daprd also has. So a page of calls
is a scan: at most `max_scan` instances are read per request, matches are returned, and the
cursor says where the scan stopped (the engine's page token and the position in that page), so
the next request goes on from there. A page may hold fewer than `limit` calls and still have a
next cursor; the dashboard follows it.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from gateway.admin_access import AdminScope
from gateway.admin_models import (
    Activity,
    CallDetail,
    CallSummary,
    HistoryEntry,
    RaisedEvent,
    Timer,
)
from gateway.audit import redact
from gateway.dispatch import CallView, Dispatcher
from gateway.runtime import DurableRuntime
from gateway.sidecar.protos import pb
from gateway.workflow import APPROVAL_EVENT, INPUT_EVENT, WORKFLOW_NAME

ENGINE_PAGE = 100
DEFAULT_MAX_SCAN = 1000
# States read at once: enough to hide round trips, few enough not to crowd the engine.
READ_CONCURRENCY = 16
MAX_HISTORY_EVENTS = 2000


class BadCursor(ValueError):
    pass


@dataclass(frozen=True)
class CallFilter:
    tenant: str | None = None
    tool: str | None = None
    state: str | None = None
    waiting_for: str | None = None
    since: datetime | None = None
    until: datetime | None = None

    def admits(self, scope: AdminScope, call: dict[str, Any], view: CallView) -> bool:
        tenant = str((call.get("principal") or {}).get("tenant", ""))
        if not scope.sees(tenant) or (self.tenant is not None and tenant != self.tenant):
            return False
        if self.tool is not None and view.tool != self.tool:
            return False
        if self.state is not None and view.state.value != self.state:
            return False
        if self.waiting_for is not None and view.waiting_for != self.waiting_for:
            return False
        if self.since is not None and view.created_at < self.since:
            return False
        return self.until is None or view.created_at < self.until


@dataclass(frozen=True)
class Found:
    """A call that matched: its view and the call input it was started with."""

    view: CallView
    call: dict[str, Any]


def encode_cursor(token: str | None, offset: int) -> str:
    raw = json.dumps({"t": token, "o": offset}, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(text: str) -> tuple[str | None, int]:
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
        data = json.loads(raw)
        token, offset = data["t"], data["o"]
        if token is not None and not isinstance(token, str):
            raise TypeError("token")
        if not isinstance(offset, int) or isinstance(offset, bool) or offset < 0:
            raise TypeError("offset")
        return token, offset
    except (ValueError, TypeError, KeyError, binascii.Error, UnicodeDecodeError):
        raise BadCursor("not a cursor this API gave out; start without one") from None


async def scan_calls(
    runtime: DurableRuntime,
    scope: AdminScope,
    wanted: CallFilter,
    *,
    limit: int,
    cursor: str | None,
    max_scan: int = DEFAULT_MAX_SCAN,
) -> tuple[list[Found], str | None, int]:
    """Matching calls, at most `limit` of them after reading at most `max_scan` instances;
    returns (calls, next cursor or None when the scan is done, instances read)."""
    token, offset = decode_cursor(cursor) if cursor else (None, 0)
    client = runtime.client
    found: list[Found] = []
    scanned = 0
    while True:
        page = await client.list_workflow_instance_ids(
            page_size=ENGINE_PAGE, continuation_token=token
        )
        ids = list(page.instance_ids)
        next_token = page.continuation_token or None
        index = offset
        while index < len(ids):
            if scanned >= max_scan or len(found) >= limit:
                return found, encode_cursor(token, index), scanned
            chunk = ids[index : index + min(READ_CONCURRENCY, max_scan - scanned)]
            states = await asyncio.gather(
                *(client.get_workflow_state(i, fetch_payloads=True) for i in chunk)
            )
            for task_id, state in zip(chunk, states, strict=True):
                scanned += 1
                index += 1
                match = _match(task_id, state, scope, wanted)
                if match is not None:
                    found.append(match)
                    if len(found) >= limit:
                        # What the chunk read past this call is read again by the next page.
                        return found, encode_cursor(token, index), scanned
        if next_token is None:
            return found, None, scanned
        token, offset = next_token, 0


def _match(task_id: str, state: Any, scope: AdminScope, wanted: CallFilter) -> Found | None:
    if state is None or state.name != WORKFLOW_NAME:
        return None
    try:
        call = json.loads(state.serialized_input or "{}")
    except ValueError:
        return None
    if not isinstance(call, dict):
        return None
    view = Dispatcher._view(task_id, state, call)
    return Found(view, call) if wanted.admits(scope, call, view) else None


async def find_call(runtime: DurableRuntime, scope: AdminScope, task_id: str) -> Found | None:
    """The call `task_id` if it exists and this admin sees its tenant; None otherwise."""
    state = await runtime.client.get_workflow_state(task_id, fetch_payloads=True)
    return _match(task_id, state, scope, CallFilter())


def summary(found: Found) -> CallSummary:
    view, call = found.view, found.call
    owner = call.get("principal") or {}
    return CallSummary(
        task_id=view.task_id,
        tool=view.tool,
        tenant=str(owner.get("tenant", "")),
        principal=str(owner.get("id", "")),
        front_door=call.get("front_door"),
        state=view.state.value,
        waiting_for=view.waiting_for,  # type: ignore[arg-type]
        message=view.message,
        created_at=view.created_at,
        updated_at=view.updated_at,
    )


# --- one call's timeline ------------------------------------------------------------------


def _time(ts: Any) -> datetime:
    return datetime.fromtimestamp(ts.seconds + ts.nanos / 1e9, UTC)


def _fire_time(ts: Any) -> datetime | None:
    # A wait without a deadline is a timer at the end of time: no datetime holds that.
    try:
        return _time(ts)
    except (ValueError, OverflowError, OSError):
        return None


def _ms(start: datetime, end: datetime | None) -> float | None:
    return None if end is None else round((end - start).total_seconds() * 1000, 3)


def _payload(value: Any) -> Any:
    if value is None or not value.value:
        return None
    try:
        return json.loads(value.value)
    except ValueError:
        return None


def _event_detail(name: str, data: Any) -> dict[str, Any] | None:
    """What an admin may see of an event's payload: who decided and how, never the values."""
    if not isinstance(data, dict):
        return None
    if name == APPROVAL_EVENT:
        return {k: data.get(k) for k in ("approved", "by", "reason")}
    if name == INPUT_EVENT:
        return {k: data.get(k) for k in ("by", "round")}
    return None


@dataclass
class Timeline:
    activities: list[Activity]
    timers: list[Timer]
    events: list[RaisedEvent]
    history: list[HistoryEntry]
    truncated: bool
    started: datetime | None
    ended: datetime | None


def timeline(events: list[pb.HistoryEvent]) -> Timeline:
    """Activities (one entry per attempt), timers (retry back-offs told apart), raised events
    and a compact history, from the workflow's history events."""
    activities: dict[int, Activity] = {}
    timers: dict[int, Timer] = {}
    raised: list[RaisedEvent] = []
    history: list[HistoryEntry] = []
    started = ended = None
    last_failed_name: str | None = None  # a retry is the same activity scheduled after a failure
    attempts: dict[str, int] = {}
    for ev in events:
        kind = ev.WhichOneof("eventType") or "unknown"
        at = _time(ev.timestamp)
        name: str | None = None
        if kind == "executionStarted":
            started = started or at
            name = ev.executionStarted.name
        elif kind in ("executionCompleted", "executionTerminated"):
            ended = at
        elif kind == "taskScheduled":
            name = ev.taskScheduled.name
            attempt = attempts.get(name, 0) + 1 if last_failed_name == name else 1
            attempts[name] = attempt
            last_failed_name = None
            activities[ev.eventId] = Activity(
                event_id=ev.eventId,
                name=name,
                attempt=attempt,
                scheduled_at=at,
                ended_at=None,
                duration_ms=None,
                outcome="running",
            )
        elif kind in ("taskCompleted", "taskFailed"):
            done = getattr(ev, kind)
            activity = activities.get(done.taskScheduledId)
            if activity is not None:
                activity.ended_at = at
                activity.duration_ms = _ms(activity.scheduled_at, at)
                activity.outcome = "completed" if kind == "taskCompleted" else "failed"
                if kind == "taskFailed":
                    details = done.failureDetails
                    activity.error = f"{details.errorType}: {details.errorMessage}"[:500]
                    last_failed_name = activity.name
                name = activity.name
        elif kind == "timerCreated" and not ev.timerCreated.HasField("externalEvent"):
            # (a timer made for an event wait is the engine's bookkeeping, not a timer of the
            # workflow's own)
            created = ev.timerCreated
            retry = created.HasField("activityRetry") or last_failed_name is not None
            timers[ev.eventId] = Timer(
                event_id=ev.eventId,
                purpose="retry" if retry else "timer",
                created_at=at,
                fire_at=_fire_time(created.fireAt) if created.HasField("fireAt") else None,
                fired_at=None,
            )
        elif kind == "timerFired":
            timer = timers.get(ev.timerFired.timerId)
            if timer is not None:
                timer.fired_at = at
        elif kind == "eventRaised":
            name = ev.eventRaised.name
            detail = _event_detail(name, _payload(ev.eventRaised.input))
            raised.append(RaisedEvent(name=name, at=at, detail=detail))
        if len(history) < MAX_HISTORY_EVENTS:
            history.append(HistoryEntry(event_id=ev.eventId, kind=kind, at=at, name=name))
    return Timeline(
        activities=sorted(activities.values(), key=lambda a: (a.scheduled_at, a.event_id)),
        timers=sorted(timers.values(), key=lambda t: (t.created_at, t.event_id)),
        events=raised,
        history=history,
        truncated=len(events) > MAX_HISTORY_EVENTS,
        started=started,
        ended=ended,
    )


async def history_of(runtime: DurableRuntime, task_id: str) -> list[pb.HistoryEvent]:
    answer = await runtime.stub.GetInstanceHistory(
        pb.GetInstanceHistoryRequest(instanceId=task_id), metadata=runtime.metadata
    )
    return list(answer.events)


def detail(found: Found, events: list[pb.HistoryEvent]) -> CallDetail:
    """The call with its timeline; arguments and result redacted as the audit log does (the
    policy's redact paths, and every secret-named field)."""
    view, call = found.view, found.call
    owner = call.get("principal") or {}
    paths = (call.get("audit") or {}).get("redact") or ()
    line = timeline(events)
    base = summary(found).model_dump()
    end = line.ended if view.terminal else None
    return CallDetail(
        **base,
        chain=[str(c) for c in owner.get("chain") or ()],
        via=owner.get("via"),
        arguments=redact(view.arguments, paths, "args"),
        result=redact(view.result, paths, "result"),
        error=view.error,
        usage=view.usage,
        timeout_seconds=call.get("timeout_seconds"),
        retry=call.get("retry"),
        approval=call.get("approval"),
        duration_ms=_ms(line.started, end) if line.started else None,
        activities=line.activities,
        timers=line.timers,
        events=line.events,
        history=line.history,
        history_truncated=line.truncated,
    )


__all__ = [
    "BadCursor",
    "CallFilter",
    "Found",
    "detail",
    "find_call",
    "history_of",
    "scan_calls",
    "summary",
]
