"""DBOS baseline: the engine benchmark's job run on DBOS 3.4 with its SQLite system database.

- sequential latency (p50/p90/p99) of a 1-step and a 5-step workflow, start to result, each
  after 20 warm-up runs;
- throughput of WORKFLOWS single-step workflows with CONCURRENCY in flight (asyncio gated by a
  semaphore, as bench.engine_bench does);
- cpu_seconds: CPU (user + system) this process used during the throughput phase; DBOS and its
  SQLite database both run inside it.

Workflows and steps are async, started with `DBOS.start_workflow_async` and awaited with
`handle.get_result()`.

Default DBOS settings (SQLite's own defaults: rollback journal, synchronous FULL) in a fresh
temporary directory, removed on exit. Prints one JSON object on stdout; logs go to stderr.
Run it in a fresh process: `python -m bench.dbos_baseline [--n 200] [--workflows 1000]
[--concurrency 32]`.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import logging
import sys
import tempfile
import time
from collections.abc import Callable, Coroutine
from importlib import metadata
from pathlib import Path
from typing import Any

from bench.measure import percentiles

WARMUP = 20
Workflow = Callable[[int], Coroutine[Any, Any, int]]


async def job(args: argparse.Namespace) -> dict[str, Any]:
    from dbos import DBOS

    @DBOS.step()
    async def echo(value: int) -> int:
        return value

    @DBOS.workflow()
    async def one_step(value: int) -> int:
        return await echo(value)

    @DBOS.workflow()
    async def five_steps(value: int) -> int:
        for _ in range(5):
            value = await echo(value)
        return value

    async def run_one(workflow: Workflow, value: int) -> float:
        t0 = time.perf_counter()
        handle = await DBOS.start_workflow_async(workflow, value)
        result = await handle.get_result()
        elapsed = time.perf_counter() - t0
        if result != value:
            raise RuntimeError(f"workflow returned {result!r}, expected {value!r}")
        return elapsed

    async def sequential(workflow: Workflow, n: int) -> dict[str, float]:
        for i in range(min(WARMUP, n)):
            await run_one(workflow, i)
        return percentiles([await run_one(workflow, i) for i in range(n)])

    gate = asyncio.Semaphore(args.concurrency)

    async def limited(i: int) -> float:
        async with gate:
            return await run_one(one_step, i)

    out: dict[str, Any] = {
        "seq_1_activity_ms": await sequential(one_step, args.n),
        "seq_5_activity_ms": await sequential(five_steps, max(args.n // 2, 1)),
    }
    cpu0, t0 = time.process_time(), time.perf_counter()
    latencies = await asyncio.gather(*(limited(i) for i in range(args.workflows)))
    elapsed, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    out.update(
        throughput_wfps=round(args.workflows / elapsed, 1),
        concurrency=args.concurrency,
        workflows=args.workflows,
        cpu_seconds=round(cpu, 2),
        cores_used=round(cpu / elapsed, 2),
        latency_ms=percentiles(list(latencies)),
    )
    return out


def run(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    from dbos import DBOS, DBOSConfig

    config: DBOSConfig = {
        "name": "dbos-baseline",
        "system_database_url": f"sqlite:///{tmp / 'dbos.sqlite'}",
        "log_level": "WARNING",
    }
    DBOS(config=config)
    DBOS.launch()
    try:
        figures = asyncio.run(job(args))
    finally:
        DBOS.destroy(destroy_registry=True)
    head = {"system": "dbos", "version": metadata.version("dbos"), "database": "sqlite"}
    return {**head, **figures}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--n", type=int, default=200, help="sequential runs per latency figure")
    parser.add_argument("--workflows", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=32)
    args = parser.parse_args(argv)
    if min(args.n, args.workflows, args.concurrency) < 1:
        parser.error("--n, --workflows and --concurrency must be at least 1")
    if importlib.util.find_spec("dbos") is None:
        sys.exit("bench.dbos_baseline: dbos is not installed; pip install 'dbos>=3.4,<3.5'")
    logging.basicConfig(stream=sys.stderr, level=logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="dbos-baseline-") as tmp:
        result = run(args, Path(tmp))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
