"""Recovery: N calls in flight, SIGKILL of the gateway (and of a sidecar process, if any),
restart on the same data directory; do all calls complete with the right result, how many ran
again, and how soon does the restarted gateway make progress?

The gateway runs `bench/recovery.yaml`: one tool, `bench.tools:long_step`, that runs for
`--seconds` and writes `start`, a `tick` a second and `end` lines with its pid and the time to a
side-effect file. Phases:
1. submit `--calls` (1,000) calls over A2A JSON-RPC with `returnImmediately` (each is durable
   once accepted), then wait until `--running` of them have started and ticked once;
2. SIGKILL the gateway's process group and its sidecar's, if it has one (no clean shutdown);
3. start a new gateway process on the same data directory and poll every task (GetTask) until
   it is `COMPLETED` with `KEY:done`.
Reported: completions and wrong results, calls that ran again (a start line from the new
process for a call the old one had started), calls that ran again although the old process had
finished them, and, counted from the new process's start, the time to ready and to the first
progress (first line written by the new process; target: within 2 s), and the time to drain.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from bench.capacity import poll_until
from bench.harness import (
    a2a_message,
    a2a_rpc,
    artifact_data,
    bounded,
    exit_on_sigterm,
    load_avg,
    start_gateway,
    task_of,
)
from bench.measure import emit, percentiles
from bench.tools import EFFECTS_ENV

CONFIG = Path(__file__).resolve().with_name("recovery.yaml")
TARGET_FIRST_PROGRESS_S = 2.0
WAIT_RUNNING_TIMEOUT_S = 600.0
DRAIN_TIMEOUT_S = 3600.0


@dataclass
class Effects:
    """The side-effect file, parsed: per call key, its events as (event, pid, time)."""

    by_key: dict[str, list[tuple[str, int, float]]] = field(default_factory=dict)

    @classmethod
    def read(cls, path: Path) -> Effects:
        by_key: dict[str, list[tuple[str, int, float]]] = defaultdict(list)
        if path.exists():
            for line in path.read_text().splitlines():
                parts = line.split()
                if len(parts) == 4:  # a line cut by the SIGKILL is not counted
                    by_key[parts[1]].append((parts[0], int(parts[2]), float(parts[3])))
        return cls(dict(by_key))

    def keys_with(self, event: str, pid: int | None = None) -> set[str]:
        return {
            k
            for k, events in self.by_key.items()
            if any(e == event and (pid is None or p == pid) for e, p, _ in events)
        }

    def first_time(self, pid: int, keys: set[str] | None = None) -> float | None:
        times = [
            t
            for k, events in self.by_key.items()
            if keys is None or k in keys
            for _, p, t in events
            if p == pid
        ]
        return min(times) if times else None


async def submit_all(base: str, calls: int, seconds: float, concurrency: int) -> Any:
    async def one(i: int) -> tuple[str, float]:
        t = time.perf_counter()
        result = await a2a_rpc(
            http,
            base,
            "SendMessage",
            {
                "message": a2a_message("long_step", {"key": f"k{i}", "seconds": seconds}),
                "configuration": {"returnImmediately": True},
            },
        )
        return str(task_of(result)["id"]), time.perf_counter() - t

    async with httpx.AsyncClient(timeout=120) as http:
        done = await bounded([one(i) for i in range(calls)], concurrency)
    failed = [repr(x) for x in done if isinstance(x, BaseException)]
    if failed:
        raise RuntimeError(f"{len(failed)} submissions failed: {failed[:5]}")
    return done


def wait_running(effects: Path, count: int, pid: int) -> Effects:
    """Wait until `count` calls have started and ticked in process `pid`."""
    deadline = time.monotonic() + WAIT_RUNNING_TIMEOUT_S
    while True:
        seen = Effects.read(effects)
        if len(seen.keys_with("tick", pid)) >= count:
            return seen
        if time.monotonic() > deadline:
            raise TimeoutError(f"fewer than {count} calls running after {WAIT_RUNNING_TIMEOUT_S}s")
        time.sleep(0.1)


async def drain(base: str, ids: dict[str, int], concurrency: int) -> dict[str, Any]:
    async with httpx.AsyncClient(timeout=120) as http:
        done = await poll_until(
            http, base, ids, "TASK_STATE_COMPLETED", concurrency, DRAIN_TIMEOUT_S
        )
    wrong = []
    for tid, task in done.items():
        value = artifact_data(task) or {}
        if value.get("result") != f"k{ids[tid]}:done":
            wrong.append({"task": tid, "result": value})
    return {"completed": len(done), "wrong_results": len(wrong), "wrong_listed": wrong[:20]}


def run(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    data = tmp / "data"
    effects = tmp / "effects.log"
    env = {EFFECTS_ENV: str(effects)}
    out: dict[str, Any] = {"load_avg_at_start": load_avg()}
    first = start_gateway(args.config, data, tmp / "gateway-1.log", env)
    try:
        t = time.monotonic()
        submitted = asyncio.run(submit_all(first.base, args.calls, args.seconds, args.concurrency))
        ids = {tid: i for i, (tid, _) in enumerate(submitted)}
        submit_s = time.monotonic() - t
        out["submit"] = {
            "seconds": round(submit_s, 2),
            "calls_per_s": round(args.calls / submit_s, 1),
            "latency_ms": percentiles([s for _, s in submitted]),
        }
        print(f"submitted {args.calls} in {submit_s:.1f} s", file=sys.stderr)
        running = min(args.running, args.calls)
        wait_running(effects, running, first.pid)
        killed_at = time.time()
        first.crash()
    finally:
        first.stop()  # a no-op after the crash; stops it if anything above failed
    before = Effects.read(effects)  # everything the old process wrote before it died
    old = first.pid
    started_old = before.keys_with("start", old)
    ended_old = before.keys_with("end", old)
    out["at_the_kill"] = {
        "started": len(started_old),
        "completed": len(ended_old),
        "in_flight_running": len(started_old - ended_old),
        "accepted_not_started": args.calls - len(started_old),
        "load_avg": load_avg(),
    }
    print(f"killed with {out['at_the_kill']}", file=sys.stderr)

    second = start_gateway(args.config, data, tmp / "gateway-2.log", env)
    try:
        drained = asyncio.run(drain(second.base, ids, args.concurrency))
        drained_at = time.time()
    finally:
        second.stop()
    after = Effects.read(effects)
    new = second.pid
    interrupted = started_old - ended_old
    rerun = after.keys_with("start", new) & started_old
    first_any = after.first_time(new)
    first_resumed = after.first_time(new, interrupted)
    ended_twice = {
        k for k, ev in after.by_key.items() if sum(1 for e, _, _ in ev if e == "end") > 1
    }

    def since_start(t: float | None) -> float | None:
        return None if t is None else round(t - second.started_at, 3)

    out["after_restart"] = {
        "process_start_after_kill_s": round(second.started_at - killed_at, 3),
        "ready_s": round(second.ready_at - second.started_at, 3),
        "first_progress_s": since_start(first_any),
        "first_progress_of_an_interrupted_call_s": since_start(first_resumed),
        "drain_s": round(drained_at - second.started_at, 2),
        **drained,
        "ran_again": len(rerun),
        "ran_again_of_interrupted": len(rerun & interrupted),
        "ran_again_after_completing": len(rerun & ended_old),
        "completed_twice": len(ended_twice),
        "not_started_before_kill_started_once": sum(
            1
            for k, ev in after.by_key.items()
            if k not in started_old and sum(1 for e, _, _ in ev if e == "start") == 1
        ),
        "load_avg_at_end": load_avg(),
    }
    # The timeline for the chart: events per 0.5 s, from the first submission's start.
    origin = min((t for ev in after.by_key.values() for _, _, t in ev), default=killed_at)
    timeline: dict[str, dict[str, int]] = {}
    for ev in after.by_key.values():
        for event, pid, at in ev:
            process = "old" if pid == old else "new"
            slot = str(round((at - origin) * 2) / 2)
            row = timeline.setdefault(slot, {})
            row[f"{event} {process}"] = row.get(f"{event} {process}", 0) + 1
    out["timeline"] = {
        "origin": "first event",
        "kill_s": round(killed_at - origin, 2),
        "restart_s": round(second.started_at - origin, 2),
        "ready_s": round(second.ready_at - origin, 2),
        "events_per_half_second": timeline,
    }
    return out


def draw(doc: dict[str, Any], out_dir: Path) -> list[Path]:
    """Starts and ends per half second in the old and the new process, kill and restart."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    line = doc["results"]["timeline"]
    events = {float(k): row for k, row in line["events_per_half_second"].items()}
    t = [i / 2 for i in range(int(max(events, default=0) * 2) + 2)]  # every slot, empty too
    fig, ax = plt.subplots(figsize=(8, 4))
    for series in ("start old", "end old", "start new", "end new"):
        ax.step(t, [events.get(x, {}).get(series, 0) for x in t], where="post", label=series)
    top = ax.get_ylim()[1]
    for i, name in enumerate(("kill_s", "restart_s", "ready_s")):
        ax.axvline(line[name], color="gray", linestyle="--", linewidth=0.8)
        ax.text(line[name], top * (0.95 - 0.12 * i), " " + name.removesuffix("_s"), fontsize=8)
    after = doc["results"]["after_restart"]
    ax.set_title(
        f"recovery: {doc['job']['calls']} calls, SIGKILL, restart; first progress "
        f"{after['first_progress_s']} s after the new process started",
        fontsize=9,
    )
    ax.set_xlabel("seconds")
    ax.set_ylabel("tool events per 0.5 s")
    ax.legend()
    fig.tight_layout()
    path = out_dir / "recovery-timeline.png"
    fig.savefig(path, dpi=110)
    plt.close("all")
    return [path]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=1000, help="calls in flight at the kill")
    parser.add_argument("--seconds", type=float, default=10.0, help="how long each call runs")
    parser.add_argument(
        "--running", type=int, default=100, help="kill once this many calls have ticked"
    )
    parser.add_argument("--concurrency", type=int, default=16, help="requests in flight")
    parser.add_argument("--config", type=Path, default=CONFIG, help="the gateway's config")
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    parser.add_argument("--png", type=Path, help="draw the timeline into this folder")
    args = parser.parse_args(argv)
    if not 1 <= args.calls <= 100_000:
        parser.error("--calls must be between 1 and 100,000")

    exit_on_sigterm()
    with tempfile.TemporaryDirectory(prefix="duragate-recovery-") as name:
        results = run(args, Path(name))
    after = results["after_restart"]
    first = after["first_progress_s"]
    doc = {
        "benchmark": "recovery",
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
        "job": {
            "calls": args.calls,
            "seconds_per_call": args.seconds,
            "killed_once_running": min(args.running, args.calls),
            "tool": "bench.tools:long_step",
            "submitted_over": "A2A JSON-RPC SendMessage, returnImmediately",
            "kill": "SIGKILL of the gateway's process group (and a sidecar process's, if any)",
            "engine": "embedded, SQLite FULL",
        },
        "results": results,
        "target": {"all_complete": True, "first_progress_s_max": TARGET_FIRST_PROGRESS_S},
        "targets_met": {
            "all_complete": after["completed"] == args.calls and after["wrong_results"] == 0,
            "first_progress_within_2s": first is not None and first <= TARGET_FIRST_PROGRESS_S,
        },
    }
    emit(doc, args.out, args.png, draw)
    return 0


if __name__ == "__main__":
    sys.exit(main())
