"""Every benchmark of the project in one run: one JSON summary and charts against the baselines.

    python -m bench.report [--quick] [--only load,capacity] [--figures DIR]

Runs, each as a subprocess (a failure is reported and the rest still run): the engine
(`engine_bench`, with the DBOS-on-SQLite baseline it runs itself), MCP (`mcp_bench`: direct
call, plain FastMCP, Duragate), authentication, policy, and the system benchmarks (load,
capacity, recovery). Each one's JSON (and charts) go into the figures folder (`bench/figures`;
`bench/figures/quick` with `--quick`, which runs small counts), with `report.json`: the machine
(cores, CPU, memory, Python, OS, load average before and after each benchmark), each
benchmark's exit status and time, its JSON, and the headline figures: ratios against the
baselines the issues name (DBOS on SQLite for the engine, plain FastMCP and the direct call for
MCP) and each target, met or not. `report-latency.png` and `report-throughput.png` put the
headline figures side by side.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
FIGURES = Path(__file__).resolve().with_name("figures")


@dataclass(frozen=True)
class Bench:
    name: str  # also the name of its JSON file
    module: str
    full: list[str]
    quick: list[str]
    charts: bool  # takes --png
    timeout_s: float  # full size; quick runs get a quarter of it


BENCHES = [
    Bench(
        "engine",
        "bench.engine_bench",
        ["--worker-processes", "0,2"],
        ["--n", "50", "--workflows", "200", "--modes", "standalone", "--synchronous", "FULL"]
        + ["--worker-processes", "0", "--scaling", "10"],
        True,
        3600,
    ),
    Bench("mcp", "bench.mcp_bench", [], ["--n", "50", "--calls", "200"], True, 1800),
    Bench("auth", "bench.auth_bench", [], ["--n", "500", "--warmup", "50"], False, 600),
    Bench("policy", "bench.policy_bench", [], ["--n", "300"], False, 600),
    Bench("load", "bench.load", [], ["--duration", "10"], True, 900),
    Bench("capacity", "bench.capacity", [], ["--calls", "500"], True, 3600),
    Bench(
        "recovery",
        "bench.recovery",
        [],
        ["--calls", "100", "--seconds", "5", "--running", "30"],
        True,
        3600,
    ),
]


def load_avg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def machine() -> dict[str, Any]:
    cpu = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    memory_mb = None
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                memory_mb = int(line.split()[1]) // 1024
    return {
        "cores": os.cpu_count(),
        "cpu": cpu,
        "memory_mb": memory_mb,
        "python": platform.python_version(),
        "os": platform.platform(),
        "load_avg": load_avg(),
    }


def run_one(bench: Bench, quick: bool, folder: Path) -> dict[str, Any]:
    """Run one benchmark in its own session; SIGTERM it on timeout (each benchmark stops the
    servers it started on SIGTERM), SIGKILL 30 s later."""
    out = folder / f"{bench.name}.json"
    out.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", bench.module, *(bench.quick if quick else bench.full)]
    cmd += ["--out", str(out)]
    if bench.charts:
        cmd += ["--png", str(folder)]
    timeout = bench.timeout_s / 4 if quick else bench.timeout_s
    log = folder / f"{bench.name}.log"
    record: dict[str, Any] = {"command": cmd[1:], "load_avg_before": load_avg()}
    print(f"report: running {bench.name}: {' '.join(cmd[1:])}", file=sys.stderr)
    started = time.monotonic()
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    with log.open("w") as err:
        proc = subprocess.Popen(
            cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=err, start_new_session=True
        )
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            record["timed_out_after_s"] = timeout
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    record["seconds"] = round(time.monotonic() - started, 1)
    record["exit_status"] = proc.returncode
    record["load_avg_after"] = load_avg()
    try:
        record["result"] = json.loads(out.read_text())
    except (OSError, ValueError) as exc:
        record["result"] = None
        tail = log.read_text(errors="replace")[-2000:]
        record["error"] = f"no JSON from {bench.name} ({exc.__class__.__name__}): {tail}"
    else:
        log.unlink()  # kept only when something went wrong
    return record


# ---------------------------------------------------------------------------------------------
# headline figures


def _get(doc: Any, *path: Any) -> Any:
    for key in path:
        if doc is None:
            return None
        try:
            doc = doc[key]
        except (KeyError, IndexError, TypeError):
            return None
    return doc


def headline(runs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    engine = _get(runs, "engine", "result")
    if engine:
        best = max(engine["results"], key=lambda r: r["throughput_wfps"])
        fastest = min(engine["results"], key=lambda r: r["seq_1_activity_ms"]["p50"])
        base = engine.get("baseline")
        row: dict[str, Any] = {
            "best_throughput_wfps": best["throughput_wfps"],
            "best_throughput_config": f"{best['mode']} {best['synchronous']} "
            f"workers={best['worker_processes']}",
            "best_seq_p50_ms": fastest["seq_1_activity_ms"]["p50"],
            "best_seq_p50_config": f"{fastest['mode']} {fastest['synchronous']} "
            f"workers={fastest['worker_processes']}",
            "target": engine.get("target"),
        }
        if base:
            row["dbos_sqlite_baseline"] = {
                "throughput_wfps": base["throughput_wfps"],
                "seq_p50_ms": base["seq_1_activity_ms"]["p50"],
                "version": base.get("version"),
            }
            row["throughput_vs_dbos_x"] = round(
                best["throughput_wfps"] / base["throughput_wfps"], 2
            )
            row["seq_p50_vs_dbos_x"] = round(
                fastest["seq_1_activity_ms"]["p50"] / base["seq_1_activity_ms"]["p50"], 2
            )
        row["targets_met"] = {
            "throughput": best["throughput_wfps"] >= engine["target"]["throughput_wfps"],
            "seq_p50": fastest["seq_1_activity_ms"]["p50"] <= engine["target"]["seq_p50_ms"],
        }
        out["engine"] = row
    mcp = _get(runs, "mcp", "result")
    if mcp:
        figures = mcp["summary"]["figures"]
        row = {
            "duragate": figures.get("duragate"),
            "fastmcp_baseline": mcp["summary"].get("fastmcp_baseline"),
            "direct_call": figures.get("direct"),
            "ratios_vs_fastmcp": mcp["summary"].get("ratios"),
            "target": mcp.get("target"),
        }
        if figures.get("duragate") and figures.get("direct"):
            row["duragate_p50_over_direct_call_x"] = round(
                figures["duragate"]["seq_p50_ms"] / figures["direct"]["seq_p50_ms"]
            )
        out["mcp"] = row
    auth = _get(runs, "auth", "result")
    if auth:
        out["auth"] = {
            "jwt_svid_p50_us_cache_on": auth["cases"]["jwt_svid_cache_on"]["p50_us"],
            "jwt_svid_p50_us_cache_off": auth["cases"]["jwt_svid_cache_off"]["p50_us"],
            "target_p50_us": auth["target_p50_us"],
            "targets_met": auth["meets_target"],
        }
    policy = _get(runs, "policy", "result")
    if policy:
        out["policy"] = {
            "allow_p50_us": policy["decide"]["allow"]["p50_us"],
            "decision_and_admission_p50_us": policy["decide"]["dispatch_decision_and_admission"][
                "p50_us"
            ],
            "target_p50_us": policy["target_p50_us"],
            "targets_met": {
                "allow": policy["allow_p50_within_target"],
                "decision_and_admission": policy["decision_and_admission_p50_within_target"],
            },
        }
    load = _get(runs, "load", "result")
    if load:
        res = load["results"]
        out["load"] = {
            "throughput_cps": res["throughput_cps"],
            "per_front_door": {
                door: {"p50_ms": d["latency_ms"]["p50"], "p99_ms": d["latency_ms"]["p99"]}
                for door, d in res["per_front_door"].items()
            },
            "errors": res["errors"]["count"],
            "gateway_rss_mb": res["memory"]["gateway"]["last_mb"],
            "sidecar_rss_mb": res["memory"]["sidecar"]["last_mb"],
            "rss_flat": res["memory"]["flat"],
            "targets_met": load["targets_met"],
        }
    capacity = _get(runs, "capacity", "result")
    if capacity:
        res = capacity["results"]
        out["capacity"] = {
            "suspended_calls": capacity["job"]["calls"],
            "gateway_rss_mb": res["suspended"]["gateway_rss_max_mb"],
            "sidecar_rss_mb": res["suspended"]["sidecar_rss_max_mb"],
            "total_rss_mb": res["suspended"]["total_rss_max_mb"],
            "approvals_per_s": res["approve"]["approvals_per_s"],
            "drain_s": res["drain"]["seconds_from_first_approval"],
            "target": capacity["target"],
            "targets_met": capacity["targets_met"],
        }
    recovery = _get(runs, "recovery", "result")
    if recovery:
        res = recovery["results"]["after_restart"]
        out["recovery"] = {
            "calls": recovery["job"]["calls"],
            "completed": res["completed"],
            "wrong_results": res["wrong_results"],
            "ran_again": res["ran_again"],
            "ran_again_after_completing": res["ran_again_after_completing"],
            "ready_s": res["ready_s"],
            "first_progress_s": res["first_progress_s"],
            "drain_s": res["drain_s"],
            "target": recovery["target"],
            "targets_met": recovery["targets_met"],
        }
    return out


def draw(report: dict[str, Any], folder: Path) -> list[Path]:
    """Latency and throughput of Duragate against each baseline, side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    head = report["headline"]
    latency: list[tuple[str, float, str]] = []  # (label, ms, color)
    throughput: list[tuple[str, float, str]] = []
    ours, theirs = "tab:red", "tab:gray"
    if "engine" in head:
        e = head["engine"]
        latency.append(("engine: Duragate workflow p50", e["best_seq_p50_ms"], ours))
        throughput.append(("engine: Duragate workflows/s", e["best_throughput_wfps"], ours))
        if "dbos_sqlite_baseline" in e:
            b = e["dbos_sqlite_baseline"]
            latency.append(("engine: DBOS on SQLite p50", b["seq_p50_ms"], theirs))
            throughput.append(("engine: DBOS on SQLite workflows/s", b["throughput_wfps"], theirs))
    if "mcp" in head:
        m = head["mcp"]
        if m.get("duragate"):
            latency.append(("MCP: Duragate p50", m["duragate"]["seq_p50_ms"], ours))
            throughput.append(("MCP: Duragate calls/s", m["duragate"]["throughput_cps"], ours))
        if m.get("fastmcp_baseline"):
            f = m["fastmcp_baseline"]
            latency.append(("MCP: plain FastMCP p50", f["seq_p50_ms"], theirs))
            throughput.append(("MCP: plain FastMCP calls/s", f["throughput_cps"], theirs))
        if m.get("direct_call"):
            latency.append(("direct call p50", m["direct_call"]["seq_p50_ms"], "tab:green"))
    if "load" in head:
        for door, d in head["load"]["per_front_door"].items():
            if door in ("mcp", "a2a (both bindings)"):
                latency.append((f"under mixed load: {door} p50", d["p50_ms"], "tab:orange"))
        throughput.append(
            ("mixed MCP+A2A load calls/s", head["load"]["throughput_cps"], "tab:orange")
        )
    if "capacity" in head:
        throughput.append(("approvals/s (capacity)", head["capacity"]["approvals_per_s"], ours))
    written = []
    folder.mkdir(parents=True, exist_ok=True)
    for name, rows, xlabel, log in (
        ("report-latency.png", latency, "ms (log scale)", True),
        ("report-throughput.png", throughput, "per second", False),
    ):
        if not rows:
            continue
        fig, ax = plt.subplots(figsize=(9, 0.45 * len(rows) + 1.5))
        labels = [r[0] for r in rows]
        ax.barh(labels, [r[1] for r in rows], color=[r[2] for r in rows])
        ax.invert_yaxis()
        if log:
            ax.set_xscale("log")
        for i, (_, value, _) in enumerate(rows):
            ax.text(value, i, f" {value:g}", va="center", fontsize=8)
        ax.set_xlabel(xlabel)
        m = report["machine"]
        ax.set_title(
            f"{m['cores']} cores, Python {m['python']}, load {m['load_avg'][0]} at start"
            + (" (quick run)" if report["quick"] else ""),
            fontsize=9,
        )
        fig.tight_layout()
        written.append(folder / name)
        fig.savefig(written[-1], dpi=110)
    plt.close("all")
    return written


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small counts: minutes, not hours")
    parser.add_argument(
        "--only",
        type=lambda s: [x for x in s.split(",") if x],
        help="a comma-separated subset of: " + ",".join(b.name for b in BENCHES),
    )
    parser.add_argument("--figures", type=Path, help="where to write (default bench/figures)")
    args = parser.parse_args(argv)
    names = [b.name for b in BENCHES]
    for name in args.only or []:
        if name not in names:
            parser.error(f"unknown benchmark {name!r}; choose from {','.join(names)}")
    folder = args.figures or (FIGURES / "quick" if args.quick else FIGURES)
    folder.mkdir(parents=True, exist_ok=True)
    signal.signal(signal.SIGTERM, _exit_on_sigterm)

    report: dict[str, Any] = {
        "report": "duragate benchmarks",
        "quick": args.quick,
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": machine(),
    }
    runs: dict[str, dict[str, Any]] = {}
    for bench in BENCHES:
        if args.only and bench.name not in args.only:
            continue
        runs[bench.name] = run_one(bench, args.quick, folder)
    report["machine"]["load_avg_at_end"] = load_avg()
    report["status"] = {
        name: {
            "ok": run["result"] is not None and run["exit_status"] == 0,
            "exit_status": run["exit_status"],
            "seconds": run["seconds"],
            **({"error": run["error"][:300]} if "error" in run else {}),
        }
        for name, run in runs.items()
    }
    report["headline"] = headline(runs)
    report["runs"] = runs
    path = folder / "report.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    charts = draw(report, folder)
    print(json.dumps({k: report[k] for k in ("machine", "status", "headline")}, indent=2))
    print(f"wrote {path} and {', '.join(str(c) for c in charts)}", file=sys.stderr)
    return 0 if all(s["ok"] for s in report["status"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
