"""What every benchmark here measures the same way: latency percentiles and CPU per process."""

from __future__ import annotations

import os
import statistics
from pathlib import Path


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
