"""Workflows and activities the engine benchmark runs, and a worker process that serves them.

`python -m bench.workloads HOST:PORT` runs a worker process: it connects a `WorkflowRuntime` to
the sidecar at that address, prints `ready` and serves until it is killed.
"""

from __future__ import annotations

import sys
import threading
from typing import Any

import dapr.ext.workflow as wf
from dapr.ext.workflow.logger import LoggerOptions

QUIET = LoggerOptions(log_level="WARNING")


def start_runtime(address: str) -> wf.WorkflowRuntime:
    """A worker for the benchmark's workflows. The functions are made afresh for each runtime:
    the SDK marks a function once it is registered and refuses it in a second runtime."""

    def echo(ctx: wf.WorkflowActivityContext, value: Any) -> Any:
        return value

    def one_activity(ctx: wf.DaprWorkflowContext, value: Any) -> Any:
        return (yield ctx.call_activity(echo, input=value))

    def five_activities(ctx: wf.DaprWorkflowContext, value: Any) -> Any:
        for _ in range(5):
            value = yield ctx.call_activity(echo, input=value)
        return value

    def n_activities(ctx: wf.DaprWorkflowContext, spec: list[int]) -> Any:
        """`spec` = [n, size]: n sequential activities, each returning `size` bytes."""
        n, size = spec
        for _ in range(n):
            yield ctx.call_activity(echo, input="x" * size)
        return n

    host, _, port = address.rpartition(":")
    runtime = wf.WorkflowRuntime(host=host, port=port, logger_options=QUIET)
    runtime.register_activity(echo)
    for w in (one_activity, five_activities, n_activities):
        runtime.register_workflow(w)
    runtime.start()
    return runtime


def main() -> None:
    runtime = start_runtime(sys.argv[1])
    print("ready", flush=True)
    try:
        threading.Event().wait()
    finally:
        runtime.shutdown()


if __name__ == "__main__":
    main()
