"""Progress that running tools report, for the front doors waiting on their calls.

A tool reports through `ToolContext.progress(...)`, from the activity's thread or loop. When
the worker runs in the gateway process (the embedded default) the hub hands each report to the
front door waiting on that call at once; calls whose activity runs elsewhere still show the
coarser progress of the workflow's custom status.
"""

from __future__ import annotations

import asyncio
import threading
from collections import OrderedDict
from dataclasses import dataclass

from adapters.base import ProgressReporter

MAX_TRACKED = 10_000


@dataclass(frozen=True)
class Progress:
    progress: float
    total: float | None
    message: str | None
    seq: int


class ProgressHub:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._latest: OrderedDict[str, Progress] = OrderedDict()
        self._waiters: dict[str, list[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]]] = {}

    def reporter(self, instance_id: str) -> ProgressReporter:
        def report(progress: float, total: float | None, message: str | None) -> None:
            self.publish(instance_id, progress, total, message)

        return report

    def publish(
        self, instance_id: str, progress: float, total: float | None, message: str | None
    ) -> None:
        """Thread-safe: tools may report from any thread."""
        with self._lock:
            previous = self._latest.pop(instance_id, None)
            seq = previous.seq + 1 if previous else 1
            self._latest[instance_id] = Progress(float(progress), total, message, seq)
            if len(self._latest) > MAX_TRACKED:
                self._latest.popitem(last=False)
            waiters = self._waiters.pop(instance_id, [])
        for loop, fut in waiters:
            loop.call_soon_threadsafe(_wake, fut)

    def latest(self, instance_id: str) -> Progress | None:
        with self._lock:
            return self._latest.get(instance_id)

    async def changed(self, instance_id: str, after_seq: int, timeout: float) -> Progress | None:
        """The next report after `after_seq`, or None if none came within `timeout`."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        with self._lock:
            current = self._latest.get(instance_id)
            if current is not None and current.seq > after_seq:
                return current
            self._waiters.setdefault(instance_id, []).append((loop, fut))
        try:
            await asyncio.wait_for(fut, timeout)
        except TimeoutError:
            return None
        finally:
            # Timed out, woken, or cancelled (a caller whose call completed first cancels
            # this wait): never leave the waiter behind, or every call leaks one entry.
            with self._lock:
                waiters = self._waiters.get(instance_id, [])
                if (loop, fut) in waiters:
                    waiters.remove((loop, fut))
                if not waiters:
                    self._waiters.pop(instance_id, None)
        return self.latest(instance_id)

    def forget(self, instance_id: str) -> None:
        with self._lock:
            self._latest.pop(instance_id, None)


def _wake(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)
