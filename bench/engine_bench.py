"""Engine benchmark: the unmodified Dapr workflow SDK against the embedded sidecar.

Measures, for each configuration (sidecar in-process or standalone; SQLite synchronous FULL or
NORMAL):
- sequential latency (p50/p90/p99) of a 1-activity and a 5-activity workflow, start to result;
- throughput of 1,000 single-activity workflows with 32 in flight;
- how one workflow's time grows with its number of activities (the SDK replays the whole
  history every turn), with the stateful-history capability on and off;
and runs the DBOS baseline (`bench.dbos_baseline`) in the same run, reporting ratios.

Prints one JSON document on stdout; `--out FILE` also writes it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from dapr.ext.workflow.aio import DaprWorkflowClient

from bench.measure import cpu_seconds, emit, percentiles
from bench.workloads import QUIET, start_runtime
from gateway.sidecar.server import READY_MARKER, SidecarThread
from gateway.sidecar.settings import SidecarSettings

REPO = Path(__file__).resolve().parents[1]
# The figures the issue names for this job, measured on this kind of machine.
ISSUE_BASELINE = {"dbos": {"throughput_wfps": 146.0, "seq_p50_ms": 6.6}}
TARGET = {"throughput_wfps": 450.0, "seq_p50_ms": 3.0}


@contextmanager
def sidecar(mode: str, db: Path, synchronous: str, stateful: bool) -> Iterator[tuple[str, int]]:
    """Yields the sidecar's gRPC address and the pid whose CPU it uses."""
    if mode == "inprocess":
        settings = SidecarSettings(
            db_path=db,
            grpc_listen="127.0.0.1:0",
            http_listen=None,
            synchronous=synchronous,  # type: ignore[arg-type]
            stateful_history=stateful,
        )
        with SidecarThread(settings) as thread:
            yield thread.grpc_address, os.getpid()
        return
    cmd = [sys.executable, "-m", "gateway.sidecar.server", "--db", str(db)]
    cmd += ["--listen", "127.0.0.1:0", "--http-listen", "none", "--synchronous", synchronous]
    cmd += ["--log-level", "WARNING"]
    if not stateful:
        cmd += ["--no-stateful-history"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith(READY_MARKER):
                yield json.loads(line[len(READY_MARKER) :])["grpc_address"], proc.pid
                break
        else:
            raise RuntimeError("the sidecar process exited before it was ready")
    finally:
        proc.kill()
        proc.wait()


@contextmanager
def workers(address: str, count: int) -> Iterator[list[int]]:
    """`count` worker processes, or (count == 0) a worker in this process."""
    if count == 0:
        runtime = start_runtime(address)
        try:
            yield [os.getpid()]
        finally:
            runtime.shutdown()
        return
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "bench.workloads", address],
            cwd=REPO,
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(count)
    ]
    try:
        for p in procs:
            assert p.stdout is not None and p.stdout.readline().strip() == "ready"
        yield [p.pid for p in procs]
    finally:
        for p in procs:
            p.kill()
            p.wait()


async def run_one(client: DaprWorkflowClient, workflow: str, value: Any) -> float:
    t0 = time.perf_counter()
    iid = await client.schedule_new_workflow(workflow, input=value)
    state = await client.wait_for_workflow_completion(iid, timeout_in_seconds=120)
    elapsed = time.perf_counter() - t0
    if state is None or state.runtime_status.name != "COMPLETED":
        raise RuntimeError(f"workflow {iid} ended as {state}")
    return elapsed


async def sequential(client: DaprWorkflowClient, workflow: str, n: int) -> dict[str, float]:
    for i in range(min(20, n)):
        await run_one(client, workflow, i)
    return percentiles([await run_one(client, workflow, i) for i in range(n)])


async def throughput(
    client: DaprWorkflowClient, total: int, concurrency: int, pids: set[int]
) -> dict[str, Any]:
    gate = asyncio.Semaphore(concurrency)

    async def limited(i: int) -> float:
        async with gate:
            return await run_one(client, "one_activity", i)

    cpu0 = {pid: cpu_seconds(pid) for pid in pids}
    t0 = time.perf_counter()
    latencies = await asyncio.gather(*(limited(i) for i in range(total)))
    elapsed = time.perf_counter() - t0
    cpu = {str(pid): round((cpu_seconds(pid) - cpu0[pid]) / elapsed, 2) for pid in pids}
    return {
        "throughput_wfps": round(total / elapsed, 1),
        "latency_ms": percentiles(list(latencies)),
        "cores_used_by_pid": cpu,
    }


def measure(
    args: argparse.Namespace, mode: str, synchronous: str, n_workers: int
) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        with sidecar(mode, Path(tmp) / "engine.db", synchronous, True) as (address, sc_pid):
            with workers(address, n_workers) as worker_pids:
                host, _, port = address.rpartition(":")

                async def main() -> dict[str, Any]:
                    client = DaprWorkflowClient(host=host, port=port, logger_options=QUIET)
                    out: dict[str, Any] = {}
                    out["seq_1_activity_ms"] = await sequential(client, "one_activity", args.n)
                    out["seq_5_activity_ms"] = await sequential(
                        client, "five_activities", max(args.n // 2, 1)
                    )
                    pids = {sc_pid, os.getpid(), *worker_pids}
                    out.update(await throughput(client, args.workflows, args.concurrency, pids))
                    return out

                result = asyncio.run(main())
    roles = {"sidecar": sc_pid, "bench": os.getpid()}
    return {
        "mode": mode,
        "synchronous": synchronous,
        "worker_processes": n_workers,
        "pids": roles,
        **result,
    }


# Result sizes of the scaling runs: small results, and results the size of an LLM answer.
RESULT_BYTES = (16, 10_000)


async def scaling_run(address: str, stateful: bool, sizes: list[int]) -> list[dict[str, Any]]:
    host, _, port = address.rpartition(":")
    client = DaprWorkflowClient(host=host, port=port, logger_options=QUIET)
    await run_one(client, "n_activities", [1, 16])
    rows = []
    for size in RESULT_BYTES:
        for n in sizes:
            runs = [await run_one(client, "n_activities", [n, size]) for _ in range(3)]
            median = statistics.median(runs) * 1000
            rows.append(
                {
                    "activities": n,
                    "result_bytes": size,
                    "stateful_history": stateful,
                    "ms_per_workflow": round(median, 1),
                    "ms_per_activity": round(median / n, 2),
                }
            )
    return rows


def scaling(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Time of one workflow of n sequential activities, stateful history on and off."""
    rows = []
    for stateful in (True, False):
        with tempfile.TemporaryDirectory() as tmp:
            with sidecar("standalone", Path(tmp) / "e.db", "FULL", stateful) as (address, _):
                with workers(address, 0):
                    rows += asyncio.run(scaling_run(address, stateful, args.scaling))
    return rows


def dbos_baseline(args: argparse.Namespace) -> dict[str, Any] | None:
    cmd = [sys.executable, "-m", "bench.dbos_baseline", "--n", str(args.n)]
    cmd += ["--workflows", str(args.workflows), "--concurrency", str(args.concurrency)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        print(f"DBOS baseline did not run: {proc.stderr.strip()[-500:]}", file=sys.stderr)
        return None
    return json.loads(proc.stdout)


def label(r: dict[str, Any]) -> str:
    if r["mode"] != "standalone":
        workers = ""
    elif r["worker_processes"]:
        workers = f", {r['worker_processes']} worker processes"
    else:
        workers = ", worker in client process"
    return f"{r['mode']} {r['synchronous']}{workers}"


def draw(doc: dict[str, Any], out_dir: Path) -> list[Path]:
    """Bar charts of throughput and latency against the baseline, and the history scaling."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    rows = doc["results"]
    base = doc.get("baseline")
    names = [label(r) for r in rows] + ([f"DBOS {base['version']} (sqlite)"] if base else [])
    tput = [r["throughput_wfps"] for r in rows] + ([base["throughput_wfps"]] if base else [])
    p50 = [r["seq_1_activity_ms"]["p50"] for r in rows]
    p99 = [r["seq_1_activity_ms"]["p99"] for r in rows]
    if base:
        p50.append(base["seq_1_activity_ms"]["p50"])
        p99.append(base["seq_1_activity_ms"]["p99"])
    written = []

    fig, ax = plt.subplots(figsize=(9, 4.5))
    colors = ["tab:blue"] * len(rows) + (["tab:gray"] if base else [])
    ax.barh(names, tput, color=colors)
    ax.axvline(TARGET["throughput_wfps"], color="tab:red", linestyle="--", label="target")
    ax.set_xlabel(
        f"workflows/s ({doc['job']['workflows']} single-activity, "
        f"{doc['job']['concurrency']} in flight)"
    )
    ax.legend()
    fig.tight_layout()
    written.append(out_dir / "engine-throughput.png")
    fig.savefig(written[-1], dpi=110)

    fig, ax = plt.subplots(figsize=(9, 4.5))
    y = range(len(names))
    ax.barh([i + 0.2 for i in y], p50, height=0.4, label="p50", color="tab:blue")
    ax.barh([i - 0.2 for i in y], p99, height=0.4, label="p99", color="tab:orange")
    ax.set_yticks(list(y), names)
    ax.axvline(TARGET["seq_p50_ms"], color="tab:red", linestyle="--", label="p50 target")
    ax.set_xlabel("sequential 1-activity workflow, start to result (ms)")
    ax.legend()
    fig.tight_layout()
    written.append(out_dir / "engine-latency.png")
    fig.savefig(written[-1], dpi=110)

    if doc["history_scaling"]:
        fig, ax = plt.subplots(figsize=(7, 4))
        for size in RESULT_BYTES:
            for stateful in (True, False):
                pts = [
                    r
                    for r in doc["history_scaling"]
                    if r["stateful_history"] is stateful and r["result_bytes"] == size
                ]
                how = "stateful history" if stateful else "full history every turn"
                ax.plot(
                    [r["activities"] for r in pts],
                    [r["ms_per_workflow"] for r in pts],
                    marker="o",
                    label=f"{how}, {size} B results",
                )
        ax.set_xlabel("sequential activities in one workflow")
        ax.set_ylabel("ms per workflow")
        ax.legend()
        fig.tight_layout()
        written.append(out_dir / "engine-history-scaling.png")
        fig.savefig(written[-1], dpi=110)
    plt.close("all")
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=200, help="sequential runs per latency figure")
    parser.add_argument("--workflows", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--modes", default="inprocess,standalone")
    parser.add_argument("--synchronous", default="FULL,NORMAL")
    parser.add_argument(
        "--worker-processes",
        default="0,1",
        help="worker layouts for standalone runs: 0 = worker in the bench process, K = K processes",
    )
    parser.add_argument(
        "--scaling", type=lambda s: [int(x) for x in s.split(",") if x], default=[10, 25, 50]
    )
    parser.add_argument("--no-baseline", action="store_true", help="skip the DBOS baseline")
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    parser.add_argument("--png", type=Path, help="draw charts into this folder")
    args = parser.parse_args(argv)

    configs = []
    for mode in filter(None, args.modes.split(",")):
        layouts = (
            [int(k) for k in args.worker_processes.split(",")] if mode == "standalone" else [0]
        )
        for sync in args.synchronous.split(","):
            for k in layouts:
                print(f"running {mode} {sync} workers={k}", file=sys.stderr)
                configs.append(measure(args, mode, sync, k))
    doc: dict[str, Any] = {
        "benchmark": "engine",
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
        "job": {
            "sequential_runs": args.n,
            "workflows": args.workflows,
            "concurrency": args.concurrency,
        },
        "results": configs,
        "history_scaling": scaling(args) if args.scaling else [],
        "target": TARGET,
        "issue_baseline": ISSUE_BASELINE,
    }
    if not args.no_baseline:
        base = dbos_baseline(args)
        doc["baseline"] = base
        if base:
            doc["ratios_vs_dbos"] = [
                {
                    "mode": r["mode"],
                    "synchronous": r["synchronous"],
                    "worker_processes": r["worker_processes"],
                    "throughput_x": round(r["throughput_wfps"] / base["throughput_wfps"], 2),
                    "seq_p50_speedup_x": round(
                        base["seq_1_activity_ms"]["p50"] / r["seq_1_activity_ms"]["p50"], 2
                    ),
                }
                for r in configs
            ]
    emit(doc, args.out, args.png, draw)
    return 0


if __name__ == "__main__":
    sys.exit(main())
