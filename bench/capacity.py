"""Capacity: N calls suspended waiting for approval at once, the memory they hold, then all
approved in bulk and drained.

One gateway (embedded engine, SQLite FULL, a temporary data directory) whose policy makes every
`word_count` call wait for a person's approval (`allow_self: true`: the one anonymous caller
approves its own calls). Phases:
1. submit `--calls` (10,000) calls over A2A JSON-RPC with `returnImmediately`, `--concurrency`
   at a time, and poll each task (GetTask) until every one is `INPUT_REQUIRED`;
2. with all of them suspended, sample the RSS (VmRSS) of the gateway (engine included when it
   runs in the gateway) and of a sidecar child, if there is one
   (target: the gateway under 300 MB), and the size of the engine's database;
3. approve every call (`POST /approvals/{task_id}`), `--concurrency` at a time, and poll until
   every task is `COMPLETED` with the right result: the approvals' throughput and latency, and
   the time to drain (first approval to the last call completed).
Prints one JSON document; `--png DIR` draws the memory over time.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from bench.harness import (
    GatewayProcess,
    a2a_message,
    a2a_rpc,
    artifact_data,
    bounded,
    exit_on_sigterm,
    load_avg,
    start_gateway,
    state_of,
    task_of,
    write_config,
)
from bench.measure import emit, percentiles

TARGET_GATEWAY_RSS_MB = 300.0
TOOLS = [
    {
        "name": "word_count",
        "kind": "python",
        "target": "examples.tools:word_count",
        "timeout_seconds": 30,
    }
]
POLICY = """\
tenant: default
members: [spiffe://duragate.local/**]
tools:
  word_count:
    call: [group:members]
    approval:
      approvers: [group:members]
      allow_self: true
      expires_seconds: 86400
"""
SUSPEND_TIMEOUT_SECONDS = 1800.0
DRAIN_TIMEOUT_SECONDS = 1800.0


def text_for(i: int) -> tuple[str, int]:
    """The i-th call's text and its word count (the result that must come back)."""
    words = 1 + i % 9
    return " ".join(f"c{i}w{k}" for k in range(words)), words


def _max_or_none(values: Any) -> float | None:
    present = [v for v in values if v is not None]
    return max(present) if present else None


def _kb_per_call(held_mb: float | None, idle_mb: float | None, calls: int) -> float | None:
    if held_mb is None or idle_mb is None:
        return None
    return round((held_mb - idle_mb) * 1024 / calls, 2)


class Memory:
    """RSS samples of the gateway and its sidecar, with the phase each was taken in."""

    def __init__(self, gateway: GatewayProcess, t0: float) -> None:
        self.gateway = gateway
        self.t0 = t0
        self.phase = "idle"
        self.samples: list[dict[str, Any]] = []

    def sample(self) -> dict[str, Any]:
        rss = self.gateway.rss()
        row = {
            "t_s": round(time.monotonic() - self.t0, 2),
            "phase": self.phase,
            **{k: None if v is None else round(v, 1) for k, v in rss.items()},
        }
        self.samples.append(row)
        return row

    async def run(self, every: float) -> None:
        while True:
            self.sample()
            await asyncio.sleep(every)


async def submit(http: httpx.AsyncClient, base: str, i: int) -> tuple[str, float]:
    text, _ = text_for(i)
    t = time.perf_counter()
    result = await a2a_rpc(
        http,
        base,
        "SendMessage",
        {
            "message": a2a_message("word_count", {"text": text}),
            "configuration": {"returnImmediately": True},
        },
    )
    return str(task_of(result)["id"]), time.perf_counter() - t


async def poll_until(
    http: httpx.AsyncClient,
    base: str,
    ids: dict[str, int],
    state: str,
    concurrency: int,
    timeout: float,
) -> dict[str, dict[str, Any]]:
    """GetTask every task not yet in `state`, pass after pass, until all are; the tasks as
    last seen. A task in a terminal state other than `state` is an error."""
    deadline = time.monotonic() + timeout
    waiting = set(ids)
    seen: dict[str, dict[str, Any]] = {}
    while waiting:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{len(waiting)} tasks not {state} after {timeout:g} s")
        order = sorted(waiting)
        answers = await bounded(
            [a2a_rpc(http, base, "GetTask", {"id": tid}) for tid in order], concurrency
        )
        for tid, answer in zip(order, answers, strict=True):
            if isinstance(answer, BaseException):
                raise RuntimeError(f"GetTask {tid}: {answer!r}")
            got = state_of(answer)
            if got == state:
                seen[tid] = answer
                waiting.discard(tid)
            elif got in ("TASK_STATE_FAILED", "TASK_STATE_REJECTED", "TASK_STATE_CANCELED"):
                raise RuntimeError(f"task {tid} ended {got}: {answer.get('status')}")
        if waiting:
            await asyncio.sleep(0.5)
    return seen


def database_mb(data: Path) -> float:
    return round(sum(p.stat().st_size for p in data.rglob("engine.db*")) / 2**20, 1)


async def drive(args: argparse.Namespace, gateway: GatewayProcess, data: Path) -> Any:
    t0 = time.monotonic()
    memory = Memory(gateway, t0)
    sampling = asyncio.create_task(memory.run(args.sample_seconds))
    limits = httpx.Limits(max_connections=args.concurrency * 2)
    out: dict[str, Any] = {"load_avg_at_start": load_avg()}
    try:
        async with httpx.AsyncClient(timeout=120, limits=limits) as http:
            await asyncio.sleep(1.0)
            out["idle_rss_mb"] = memory.sample()
            # 1. submit
            memory.phase = "submitting"
            t = time.monotonic()
            submitted = await bounded(
                [submit(http, gateway.base, i) for i in range(args.calls)], args.concurrency
            )
            failures = [repr(x) for x in submitted if isinstance(x, BaseException)]
            if failures:
                raise RuntimeError(f"{len(failures)} submissions failed: {failures[:5]}")
            ids = {tid: i for i, (tid, _) in enumerate(submitted)}
            if len(ids) != args.calls:
                raise RuntimeError(f"{args.calls} calls submitted, {len(ids)} distinct tasks")
            submit_s = time.monotonic() - t
            out["submit"] = {
                "seconds": round(submit_s, 2),
                "calls_per_s": round(args.calls / submit_s, 1),
                "latency_ms": percentiles([s for _, s in submitted]),
            }
            print(f"submitted {args.calls} in {submit_s:.1f} s", file=sys.stderr)
            # every call must be suspended on its approval at once
            memory.phase = "suspending"
            await poll_until(
                http,
                gateway.base,
                ids,
                "TASK_STATE_INPUT_REQUIRED",
                args.concurrency,
                SUSPEND_TIMEOUT_SECONDS,
            )
            out["all_suspended_after_s"] = round(time.monotonic() - t, 2)
            print(f"all {args.calls} waiting for approval", file=sys.stderr)
            # 2. memory with all of them suspended
            memory.phase = "suspended"
            held = []
            for _ in range(args.settle_samples):
                await asyncio.sleep(1.0)
                held.append(memory.sample())
            peak_gateway = max(s["gateway"] for s in held)
            out["suspended"] = {
                "calls": args.calls,
                "rss_mb": held[-1],
                "gateway_rss_max_mb": peak_gateway,
                # None when the engine runs in the gateway process (no sidecar process).
                "sidecar_rss_max_mb": _max_or_none(s["sidecar"] for s in held),
                "total_rss_max_mb": max(s["total"] for s in held),
                "gateway_kb_per_suspended_call": _kb_per_call(
                    held[-1]["gateway"], out["idle_rss_mb"]["gateway"], args.calls
                ),
                "sidecar_kb_per_suspended_call": _kb_per_call(
                    held[-1]["sidecar"], out["idle_rss_mb"]["sidecar"], args.calls
                ),
                "engine_db_mb": database_mb(data),
                "load_avg": load_avg(),
            }
            # 3. approve in bulk, then drain
            memory.phase = "approving"
            started = time.monotonic()

            async def approve(tid: str) -> float:
                t = time.perf_counter()
                answer = await http.post(
                    f"{gateway.base}/approvals/{tid}", json={"approve": True, "reason": "bench"}
                )
                if answer.status_code != 200:
                    raise RuntimeError(f"approve {tid}: {answer.status_code} {answer.text}")
                return time.perf_counter() - t

            approved = await bounded([approve(tid) for tid in ids], args.concurrency)
            failed = [repr(x) for x in approved if isinstance(x, BaseException)]
            if failed:
                raise RuntimeError(f"{len(failed)} approvals failed: {failed[:5]}")
            approve_s = time.monotonic() - started
            out["approve"] = {
                "seconds": round(approve_s, 2),
                "approvals_per_s": round(args.calls / approve_s, 1),
                "latency_ms": percentiles([s for s in approved if isinstance(s, float)]),
            }
            print(f"approved {args.calls} in {approve_s:.1f} s", file=sys.stderr)
            memory.phase = "draining"
            done = await poll_until(
                http,
                gateway.base,
                ids,
                "TASK_STATE_COMPLETED",
                args.concurrency,
                DRAIN_TIMEOUT_SECONDS,
            )
            drain_s = time.monotonic() - started
            wrong = []
            for tid, task in done.items():
                value = artifact_data(task) or {}
                if value.get("words") != text_for(ids[tid])[1]:
                    wrong.append({"task": tid, "result": value})
            memory.phase = "drained"
            out["drain"] = {
                "seconds_from_first_approval": round(drain_s, 2),
                "completed": len(done),
                "wrong_results": len(wrong),
                "wrong_listed": wrong[:20],
                "calls_per_s": round(args.calls / drain_s, 1),
            }
            await asyncio.sleep(1.0)
            out["drained_rss_mb"] = memory.sample()
            out["engine_db_mb_at_end"] = database_mb(data)
    finally:
        sampling.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sampling
    out["load_avg_at_end"] = load_avg()
    out["rss_samples"] = memory.samples
    return out


def draw(doc: dict[str, Any], out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    samples = doc["results"]["rss_samples"]
    t = [s["t_s"] for s in samples]
    fig, ax = plt.subplots(figsize=(8, 4))
    for role in ("gateway", "sidecar", "total"):
        if any(s[role] is not None for s in samples):
            ax.plot(t, [s[role] for s in samples], label=role)
    ax.axhline(TARGET_GATEWAY_RSS_MB, color="tab:red", linestyle="--", label="gateway target")
    phases: dict[str, float] = {}
    for s in samples:
        phases.setdefault(s["phase"], s["t_s"])
    for name, start in phases.items():
        ax.axvline(start, color="gray", linewidth=0.5)
        ax.text(start, 5, name, rotation=90, fontsize=7, va="bottom")
    ax.set_ylim(bottom=0)
    ax.set_xlabel("seconds")
    ax.set_ylabel("RSS, MB")
    ax.set_title(f"capacity: {doc['job']['calls']} calls suspended for approval, then approved")
    ax.legend(loc="upper left")
    fig.tight_layout()
    path = out_dir / "capacity-rss.png"
    fig.savefig(path, dpi=110)
    plt.close("all")
    return [path]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=10_000, help="calls suspended at once")
    parser.add_argument("--concurrency", type=int, default=16, help="requests in flight")
    parser.add_argument("--sample-seconds", type=float, default=1.0)
    parser.add_argument("--settle-samples", type=int, default=5, help="RSS samples, 1 s apart")
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    parser.add_argument("--png", type=Path, help="draw charts into this folder")
    args = parser.parse_args(argv)
    if not 1 <= args.calls <= 1_000_000:
        parser.error("--calls must be between 1 and 1,000,000")

    exit_on_sigterm()
    with tempfile.TemporaryDirectory(prefix="duragate-capacity-") as name:
        tmp = Path(name)
        config = write_config(tmp, TOOLS, {"default": POLICY})
        data = tmp / "data"
        gateway = start_gateway(config, data, tmp / "gateway.log")
        try:
            results = asyncio.run(drive(args, gateway, data))
        finally:
            gateway.stop()
    suspended = results["suspended"]
    doc = {
        "benchmark": "capacity",
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
        "job": {
            "calls": args.calls,
            "concurrency": args.concurrency,
            "tool": "word_count behind an approval",
            "submitted_over": "A2A JSON-RPC SendMessage, returnImmediately",
            "approved_over": "POST /approvals/{task_id}",
            "engine": "embedded, SQLite FULL",
        },
        "results": results,
        "target": {"gateway_rss_mb_max": TARGET_GATEWAY_RSS_MB},
        "targets_met": {
            "gateway_rss": suspended["gateway_rss_max_mb"] < TARGET_GATEWAY_RSS_MB,
            "all_completed": results["drain"]["completed"] == args.calls
            and results["drain"]["wrong_results"] == 0,
        },
    }
    emit(doc, args.out, args.png, draw)
    return 0


if __name__ == "__main__":
    sys.exit(main())
