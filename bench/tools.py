"""Tools the system-level benchmarks run through the gateway.

`long_step` is the recovery benchmark's call: it runs for a while and leaves a trace of every
run in a side-effect file (the path in the `DURAGATE_BENCH_EFFECTS` environment variable of the
gateway process), one line per event: `start|tick|end KEY PID UNIX_TIME`. From that file the
benchmark tells which calls ran, in which process, and which ran again after a crash.
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Annotated

from pydantic import Field

# Imported at run time, not under TYPE_CHECKING: the adapter resolves the string annotations.
from adapters.base import ToolContext

EFFECTS_ENV = "DURAGATE_BENCH_EFFECTS"
TICK_SECONDS = 1.0


def record(event: str, key: str) -> None:
    """Append one line with a single write(2) on an O_APPEND descriptor, so that lines of
    concurrent calls never interleave. A 50-byte append to the page cache does not block the
    event loop for any length of time worth a thread hop."""
    path = os.environ.get(EFFECTS_ENV)
    if not path:
        return
    line = f"{event} {key} {os.getpid()} {time.time():.6f}\n".encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)


async def long_step(
    key: Annotated[str, Field(max_length=200, pattern=r"^\S+$", description="Call's name.")],
    seconds: Annotated[float, Field(ge=0, le=3600, description="How long to run.")] = 10.0,
    *,
    context: ToolContext,
) -> str:
    """Run for `seconds`, recording a start, a tick every second and an end in the side-effect
    file; return `KEY:done`."""
    record("start", key)
    began = time.monotonic()
    ticks = 0
    while (left := seconds - (time.monotonic() - began)) > 0:
        await asyncio.sleep(min(TICK_SECONDS, left))
        ticks += 1
        record("tick", key)
        context.progress(min(seconds, time.monotonic() - began), seconds)
    record("end", key)
    return f"{key}:done"
