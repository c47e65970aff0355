"""Durable storage of workflow state in SQLite, with group commit.

The engine keeps live state in memory and describes every change as a list of SQL statements.
All batches submitted during one turn of the event loop go into one transaction, so concurrent
turns share one fsync. A batch's future resolves only after its transaction has committed,
which is when the RPC that caused it may answer.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import sqlite3
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

Op = tuple[str, Sequence[Any]]

SCHEMA = """
CREATE TABLE IF NOT EXISTS wf_instances (
    instance_id TEXT PRIMARY KEY,
    status INTEGER NOT NULL,
    created_at REAL NOT NULL,
    parent_id TEXT,
    state BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS wf_instances_status ON wf_instances (status);
CREATE TABLE IF NOT EXISTS wf_history (
    instance_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    event BLOB NOT NULL,
    PRIMARY KEY (instance_id, seq)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS wf_inbox (
    id INTEGER PRIMARY KEY,
    instance_id TEXT NOT NULL,
    visible_at REAL NOT NULL,
    event BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS wf_inbox_instance ON wf_inbox (instance_id);
CREATE TABLE IF NOT EXISTS wf_activities (
    id INTEGER PRIMARY KEY,
    instance_id TEXT NOT NULL,
    request BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS wf_activities_instance ON wf_activities (instance_id);
"""

# The statuses whose instances are live: loaded into memory at start-up.
LIVE_STATUSES = (0, 6, 7, 8)  # RUNNING, PENDING, SUSPENDED, STALLED


class StoreClosedError(RuntimeError):
    pass


@dataclass
class _Batch:
    ops: list[Op]
    future: asyncio.Future[None]


@dataclass
class LoadedInstance:
    instance_id: str
    state: bytes
    history: list[bytes] = field(default_factory=list)
    inbox: list[tuple[int, float, bytes]] = field(default_factory=list)


def connect(path: Path, synchronous: str) -> sqlite3.Connection:
    conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute(f"PRAGMA synchronous={synchronous}")
    conn.execute("PRAGMA busy_timeout=10000")
    return conn


class WorkflowStore:
    """SQLite persistence for the engine. `submit` is called on the event loop; the
    statements run on the writer thread."""

    def __init__(self, path: Path, synchronous: str = "FULL") -> None:
        self.path = path
        self.synchronous = synchronous
        self._conn: sqlite3.Connection | None = None
        self._reader: sqlite3.Connection | None = None
        self._read_lock = threading.Lock()
        self._batches: list[_Batch] = []
        self._flush_scheduled = False
        self._committing = False
        self._commit_queue: queue.SimpleQueue[tuple[list[_Batch], asyncio.AbstractEventLoop] | None]
        self._commit_queue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._last_future: asyncio.Future[None] | None = None
        self._failed: BaseException | None = None
        self.commits = 0

    # --- start-up -----------------------------------------------------------------------
    def open(self) -> None:
        """Open the connections and create the schema; `load_live` comes next."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._conn = connect(self.path, self.synchronous)
        self._conn.executescript(SCHEMA)
        self._reader = connect(self.path, self.synchronous)
        if self.synchronous == "FULL":
            self._thread = threading.Thread(target=self._committer, name="wf-commit", daemon=True)
            self._thread.start()

    def load_live(self) -> tuple[list[LoadedInstance], list[tuple[int, str, bytes]], int, int]:
        """Everything needed to resume: live instances with their history and inbox, the
        activity queue, and the highest inbox and activity row ids."""
        conn = self._require_conn()
        marks = ",".join("?" * len(LIVE_STATUSES))
        rows = conn.execute(
            f"SELECT instance_id, state FROM wf_instances WHERE status IN ({marks})",
            LIVE_STATUSES,
        ).fetchall()
        live = {iid: LoadedInstance(iid, state) for iid, state in rows}
        for iid, event in conn.execute(
            "SELECT instance_id, event FROM wf_history ORDER BY instance_id, seq"
        ):
            inst = live.get(iid)
            if inst is not None:
                inst.history.append(event)
        for row_id, iid, visible_at, event in conn.execute(
            "SELECT id, instance_id, visible_at, event FROM wf_inbox ORDER BY id"
        ):
            inst = live.get(iid)
            if inst is not None:
                inst.inbox.append((row_id, visible_at, event))
        activities = [
            (row_id, iid, request)
            for row_id, iid, request in conn.execute(
                "SELECT id, instance_id, request FROM wf_activities ORDER BY id"
            )
            if iid in live
        ]
        max_inbox = conn.execute("SELECT COALESCE(MAX(id), 0) FROM wf_inbox").fetchone()[0]
        max_act = conn.execute("SELECT COALESCE(MAX(id), 0) FROM wf_activities").fetchone()[0]
        # Rows of instances that are no longer live are left-overs of a finished turn.
        conn.execute(
            f"DELETE FROM wf_inbox WHERE instance_id NOT IN "
            f"(SELECT instance_id FROM wf_instances WHERE status IN ({marks}))",
            LIVE_STATUSES,
        )
        conn.execute(
            f"DELETE FROM wf_activities WHERE instance_id NOT IN "
            f"(SELECT instance_id FROM wf_instances WHERE status IN ({marks}))",
            LIVE_STATUSES,
        )
        return list(live.values()), activities, max_inbox, max_act

    # --- reads of committed data (terminal instances, lists); call through to_thread -------
    def _read(self, sql: str, args: Sequence[Any]) -> list[Any]:
        with self._read_lock:
            if self._reader is None:
                raise StoreClosedError("the workflow store is closed")
            return self._reader.execute(sql, args).fetchall()

    def read_state(self, instance_id: str) -> bytes | None:
        rows = self._read("SELECT state FROM wf_instances WHERE instance_id = ?", (instance_id,))
        return rows[0][0] if rows else None

    def read_history(self, instance_id: str) -> list[bytes]:
        rows = self._read(
            "SELECT event FROM wf_history WHERE instance_id = ? ORDER BY seq", (instance_id,)
        )
        return [r[0] for r in rows]

    def list_ids(self, after: str, limit: int) -> list[str]:
        rows = self._read(
            "SELECT instance_id FROM wf_instances WHERE instance_id > ? "
            "ORDER BY instance_id LIMIT ?",
            (after, limit),
        )
        return [r[0] for r in rows]

    def query_ids(
        self, created_from: float | None, created_to: float | None, statuses: Iterable[int]
    ) -> list[str]:
        sql = "SELECT instance_id FROM wf_instances WHERE 1=1"
        args: list[Any] = []
        if created_from is not None:
            sql += " AND created_at >= ?"
            args.append(created_from)
        if created_to is not None:
            sql += " AND created_at < ?"
            args.append(created_to)
        statuses = list(statuses)
        if statuses:
            sql += f" AND status IN ({','.join('?' * len(statuses))})"
            args.extend(statuses)
        return [r[0] for r in self._read(sql, args)]

    # --- writes ---------------------------------------------------------------------------
    def submit(self, ops: list[Op]) -> asyncio.Future[None]:
        """Queue a batch; the returned future resolves once it is committed.

        Batches submitted during one turn of the event loop, or while the previous commit
        was running, are committed together by one transaction.
        """
        if self._failed is not None:
            raise StoreClosedError(f"the workflow store failed: {self._failed}")
        if self._conn is None:
            raise StoreClosedError("the workflow store is closed")
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        self._batches.append(_Batch(ops, fut))
        self._last_future = fut
        if not self._flush_scheduled:
            self._flush_scheduled = True
            loop.call_soon(self._flush)
        return fut

    async def barrier(self) -> None:
        """Wait until everything submitted so far is committed."""
        fut = self._last_future
        if fut is not None and not fut.done():
            await asyncio.shield(fut)

    def _flush(self) -> None:
        self._flush_scheduled = False
        if self._committing or not self._batches:
            return  # the commit in progress starts the next flush when it ends
        batches, self._batches = self._batches, []
        if self._failed is not None:
            self._settle(batches, self._failed)
            return
        conn = self._require_conn()
        try:
            conn.execute("BEGIN IMMEDIATE")
            for batch in batches:
                for sql, args in batch.ops:
                    conn.execute(sql, args)
        except BaseException as exc:  # noqa: BLE001 - reported to every waiter
            self._fail(conn, exc)
            self._settle(batches, exc)
            return
        if self._thread is None:
            # Without fsync a COMMIT is quick: a handoff to the committer thread would cost more.
            error: BaseException | None = None
            try:
                conn.execute("COMMIT")
            except BaseException as exc:  # noqa: BLE001 - reported to every waiter
                error = exc
            self._committing = True
            self._committed(batches, error)
            return
        # The fsync of COMMIT runs on the committer thread so the loop keeps serving; what is
        # submitted meanwhile goes into the next transaction.
        self._committing = True
        self._commit_queue.put((batches, asyncio.get_running_loop()))

    def _committer(self) -> None:
        while True:
            item = self._commit_queue.get()
            if item is None:
                return
            batches, loop = item
            error: BaseException | None = None
            try:
                self._require_conn().execute("COMMIT")
            except BaseException as exc:  # noqa: BLE001 - reported to every waiter
                error = exc
            try:
                loop.call_soon_threadsafe(self._committed, batches, error)
            except RuntimeError:  # the loop is gone (shutdown)
                return

    def _committed(self, batches: list[_Batch], error: BaseException | None) -> None:
        self._committing = False
        if error is None:
            self.commits += 1
        else:
            self._fail(self._require_conn(), error)
        self._settle(batches, error)
        if self._batches:
            self._flush()

    def _fail(self, conn: sqlite3.Connection, exc: BaseException) -> None:
        log.error("workflow store commit failed: %s", exc)
        try:
            conn.execute("ROLLBACK")
        except sqlite3.Error:
            pass
        # Memory is now ahead of the disk: refuse further work rather than diverge.
        self._failed = exc

    @staticmethod
    def _settle(batches: list[_Batch], error: BaseException | None) -> None:
        for b in batches:
            if b.future.done():
                continue
            if error is None:
                b.future.set_result(None)
            else:
                b.future.set_exception(StoreClosedError(f"commit failed: {error}"))

    async def drain(self) -> None:
        """Commit whatever is still queued; call before `close`."""
        while self._batches or self._committing:
            if not self._committing:
                self._flush()
            await self.barrier()
            await asyncio.sleep(0)

    def close(self) -> None:
        if self._thread is not None:
            self._commit_queue.put(None)
            self._thread.join()
            self._thread = None
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        with self._read_lock:
            if self._reader is not None:
                self._reader.close()
                self._reader = None

    def _require_conn(self) -> sqlite3.Connection:
        if self._conn is None:
            raise StoreClosedError("the workflow store is not open")
        return self._conn
