"""Demo tools of the `python` kind, served by `config/gateway.yaml` and used by the tests.

Each shows one thing the gateway must handle: a trivial sync call (`add`), a long async call
with progress (`slow_echo`), a failure that a retry cures (`flaky`), a failure reported to the
caller (`fail`) and an object result (`word_count`).
"""

from __future__ import annotations

import asyncio
import threading
from typing import Annotated

from pydantic import BaseModel, Field

# Imported at run time, not under TYPE_CHECKING: the adapter resolves the string annotations.
from adapters.base import ToolContext, ToolError


def add(
    a: Annotated[float, Field(description="The first number.")],
    b: Annotated[float, Field(description="The second number.")],
) -> float:
    """Add two numbers."""
    return a + b


async def slow_echo(
    text: Annotated[str, Field(description="What to send back.")],
    seconds: Annotated[float, Field(ge=0, le=3600, description="How long to take.")] = 1.0,
    *,
    context: ToolContext,
) -> str:
    """Wait `seconds`, reporting progress every 0.1 s, then return `text`."""
    step = 0.1
    ticks = 0
    waited = 0.0
    while waited < seconds:
        ticks += 1
        target = min(seconds, ticks * step)  # from the tick count: no drift from adding 0.1s
        await asyncio.sleep(target - waited)
        waited = target
        context.progress(waited, seconds, f"{waited:g} of {seconds:g} s")
    return text


# Failures so far per key, in this process: enough for retry tests, which run the tool in the
# gateway's own process (a restarted gateway starts counting again).
_flaky_failures: dict[str, int] = {}
_flaky_lock = threading.Lock()  # sync tools run in worker threads


def flaky(
    key: Annotated[str, Field(description="Counts failures separately per key.")],
    failures: Annotated[int, Field(ge=0, description="How many calls fail first.")] = 2,
) -> str:
    """Fail the first `failures` calls with this key, then succeed (for retry tests)."""
    with _flaky_lock:
        failed = _flaky_failures.get(key, 0)
        if failed < failures:
            _flaky_failures[key] = failed + 1
            # Not a ToolError: an unexpected failure, the kind a retry policy is for.
            raise RuntimeError(f"flaky {key!r}: failure {failed + 1} of {failures}")
    return f"{key}: succeeded after {failures} failures"


def fail(message: Annotated[str, Field(description="The error to report.")]) -> None:
    """Always fail, with `message` as the tool's error."""
    raise ToolError(message, data={"tool": "fail"})


class WordCount(BaseModel):
    words: int = Field(description="Runs of non-blank characters.")
    characters: int = Field(description="Every character, blanks included.")
    lines: int = Field(description="Lines of text (a final line without newline counts).")


def word_count(text: Annotated[str, Field(description="The text to count.")]) -> WordCount:
    """Count the words, characters and lines of a text."""
    return WordCount(words=len(text.split()), characters=len(text), lines=len(text.splitlines()))
