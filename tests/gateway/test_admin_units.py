"""The admin API's parts on their own: who is an admin, the audit log read backwards, cursors,
a workflow history turned into a timeline, and `admins:` in policy files."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from google.protobuf import timestamp_pb2, wrappers_pb2

from gateway.admin_access import AdminScope, NotAdmin, admin_scope
from gateway.admin_audit import AuditFilter, BadAuditCursor, parse_cursor, query_audit
from gateway.admin_calls import BadCursor, decode_cursor, encode_cursor, timeline
from gateway.config import ConfigError, parse_config
from gateway.sidecar.protos import pb
from identity.principal import Principal
from policies.loader import parse_policy

CONFIG = parse_config(
    "admin:\n  principals: [spiffe://example.org/ops/*, spiffe://duragate.local/anonymous]\n",
    "gateway.yaml",
    Path("."),
)
POLICY = """
tenant: team-a
members: [spiffe://example.org/team-a/**]
groups:
  leads: [spiffe://example.org/team-a/lead]
admins: [group:leads, spiffe://example.org/outsider]
tools: {}
"""


class Policies:
    def __init__(self, text: str = POLICY) -> None:
        self.policy = parse_policy(text, "team-a.yaml", "team-a.yaml")

    def get(self, tenant: str) -> object:
        return self.policy if tenant == "team-a" else None


def scope_of(principal: Principal, loopback: bool = True) -> AdminScope:
    return admin_scope(principal, CONFIG, Policies(), loopback=loopback)  # type: ignore[arg-type]


# --- who is an admin -----------------------------------------------------------------------


def test_global_and_tenant_admins() -> None:
    root = scope_of(Principal("spiffe://example.org/ops/root", "example.org", "jwt-svid"))
    assert root.is_global and root.sees("team-a") and root.sees("anything")
    lead = scope_of(Principal("spiffe://example.org/team-a/lead", "team-a", "jwt-svid"))
    assert lead.tenants == frozenset({"team-a"}) and not lead.sees("team-b")


def test_non_admins_are_refused_with_the_reason() -> None:
    with pytest.raises(NotAdmin, match="is not an admin.*admins` in the policy of tenant"):
        scope_of(Principal("spiffe://example.org/team-a/alice", "team-a", "jwt-svid"))
    # Named in `admins` but not a member of the tenant: not its admin.
    with pytest.raises(NotAdmin):
        scope_of(Principal("spiffe://example.org/outsider", "team-a", "jwt-svid"))
    # A tenant admin's name in another tenant's caller does not carry over.
    with pytest.raises(NotAdmin):
        scope_of(Principal("spiffe://example.org/team-a/lead", "team-b", "jwt-svid"))


def test_delegation_never_makes_an_admin() -> None:
    agent = Principal(
        "spiffe://example.org/ops/bot", "example.org", "x509-svid", ("spiffe://example.org/u",)
    )
    with pytest.raises(NotAdmin, match="cannot be delegated"):
        scope_of(agent)


def test_anonymous_admin_only_on_loopback() -> None:
    anonymous = Principal("spiffe://duragate.local/anonymous", "default", "anonymous")
    assert scope_of(anonymous, loopback=True).is_global
    with pytest.raises(NotAdmin, match="non-loopback"):
        scope_of(anonymous, loopback=False)


def test_admins_in_a_policy_must_name_known_groups() -> None:
    with pytest.raises(ConfigError, match=r"team-a.yaml:3: admins\[0\]: no group 'nope'"):
        parse_policy(
            "tenant: team-a\nmembers: [spiffe://example.org/**]\nadmins: [group:nope]\n",
            "team-a.yaml",
            "team-a.yaml",
        )


def test_admin_principals_must_be_patterns() -> None:
    with pytest.raises(ConfigError, match="admin.principals"):
        parse_config("admin:\n  principals: [not-a-spiffe-id]\n", "gateway.yaml", Path("."))


# --- the audit log, backwards --------------------------------------------------------------


def _audit_file(tmp_path: Path, count: int, *, pad: int = 0) -> Path:
    start = datetime(2026, 1, 1, tzinfo=UTC)
    lines = []
    for i in range(count):
        at = (start + timedelta(minutes=i)).strftime("%Y-%m-%dT%H:%M:%S.000Z")
        record = {
            "time": at,
            "event": "scheduled" if i % 2 == 0 else "denied",
            "tenant": "team-a" if i % 3 else "team-b",
            "tool": "add",
            "n": i,
            "pad": "x" * pad,
        }
        lines.append(json.dumps(record))
    path = tmp_path / "audit.jsonl"
    # A torn last line (the writer mid-write) and a foreign one are skipped.
    path.write_text("\n".join(lines) + "\nnot json\n" + '{"time": "2026-01-02T00:00:00Z", "ev')
    return path


GLOBAL = AdminScope(Principal("spiffe://x.org/root", "x.org", "jwt-svid"), None)


def _pages(path: Path, limit: int, **kwargs: object) -> list[int]:
    seen: list[int] = []
    cursor = None
    for _ in range(1000):
        records, next_cursor, _ = query_audit(
            path,
            GLOBAL,
            AuditFilter(),
            limit=limit,
            cursor=cursor,
            **kwargs,  # type: ignore[arg-type]
        )
        seen += [r["n"] for r in records]
        if next_cursor is None:
            return seen
        cursor = parse_cursor(next_cursor)
    raise AssertionError("the cursor never ended")


def test_audit_newest_first_across_blocks_and_pages(tmp_path: Path) -> None:
    path = _audit_file(tmp_path, 3000, pad=100)  # about 450 KiB: several 64 KiB blocks
    everything = list(range(2999, -1, -1))
    assert _pages(path, 500) == everything
    assert _pages(path, 7) == everything
    # A small read bound per request: more requests, the same records, none twice.
    assert _pages(path, 500, max_bytes=100_000) == everything


def test_audit_a_line_longer_than_a_read_is_skipped(tmp_path: Path) -> None:
    path = _audit_file(tmp_path, 3)
    with path.open("a") as f:
        f.write(
            "\n"
            + json.dumps(
                {
                    "time": "2026-01-03T00:00:00Z",
                    "event": "x",
                    "tenant": "t",
                    "n": 99,
                    "pad": "y" * 300_000,
                }
            )
            + "\n"
        )
    assert _pages(path, 10, max_bytes=65_536) == [2, 1, 0]
    assert _pages(path, 10) == [99, 2, 1, 0]


def test_audit_filters_and_scope(tmp_path: Path) -> None:
    path = _audit_file(tmp_path, 60)
    lead = AdminScope(Principal("spiffe://x.org/lead", "team-a", "jwt-svid"), frozenset({"team-a"}))
    records, _, _ = query_audit(path, lead, AuditFilter(), limit=500, cursor=None)
    assert records and {r["tenant"] for r in records} == {"team-a"}
    wanted = AuditFilter(event="denied", since=datetime(2026, 1, 1, 0, 30, tzinfo=UTC))
    records, _, _ = query_audit(path, GLOBAL, wanted, limit=500, cursor=None)
    assert [r["n"] for r in records] == list(range(59, 29, -2))
    assert (
        query_audit(tmp_path / "missing.jsonl", GLOBAL, AuditFilter(), limit=5, cursor=None)[0]
        == []
    )


def test_cursors_refuse_garbage() -> None:
    assert decode_cursor(encode_cursor("abc", 7)) == ("abc", 7)
    assert decode_cursor(encode_cursor(None, 0)) == (None, 0)
    for bad in ("x", "eyJ0IjogMX0", encode_cursor("abc", 1)[:-3], "e30"):
        with pytest.raises(BadCursor):
            decode_cursor(bad)
    with pytest.raises(BadAuditCursor):
        parse_cursor("-1")


# --- a workflow history as a timeline ----------------------------------------------------


def _ts(seconds: float) -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.FromNanoseconds(int((1_800_000_000 + seconds) * 1e9))
    return ts


def test_timeline_attempts_retries_and_events() -> None:
    approval = json.dumps({"approved": True, "by": "spiffe://x/lead", "reason": "ok", "x": 1})
    events = [
        pb.HistoryEvent(
            eventId=-1, timestamp=_ts(0), executionStarted=pb.ExecutionStartedEvent(name="w")
        ),
        pb.HistoryEvent(
            eventId=-1,
            timestamp=_ts(1),
            eventRaised=pb.EventRaisedEvent(
                name="duragate.approval", input=wrappers_pb2.StringValue(value=approval)
            ),
        ),
        pb.HistoryEvent(eventId=0, timestamp=_ts(1), taskScheduled=pb.TaskScheduledEvent(name="t")),
        pb.HistoryEvent(
            eventId=1, timestamp=_ts(1), timerCreated=pb.TimerCreatedEvent(fireAt=_ts(61))
        ),
        pb.HistoryEvent(
            eventId=-1,
            timestamp=_ts(2),
            taskFailed=pb.TaskFailedEvent(
                taskScheduledId=0,
                failureDetails=pb.TaskFailureDetails(errorType="E", errorMessage="boom"),
            ),
        ),
        pb.HistoryEvent(
            eventId=2, timestamp=_ts(2), timerCreated=pb.TimerCreatedEvent(fireAt=_ts(3))
        ),
        pb.HistoryEvent(
            eventId=-1, timestamp=_ts(3), timerFired=pb.TimerFiredEvent(timerId=2, fireAt=_ts(3))
        ),
        pb.HistoryEvent(eventId=3, timestamp=_ts(3), taskScheduled=pb.TaskScheduledEvent(name="t")),
        pb.HistoryEvent(
            eventId=-1, timestamp=_ts(4.5), taskCompleted=pb.TaskCompletedEvent(taskScheduledId=3)
        ),
        pb.HistoryEvent(
            eventId=4,
            timestamp=_ts(4.5),
            executionCompleted=pb.ExecutionCompletedEvent(),
        ),
    ]
    line = timeline(events)
    assert [(a.attempt, a.outcome, a.duration_ms) for a in line.activities] == [
        (1, "failed", 1000.0),
        (2, "completed", 1500.0),
    ]
    assert line.activities[0].error == "E: boom"
    assert [(t.purpose, t.fired_at is not None) for t in line.timers] == [
        ("timer", False),
        ("retry", True),
    ]
    # Only who decided, how and why: nothing else of the event's payload.
    assert line.events[0].detail == {"approved": True, "by": "spiffe://x/lead", "reason": "ok"}
    assert line.started is not None and line.ended is not None
    assert (line.ended - line.started).total_seconds() == 4.5
    assert len(line.history) == len(events) and not line.truncated


# --- packaging ----------------------------------------------------------------------------


def test_dashboard_files_ship_in_the_wheel_and_the_image() -> None:
    import fnmatch
    import tomllib

    from gateway import dashboard

    root = Path(__file__).resolve().parents[2]
    package = root / "gateway"
    files = sorted(p.relative_to(package) for p in (package / "static").rglob("*") if p.is_file())
    assert files, "no dashboard files"
    globs = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"][
        "package-data"
    ]["gateway"]
    for file in files:
        assert any(fnmatch.fnmatch(str(file), g) for g in globs), f"{file} is not package data"
    # Every file is served, and only those.
    assert {f.name for f in files} == set(dashboard.ASSETS)
    assert "COPY gateway ./gateway" in (root / "Dockerfile").read_text()
