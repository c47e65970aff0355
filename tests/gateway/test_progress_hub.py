"""The progress hub forgets a waiter however its wait ends: woken, timed out or cancelled (the
dispatcher cancels the wait when the call completes first). A waiter left behind is memory
held for every call the gateway ever served."""

from __future__ import annotations

import asyncio

from gateway.progress import ProgressHub


async def test_a_cancelled_wait_leaves_nothing_behind() -> None:
    hub = ProgressHub()
    waits = [asyncio.ensure_future(hub.changed(f"task-{i}", 0, 30)) for i in range(50)]
    await asyncio.sleep(0.01)
    assert len(hub._waiters) == 50
    for wait in waits:
        wait.cancel()
    await asyncio.gather(*waits, return_exceptions=True)
    assert hub._waiters == {}


async def test_woken_and_timed_out_waits_leave_nothing_behind() -> None:
    hub = ProgressHub()
    woken = asyncio.ensure_future(hub.changed("a", 0, 30))
    await asyncio.sleep(0.01)
    hub.publish("a", 1, 2, "half")
    progress = await woken
    assert progress is not None and progress.progress == 1
    assert await hub.changed("b", 0, 0.01) is None
    assert hub._waiters == {}
