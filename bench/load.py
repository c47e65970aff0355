"""Load and soak: mixed MCP and A2A traffic from many principals of several tenants against one
gateway for a fixed time; throughput, latency per front door, errors, and memory over time.

One gateway (`python -m bench.harness serve`, embedded engine, SQLite FULL, a temporary data
directory) with the `add` and `word_count` tools, JWT-SVID callers from a development CA and
one policy file per tenant. For `--duration` seconds (`--soak S` for long runs):
- `--mcp-workers` workers, each with an MCP session (the SDK's client) of one principal, moving
  to the next principal after `--session-calls` calls (so sessions open and close all along);
- `--a2a-workers` workers calling over A2A, every call as the next principal, alternating the
  JSON-RPC binding (`/a2a`) and the HTTP+JSON binding (`/a2a/rest/message:send`), blocking;
every result is checked. Every `--sample-seconds` the RSS (VmRSS) of the gateway and of its
sidecar child is sampled; the verdict on memory is the least-squares slope over the second
half of the run (the first half is warm-up). Prints one JSON document; `--png DIR` draws charts.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import os
import platform
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
from mcp import ClientSession
from mcp.client.streamable_http import streamable_http_client
from mcp.types import CallToolResult

from bench.harness import (
    A2A_HEADERS,
    GatewayProcess,
    Principals,
    a2a_message,
    a2a_rpc,
    artifact_data,
    exit_on_sigterm,
    load_avg,
    make_principals,
    slope_per_minute,
    start_gateway,
    state_of,
    task_of,
    write_config,
)
from bench.measure import cpu_seconds, emit, percentiles

TOOLS = [
    {"name": "add", "kind": "python", "target": "examples.tools:add", "timeout_seconds": 30},
    {
        "name": "word_count",
        "kind": "python",
        "target": "examples.tools:word_count",
        "timeout_seconds": 30,
    },
]
POLICY = """\
tenant: {tenant}
members: [spiffe://example.org/{tenant}/**]
tools:
  add: {{call: [group:members]}}
  word_count: {{call: [group:members]}}
"""
# Memory is "flat" when the fitted growth over the second half of the run is at most this
# many MB or this share of the process's median RSS, whichever is larger.
FLAT_MB = 3.0
FLAT_SHARE = 0.02
MAX_ERRORS_LISTED = 50


@dataclass
class Recorder:
    """Latencies per front door, every error (the first MAX_ERRORS_LISTED in full)."""

    latencies: dict[str, list[float]] = field(default_factory=dict)
    errors: list[dict[str, Any]] = field(default_factory=list)
    error_count: int = 0
    calls: int = 0
    sessions: int = 0
    t0: float = 0.0

    def ok(self, door: str, seconds: float) -> None:
        self.latencies.setdefault(door, []).append(seconds)
        self.calls += 1

    def error(self, door: str, principal: str, what: str) -> None:
        self.error_count += 1
        if len(self.errors) < MAX_ERRORS_LISTED:
            at = round(time.monotonic() - self.t0, 2)
            self.errors.append({"door": door, "principal": principal, "at_s": at, "error": what})


def job(i: int) -> tuple[str, dict[str, Any], Any]:
    """The i-th call: a tool, its arguments and the result it must give."""
    if i % 2:
        words = " ".join(f"w{k}" for k in range(1 + i % 7))
        return "word_count", {"text": words}, 1 + i % 7
    return "add", {"a": i, "b": 0.5}, i + 0.5


def check(tool: str, value: Any, expected: Any) -> None:
    got = value.get("words") if tool == "word_count" else value.get("result")
    if got != expected:
        raise AssertionError(f"{tool} gave {value!r}, expected {expected!r}")


def mcp_value(result: CallToolResult) -> dict[str, Any]:
    if result.isError or not isinstance(result.structuredContent, dict):
        raise AssertionError(f"error result: {result.content!r}"[:300])
    return result.structuredContent


async def mcp_worker(
    gateway: GatewayProcess,
    principals: list[str],
    tokens: Principals,
    start: int,
    session_calls: int,
    end: float,
    rec: Recorder,
    counter: itertools.count[int],
) -> None:
    for turn in itertools.count():
        if time.monotonic() >= end:
            return
        principal = principals[(start + turn) % len(principals)]
        headers = {"Authorization": f"Bearer {tokens.token(principal)}"}
        try:
            async with (
                httpx.AsyncClient(headers=headers, timeout=60) as http,
                streamable_http_client(gateway.url, http_client=http) as (read, write, _),
                ClientSession(read, write) as session,
            ):
                await session.initialize()
                rec.sessions += 1
                for _ in range(session_calls):
                    if time.monotonic() >= end:
                        break
                    tool, args, expected = job(next(counter))
                    t = time.perf_counter()
                    try:
                        check(tool, mcp_value(await session.call_tool(tool, args)), expected)
                    except Exception as exc:
                        rec.error("mcp", principal, f"{tool}: {exc!r}"[:500])
                        continue
                    rec.ok("mcp", time.perf_counter() - t)
        except Exception as exc:  # the session itself failed (open, transport)
            rec.error("mcp", principal, f"session: {exc!r}"[:500])
            await asyncio.sleep(0.1)


async def a2a_call(
    http: httpx.AsyncClient, base: str, binding: str, token: str, message: dict[str, Any]
) -> dict[str, Any]:
    if binding == "a2a-jsonrpc":
        return task_of(await a2a_rpc(http, base, "SendMessage", {"message": message}, token))
    headers = {**A2A_HEADERS, "Authorization": f"Bearer {token}"}
    response = await http.post(
        f"{base}/a2a/rest/message:send", json={"message": message}, headers=headers
    )
    if response.status_code != 200:
        raise RuntimeError(f"HTTP {response.status_code}: {response.text[:300]}")
    return task_of(response.json())


async def a2a_worker(
    gateway: GatewayProcess,
    principals: list[str],
    tokens: Principals,
    start: int,
    end: float,
    rec: Recorder,
    counter: itertools.count[int],
) -> None:
    async with httpx.AsyncClient(timeout=90) as http:
        for turn in itertools.count():
            if time.monotonic() >= end:
                return
            principal = principals[(start + turn * 7) % len(principals)]
            binding = "a2a-jsonrpc" if turn % 2 == 0 else "a2a-rest"
            tool, args, expected = job(next(counter))
            t = time.perf_counter()
            try:
                task = await a2a_call(
                    http, gateway.base, binding, tokens.token(principal), a2a_message(tool, args)
                )
                if state_of(task) != "TASK_STATE_COMPLETED":
                    raise AssertionError(f"task {task.get('id')} is {state_of(task)}")
                check(tool, artifact_data(task) or {}, expected)
            except Exception as exc:
                rec.error(binding, principal, f"{tool}: {exc!r}"[:500])
                continue
            rec.ok(binding, time.perf_counter() - t)


async def sampler(
    gateway: GatewayProcess, rec: Recorder, every: float, samples: list[dict[str, Any]]
) -> None:
    while True:
        rss = gateway.rss()
        samples.append(
            {"t_s": round(time.monotonic() - rec.t0, 2), "calls": rec.calls, **_rounded(rss)}
        )
        await asyncio.sleep(every)


def _rounded(values: dict[str, float | None]) -> dict[str, float | None]:
    return {k: None if v is None else round(v, 1) for k, v in values.items()}


def memory_verdict(samples: list[dict[str, Any]], duration: float) -> dict[str, Any]:
    """Per process: first, median, last and max RSS, and the slope over the second half."""
    out: dict[str, Any] = {}
    half = duration / 2
    for role in ("gateway", "sidecar", "total"):
        series = [(s["t_s"], s[role]) for s in samples if s.get(role) is not None]
        if not series:
            continue
        values = sorted(v for _, v in series)
        median = values[len(values) // 2]
        second = [(t, v) for t, v in series if t >= half]
        slope = slope_per_minute(second)
        growth = slope * (duration - half) / 60
        allowed = max(FLAT_MB, FLAT_SHARE * median)
        out[role] = {
            "first_mb": series[0][1],
            "median_mb": median,
            "last_mb": series[-1][1],
            "max_mb": values[-1],
            "second_half_slope_mb_per_min": round(slope, 3),
            "second_half_fitted_growth_mb": round(growth, 2),
            "allowed_growth_mb": round(allowed, 2),
            "flat": growth <= allowed,
        }
    out["flat"] = all(out[r]["flat"] for r in ("gateway", "sidecar") if r in out)
    out["rule"] = (
        f"flat: the least-squares growth over the second half is at most "
        f"max({FLAT_MB} MB, {FLAT_SHARE:.0%} of the median RSS), per process"
    )
    return out


async def drive(args: argparse.Namespace, gateway: GatewayProcess, tokens: Principals) -> Any:
    rec = Recorder()
    principals = tokens.all_ids()
    for p in principals:  # issue every token before the clock starts
        tokens.token(p)
    samples: list[dict[str, Any]] = []
    counter = itertools.count()
    cpu_roles = {"gateway": gateway.pid, "bench": os.getpid()}
    if gateway.sidecar:
        cpu_roles["sidecar"] = gateway.sidecar
    cpu0 = {r: cpu_seconds(p) for r, p in cpu_roles.items()}
    load0 = load_avg()
    rec.t0 = time.monotonic()
    end = rec.t0 + args.duration
    sampling = asyncio.create_task(sampler(gateway, rec, args.sample_seconds, samples))
    workers = [
        mcp_worker(gateway, principals, tokens, i * 3, args.session_calls, end, rec, counter)
        for i in range(args.mcp_workers)
    ] + [
        a2a_worker(gateway, principals, tokens, i * 5 + 1, end, rec, counter)
        for i in range(args.a2a_workers)
    ]
    await asyncio.gather(*workers)
    elapsed = time.monotonic() - rec.t0
    sampling.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await sampling
    samples.append({"t_s": round(elapsed, 2), "calls": rec.calls, **_rounded(gateway.rss())})
    alive = {r: p for r, p in cpu_roles.items() if Path(f"/proc/{p}").exists()}
    used = {r: cpu_seconds(p) - cpu0[r] for r, p in alive.items()}
    doors = {
        door: {
            "calls": len(lat),
            "throughput_cps": round(len(lat) / elapsed, 1),
            "latency_ms": percentiles(lat),
        }
        for door, lat in sorted(rec.latencies.items())
    }
    a2a = rec.latencies.get("a2a-jsonrpc", []) + rec.latencies.get("a2a-rest", [])
    if a2a:
        doors["a2a (both bindings)"] = {
            "calls": len(a2a),
            "throughput_cps": round(len(a2a) / elapsed, 1),
            "latency_ms": percentiles(a2a),
        }
    return {
        "elapsed_s": round(elapsed, 2),
        "calls": rec.calls,
        "throughput_cps": round(rec.calls / elapsed, 1),
        "per_front_door": doors,
        "mcp_sessions_opened": rec.sessions,
        "errors": {"count": rec.error_count, "listed": rec.errors},
        "cores_used": {r: round(s / elapsed, 2) for r, s in used.items()},
        "cpu_ms_per_call": {r: round(s * 1000 / max(1, rec.calls), 2) for r, s in used.items()},
        "load_avg_at_start": load0,
        "load_avg_at_end": load_avg(),
        "memory": memory_verdict(samples, elapsed),
        "rss_samples": samples,
    }


def draw(doc: dict[str, Any], out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    res = doc["results"]
    samples = res["rss_samples"]
    t = [s["t_s"] for s in samples]
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    for role in ("gateway", "sidecar", "total"):
        if any(s[role] is not None for s in samples):  # no sidecar process: engine in-process
            ax1.plot(t, [s[role] for s in samples], label=role)
    ax1.set_ylabel("RSS, MB")
    ax1.set_ylim(bottom=0)
    ax1.legend()
    verdict = "flat" if res["memory"]["flat"] else "NOT flat"
    ax1.set_title(f"load: RSS over time ({verdict} over the second half)")
    rates = [0.0] + [
        (b["calls"] - a["calls"]) / max(1e-9, b["t_s"] - a["t_s"])
        for a, b in itertools.pairwise(samples)
    ]
    ax2.plot(t, rates, color="tab:green")
    ax2.set_ylabel("calls/s (all front doors)")
    ax2.set_xlabel("seconds")
    fig.tight_layout()
    written = [out_dir / "load-rss.png"]
    fig.savefig(written[-1], dpi=110)

    doors = [d for d in res["per_front_door"] if d != "a2a (both bindings)"]
    fig, ax = plt.subplots(figsize=(8, 3.5))
    y = range(len(doors))
    lat = [res["per_front_door"][d]["latency_ms"] for d in doors]
    ax.barh([i + 0.2 for i in y], [x["p50"] for x in lat], 0.4, label="p50")
    ax.barh([i - 0.2 for i in y], [x["p99"] for x in lat], 0.4, label="p99")
    ax.set_yticks(list(y), doors)
    ax.set_xlabel(
        f"ms per call under mixed load ({res['throughput_cps']} calls/s in all, "
        f"{doc['job']['mcp_workers']} MCP + {doc['job']['a2a_workers']} A2A workers)"
    )
    ax.legend()
    fig.tight_layout()
    written.append(out_dir / "load-latency.png")
    fig.savefig(written[-1], dpi=110)
    plt.close("all")
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=30.0, help="seconds of load")
    parser.add_argument("--soak", type=float, help="a long run: this many seconds")
    parser.add_argument("--tenants", type=int, default=4)
    parser.add_argument("--principals-per-tenant", type=int, default=10)
    parser.add_argument("--mcp-workers", type=int, default=8, help="concurrent MCP sessions")
    parser.add_argument("--a2a-workers", type=int, default=8, help="concurrent A2A callers")
    parser.add_argument("--session-calls", type=int, default=25, help="MCP calls per session")
    parser.add_argument("--sample-seconds", type=float, help="RSS sampling interval")
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    parser.add_argument("--png", type=Path, help="draw charts into this folder")
    args = parser.parse_args(argv)
    if args.soak:
        args.duration = args.soak
    if args.duration <= 0 or args.duration > 7 * 24 * 3600:
        parser.error("--duration must be between 0 and a week")
    if args.sample_seconds is None:
        args.sample_seconds = max(0.5, args.duration / 200)

    exit_on_sigterm()
    with tempfile.TemporaryDirectory(prefix="duragate-load-") as name:
        tmp = Path(name)
        ttl = timedelta(seconds=args.duration + 900)
        tokens = make_principals(tmp, args.tenants, args.principals_per_tenant, ttl)
        policies = {t: POLICY.format(tenant=t) for t in tokens.tenants}
        config = write_config(tmp, TOOLS, policies, tokens)
        gateway = start_gateway(config, tmp / "data", tmp / "gateway.log")
        try:
            results = asyncio.run(drive(args, gateway, tokens))
        finally:
            gateway.stop()
    doc = {
        "benchmark": "load",
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
        "job": {
            "duration_s": args.duration,
            "tenants": args.tenants,
            "principals": args.tenants * args.principals_per_tenant,
            "mcp_workers": args.mcp_workers,
            "a2a_workers": args.a2a_workers,
            "mcp_calls_per_session": args.session_calls,
            "tools": ["add", "word_count"],
            "engine": "embedded, SQLite FULL",
        },
        "results": results,
        "target": {"errors": 0, "rss": "flat"},
        "targets_met": {
            "zero_errors": results["errors"]["count"] == 0,
            "rss_flat": results["memory"]["flat"],
        },
    }
    emit(doc, args.out, args.png, draw)
    return 0 if results["errors"]["count"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
