"""A key/value store on SQLite with the semantics of a Dapr state store.

It lives in the sidecar's database file next to the workflow engine's tables (`wf_*`); its own
tables are prefixed `state_`. The rules are those of daprd + components-contrib (the SQLite
state store in particular):

- every write gives the item a new etag;
- a write or delete that carries an etag succeeds only if it matches the stored one
  (`EtagMismatchError`); an etag this store cannot have issued is `EtagInvalidError`;
- without an etag, first-write concurrency means insert-only, last-write means upsert, and a
  delete is unconditional (deleting a missing key is not an error);
- `ttl_seconds > 0` makes an item expire; an expired item reads, and conflicts, as absent;
- the operations of one `apply()` call are atomic: all of them or none.

Etags are the decimal value of one counter shared by every key and persisted in `state_meta`,
so an etag is never issued twice, not even after a delete and a re-insert of the same key.

SQLite calls are blocking, so they never run on the event loop: one writer thread and one reader
thread each own a connection. The writer commits the writes that queued up while it was busy in
one transaction, each under its own savepoint (group commit): with `synchronous=FULL` that is
one fsync for many concurrent writers, and a failed write still rolls back alone.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import queue
import re
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

logger = logging.getLogger(__name__)

T = TypeVar("T")

# How long a connection waits for the engine's connection to release the write lock.
BUSY_TIMEOUT_MS = 10_000
# Writes that may wait for the writer thread at once; more callers wait on the event loop.
MAX_PENDING_WRITES = 1024
# Jobs committed together in one transaction by the writer thread.
MAX_BATCH_JOBS = 256
# SQLite's limit of host parameters is 32766 since 3.32; stay far below it.
SQL_CHUNK = 500
# Expired rows are garbage-collected in the background, this many per transaction.
PURGE_BATCH = 1000
PURGE_INTERVAL_SECONDS = 60.0

_ETAG_RE = re.compile(r"[0-9]{1,19}")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS state_items (
    store      TEXT    NOT NULL,
    key        TEXT    NOT NULL,
    value      BLOB    NOT NULL,
    version    INTEGER NOT NULL,
    expires_at REAL,
    updated_at REAL    NOT NULL,
    PRIMARY KEY (store, key)
);
CREATE INDEX IF NOT EXISTS state_items_expiry
    ON state_items (expires_at) WHERE expires_at IS NOT NULL;
CREATE TABLE IF NOT EXISTS state_meta (
    name  TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
INSERT OR IGNORE INTO state_meta (name, value) VALUES ('schema_version', 1), ('etag_seq', 0);
"""


class StateStoreError(Exception):
    """A state operation failed."""


class EtagMismatchError(StateStoreError):
    """The etag (or first-write concurrency) did not allow the write. daprd: codes.Aborted."""

    def __init__(self, key: str) -> None:
        # The wording of components-contrib's state.ETagError, which daprd passes on.
        super().__init__("possible etag mismatch. error from state store")
        self.key = key


class EtagInvalidError(StateStoreError):
    """The etag is not one this store can have issued. daprd: codes.InvalidArgument."""

    def __init__(self, key: str, etag: str) -> None:
        super().__init__(f"invalid etag value: {etag!r} is not an etag issued by this store")
        self.key = key
        self.etag = etag


class StoreClosedError(StateStoreError):
    """The store is not open."""


@dataclass(frozen=True, slots=True)
class Upsert:
    key: str
    value: bytes
    etag: str | None = None
    first_write: bool = False
    # > 0: expires that many seconds after the write; None, 0 or -1: never.
    ttl_seconds: int | None = None


@dataclass(frozen=True, slots=True)
class Delete:
    key: str
    etag: str | None = None


Operation = Upsert | Delete


@dataclass(frozen=True, slots=True)
class StoredItem:
    key: str
    value: bytes
    etag: str
    expires_at: float | None  # unix seconds


def check_etag(key: str, etag: str | None) -> None:
    """Raise EtagInvalidError for an etag this store cannot have issued. None or "" is no etag."""
    if etag and not _ETAG_RE.fullmatch(etag):
        raise EtagInvalidError(key, etag)


def connect(db_path: Path, synchronous: Literal["FULL", "NORMAL"]) -> sqlite3.Connection:
    """One connection in autocommit mode (transactions are explicit), WAL, busy timeout."""
    conn = sqlite3.connect(
        db_path, isolation_level=None, timeout=BUSY_TIMEOUT_MS / 1000, check_same_thread=True
    )
    try:
        conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise StateStoreError(f"cannot put {db_path} in WAL mode (journal_mode is {mode})")
        # `synchronous` is a Literal validated by the settings model: safe to interpolate.
        conn.execute(f"PRAGMA synchronous = {synchronous}")
    except BaseException:
        conn.close()
        raise
    return conn


class _Job:
    """One unit of work for a database thread; its result goes to a concurrent future."""

    __slots__ = ("fn", "future")

    def __init__(self, fn: Callable[[sqlite3.Connection, float], Any]) -> None:
        self.fn = fn
        self.future: concurrent.futures.Future[Any] = concurrent.futures.Future()


_STOP = object()


class _DbThread:
    """A thread that owns one SQLite connection and runs jobs from a queue.

    With `batched`, the jobs waiting in the queue run in one write transaction, each under a
    savepoint, and are committed together. Otherwise each job runs on its own.
    """

    def __init__(self, name: str, opener: Callable[[], sqlite3.Connection], batched: bool) -> None:
        self._name = name
        self._opener = opener
        self._batched = batched
        self._queue: queue.SimpleQueue[_Job | object] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._main, name=name, daemon=True)
        self._opened: concurrent.futures.Future[None] = concurrent.futures.Future()

    async def start(self) -> None:
        self._thread.start()
        await asyncio.wrap_future(self._opened)

    def submit(self, fn: Callable[[sqlite3.Connection, float], T]) -> asyncio.Future[T]:
        job = _Job(fn)
        self._queue.put(job)
        return asyncio.wrap_future(job.future)

    async def stop(self) -> None:
        """Run the jobs already queued, close the connection and end the thread."""
        if self._thread.is_alive():
            self._queue.put(_STOP)
            await asyncio.to_thread(self._thread.join)

    def _main(self) -> None:
        try:
            conn = self._opener()
        except BaseException as exc:
            self._opened.set_exception(exc)
            return
        self._opened.set_result(None)
        try:
            stopping = False
            while not stopping:
                jobs: list[_Job] = []
                item = self._queue.get()
                while True:
                    if item is _STOP:
                        stopping = True
                        break
                    assert isinstance(item, _Job)
                    # Skip jobs whose caller was cancelled before they started.
                    if item.future.set_running_or_notify_cancel():
                        jobs.append(item)
                    if not self._batched or len(jobs) >= MAX_BATCH_JOBS:
                        break
                    try:
                        item = self._queue.get_nowait()
                    except queue.Empty:
                        break
                if jobs:
                    if self._batched:
                        self._run_batch(conn, jobs)
                    else:
                        for job in jobs:
                            self._run_one(conn, job)
        finally:
            conn.close()
            # Anything queued after the stop marker will never run.
            while True:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if isinstance(item, _Job) and item.future.set_running_or_notify_cancel():
                    item.future.set_exception(StoreClosedError("the state store is closed"))

    @staticmethod
    def _run_one(conn: sqlite3.Connection, job: _Job) -> None:
        try:
            job.future.set_result(job.fn(conn, time.time()))
        except BaseException as exc:
            job.future.set_exception(exc)

    @staticmethod
    def _run_batch(conn: sqlite3.Connection, jobs: list[_Job]) -> None:
        now = time.time()
        outcomes: list[tuple[_Job, Any, BaseException | None]] = []
        try:
            # IMMEDIATE takes the write lock now (waiting up to busy_timeout for the engine)
            # rather than failing with SQLITE_BUSY on the first write of the transaction.
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            for job in jobs:
                job.future.set_exception(exc)
            return
        try:
            for job in jobs:
                conn.execute("SAVEPOINT job")
                try:
                    result = job.fn(conn, now)
                except Exception as exc:
                    conn.execute("ROLLBACK TO job")
                    conn.execute("RELEASE job")
                    outcomes.append((job, None, exc))
                else:
                    conn.execute("RELEASE job")
                    outcomes.append((job, result, None))
            conn.execute("COMMIT")
        except BaseException as exc:
            # The commit (or a savepoint statement) failed: nothing of this batch is durable.
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            for job in jobs:
                if not job.future.done():
                    job.future.set_exception(exc)
            return
        # Only now, after COMMIT, may a caller learn that its write succeeded.
        for job, result, error in outcomes:
            if error is None:
                job.future.set_result(result)
            else:
                job.future.set_exception(error)


class StateStore:
    """SQLite-backed state items, keyed by (store name, key). See the module docstring."""

    def __init__(self, db_path: Path, *, synchronous: Literal["FULL", "NORMAL"] = "FULL") -> None:
        self.db_path = Path(db_path)
        self.synchronous = synchronous
        self._writer: _DbThread | None = None
        self._reader: _DbThread | None = None
        self._write_slots: asyncio.Semaphore | None = None
        self._purger: asyncio.Task[None] | None = None
        # The last etag issued; only the writer thread touches it after open().
        self._version = 0

    @property
    def is_open(self) -> bool:
        return self._writer is not None

    async def open(self) -> None:
        if self._writer is not None:
            raise StateStoreError("the state store is already open")
        writer = _DbThread("state-writer", self._open_writer, batched=True)
        await writer.start()
        # The reader starts after the writer has created the schema.
        reader = _DbThread("state-reader", self._open_reader, batched=False)
        try:
            await reader.start()
        except BaseException:
            await writer.stop()
            raise
        self._writer, self._reader = writer, reader
        self._write_slots = asyncio.Semaphore(MAX_PENDING_WRITES)
        self._purger = asyncio.create_task(self._purge_loop(), name="state-purge-expired")

    async def close(self) -> None:
        if self._purger is not None:
            self._purger.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._purger
            self._purger = None
        writer, reader = self._writer, self._reader
        self._writer = self._reader = None
        if writer is not None:
            await writer.stop()
        if reader is not None:
            await reader.stop()

    # -- reads ---------------------------------------------------------------------------------

    async def get(self, store: str, key: str) -> StoredItem | None:
        items = await self.get_many(store, [key])
        return items.get(key)

    async def get_many(self, store: str, keys: Iterable[str]) -> dict[str, StoredItem]:
        """The live items among `keys` (missing and expired keys are absent from the result)."""
        unique = list(dict.fromkeys(keys))
        if not unique:
            return {}
        if self._reader is None:
            raise StoreClosedError("the state store is closed")
        return await self._reader.submit(lambda conn, now: self._select(conn, store, unique, now))

    @staticmethod
    def _select(
        conn: sqlite3.Connection, store: str, keys: list[str], now: float
    ) -> dict[str, StoredItem]:
        found: dict[str, StoredItem] = {}
        # One read transaction, so that every chunk sees the same snapshot.
        conn.execute("BEGIN")
        try:
            for start in range(0, len(keys), SQL_CHUNK):
                chunk = keys[start : start + SQL_CHUNK]
                marks = ",".join("?" * len(chunk))
                rows = conn.execute(
                    "SELECT key, value, version, expires_at FROM state_items"
                    f" WHERE store = ? AND key IN ({marks})"
                    " AND (expires_at IS NULL OR expires_at > ?)",
                    (store, *chunk, now),
                )
                for key, value, version, expires_at in rows:
                    found[key] = StoredItem(key, bytes(value), str(version), expires_at)
        finally:
            conn.execute("COMMIT")
        return found

    # -- writes --------------------------------------------------------------------------------

    async def apply(self, store: str, operations: Sequence[Operation]) -> None:
        """Apply the operations in order, atomically. Raises EtagMismatchError,
        EtagInvalidError (before anything is written) or another StateStoreError."""
        for op in operations:
            check_etag(op.key, op.etag)
        if not operations:
            return
        ops = list(operations)
        await self._write(lambda conn, now: self._apply(conn, store, ops, now))

    async def purge_expired(self, limit: int = PURGE_BATCH) -> int:
        """Delete up to `limit` expired items; returns how many were deleted."""
        return await self._write(
            lambda conn, now: (
                conn.execute(
                    "DELETE FROM state_items WHERE rowid IN (SELECT rowid FROM state_items"
                    " WHERE expires_at IS NOT NULL AND expires_at <= ? LIMIT ?)",
                    (now, limit),
                ).rowcount
            )
        )

    async def _write(self, fn: Callable[[sqlite3.Connection, float], T]) -> T:
        if self._writer is None or self._write_slots is None:
            raise StoreClosedError("the state store is closed")
        async with self._write_slots:
            writer = self._writer
            if writer is None:
                raise StoreClosedError("the state store is closed")
            return await writer.submit(fn)

    def _apply(
        self, conn: sqlite3.Connection, store: str, ops: list[Operation], now: float
    ) -> None:
        version = self._version
        for op in ops:
            row = conn.execute(
                "SELECT version, expires_at FROM state_items WHERE store = ? AND key = ?",
                (store, op.key),
            ).fetchone()
            live_etag: str | None = None
            if row is not None and (row[1] is None or row[1] > now):
                live_etag = str(row[0])
            if op.etag:
                if op.etag != live_etag:
                    raise EtagMismatchError(op.key)
            elif isinstance(op, Upsert) and op.first_write and live_etag is not None:
                # First-write without an etag is insert-only (an expired row counts as absent).
                raise EtagMismatchError(op.key)
            if isinstance(op, Upsert):
                version += 1
                expires_at = now + op.ttl_seconds if op.ttl_seconds and op.ttl_seconds > 0 else None
                conn.execute(
                    "INSERT INTO state_items (store, key, value, version, expires_at, updated_at)"
                    " VALUES (?, ?, ?, ?, ?, ?)"
                    " ON CONFLICT (store, key) DO UPDATE SET value = excluded.value,"
                    " version = excluded.version, expires_at = excluded.expires_at,"
                    " updated_at = excluded.updated_at",
                    (store, op.key, op.value, version, expires_at, now),
                )
            elif row is not None:
                conn.execute("DELETE FROM state_items WHERE store = ? AND key = ?", (store, op.key))
        if version != self._version:
            # Persisted in the same transaction as the rows that carry the new etags.
            conn.execute("UPDATE state_meta SET value = ? WHERE name = 'etag_seq'", (version,))
            # A rolled-back job leaves a gap in the sequence, which is harmless.
            self._version = version

    # -- connections ---------------------------------------------------------------------------

    def _open_writer(self) -> sqlite3.Connection:
        conn = connect(self.db_path, self.synchronous)
        try:
            # executescript() would commit on its own; run the statements in one transaction.
            conn.execute("BEGIN IMMEDIATE")
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    conn.execute(statement)
            seq = conn.execute("SELECT value FROM state_meta WHERE name = 'etag_seq'").fetchone()
            top = conn.execute("SELECT MAX(version) FROM state_items").fetchone()
            conn.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            conn.close()
            raise
        self._version = max(int(seq[0]), int(top[0] or 0))
        return conn

    def _open_reader(self) -> sqlite3.Connection:
        conn = connect(self.db_path, self.synchronous)
        conn.execute("PRAGMA query_only = ON")
        return conn

    async def _purge_loop(self) -> None:
        while True:
            try:
                while await self.purge_expired() >= PURGE_BATCH:
                    pass
            except StoreClosedError:
                return
            except Exception:
                logger.exception("removing expired state items failed")
            await asyncio.sleep(PURGE_INTERVAL_SECONDS)
