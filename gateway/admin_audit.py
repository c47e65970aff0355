"""Queries over the audit log file (gateway.audit's JSON lines), newest first.

The file is read backwards from its end (or from where the previous page stopped: the cursor is
a byte offset) in blocks, at most `max_bytes` per request, so a query costs the same on a file
of any size. Runs in a worker thread (file reads are blocking).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from gateway.admin_access import AdminScope

BLOCK = 64 * 1024
DEFAULT_MAX_BYTES = 4 * 1024 * 1024


class BadAuditCursor(ValueError):
    pass


@dataclass(frozen=True)
class AuditFilter:
    tenant: str | None = None
    tool: str | None = None
    event: str | None = None
    since: datetime | None = None
    until: datetime | None = None

    def admits(self, scope: AdminScope, record: dict[str, Any]) -> bool:
        tenant = record.get("tenant")
        if not isinstance(tenant, str) or not scope.sees(tenant):
            return False
        if self.tenant is not None and tenant != self.tenant:
            return False
        if self.tool is not None and record.get("tool") != self.tool:
            return False
        if self.event is not None and record.get("event") != self.event:
            return False
        if self.since is None and self.until is None:
            return True
        at = _parse_time(record.get("time"))
        if at is None:
            return False
        if self.since is not None and at < self.since:
            return False
        return self.until is None or at < self.until


def _parse_time(value: Any) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        at = datetime.fromisoformat(value)
    except ValueError:
        return None
    return at if at.tzinfo else at.replace(tzinfo=UTC)


def parse_cursor(text: str) -> int:
    if not text.isdigit() or len(text) > 19:
        raise BadAuditCursor("not a cursor this API gave out; start without one")
    return int(text)


def query_audit(
    path: Path,
    scope: AdminScope,
    wanted: AuditFilter,
    *,
    limit: int,
    cursor: int | None,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> tuple[list[dict[str, Any]], str | None, int]:
    """(records newest first, next cursor or None at the file's start, bytes read)."""
    records: list[dict[str, Any]] = []
    try:
        handle = open(path, "rb")  # noqa: SIM115 - closed below
    except FileNotFoundError:
        return records, None, 0
    with handle:
        size = os.fstat(handle.fileno()).st_size
        # A cursor past the end (the file was rotated and is shorter now) starts at the end.
        end = size if cursor is None else min(cursor, size)
        pos = end
        carry = b""
        read = 0
        while pos > 0:
            if read >= max_bytes:
                # Stopped between blocks: the partial line in `carry` is read again next time,
                # unless it alone is longer than a whole read (then it is skipped: a request
                # must make progress).
                resume = pos + len(carry)
                return records, str(resume if resume < end else pos), read
            step = min(BLOCK, pos)
            pos -= step
            handle.seek(pos)
            block = handle.read(step) + carry
            read += step
            parts = block.split(b"\n")
            carry = parts[0]
            # Start offsets of the complete lines parts[1:], then walk them newest first.
            starts = []
            offset = pos + len(parts[0]) + 1
            for part in parts[1:]:
                starts.append(offset)
                offset += len(part) + 1
            for start, line in zip(reversed(starts), reversed(parts[1:]), strict=True):
                if _take(line, scope, wanted, records) and len(records) >= limit:
                    return records, (str(start) if start > 0 else None), read
        if carry:
            _take(carry, scope, wanted, records)
    return records, None, read


def _take(line: bytes, scope: AdminScope, wanted: AuditFilter, into: list[dict[str, Any]]) -> bool:
    line = line.strip()
    if not line:
        return False
    try:
        record = json.loads(line)
    except ValueError:
        return False  # a torn last line (the writer is mid-write) or a foreign one
    if not isinstance(record, dict) or not isinstance(record.get("time"), str):
        return False
    if not isinstance(record.get("event"), str) or not wanted.admits(scope, record):
        return False
    into.append(record)
    return True
