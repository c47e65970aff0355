"""Start-up cost of a gateway: time from `duragate serve` to `/readyz` 200, and memory.

    python -m bench.startup [--config config/gateway.yaml] [--runs 3] [--call TOOL --args JSON]

Each run starts `duragate serve` on a free loopback port with a fresh data directory, polls
`/readyz` until it answers 200 and reads the CPU time spent so far (user + system; steadier than
the wall time on a shared machine) and the resident memory (VmRSS, Linux /proc) of the gateway
process and of the whole process tree (the embedded sidecar is a child process). With `--call`,
one call of TOOL is then made over MCP (the real client) and the memory read again: what the
first use of a lazily loaded tool costs. Prints one JSON document (medians over the runs).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from bench.measure import cpu_seconds

REPO = Path(__file__).resolve().parents[1]
READY_TIMEOUT = 120.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def tree(pid: int) -> list[int]:
    """`pid` and its descendants (Linux /proc)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        parent = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(parent, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        todo.extend(children.get(current, []))
    return found


def memory(pid: int) -> dict[str, float]:
    total = 0.0
    for member in tree(pid):
        try:
            total += rss_mib(member)
        except OSError:
            pass
    return {"gateway_rss_mib": round(rss_mib(pid), 1), "tree_rss_mib": round(total, 1)}


async def call(url: str, tool: str, arguments: dict[str, Any]) -> float:
    from mcp import ClientSession
    from mcp.client.streamable_http import streamable_http_client

    started = time.monotonic()
    async with streamable_http_client(url) as (read, write, _):
        async with ClientSession(read, write) as session:
            await session.initialize()
            result = await session.call_tool(tool, arguments)
    if result.isError:
        raise RuntimeError(f"{tool} failed: {result.content}")
    return time.monotonic() - started


def one_run(config: Path, tool: str | None, arguments: dict[str, Any]) -> dict[str, float]:
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="duragate-startup-") as data:
        command = [sys.executable, "-m", "gateway", "--data-dir", data, "serve"]
        command += ["--config", str(config), "--port", str(port)]
        env = {**os.environ, "DURAGATE_LOG_LEVEL": "warning"}
        started = time.monotonic()
        proc = subprocess.Popen(command, cwd=REPO, env=env, stderr=subprocess.DEVNULL)
        try:
            ready, cpu = None, 0.0
            while time.monotonic() - started < READY_TIMEOUT:
                if proc.poll() is not None:
                    raise RuntimeError(f"the gateway exited with {proc.returncode}")
                try:
                    if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200:
                        ready = time.monotonic() - started
                        cpu = cpu_seconds(proc.pid)
                        break
                except httpx.HTTPError:
                    pass
                time.sleep(0.02)
            if ready is None:
                raise RuntimeError("the gateway was not ready in time")
            time.sleep(0.5)  # let start-up work that follows readiness settle
            run: dict[str, float] = {
                "ready_seconds": round(ready, 3),
                "gateway_cpu_seconds_at_ready": round(cpu, 2),
                **memory(proc.pid),
            }
            if tool is not None:
                seconds = asyncio.run(call(f"http://127.0.0.1:{port}/mcp", tool, arguments))
                after = memory(proc.pid)
                run["first_call_seconds"] = round(seconds, 3)
                run["after_call_gateway_rss_mib"] = after["gateway_rss_mib"]
                run["after_call_tree_rss_mib"] = after["tree_rss_mib"]
            return run
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=REPO / "config" / "gateway.yaml")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--call", dest="tool", default=None, help="a tool to call once, after")
    parser.add_argument("--args", default="{}", help="its arguments, JSON")
    options = parser.parse_args()
    runs = [
        one_run(options.config.resolve(), options.tool, json.loads(options.args))
        for _ in range(options.runs)
    ]
    summary = {name: round(statistics.median(r[name] for r in runs), 3) for name in runs[0]}
    doc = {
        "config": str(options.config),
        "call": options.tool,
        "runs": runs,
        "median": summary,
        "load_average": os.getloadavg(),
    }
    print(json.dumps(doc, indent=2))


if __name__ == "__main__":
    main()
