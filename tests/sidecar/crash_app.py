"""A small Duragate-shaped program for crash tests: sidecar and workflow worker in one process.

    python -m tests.sidecar.crash_app --db DB --journal JOURNAL --gates DIR
    python -m tests.sidecar.crash_app --sidecar HOST:PORT --journal JOURNAL --gates DIR

Without `--sidecar` it runs, like `duragate serve`, the embedded sidecar in-process
(`SidecarThread`, gRPC on 127.0.0.1:0 unless `--listen`, no HTTP) on the database `--db`, and a
`WorkflowRuntime` worker connected to it. With `--sidecar` it is only a worker, connected to a
sidecar that runs elsewhere. Either way it prints one line once the worker's stream is ready:

    CRASH_APP_READY {"grpc_address": "127.0.0.1:PORT", "pid": PID, "worker": NAME}

Every activity execution appends JSON lines to the journal (flushed and fsynced, O_APPEND so
several processes can share one file): `{"event": "start"}` when it begins and
`{"event": "end"}` when it returns, with the activity name, its input, the workflow instance id,
the task id, the task execution id, the worker name and the pid. The sidecar's answer to the
result is journaled too: `{"event": "ack"}` (accepted, so committed) or `{"event": "nack"}`, with
the instance id, task id and completion token. `gated_step` waits, after its
start line, until the file `<gates>/<input["gate"]>` exists.

The process exits on SIGTERM/SIGINT (cleanly), when its parent dies, or after `--lifetime`
seconds, so that a test that dies never leaves it behind.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Sequence
from datetime import UTC, timedelta
from pathlib import Path
from typing import Any

import dapr.ext.workflow as wf
import grpc
from dapr.ext.workflow.logger import LoggerOptions

if not __package__:  # run by path: make `gateway` importable from the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

READY_MARKER = "CRASH_APP_READY"
GATE_POLL_SECONDS = 0.02
QUIET = LoggerOptions(log_level="WARNING")

log = logging.getLogger("crash_app")


# --- the journal ------------------------------------------------------------------------------


class Journal:
    """Appends one JSON line per record and makes it durable before returning."""

    def __init__(self, path: Path, worker: str) -> None:
        self.worker = worker
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
        self._lock = threading.Lock()

    def record(self, event: str, **fields: Any) -> None:
        line = {
            "event": event,
            **fields,
            "worker": self.worker,
            "pid": os.getpid(),
            "time": time.time(),
        }
        data = (json.dumps(line, sort_keys=True) + "\n").encode()
        with self._lock:
            os.write(self._fd, data)  # one write: a line is never interleaved with another
            os.fsync(self._fd)


JOURNAL: Journal | None = None
GATES: Path = Path(".")


def _run_step(ctx: wf.WorkflowActivityContext, name: str, inp: dict[str, Any]) -> str:
    assert JOURNAL is not None
    inner = ctx.get_inner_context()
    ids = {
        "activity": name,
        "label": inp["label"],
        "input": inp,
        "instance": ctx.workflow_id,
        "task_id": ctx.task_id,
        "task_execution_id": getattr(inner, "task_execution_id", ""),
    }
    JOURNAL.record("start", **ids)
    gate = inp.get("gate")
    if gate:
        gate_path = GATES / gate
        while not gate_path.exists():
            time.sleep(GATE_POLL_SECONDS)
    result = f"{inp['value']}>{inp['label']}"
    JOURNAL.record("end", result=result, **ids)
    return result


class AckRecorder(grpc.UnaryUnaryClientInterceptor):
    """Journals the sidecar's answer to every CompleteActivityTask: "ack" once the sidecar has
    accepted (and so committed) an activity result, "nack" when it refused it."""

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        outcome = continuation(details, request)
        if JOURNAL is not None and details.method.endswith("/CompleteActivityTask"):
            error = outcome.exception()
            JOURNAL.record(
                "ack" if error is None else "nack",
                instance=request.instanceId,
                task_id=request.taskId,
                token=request.completionToken,
                error=None if error is None else f"{error.code()}: {error.details()}",
            )
        return outcome


# --- activities -------------------------------------------------------------------------------


def step(ctx: wf.WorkflowActivityContext, inp: dict[str, Any]) -> str:
    """Returns `<value>><label>` at once."""
    return _run_step(ctx, "step", inp)


def gated_step(ctx: wf.WorkflowActivityContext, inp: dict[str, Any]) -> str:
    """Returns `<value>><label>` once the gate file `inp["gate"]` exists."""
    return _run_step(ctx, "gated_step", inp)


# --- workflows (deterministic: no clocks, randomness or I/O) ----------------------------------


def sequence_wf(ctx: wf.DaprWorkflowContext, inp: dict[str, Any]) -> Any:
    """Three activities in a row; the second waits for the gate `inp["gate"]`."""
    r1 = yield ctx.call_activity(step, input={"label": "s1", "value": inp["value"]})
    r2 = yield ctx.call_activity(
        gated_step, input={"label": "s2", "value": r1, "gate": inp["gate"]}
    )
    r3 = yield ctx.call_activity(step, input={"label": "s3", "value": r2})
    return r3


def timer_wf(ctx: wf.DaprWorkflowContext, inp: dict[str, Any]) -> Any:
    """An activity, a durable timer of `inp["seconds"]`, then an activity told the due time."""
    r1 = yield ctx.call_activity(step, input={"label": "before", "value": inp["value"]})
    fire_at = ctx.current_utc_datetime + timedelta(seconds=inp["seconds"])
    yield ctx.create_timer(timedelta(seconds=inp["seconds"]))
    due = fire_at.replace(tzinfo=UTC).timestamp()
    r2 = yield ctx.call_activity(step, input={"label": "after", "value": r1, "due": due})
    return r2


def child_wf(ctx: wf.DaprWorkflowContext, inp: dict[str, Any]) -> Any:
    """One activity that waits for the gate `inp["gate"]`."""
    result = yield ctx.call_activity(
        gated_step, input={"label": "child", "value": inp["value"], "gate": inp["gate"]}
    )
    return result


def parent_wf(ctx: wf.DaprWorkflowContext, inp: dict[str, Any]) -> Any:
    """An activity, a child workflow (`child_wf`), then an activity on the child's result."""
    r1 = yield ctx.call_activity(step, input={"label": "p1", "value": inp["value"]})
    r2 = yield ctx.call_child_workflow(child_wf, input={"value": r1, "gate": inp["gate"]})
    r3 = yield ctx.call_activity(step, input={"label": "p2", "value": r2})
    return r3


def approval_wf(ctx: wf.DaprWorkflowContext, inp: dict[str, Any]) -> Any:
    """An activity, then waits (forever) for the external event "approve", then an activity."""
    r1 = yield ctx.call_activity(step, input={"label": "prep", "value": inp["value"]})
    approval = yield ctx.wait_for_external_event("approve")
    r2 = yield ctx.call_activity(
        step, input={"label": f"approved-by-{approval['by']}", "value": r1}
    )
    return r2


def chain_wf(ctx: wf.DaprWorkflowContext, inp: dict[str, Any]) -> Any:
    """`inp["steps"]` activities in a row; the first waits for the gate `inp["gate"]`, if any."""
    value = inp["value"]
    for i in range(inp["steps"]):
        args = {"label": f"c{i}", "value": value}
        if i == 0 and inp.get("gate"):
            value = yield ctx.call_activity(gated_step, input={**args, "gate": inp["gate"]})
        else:
            value = yield ctx.call_activity(step, input=args)
    return value


WORKFLOWS = (sequence_wf, timer_wf, child_wf, parent_wf, approval_wf, chain_wf)
ACTIVITIES = (step, gated_step)


# --- the program ------------------------------------------------------------------------------


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tests.sidecar.crash_app")
    parser.add_argument("--db", type=Path, help="database of the in-process sidecar")
    parser.add_argument(
        "--sidecar", help="HOST:PORT of a sidecar elsewhere: run only the worker, connected to it"
    )
    parser.add_argument("--listen", default="127.0.0.1:0", help="gRPC address (own sidecar)")
    parser.add_argument(
        "--journal", type=Path, default=os.environ.get("CRASH_APP_JOURNAL"), help="journal file"
    )
    parser.add_argument(
        "--gates", type=Path, default=os.environ.get("CRASH_APP_GATES"), help="gate directory"
    )
    parser.add_argument("--worker", default="", help="worker name in journal lines")
    parser.add_argument(
        "--threads", type=int, default=None, help="activity threads (SDK default: cpus + 4)"
    )
    parser.add_argument("--lifetime", type=float, default=300.0, help="exit after this long")
    args = parser.parse_args(argv)
    if (args.db is None) == (args.sidecar is None):
        parser.error("give exactly one of --db (own sidecar) and --sidecar (external one)")
    if args.journal is None or args.gates is None:
        parser.error("--journal and --gates (or CRASH_APP_JOURNAL, CRASH_APP_GATES) are required")
    return args


def _watchdog(parent: int, lifetime: float) -> None:
    """Exit hard when the test process that started us is gone, or after `lifetime`."""
    deadline = time.monotonic() + lifetime
    while True:
        time.sleep(0.5)
        if os.getppid() != parent:
            os._exit(3)
        if time.monotonic() > deadline:
            print("crash_app: lifetime exceeded", file=sys.stderr, flush=True)
            os._exit(4)


def main(argv: Sequence[str] | None = None) -> int:
    global JOURNAL, GATES
    args = _parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING,
        stream=sys.stderr,
        format="%(asctime)s %(process)d %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("gateway").setLevel(logging.INFO)
    threading.Thread(
        target=_watchdog, args=(os.getppid(), args.lifetime), name="watchdog", daemon=True
    ).start()

    JOURNAL = Journal(args.journal, args.worker or f"pid-{os.getpid()}")
    GATES = args.gates

    sidecar = None
    if args.sidecar is None:
        from gateway.sidecar.server import SidecarThread
        from gateway.sidecar.settings import SidecarSettings

        settings = SidecarSettings(db_path=args.db, grpc_listen=args.listen, http_listen=None)
        sidecar = SidecarThread(settings).start()
        address = sidecar.grpc_address
    else:
        address = args.sidecar

    host, _, port = address.rpartition(":")
    runtime = wf.WorkflowRuntime(
        host=host,
        port=port,
        logger_options=QUIET,
        interceptors=[AckRecorder()],
        maximum_thread_pool_workers=args.threads,
    )
    for workflow in WORKFLOWS:
        runtime.register_workflow(workflow)
    for activity in ACTIVITIES:
        runtime.register_activity(activity)
    runtime.start()

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    ready = {"grpc_address": address, "pid": os.getpid(), "worker": JOURNAL.worker}
    print(f"{READY_MARKER} {json.dumps(ready)}", flush=True)
    stop.wait()
    runtime.shutdown()
    if sidecar is not None:
        sidecar.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
