"""What the system-level benchmarks (load, capacity, recovery) share: a gateway in its own
process (and its sidecar child), its memory, SIGKILL of both, JWT-SVIDs for many principals
and tenants, and the A2A JSON-RPC calls they make.

The gateway runs as `python -m bench.harness serve --config C --data-dir D`, which prints a
ready line with the URL once the front doors accept requests. The embedded sidecar is a child
of the gateway in a session of its own (see `gateway.runtime`), so a crash of the machine's
processes is a SIGKILL of both groups, which `GatewayProcess.crash` does.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import yaml

from bench.mcp_bench import children, role_of, start_time

REPO = Path(__file__).resolve().parents[1]
READY_MARKER = "DURAGATE-BENCH-READY "
START_TIMEOUT_SECONDS = 90.0
A2A_HEADERS = {"A2A-Version": "1.0"}
TRACEMALLOC_ENV = "DURAGATE_BENCH_TRACEMALLOC"
TRUST_DOMAIN = "example.org"
AUDIENCE = "duragate"


# ---------------------------------------------------------------------------------------------
# memory


def rss_mb(pid: int) -> float | None:
    """Resident set size of a live process (VmRSS), in MB; None once it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def slope_per_minute(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of (seconds, MB) points, in MB per minute."""
    n = len(points)
    if n < 2:
        return 0.0
    mean_t = sum(t for t, _ in points) / n
    mean_v = sum(v for _, v in points) / n
    var = sum((t - mean_t) ** 2 for t, _ in points)
    if var == 0:
        return 0.0
    cov = sum((t - mean_t) * (v - mean_v) for t, v in points)
    return cov / var * 60


# ---------------------------------------------------------------------------------------------
# the gateway process


@dataclass
class GatewayProcess:
    """A gateway started by `start_gateway`: its URL, pid and sidecar pid, its log."""

    proc: subprocess.Popen[bytes]
    url: str
    log: Path
    started_at: float  # time.time() just before the process was started
    ready_at: float  # time.time() when it printed its ready line
    sidecar: int | None = None
    _seen: dict[int, int | None] = field(default_factory=dict)

    @property
    def base(self) -> str:
        return self.url.removesuffix("/mcp")

    @property
    def pid(self) -> int:
        return self.proc.pid

    def rss(self) -> dict[str, float | None]:
        gateway = rss_mb(self.pid)
        # No sidecar process with the engine in the gateway (engine.sidecar: inprocess).
        sidecar = rss_mb(self.sidecar) if self.sidecar else None
        total = None if gateway is None else gateway + (sidecar or 0.0)
        return {"gateway": gateway, "sidecar": sidecar, "total": total}

    def crash(self) -> None:
        """SIGKILL the gateway's process group and the sidecar's, at once: no clean shutdown
        of either, as when the machine's processes die."""
        groups = [self.pid] + ([self.sidecar] if self.sidecar else [])
        for group in groups:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(group, signal.SIGKILL)
        self.proc.wait()
        self._wait_gone()

    def stop(self) -> None:
        """SIGTERM (the gateway stops its engine cleanly), SIGKILL after 10 s; then make sure
        the sidecar it started is gone too (only that process: checked by its start time)."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.pid, signal.SIGKILL)
                self.proc.wait()
        self._wait_gone(kill_after=5.0)

    def _wait_gone(self, kill_after: float = 5.0) -> None:
        deadline = time.monotonic() + kill_after
        for pid, started in self._seen.items():
            while started is not None and start_time(pid) == started:
                if time.monotonic() > deadline:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                    break
                time.sleep(0.05)


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


def start_gateway(
    config: Path, data_dir: Path, log: Path, env: dict[str, str] | None = None
) -> GatewayProcess:
    """Start the gateway in its own process group and wait for its ready line. Its stdout goes
    to a file next to `log` (a pipe nobody reads after the start could fill and stall it)."""
    cmd = [sys.executable, "-m", "bench.harness", "serve", "--config", str(config)]
    cmd += ["--data-dir", str(data_dir)]
    out = log.with_suffix(".out")
    started_at = time.time()
    with log.open("ab") as err, out.open("wb") as stdout:
        proc = subprocess.Popen(
            cmd,
            cwd=REPO,
            env=child_env(env),
            stdout=stdout,
            stderr=err,
            start_new_session=True,
        )
    try:
        url, ready_at = _wait_ready(proc, out, log)
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise
    gateway = GatewayProcess(proc, url, log, started_at, ready_at)
    for child in children(proc.pid):
        gateway._seen[child] = start_time(child)
        if role_of(child) == "sidecar":
            gateway.sidecar = child
    return gateway


def _wait_ready(proc: subprocess.Popen[bytes], out: Path, log: Path) -> tuple[str, float]:
    deadline = time.monotonic() + START_TIMEOUT_SECONDS
    while time.monotonic() < deadline:
        for line in out.read_text(errors="replace").splitlines():
            if line.startswith(READY_MARKER):
                return json.loads(line[len(READY_MARKER) :])["url"], time.time()
        if proc.poll() is not None:
            tail = log.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"the gateway exited ({proc.returncode}) at start:\n{tail}")
        time.sleep(0.02)
    raise RuntimeError(f"the gateway was not ready in {START_TIMEOUT_SECONDS:g} s; see {log}")


async def _trace_memory(setting: str) -> None:
    """A diagnostic for memory growth (`DURAGATE_BENCH_TRACEMALLOC=T1,T2,FILE` in the gateway's
    environment): trace allocations, snapshot at T1 and T2 seconds after start, and write the
    30 places whose live memory grew most between the two to FILE."""
    import tracemalloc

    first, second, path = setting.split(",", 2)
    tracemalloc.start(8)
    await asyncio.sleep(float(first))
    before = tracemalloc.take_snapshot()
    await asyncio.sleep(float(second) - float(first))
    after = tracemalloc.take_snapshot()
    lines = []
    for stat in after.compare_to(before, "traceback")[:30]:
        lines.append(f"{stat.size_diff / 1024:+.1f} KiB in {stat.count_diff:+d} blocks")
        lines.extend("    " + line for line in stat.traceback.format()[-8:])
    Path(path).write_text("\n".join(lines) + "\n")


def serve_main(argv: list[str]) -> int:
    import logging

    from gateway.config import load_config
    from gateway.server import serve

    parser = argparse.ArgumentParser(prog="python -m bench.harness serve")
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)

    def ready(url: str) -> None:
        print(READY_MARKER + json.dumps({"url": url}), flush=True)

    async def main() -> None:
        trace = os.environ.get(TRACEMALLOC_ENV)
        tracer = asyncio.ensure_future(_trace_memory(trace)) if trace else None
        # `serve` leaves SIGTERM to its caller: cancelling it stops the engine cleanly.
        task = asyncio.ensure_future(
            serve(load_config(args.config), args.data_dir, port=args.port, on_ready=ready)
        )
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
        with contextlib.suppress(asyncio.CancelledError):
            await task
        if tracer is not None:
            tracer.cancel()

    asyncio.run(main())
    return 0


# ---------------------------------------------------------------------------------------------
# configuration: tools, tenants, principals


@dataclass
class Principals:
    """A development CA and the JWT-SVIDs of `per_tenant` principals in each tenant."""

    ca: Any
    tenants: list[str]
    per_tenant: int
    ttl: timedelta
    _tokens: dict[str, str] = field(default_factory=dict)

    def ids(self, tenant: str) -> list[str]:
        return [f"spiffe://{TRUST_DOMAIN}/{tenant}/p{i}" for i in range(self.per_tenant)]

    def all_ids(self) -> list[str]:
        return [p for t in self.tenants for p in self.ids(t)]

    def token(self, spiffe_id: str) -> str:
        if spiffe_id not in self._tokens:
            self._tokens[spiffe_id] = self.ca.issue_jwt_svid(spiffe_id, AUDIENCE, ttl=self.ttl)
        return self._tokens[spiffe_id]


def write_config(
    tmp: Path,
    tools: list[dict[str, Any]],
    policies: dict[str, str] | None = None,
    principals: Principals | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """A gateway config on loopback with the embedded engine (SQLite FULL): `tools`, the
    tenant policy files `policies` ({tenant: yaml}), and JWT-SVID callers from `principals`'
    CA (or anonymous callers without it)."""
    config: dict[str, Any] = {
        "listen": {"host": "127.0.0.1", "port": 0},
        "engine": {"kind": "embedded", "synchronous": "FULL"},
        "tools": tools,
    }
    if principals is None:
        config["identity"] = {"allow_anonymous": True}
    else:
        config["identity"] = {
            "trust_domain": TRUST_DOMAIN,
            "audience": AUDIENCE,
            "bundles": {TRUST_DOMAIN: str(tmp / "ca" / "bundle.json")},
            "tenants": [
                {"match": f"spiffe://{TRUST_DOMAIN}/{t}/**", "tenant": t}
                for t in principals.tenants
            ],
            "require_tenant_rule": True,
        }
    if policies:
        folder = tmp / "policies"
        folder.mkdir(exist_ok=True)
        for tenant, text in policies.items():
            (folder / f"{tenant}.yaml").write_text(text)
        config["policy"] = {"dir": str(folder)}
    config.update(extra or {})
    path = tmp / "gateway.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def make_principals(tmp: Path, tenants: int, per_tenant: int, ttl: timedelta) -> Principals:
    from identity.dev_ca import DevCA

    ca = DevCA.create(tmp / "ca", TRUST_DOMAIN)
    return Principals(ca, [f"team-{i}" for i in range(tenants)], per_tenant, ttl)


# ---------------------------------------------------------------------------------------------
# A2A JSON-RPC


class RpcError(RuntimeError):
    pass


def a2a_message(skill: str, data: dict[str, Any]) -> dict[str, Any]:
    return {
        "messageId": uuid.uuid4().hex,
        "role": "ROLE_USER",
        "parts": [{"data": data}],
        "metadata": {"skill": skill},
    }


async def a2a_rpc(
    http: httpx.AsyncClient,
    base: str,
    method: str,
    params: dict[str, Any],
    token: str | None = None,
) -> dict[str, Any]:
    """One JSON-RPC call to /a2a; the `result`, or RpcError with the error or the status."""
    headers = dict(A2A_HEADERS)
    if token:
        headers["Authorization"] = f"Bearer {token}"
    body = {"jsonrpc": "2.0", "id": 1, "method": method, "params": params}
    response = await http.post(f"{base}/a2a", json=body, headers=headers)
    if response.status_code != 200:
        raise RpcError(f"{method}: HTTP {response.status_code}: {response.text[:300]}")
    answer = response.json()
    if "error" in answer:
        raise RpcError(f"{method}: {answer['error']}")
    result: dict[str, Any] = answer["result"]
    return result


def task_of(result: dict[str, Any]) -> dict[str, Any]:
    """The task in a SendMessage result (the 1.0 `{"task": ...}` form)."""
    task: dict[str, Any] = result.get("task", result)
    return task


def state_of(task: dict[str, Any]) -> str:
    return str(task.get("status", {}).get("state", ""))


def artifact_data(task: dict[str, Any]) -> Any:
    """The data part of the task's first artifact (the tool's result)."""
    for artifact in task.get("artifacts", []):
        for part in artifact.get("parts", []):
            if "data" in part:
                return part["data"]
    return None


async def bounded(jobs: list[Any], concurrency: int) -> list[Any]:
    """Await the coroutines in `jobs` with at most `concurrency` at a time, results in order
    (an exception is returned in its place, not raised)."""
    semaphore = asyncio.Semaphore(concurrency)

    async def one(job: Any) -> Any:
        async with semaphore:
            return await job

    return await asyncio.gather(*(one(j) for j in jobs), return_exceptions=True)


def exit_on_sigterm() -> None:
    """Turn SIGTERM into SystemExit, so that the `finally` blocks stop the gateways started."""

    def handler(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)


def load_avg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


if __name__ == "__main__":
    if sys.argv[1:2] == ["serve"]:
        sys.exit(serve_main(sys.argv[2:]))
    print("usage: python -m bench.harness serve --config C --data-dir D", file=sys.stderr)
    sys.exit(2)
