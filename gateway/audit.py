"""The audit log: one JSON line per decision, refusal, approval, cancellation (and, at the
`full` level, per result), written off the event loop.

    audit = AuditLog.open(Path(".duragate/audit.jsonl"))     # or AuditLog.open(STDOUT)
    dispatcher = Dispatcher(..., audit=audit)                # Dispatcher calls audit.record(...)
    audit.close()                                            # drains what is pending

A record:

    {"time": "2026-01-05T10:30:00.123Z", "event": "denied", "outcome": "deny",
     "principal": "spiffe://acme.example/people/alice", "tenant": "acme", "via": "jwt-svid",
     "chain": [], "tool": "pay", "rule": "acme.yaml:tools[pay].deny[0]", "reason": "too much",
     "task": null, "level": "full", "arguments": {"amount": 20000, "card": "[redacted]"},
     "trace_id": "4bf92f3577b34da6a3ce929d0e0e4736"}

Events: `scheduled` (allowed, or waiting for approval: outcome allow | approve), `denied`,
`refused` (unknown tool, invalid arguments), `limited` (rate, concurrency or budget, with when
to retry), `replayed` (an idempotency key seen again), `approved` / `rejected` (by whom: the
record's principal is the approver), `cancelled`, `result` (full level only: completed | failed
| cancelled, with the result).

The audit level is the tool's `audit` obligation (policies/model.py; `standard` when none):
- minimal: refusals, denials, limits, approvals and cancellations only (no `scheduled`,
  `replayed` or `result` records), never arguments;
- standard: every decision, never arguments;
- full: every decision with the arguments, and the result when the call ends.
Arguments and results are copied with every `redact` obligation path (`args.card.number`,
`result.items[*].token`) replaced by "[redacted]", and with any field whose name says it holds
a secret (token, password, secret, api key, authorization, credential, private key) replaced
too, whatever the policy says. The record never holds a bearer token or a certificate: the
principal is its SPIFFE ID, tenant, how it was proved (`via`) and the delegation chain.
Records written while a call is dispatched carry its W3C trace id (`trace_id`, from the front
door's span or the caller's `traceparent`), which finds the call's trace.

Bounded and never in a call's way: `record` only formats the record and puts it on a queue of
at most `max_pending` records; one writer thread appends them to the file (mode 0600) and
flushes after each batch. When the queue is full (the disk is slower than the calls), or a write
fails (a full disk, a removed directory), records are dropped, counted (`dropped`,
`write_errors`) and reported in the log at most once a minute; calls go on. So the audit log is
best-effort evidence, not a gate: a gateway that must not run without its audit trail should
watch those counters. A log file moved away (rotation) is noticed and a new one opened.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import re
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

from gateway import telemetry
from identity.principal import Principal

log = logging.getLogger(__name__)

STDOUT = "-"
AUDIT_FILE_NAME = "audit.jsonl"
DEFAULT_MAX_PENDING = 10_000
REDACTED = "[redacted]"
DEFAULT_LEVEL = "standard"
LEVELS = ("minimal", "standard", "full")
# Records that `minimal` keeps: whatever refused, stopped or approved a call.
_MINIMAL_EVENTS = frozenset({"denied", "refused", "limited", "approved", "rejected", "cancelled"})
_REPORT_EVERY_SECONDS = 60.0
_BATCH = 512
# Field names that hold secrets, redacted in every record whatever the policy says.
# A name that ends with one of these words: `token`, `access_token`, `apiKey`, not `max_tokens`.
_SECRET_NAME = re.compile(
    r".*(password|passwd|passphrase|secret|token|api[_-]?key|authorization|credentials?"
    r"|private[_-]?key|cookie)",
    re.IGNORECASE,
)
# One step of a redact path: `.name`, `[3]` or `[*]`.
_STEP = re.compile(r"\.([A-Za-z_][A-Za-z0-9_-]*)|\[(\d+|\*)\]")
# Result records kept in memory to write each task's result once (per process).
_RESULTS_REMEMBERED = 10_000


class AuditLog:
    """The gateway's `Audit` (gateway.dispatch): JSON lines to a file or stdout."""

    def __init__(
        self, target: Path | str, *, max_pending: int = DEFAULT_MAX_PENDING, echo: bool = True
    ) -> None:
        if max_pending < 1:
            raise ValueError("max_pending must be at least 1")
        self.target = target
        self.echo = echo  # a one-line summary in the gateway log too (no arguments, no reason)
        self.dropped = 0
        self.write_errors = 0
        self.written = 0
        # Records wait here unformatted: copying, redacting and encoding happen in the writer.
        self._queue: queue.Queue[_Pending | None] = queue.Queue(maxsize=max_pending)
        self._stream: IO[str] | None = None
        self._inode: tuple[int, int] | None = None
        self._reported = 0.0
        self._results: OrderedDict[str, None] = OrderedDict()
        self._results_lock = threading.Lock()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="duragate-audit", daemon=True)
        self._thread.start()

    @classmethod
    def open(cls, target: Path | str, **kwargs: Any) -> AuditLog:
        """Check that the file can be opened (at start-up, with a clear error), then start."""
        if target != STDOUT:
            path = Path(target)
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            os.close(fd)
        return cls(target, **kwargs)

    # --- the seam -------------------------------------------------------------------------

    def record(self, event: str, principal: Principal, tool: str | None, **details: Any) -> None:
        """Queue one record (formatted by the writer thread); never blocks, never raises."""
        obligations = details.pop("audit", None) or {}
        if "trace_id" not in details and (trace_id := telemetry.call_trace_id()) is not None:
            details["trace_id"] = trace_id  # the call's trace, while it is being dispatched
        level = obligations.get("level") or DEFAULT_LEVEL
        if level not in LEVELS:
            level = DEFAULT_LEVEL
        if level == "minimal" and event not in _MINIMAL_EVENTS:
            if not (event == "scheduled" and details.get("outcome") == "approve"):
                return
        if event == "result" and (level != "full" or not self._first_result(details.get("task"))):
            return
        pending = _Pending(
            datetime.now(UTC),
            event,
            principal,
            tool,
            level,
            obligations.get("redact") or (),
            details,
        )
        if self.echo:
            log.info(
                "audit %s tool=%s principal=%s tenant=%s",
                event,
                tool,
                principal.id,
                principal.tenant,
            )
        try:
            self._queue.put_nowait(pending)
        except queue.Full:
            self.dropped += 1
            self._report("the audit queue is full (writes are slower than calls)")

    def close(self, timeout: float = 5.0) -> None:
        """Write what is pending (waiting at most `timeout` seconds) and stop the writer."""
        if self._closed:
            return
        self._closed = True
        deadline = time.monotonic() + timeout
        while True:
            try:
                self._queue.put(None, timeout=max(deadline - time.monotonic(), 0.01))
                break
            except queue.Full:
                if time.monotonic() >= deadline:
                    break
        self._thread.join(max(deadline - time.monotonic(), 0.1))

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until every queued record is written (or dropped); for tests and shutdown."""
        deadline = time.monotonic() + timeout
        while self._queue.unfinished_tasks and time.monotonic() < deadline:
            time.sleep(0.01)
        return not self._queue.unfinished_tasks

    # --- formatting -----------------------------------------------------------------------

    @staticmethod
    def _format(pending: _Pending) -> str:
        event, principal, level = pending.event, pending.principal, pending.level
        details = dict(pending.details)
        arguments = details.pop("arguments", None)
        result = details.pop("result", None)
        now = pending.time
        record: dict[str, Any] = {
            "time": now.strftime("%Y-%m-%dT%H:%M:%S.") + f"{now.microsecond // 1000:03d}Z",
            "event": event,
            "outcome": details.pop("outcome", _OUTCOMES.get(event, event)),
            "principal": principal.id,
            "tenant": principal.tenant,
            "via": principal.via,
            "chain": list(principal.chain),
            "tool": pending.tool,
            "rule": details.pop("rule", None),
            "reason": details.pop("reason", None),
            "task": details.pop("task", None),
            "level": level,
        }
        paths = pending.redact
        if level == "full":
            if arguments is not None:
                record["arguments"] = redact(arguments, paths, "args")
            if event == "result":
                record["result"] = redact(result, paths, "result")
        for key, value in details.items():  # limit, retry_after_seconds, caller, error ...
            record.setdefault(key, value)
        return json.dumps(record, ensure_ascii=False, default=str, separators=(",", ":"))

    def _first_result(self, task: Any) -> bool:
        """Whether the result of `task` is seen for the first time (per process, bounded):
        every view of a finished task reports it, the log wants it once."""
        key = str(task)
        with self._results_lock:
            if key in self._results:
                return False
            self._results[key] = None
            if len(self._results) > _RESULTS_REMEMBERED:
                self._results.popitem(last=False)
            return True

    # --- the writer thread ----------------------------------------------------------------

    def _run(self) -> None:
        while True:
            first = self._queue.get()
            batch = [first]
            while len(batch) < _BATCH:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            lines = []
            for pending in batch:
                if pending is None:
                    continue
                try:
                    lines.append(self._format(pending))
                except Exception:  # noqa: BLE001 - an odd value must not stop the writer
                    self.dropped += 1
                    log.exception("audit record %s could not be formatted", pending.event)
            try:
                if lines:
                    self._write(lines)
            finally:
                for _ in batch:
                    self._queue.task_done()
            if None in batch:
                self._close_stream()
                return

    def _write(self, lines: Sequence[str]) -> None:
        try:
            stream = self._current_stream()
            stream.write("\n".join(lines) + "\n")
            stream.flush()
            self.written += len(lines)
        except (OSError, ValueError) as exc:  # a full disk, a closed stream
            self.write_errors += 1
            self.dropped += len(lines)
            self._close_stream()
            self._report(f"audit records could not be written to {self.target}: {exc}")

    def _current_stream(self) -> IO[str]:
        if self.target == STDOUT:
            return sys.stdout  # looked up each time: `duragate stdio` points it at stderr
        path = Path(self.target)
        if self._stream is not None:
            try:
                st = path.stat()
                moved = (st.st_dev, st.st_ino) != self._inode
            except FileNotFoundError:
                moved = True
            if not moved:
                return self._stream
            self._close_stream()  # rotated away: start a new file
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        stream = open(fd, "a", encoding="utf-8")  # noqa: SIM115 - kept open between batches
        st = os.fstat(fd)
        self._stream, self._inode = stream, (st.st_dev, st.st_ino)
        return stream

    def _close_stream(self) -> None:
        stream, self._stream = self._stream, None
        if stream is not None:
            try:
                stream.close()
            except OSError:
                pass

    def _report(self, message: str) -> None:
        now = time.monotonic()
        if now - self._reported >= _REPORT_EVERY_SECONDS:
            self._reported = now
            log.error(
                "%s; %d record(s) dropped so far, %d write error(s)",
                message,
                self.dropped,
                self.write_errors,
            )


@dataclass(frozen=True)
class _Pending:
    time: datetime
    event: str
    principal: Principal
    tool: str | None
    level: str
    redact: Sequence[str]
    details: dict[str, Any]


_OUTCOMES = {
    "denied": "deny",
    "refused": "refused",
    "limited": "limited",
    "replayed": "replayed",
    "approved": "approved",
    "rejected": "rejected",
    "cancelled": "cancelled",
}


def audit_obligations(obligations: Mapping[str, Any] | None) -> dict[str, Any]:
    """The part of a decision's obligations the audit log needs: level and redact paths."""
    obligations = obligations or {}
    found: dict[str, Any] = {"level": obligations.get("audit") or DEFAULT_LEVEL}
    if obligations.get("redact"):
        found["redact"] = list(obligations["redact"])
    return found


def redact(value: Any, paths: Sequence[str], root: str) -> Any:
    """A copy of `value` with the fields that `paths` name under `root` ("args" or "result")
    replaced by "[redacted]", and every field whose name says it holds a secret too. A path
    that names nothing in this value changes nothing."""
    steps = [
        _parse(p[len(root) :]) for p in paths if p == root or p.startswith((root + ".", root + "["))
    ]
    return _apply(_secrets(value), steps)


def _parse(path: str) -> list[str | int | None]:
    """`.card.number` -> ["card", "number"]; `[3]` -> 3; `[*]` -> None (every item)."""
    steps: list[str | int | None] = []
    for match in _STEP.finditer(path):
        name, index = match.groups()
        if name is not None:
            steps.append(name)
        elif index == "*":
            steps.append(None)
        else:
            steps.append(int(index))
    return steps


def _apply(value: Any, paths: list[list[str | int | None]]) -> Any:
    if not paths:
        return value
    if any(not p for p in paths):  # a path ends here: this whole value is redacted
        return REDACTED
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            deeper = [p[1:] for p in paths if p[0] == key]
            out[key] = _apply(item, deeper) if deeper else item
        return out
    if isinstance(value, list):
        items = []
        for index, item in enumerate(value):
            deeper = [p[1:] for p in paths if p[0] is None or p[0] == index]
            items.append(_apply(item, deeper) if deeper else item)
        return items
    return value  # the path goes deeper than the value: nothing to redact


def _secrets(value: Any) -> Any:
    """A deep copy of JSON data with secret-named fields redacted."""
    if isinstance(value, dict):
        return {
            k: REDACTED if isinstance(k, str) and _SECRET_NAME.fullmatch(k) else _secrets(v)
            for k, v in value.items()
        }
    if isinstance(value, list | tuple):
        return [_secrets(v) for v in value]
    return value
