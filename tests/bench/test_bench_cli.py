"""The system benchmarks and the report command start and explain themselves (`--help`), and
the side-effect tool of the recovery benchmark records its runs. No timing here: the
benchmarks themselves are run by hand or by `python -m bench.report`."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from adapters.base import ToolContext
from bench import tools
from bench.harness import slope_per_minute

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    ("module", "words"),
    [
        ("bench.load", ["--duration", "--soak", "--mcp-workers", "--a2a-workers"]),
        ("bench.capacity", ["--calls", "--concurrency"]),
        ("bench.recovery", ["--calls", "--seconds", "--running"]),
        ("bench.report", ["--quick", "--only"]),
    ],
)
def test_help(module: str, words: list[str]) -> None:
    done = subprocess.run(
        [sys.executable, "-m", module, "--help"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    for word in words:
        assert word in done.stdout


def test_report_refuses_an_unknown_benchmark() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "bench.report", "--only", "nosuch"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2 and "unknown benchmark 'nosuch'" in done.stderr


async def test_long_step_records_start_ticks_and_end(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    effects = tmp_path / "effects.log"
    monkeypatch.setenv(tools.EFFECTS_ENV, str(effects))
    monkeypatch.setattr(tools, "TICK_SECONDS", 0.01)
    seen: list[float] = []
    context = ToolContext(
        instance_id="i", task_execution_id="e", report_progress=lambda p, t, m: seen.append(p)
    )
    assert await tools.long_step("k1", 0.03, context=context) == "k1:done"
    events = [line.split() for line in effects.read_text().splitlines()]
    assert [e[0] for e in events][0] == "start" and events[-1][0] == "end"
    assert {e[1] for e in events} == {"k1"} and len(seen) >= 1


def test_slope() -> None:
    assert slope_per_minute([(0, 100.0), (30, 101.0), (60, 102.0)]) == pytest.approx(2.0)
    assert slope_per_minute([(0, 5.0)]) == 0.0
