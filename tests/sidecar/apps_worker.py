"""A Dapr workflow worker of one app, for the tests of a sidecar serving several apps.

    python -m tests.sidecar.apps_worker --address HOST:PORT --app APP --journal FILE --gates DIR

It connects a `WorkflowRuntime` to the sidecar address of its app, registers the app's
workflows and activities, and prints one line once its stream is ready:

    APPS_WORKER_READY {"pid": PID, "app": APP}

Both apps register an activity named `whoami` that answers with its own app id: a call routed
to the wrong app shows in the result. Every activity run appends one fsynced JSON line to the
journal: `{"event": "start" | "end", "activity", "app", "pid", "instance", "task_id"}`.
`gated` waits, after its start line, until `<gates>/<input>` exists.

The workflows are plain Dapr SDK code: `call_activity(..., app_id=...)` and
`call_child_workflow(..., app_id=...)` run unchanged on daprd.
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
from datetime import timedelta
from pathlib import Path
from typing import Any

import dapr.ext.workflow as wf
from dapr.ext.workflow.logger import LoggerOptions

READY_MARKER = "APPS_WORKER_READY"
QUIET = LoggerOptions(log_level="WARNING")
B = "b"  # the app id of the second app
NOWHERE = "nowhere"  # an app id no sidecar serves


class Settings:
    app = ""
    journal: Path = Path()
    gates: Path = Path()


def _record(event: str, ctx: wf.WorkflowActivityContext, activity: str) -> None:
    line = {
        "event": event,
        "activity": activity,
        "app": Settings.app,
        "pid": os.getpid(),
        "instance": ctx.workflow_id,
        "task_id": ctx.task_id,
    }
    fd = os.open(Settings.journal, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, (json.dumps(line) + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)


# --- activities (both apps) -------------------------------------------------------------------


def whoami(ctx: wf.WorkflowActivityContext, inp: Any) -> dict[str, Any]:
    _record("start", ctx, "whoami")
    _record("end", ctx, "whoami")
    return {"app": Settings.app, "input": inp}


def gated(ctx: wf.WorkflowActivityContext, gate: str) -> str:
    _record("start", ctx, "gated")
    while not (Settings.gates / gate).exists():
        time.sleep(0.02)
    _record("end", ctx, "gated")
    return f"{Settings.app} passed {gate}"


# --- workflows of the first app ---------------------------------------------------------------


def cross_app(ctx: wf.DaprWorkflowContext, inp: str) -> Any:
    local = yield ctx.call_activity("whoami", input=f"{inp}-local")
    remote = yield ctx.call_activity("whoami", input=f"{inp}-remote", app_id=B)
    child = yield ctx.call_child_workflow("b_child", input=f"{inp}-child", app_id=B)
    return {"local": local, "remote": remote, "child": child}


def remote_only(ctx: wf.DaprWorkflowContext, inp: str) -> Any:
    return (yield ctx.call_activity("whoami", input=inp, app_id=B))


def remote_gated(ctx: wf.DaprWorkflowContext, gate: str) -> Any:
    first = yield ctx.call_activity("whoami", input="before", app_id=B)
    passed = yield ctx.call_activity("gated", input=gate, app_id=B)
    child = yield ctx.call_child_workflow("b_child", input="after", app_id=B)
    return {"first": first["app"], "passed": passed, "child": child}


def remote_child_gated(ctx: wf.DaprWorkflowContext, gate: str) -> Any:
    return (yield ctx.call_child_workflow("b_gated_child", input=gate, app_id=B))


def unknown_app(ctx: wf.DaprWorkflowContext, _: Any) -> Any:
    errors: dict[str, str] = {}
    try:
        yield ctx.call_activity("whoami", input="x", app_id=NOWHERE)
    except wf.TaskFailedError as exc:
        errors["activity"] = str(exc)
    try:
        yield ctx.call_child_workflow("b_child", input="x", app_id=NOWHERE)
    except wf.TaskFailedError as exc:
        errors["child"] = str(exc)
    retry = wf.RetryPolicy(
        first_retry_interval=timedelta(milliseconds=50), max_number_of_attempts=3
    )
    try:
        yield ctx.call_activity("whoami", input="x", app_id=NOWHERE, retry_policy=retry)
    except wf.TaskFailedError as exc:
        errors["retried"] = str(exc)
    return errors


# --- workflows of the second app --------------------------------------------------------------


def b_child(ctx: wf.DaprWorkflowContext, inp: str) -> Any:
    # No app_id: the child runs on the second app, so its activities do too.
    mine = yield ctx.call_activity("whoami", input=inp)
    return {"child_ran_on": mine["app"], "input": inp}


def b_gated_child(ctx: wf.DaprWorkflowContext, gate: str) -> Any:
    passed = yield ctx.call_activity("gated", input=gate)
    return {"child_ran_on": B, "passed": passed}


WORKFLOWS = {
    "a": (cross_app, remote_only, remote_gated, remote_child_gated, unknown_app),
    B: (b_child, b_gated_child),
}


# --- the program ------------------------------------------------------------------------------


def _watchdog(parent: int, lifetime: float) -> None:
    deadline = time.monotonic() + lifetime
    while True:
        time.sleep(0.5)
        if os.getppid() != parent or time.monotonic() > deadline:
            os._exit(3)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.sidecar.apps_worker")
    parser.add_argument("--address", required=True, help="the sidecar address of this app")
    parser.add_argument("--app", required=True, choices=sorted(WORKFLOWS))
    parser.add_argument("--journal", type=Path, required=True)
    parser.add_argument("--gates", type=Path, required=True)
    parser.add_argument("--lifetime", type=float, default=300.0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    Settings.app, Settings.journal, Settings.gates = args.app, args.journal, args.gates
    threading.Thread(
        target=_watchdog, args=(os.getppid(), args.lifetime), name="watchdog", daemon=True
    ).start()

    host, _, port = args.address.rpartition(":")
    runtime = wf.WorkflowRuntime(host=host, port=port, logger_options=QUIET)
    for workflow in WORKFLOWS[args.app]:
        runtime.register_workflow(workflow, name=workflow.__name__)
    runtime.register_activity(whoami, name="whoami")
    runtime.register_activity(gated, name="gated")
    runtime.start()

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    print(f"{READY_MARKER} {json.dumps({'pid': os.getpid(), 'app': args.app})}", flush=True)
    stop.wait()
    runtime.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
