"""What every benchmark here measures the same way: latency percentiles and CPU per process."""

from __future__ import annotations

import json
import os
import statistics
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def percentiles(samples: list[float], digits: int = 3) -> dict[str, float]:
    """p50/p90/p99/mean in milliseconds of durations given in seconds."""
    ordered = sorted(samples)

    def pick(q: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000, digits)

    return {
        "p50": pick(0.50),
        "p90": pick(0.90),
        "p99": pick(0.99),
        "mean": round(statistics.fmean(ordered) * 1000, digits),
        "n": len(ordered),
    }


def emit(
    doc: dict[str, Any],
    out: Path | None,
    png: Path | None,
    draw: Callable[[dict[str, Any], Path], list[Path]],
) -> None:
    """The JSON on stdout (and in `out`), and the charts in `png` when asked."""
    text = json.dumps(doc, indent=2)
    print(text)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n")
    if png:
        for path in draw(doc, png):
            print(f"wrote {path}", file=sys.stderr)
