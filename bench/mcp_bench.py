"""MCP benchmark: a trivial `add(a, b)` tool, directly, through FastMCP, and through Duragate.

Measures, in one run, the same tool (`examples.tools:add`) called
- sequentially: 20 warm-up calls, then `--n` calls, one at a time (p50/p90/p99 ms);
- concurrently: `--calls` calls by `--concurrency` (32) workers (calls/s);
through
- `direct`: the Python function called in the benchmark's process (the floor);
- `fastmcp`: a plain FastMCP server of the same mcp SDK, stateless Streamable HTTP, no
  durability, served by uvicorn in its own process (with `json_response` off and on; the better
  figure of the two is the baseline);
- `engine`: the durable part alone, no MCP: a one-activity workflow (the activity returns its
  input) through the unmodified Dapr SDK (aio client and worker in the benchmark's process)
  against the embedded sidecar in its own process (SQLite `FULL`), as `bench.engine_bench`
  measures it. With FastMCP it gives the floor of a durable MCP call built this way: a call
  does the MCP work and then the workflow's, one after the other, on the same cores;
- `duragate`: the gateway (`gateway.server.serve`) in its own process with `bench/mcp_bench.yaml`
  (the add tool, anonymous callers, the embedded engine on a temporary data directory): every
  call is a durable Dapr workflow.
The MCP client is the SDK's own (`streamable_http_client` + `ClientSession`), one session per
worker, reused for all of that worker's calls. Reports Duragate's p50 and throughput as ratios
to FastMCP's, and the CPU cores each process used. `--fastmcp-stateful-sse` adds FastMCP with
the transport settings the gateway uses (stateful sessions, SSE responses) as a diagnostic.

Prints one JSON document on stdout; `--out FILE` also writes it, `--png DIR` draws charts.
The servers are started by this module itself (`python -m bench.mcp_bench serve ...`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from mcp import ClientSession
from mcp.client.streamable_http import streamable_http_client
from mcp.types import CallToolResult, TextContent

from bench.measure import cpu_seconds, emit, percentiles
from examples.tools import add

REPO = Path(__file__).resolve().parents[1]
BENCH_CONFIG = Path(__file__).resolve().with_name("mcp_bench.yaml")
HOST = "127.0.0.1"
WARMUP = 20
START_TIMEOUT_SECONDS = 60.0
# What the issue reports for a plain FastMCP server on this kind of machine.
ISSUE_BASELINE = {"fastmcp": {"seq_p50_ms": 4.8, "throughput_cps": 360.0}}
# Duragate's durable call against the plain FastMCP server measured in the same run.
TARGET = {"p50_ratio_max": 1.5, "throughput_ratio_min": 0.7}


# ---------------------------------------------------------------------------------------------
# measuring


def load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


@dataclass
class Processes:
    """The processes whose CPU a measurement reports, by role."""

    roles: dict[str, int] = field(default_factory=dict)

    def snapshot(self) -> dict[str, float]:
        out = {}
        for role, pid in self.roles.items():
            with contextlib.suppress(OSError):
                out[role] = cpu_seconds(pid)
        return out

    def usage(self, before: dict[str, float], elapsed: float, calls: int) -> dict[str, Any]:
        after = self.snapshot()
        used = {r: after[r] - before[r] for r in before if r in after}
        per_call = {r: round(s * 1000 / calls, 3) for r, s in used.items()}
        if per_call:
            per_call["total"] = round(sum(used.values()) * 1000 / calls, 3)
        return {
            "cores_used": {r: round(s / elapsed, 2) for r, s in used.items()},
            "cpu_ms_per_call": per_call,
        }


Call = Callable[[int], Awaitable[None]]


async def sequential(call: Call, n: int, procs: Processes) -> dict[str, Any]:
    for i in range(WARMUP):
        await call(i)
    samples = []
    load0, cpu0, t0 = load(), procs.snapshot(), time.perf_counter()
    for i in range(n):
        start = time.perf_counter()
        await call(i)
        samples.append(time.perf_counter() - start)
    elapsed = time.perf_counter() - t0
    return {
        "latency_ms": percentiles(samples, digits=4),
        **procs.usage(cpu0, elapsed, n),
        "load_avg": load0,
    }


async def concurrent(
    open_worker: Callable[[], contextlib.AbstractAsyncContextManager[Call]],
    total: int,
    workers: int,
    procs: Processes,
) -> dict[str, Any]:
    """`workers` tasks, each with its own session (opened and warmed before the clock starts),
    take calls from one counter until `total` calls have been made."""
    ready = asyncio.Semaphore(0)
    go = asyncio.Event()
    counter = itertools.count()
    latencies: list[float] = []
    finished: list[float] = []

    async def worker() -> None:
        async with open_worker() as call:
            await call(-1)
            ready.release()
            await go.wait()
            while (i := next(counter)) < total:
                start = time.perf_counter()
                await call(i)
                latencies.append(time.perf_counter() - start)
            finished.append(time.perf_counter())
            ready.release()
            # Keep the session open until every worker is done, so that no session's shutdown
            # runs inside another's measured calls.
            await done.wait()

    done = asyncio.Event()
    tasks = [asyncio.create_task(worker()) for _ in range(workers)]
    try:
        for _ in range(workers):
            await wait_or_fail(ready.acquire(), tasks)
        load0, cpu0 = load(), procs.snapshot()
        t0 = time.perf_counter()
        go.set()
        for _ in range(workers):
            await wait_or_fail(ready.acquire(), tasks)
        elapsed = max(finished) - t0
        usage = procs.usage(cpu0, elapsed, total)
        done.set()
        await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return {
        "throughput_cps": round(total / elapsed, 1),
        "latency_ms": percentiles(latencies, digits=4),
        **usage,
        "load_avg": load0,
    }


async def wait_or_fail(step: Awaitable[Any], tasks: list[asyncio.Task[None]]) -> None:
    """Await `step`, but raise a worker's exception instead of waiting forever for it."""
    waiter = asyncio.ensure_future(step)
    while True:
        await asyncio.wait([waiter, *tasks], return_when=asyncio.FIRST_COMPLETED, timeout=120)
        if waiter.done():
            return
        for task in tasks:
            exc = task.exception() if task.done() and not task.cancelled() else None
            if exc is not None:
                waiter.cancel()
                raise exc
        if all(t.done() for t in tasks):
            waiter.cancel()
            raise RuntimeError("every worker stopped before the benchmark was done")


# ---------------------------------------------------------------------------------------------
# the three ways of calling add


async def measure_direct(args: argparse.Namespace) -> dict[str, Any]:
    # No CPU figures: a whole phase takes less than one clock tick of /proc accounting.
    procs = Processes({})

    async def call(i: int) -> None:
        if add(i, 1) != i + 1:
            raise AssertionError("add is wrong")

    @contextlib.asynccontextmanager
    async def open_worker() -> Any:
        yield call

    return {
        "sequential": await sequential(call, args.n, procs),
        "concurrent": await concurrent(open_worker, args.calls, args.concurrency, procs),
    }


def measure_engine(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    from dapr.ext.workflow.aio import DaprWorkflowClient

    from bench.engine_bench import sidecar
    from bench.workloads import QUIET, start_runtime

    with sidecar("standalone", tmp / "engine.db", "FULL", True) as (address, sidecar_pid):
        runtime = start_runtime(address)
        try:
            procs = Processes({"bench": os.getpid(), "sidecar": sidecar_pid})
            host, _, port = address.rpartition(":")

            async def main() -> dict[str, Any]:
                client = DaprWorkflowClient(host=host, port=port, logger_options=QUIET)

                async def call(i: int) -> None:
                    iid = await client.schedule_new_workflow("one_activity", input=i)
                    state = await client.wait_for_workflow_completion(iid, timeout_in_seconds=60)
                    if state is None or state.serialized_output != str(i):
                        raise RuntimeError(f"workflow {iid} ended as {state}")

                @contextlib.asynccontextmanager
                async def open_worker() -> Any:
                    yield call

                return {
                    "baseline": False,
                    "sequential": await sequential(call, args.n, procs),
                    "concurrent": await concurrent(
                        open_worker, args.calls, args.concurrency, procs
                    ),
                }

            return asyncio.run(main())
        finally:
            runtime.shutdown()


def check(result: CallToolResult, expected: float) -> None:
    if result.isError:
        raise RuntimeError(f"add returned an error: {result.content}")
    value: Any = None
    if isinstance(result.structuredContent, dict):
        value = result.structuredContent.get("result")
    if value is None:
        text = [c.text for c in result.content if isinstance(c, TextContent)]
        value = json.loads(text[0]) if text else None
    if not isinstance(value, int | float) or value != expected:
        raise RuntimeError(f"add returned {result.structuredContent or result.content}")


@contextlib.asynccontextmanager
async def mcp_caller(url: str, info: dict[str, Any] | None = None) -> Any:
    """An initialised MCP session whose `call(i)` calls add(i, 1) and checks the answer.
    `info`, if given, is told whether the server keeps sessions (sends a session id)."""
    async with streamable_http_client(url) as (read, write, session_id):
        async with ClientSession(read, write) as session:
            await session.initialize()
            if info is not None:
                info["stateful_sessions"] = session_id() is not None

            async def call(i: int) -> None:
                check(await session.call_tool("add", {"a": i, "b": 1}), i + 1)

            yield call


async def measure_mcp(args: argparse.Namespace, url: str, procs: Processes) -> dict[str, Any]:
    info: dict[str, Any] = {}
    async with mcp_caller(url, info) as call:
        seq = await sequential(call, args.n, procs)
    conc = await concurrent(lambda: mcp_caller(url), args.calls, args.concurrency, procs)
    return {**info, "sequential": seq, "concurrent": conc}


# ---------------------------------------------------------------------------------------------
# server processes


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def start_time(pid: int) -> int | None:
    """The process's start time (clock ticks since boot): with the pid, its identity."""
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def children(pid: int) -> list[int]:
    """Every live descendant of `pid`."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, IndexError, ValueError):
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            parents.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def role_of(pid: int) -> str:
    with contextlib.suppress(OSError):
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        if "gateway.sidecar" in cmd:
            return "sidecar"
    return f"child {pid}"


async def probe(url: str) -> None:
    async with mcp_caller(url) as call:
        await call(1)


@contextlib.contextmanager
def server(kind: str, extra: list[str], log: Path) -> Iterator[tuple[str, Processes]]:
    """Start `python -m bench.mcp_bench serve KIND` in its own process group; yield the MCP URL
    and its processes once it answers a call; kill the whole group afterwards, come what may."""
    port = free_port()
    cmd = [sys.executable, "-m", "bench.mcp_bench", "serve", kind, "--port", str(port), *extra]
    with log.open("w") as out:
        proc = subprocess.Popen(
            cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    seen: dict[int, int | None] = {}
    try:
        url = f"http://{HOST}:{port}/mcp"
        wait_ready(proc, url, log)
        procs = Processes({"server": proc.pid})
        for child in children(proc.pid):
            seen[child] = start_time(child)
            procs.roles[role_of(child)] = child
        yield url, procs
    finally:
        seen.update({child: start_time(child) for child in children(proc.pid)})
        stop(proc, seen)


def wait_ready(proc: subprocess.Popen[bytes], url: str, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_SECONDS
    error: BaseException | None = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log.read_text(errors="replace")[-3000:]
            raise RuntimeError(
                f"the server exited ({proc.returncode}) before it was ready:\n{tail}"
            )
        try:
            asyncio.run(asyncio.wait_for(probe(url), timeout=10))
            return
        except Exception as exc:
            error = exc
            time.sleep(0.25)
    tail = log.read_text(errors="replace")[-3000:]
    raise RuntimeError(
        f"the server did not answer in {START_TIMEOUT_SECONDS:.0f} s ({error!r}):\n{tail}"
    )


def stop(proc: subprocess.Popen[bytes], others: dict[int, int | None]) -> None:
    """SIGTERM the server's process group, SIGKILL it if the server is not gone after 5 s,
    then SIGKILL any of its descendants `others` (pid: start time) that outlived it. Only these
    processes: a pid is signalled only while it still has the start time it was seen with."""
    # The server is not reaped before proc.wait(), so its pid (the group id) is still ours.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    deadline = time.monotonic() + 5
    for pid, started in others.items():
        while started is not None and start_time(pid) == started:
            if time.monotonic() > deadline:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                break
            time.sleep(0.05)


def serve_fastmcp(port: int, json_response: bool, stateful: bool) -> None:
    import uvicorn
    from mcp.server.fastmcp import FastMCP

    mcp = FastMCP(
        "bench",
        host=HOST,
        port=port,
        stateless_http=not stateful,
        json_response=json_response,
        log_level="WARNING",
    )
    mcp.tool()(add)
    config = uvicorn.Config(
        mcp.streamable_http_app(), host=HOST, port=port, log_level="warning", access_log=False
    )
    uvicorn.Server(config).run()


def serve_duragate(config_path: Path, data_dir: Path, port: int) -> None:
    from gateway.config import load_config
    from gateway.server import serve

    async def main() -> None:
        # `serve` leaves SIGTERM to its caller: stop it by cancelling, so that the gateway
        # stops its engine cleanly.
        task = asyncio.ensure_future(serve(load_config(config_path), data_dir, HOST, port))
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
        with contextlib.suppress(asyncio.CancelledError):
            await task

    asyncio.run(main())


def serve_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.mcp_bench serve")
    parser.add_argument("kind", choices=["fastmcp", "duragate"])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--json-response", action="store_true")
    parser.add_argument("--stateful", action="store_true", help="FastMCP: keep sessions")
    parser.add_argument("--config", type=Path, default=BENCH_CONFIG)
    parser.add_argument("--data-dir", type=Path)
    args = parser.parse_args(argv)
    if args.kind == "fastmcp":
        serve_fastmcp(args.port, args.json_response, args.stateful)
    else:
        if args.data_dir is None:
            parser.error("duragate needs --data-dir")
        serve_duragate(args.config, args.data_dir, args.port)
    return 0


# ---------------------------------------------------------------------------------------------
# the run


def run_server(args: argparse.Namespace, kind: str, extra: list[str], log: Path) -> dict[str, Any]:
    with server(kind, extra, log) as (url, procs):
        procs.roles["bench"] = os.getpid()
        result = asyncio.run(measure_mcp(args, url, procs))
        result["processes"] = {role: pid for role, pid in procs.roles.items()}
        return result


def run(args: argparse.Namespace) -> dict[str, Any]:
    systems: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="mcp-bench-") as name:
        tmp = Path(name)
        if "direct" in args.systems:
            print("running direct", file=sys.stderr)
            systems["direct"] = asyncio.run(measure_direct(args))
        if "fastmcp" in args.systems:
            for json_response in args.fastmcp_json_response:
                key = f"fastmcp json_response={str(json_response).lower()}"
                print(f"running {key}", file=sys.stderr)
                extra = ["--json-response"] if json_response else []
                systems[key] = {
                    "json_response": json_response,
                    "baseline": True,
                    **run_server(args, "fastmcp", extra, tmp / f"fastmcp-{json_response}.log"),
                }
            if args.fastmcp_stateful_sse:
                # Not a baseline: FastMCP with the transport settings Duragate uses, to tell
                # the cost of those settings from the cost of durability.
                key = "fastmcp stateful, SSE (diagnostic)"
                print(f"running {key}", file=sys.stderr)
                systems[key] = {
                    "json_response": False,
                    "baseline": False,
                    **run_server(args, "fastmcp", ["--stateful"], tmp / "fastmcp-stateful.log"),
                }
        if "engine" in args.systems:
            print("running engine", file=sys.stderr)
            systems["engine"] = measure_engine(args, tmp)
        if "duragate" in args.systems:
            print("running duragate", file=sys.stderr)
            data = tmp / "duragate-data"
            data.mkdir()
            extra = ["--config", str(args.config), "--data-dir", str(data)]
            systems["duragate"] = run_server(args, "duragate", extra, tmp / "duragate.log")
    return systems


def summary(systems: dict[str, Any]) -> dict[str, Any]:
    """The headline figures, and Duragate's ratios to the best FastMCP figure of this run."""
    rows = {
        name: {
            "seq_p50_ms": s["sequential"]["latency_ms"]["p50"],
            "seq_p99_ms": s["sequential"]["latency_ms"]["p99"],
            "throughput_cps": s["concurrent"]["throughput_cps"],
        }
        for name, s in systems.items()
    }
    out: dict[str, Any] = {"figures": rows}
    fast = [name for name, s in systems.items() if s.get("baseline")]
    if fast:
        best_p50 = min(fast, key=lambda n: rows[n]["seq_p50_ms"])
        best_tput = max(fast, key=lambda n: rows[n]["throughput_cps"])
        out["fastmcp_baseline"] = {
            "seq_p50_ms": rows[best_p50]["seq_p50_ms"],
            "seq_p50_from": best_p50,
            "throughput_cps": rows[best_tput]["throughput_cps"],
            "throughput_from": best_tput,
        }
        if "duragate" in rows:
            base, ours = out["fastmcp_baseline"], rows["duragate"]
            p50_ratio = round(ours["seq_p50_ms"] / base["seq_p50_ms"], 2)
            tput_ratio = round(ours["throughput_cps"] / base["throughput_cps"], 2)
            out["ratios"] = {
                "duragate_p50_over_fastmcp_p50": p50_ratio,
                "duragate_throughput_over_fastmcp_throughput": tput_ratio,
                "p50_target_met": p50_ratio <= TARGET["p50_ratio_max"],
                "throughput_target_met": tput_ratio >= TARGET["throughput_ratio_min"],
            }
        if "engine" in rows:
            out["floor"] = floor(out["fastmcp_baseline"], rows["engine"], rows.get("duragate"))
    if "duragate" in rows:
        issue = ISSUE_BASELINE["fastmcp"]
        out["ratios_vs_issue_figure"] = {
            "duragate_p50_over_fastmcp_p50": round(
                rows["duragate"]["seq_p50_ms"] / issue["seq_p50_ms"], 2
            ),
            "duragate_throughput_over_fastmcp_throughput": round(
                rows["duragate"]["throughput_cps"] / issue["throughput_cps"], 2
            ),
        }
    return out


def floor(
    base: dict[str, Any], engine: dict[str, Any], duragate: dict[str, Any] | None
) -> dict[str, Any]:
    """The best a durable MCP call made of FastMCP's work and the engine's could do here.

    Latency: the two run one after the other, so their p50s add up. Throughput: the machine is
    CPU-bound in both runs, so the CPU time per call adds up, and calls/s is the harmonic sum.
    Each figure already includes its own client's CPU (the MCP client, the SDK's client), so
    the bound is generous to the durable call."""
    p50 = base["seq_p50_ms"] + engine["seq_p50_ms"]
    tput = 1 / (1 / base["throughput_cps"] + 1 / engine["throughput_cps"])
    out: dict[str, Any] = {
        "seq_p50_ms": round(p50, 3),
        "throughput_cps": round(tput, 1),
        "p50_ratio_to_fastmcp": round(p50 / base["seq_p50_ms"], 2),
        "throughput_ratio_to_fastmcp": round(tput / base["throughput_cps"], 2),
        "engine_alone_p50_ratio_to_fastmcp": round(engine["seq_p50_ms"] / base["seq_p50_ms"], 2),
    }
    if duragate is not None:
        # How much of Duragate's time is its own (policy, audit, routing...) over the floor.
        out["duragate_p50_over_floor"] = round(duragate["seq_p50_ms"] / p50, 2)
        out["duragate_throughput_over_floor"] = round(duragate["throughput_cps"] / tput, 2)
    return out


def draw(doc: dict[str, Any], out_dir: Path) -> list[Path]:
    """Bar charts of throughput and of sequential latency, with the targets drawn in."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    rows = doc["summary"]["figures"]
    base = doc["summary"].get("fastmcp_baseline")
    # The direct call is orders of magnitude off the scale: named in the title instead.
    names = [n for n in rows if n != "direct"]
    direct = rows.get("direct")
    floor = (
        f"direct call: {direct['seq_p50_ms'] * 1000:.1f} \u00b5s p50, "
        f"{direct['throughput_cps'] / 1e6:.1f} M calls/s"
        if direct
        else ""
    )
    colors = ["tab:red" if n == "duragate" else "tab:gray" for n in names]
    written = []

    fig, ax = plt.subplots(figsize=(8, 3.8))
    ax.barh(names, [rows[n]["throughput_cps"] for n in names], color=colors)
    ax.set_title(floor, fontsize=9)
    if base:
        target = base["throughput_cps"] * TARGET["throughput_ratio_min"]
        ax.axvline(target, color="tab:blue", linestyle="--", label="target (0.7x FastMCP)")
        ax.legend()
    job = doc["job"]
    ax.set_xlabel(f"add calls/s ({job['calls']} calls, {job['concurrency']} concurrent)")
    fig.tight_layout()
    written.append(out_dir / "mcp-throughput.png")
    fig.savefig(written[-1], dpi=110)

    fig, ax = plt.subplots(figsize=(8, 3.8))
    y = range(len(names))
    ax.barh([i + 0.2 for i in y], [rows[n]["seq_p50_ms"] for n in names], 0.4, label="p50")
    ax.barh([i - 0.2 for i in y], [rows[n]["seq_p99_ms"] for n in names], 0.4, label="p99")
    ax.set_yticks(list(y), names)
    ax.set_title(floor, fontsize=9)
    if base:
        target = base["seq_p50_ms"] * TARGET["p50_ratio_max"]
        ax.axvline(target, color="tab:red", linestyle="--", label="p50 target (1.5x FastMCP)")
    ax.set_xlabel("sequential add call, ms")
    ax.legend()
    fig.tight_layout()
    written.append(out_dir / "mcp-latency.png")
    fig.savefig(written[-1], dpi=110)
    plt.close("all")
    return written


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def bool_list(text: str) -> list[bool]:
    values = {"true": True, "false": False}
    return [values[x.strip().lower()] for x in text.split(",") if x.strip()]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["serve"]:
        return serve_main(argv[1:])
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--n", type=int, default=200, help="sequential calls after 20 warm-up")
    parser.add_argument("--calls", type=int, default=1000, help="calls in the concurrent phase")
    parser.add_argument("--concurrency", type=int, default=32, help="workers, one session each")
    parser.add_argument(
        "--systems",
        type=lambda s: [x for x in s.split(",") if x],
        default=["direct", "fastmcp", "engine", "duragate"],
        help="any of direct,fastmcp,engine,duragate",
    )
    parser.add_argument(
        "--fastmcp-json-response",
        type=bool_list,
        default=[False, True],
        help="FastMCP variants to run (the best of them is the baseline)",
    )
    parser.add_argument(
        "--fastmcp-stateful-sse",
        action="store_true",
        help="also run FastMCP with stateful sessions and SSE responses (not a baseline)",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="run every system this many times, one after the other; the ratios are taken in "
        "each round and their medians reported (the machine's speed drifts between rounds)",
    )
    parser.add_argument("--config", type=Path, default=BENCH_CONFIG, help="Duragate's config")
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    parser.add_argument("--png", type=Path, help="draw charts into this folder")
    args = parser.parse_args(argv)

    signal.signal(signal.SIGTERM, _exit_on_sigterm)  # so that the servers are stopped
    load_before = load()
    rounds = []
    for i in range(max(1, args.rounds)):
        if args.rounds > 1:
            print(f"round {i + 1} of {args.rounds}", file=sys.stderr)
        rounds.append(run(args))
    systems = rounds[-1]
    doc: dict[str, Any] = {
        "benchmark": "mcp",
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
            "mcp": metadata.version("mcp"),
            "uvicorn": metadata.version("uvicorn"),
            "load_avg_before": load_before,
            "load_avg_after": load(),
        },
        "job": {
            "tool": "examples.tools:add",
            "warmup_calls": WARMUP,
            "sequential_calls": args.n,
            "calls": args.calls,
            "concurrency": args.concurrency,
        },
        "summary": summary(systems),
        "results": systems,
        "target": TARGET,
        "issue_baseline": ISSUE_BASELINE,
    }
    if len(rounds) > 1:
        # `summary` and `results` are the last round's; every round's summary, and the median
        # of each ratio over the rounds, come with them.
        doc["rounds"] = [summary(r) for r in rounds]
        doc["median_over_rounds"] = median_ratios(doc["rounds"])
    emit(doc, args.out, args.png, draw)
    return 0


def median_ratios(summaries: list[dict[str, Any]]) -> dict[str, Any]:
    """The median over rounds of each figure and ratio of `summary`, and the verdicts on it."""
    out: dict[str, Any] = {}
    for section in ("ratios", "ratios_vs_issue_figure"):
        keys = [k for k, v in summaries[0].get(section, {}).items() if not isinstance(v, bool)]
        if keys:
            out[section] = {k: statistics.median(s[section][k] for s in summaries) for k in keys}
    figures: dict[str, dict[str, float]] = {}
    for name in summaries[0]["figures"]:
        for key in ("seq_p50_ms", "throughput_cps"):
            values = [s["figures"][name][key] for s in summaries if name in s["figures"]]
            figures.setdefault(name, {})[key] = statistics.median(values)
    out["figures"] = figures
    ratios = out.get("ratios")
    if ratios:
        ratios["p50_target_met"] = (
            ratios["duragate_p50_over_fastmcp_p50"] <= TARGET["p50_ratio_max"]
        )
        ratios["throughput_target_met"] = (
            ratios["duragate_throughput_over_fastmcp_throughput"] >= TARGET["throughput_ratio_min"]
        )
    return out


if __name__ == "__main__":
    sys.exit(main())
