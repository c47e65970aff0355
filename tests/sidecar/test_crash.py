"""Durability with real processes killed by SIGKILL.

The program under test is `tests/sidecar/crash_app.py`: the shape of `duragate serve` (embedded
sidecar and a `WorkflowRuntime` worker in one process), or with `--sidecar` a worker alone next
to a standalone sidecar process. Activities append fsynced start/end lines to a journal, and
`gated_step` blocks until the test creates a gate file, so a kill lands exactly where a test
wants it. What every test checks after the restart:

- the workflow completes with the exact expected output;
- the history records each activity's result exactly once (one taskCompleted per taskScheduled);
- the journal shows at-least-once execution: the activity that was running when the process
  died ran again, and the ones that had finished did not.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import select
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

import dapr.ext.workflow as wf
import grpc
import pytest
from dapr.ext.workflow import WorkflowHistoryEventType as EventType
from dapr.ext.workflow.logger import LoggerOptions
from google.protobuf import wrappers_pb2

from gateway.sidecar.protos import pb, workflow_grpc

from .conftest import REPO_ROOT, DaprEnv, SidecarProcess

pytestmark = pytest.mark.crash

QUIET = LoggerOptions(log_level="WARNING")
READY_MARKER = "CRASH_APP_READY"
TIMEOUT = 30.0  # the longest any single wait may take
POLL = 0.02


# --- processes --------------------------------------------------------------------------------


@dataclass
class App:
    """One running crash_app process."""

    name: str
    popen: subprocess.Popen[str]
    grpc_address: str
    log_path: Path
    ready_at: float

    @property
    def pid(self) -> int:
        return self.popen.pid

    def kill(self) -> float:
        """SIGKILL, then reap; returns the time of the kill."""
        killed_at = time.time()
        if self.popen.poll() is None:
            os.kill(self.popen.pid, signal.SIGKILL)
        self.popen.wait(timeout=10)
        return killed_at

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


@dataclass
class Harness:
    """Starts crash apps and clients, reads the journal, opens gates; cleans up after itself."""

    root: Path
    apps: list[App] = field(default_factory=list)
    sidecars: list[SidecarProcess] = field(default_factory=list)
    clients: list[wf.DaprWorkflowClient] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.db = self.root / "duragate.db"
        self.journal_path = self.root / "journal.jsonl"
        self.gates = self.root / "gates"
        self.gates.mkdir()
        self.journal_path.touch()

    # processes
    def start_app(
        self, *, sidecar: str | None = None, worker: str | None = None, threads: int = 0
    ) -> App:
        name = worker or f"app{len(self.apps) + 1}"
        log_path = self.root / f"{name}.log"
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
        cmd = [sys.executable, "-m", "tests.sidecar.crash_app"]
        cmd += ["--sidecar", sidecar] if sidecar else ["--db", str(self.db)]
        cmd += ["--journal", str(self.journal_path), "--gates", str(self.gates), "--worker", name]
        if threads:
            cmd += ["--threads", str(threads)]
        with open(log_path, "ab") as log:
            popen = subprocess.Popen(
                cmd, stdout=subprocess.PIPE, stderr=log, text=True, cwd=REPO_ROOT, env=env
            )
        assert popen.stdout is not None
        deadline = time.monotonic() + TIMEOUT
        try:
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(f"{name} did not get ready:\n{log_path.read_text()}")
                readable, _, _ = select.select([popen.stdout], [], [], remaining)
                if not readable:
                    continue
                line = popen.stdout.readline()
                if not line:
                    popen.wait(timeout=10)
                    raise AssertionError(
                        f"{name} exited with {popen.returncode}:\n{log_path.read_text()}"
                    )
                if line.startswith(READY_MARKER):
                    ready = json.loads(line[len(READY_MARKER) :])
                    break
        except BaseException:
            if popen.poll() is None:
                popen.kill()
                popen.wait(timeout=10)
            raise
        app = App(name, popen, ready["grpc_address"], log_path, time.time())
        assert ready["pid"] == app.pid
        self.apps.append(app)
        return app

    def watch(self, sidecar: SidecarProcess) -> SidecarProcess:
        """Include a standalone sidecar's log in failure messages."""
        self.sidecars.append(sidecar)
        return sidecar

    def client(self, address: str) -> wf.DaprWorkflowClient:
        host, _, port = address.rpartition(":")
        client = wf.DaprWorkflowClient(host=host, port=port, logger_options=QUIET)
        self.clients.append(client)
        return client

    def close(self) -> None:
        for client in self.clients:
            client.close()
        for app in self.apps:
            if app.popen.poll() is None:
                app.popen.kill()
                app.popen.wait(timeout=10)
            if app.popen.stdout is not None:
                app.popen.stdout.close()

    def logs(self) -> str:
        parts = [f"--- {app.name} (pid {app.pid}) ---\n{app.log()}" for app in self.apps]
        parts += [f"--- sidecar (pid {s.pid}) ---\n{s.log()}" for s in self.sidecars]
        return "\n".join(parts)

    # gates and journal
    def open_gate(self, name: str) -> None:
        (self.gates / name).touch()

    def journal(self) -> list[dict[str, Any]]:
        # Every line ends with a newline; whatever follows the last one is still being written.
        lines = self.journal_path.read_text().split("\n")[:-1]
        return [json.loads(line) for line in lines]

    def runs(self, instance: str, label: str, event: str = "start") -> list[dict[str, Any]]:
        return [
            r
            for r in self.journal()
            if r["instance"] == instance and r.get("label") == label and r["event"] == event
        ]

    def refused(self) -> list[dict[str, Any]]:
        """Activity results the sidecar refused (see AckRecorder in crash_app)."""
        return [r for r in self.journal() if r["event"] == "nack"]

    # waiting
    def wait_until(self, predicate: Callable[[], Any], what: str, timeout: float = TIMEOUT) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            value = predicate()
            if value:
                return value
            if time.monotonic() > deadline:
                pytest.fail(
                    f"timed out after {timeout:.0f} s waiting until {what}\n"
                    f"journal:\n{self.journal_path.read_text()}\n{self.logs()}"
                )
            time.sleep(POLL)

    def wait_completed(
        self, client: wf.DaprWorkflowClient, instance_id: str, expected_output: Any
    ) -> wf.WorkflowState:
        try:
            state = client.wait_for_workflow_completion(
                instance_id, timeout_in_seconds=int(TIMEOUT)
            )
        except Exception as exc:  # noqa: BLE001 - reported with the logs
            pytest.fail(f"waiting for {instance_id} failed: {exc!r}\n{self.logs()}")
        assert state is not None, f"{instance_id} does not exist\n{self.logs()}"
        assert state.runtime_status == wf.WorkflowStatus.COMPLETED, (
            f"{instance_id} is {state.runtime_status}: {state.failure_details}\n{self.logs()}"
        )
        assert json.loads(state.serialized_output) == expected_output
        return state


@pytest.fixture
def harness(tmp_path: Path, dapr_env: DaprEnv) -> Iterator[Harness]:
    # dapr_env has removed the developer's DAPR_* variables: the children inherit a clean env.
    h = Harness(tmp_path)
    try:
        yield h
    finally:
        h.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --- history checks ---------------------------------------------------------------------------


def history(client: wf.DaprWorkflowClient, instance_id: str) -> list[wf.WorkflowHistoryEvent]:
    return client.get_workflow_history(instance_id)


def has_event(client: wf.DaprWorkflowClient, instance_id: str, kind: EventType) -> bool:
    return any(e.event_type == kind for e in history(client, instance_id))


def assert_results_recorded_once(
    client: wf.DaprWorkflowClient, instance_id: str, *, tasks: int, children: int = 0
) -> list[wf.WorkflowHistoryEvent]:
    """Exactly one completion per scheduled activity and per created child workflow."""
    events = history(client, instance_id)
    kinds = Counter(e.event_type for e in events)

    def pairs(opened: EventType, closed: EventType, n: int) -> None:
        ids = [e.event_id for e in events if e.event_type == opened]
        done = Counter(e.task_scheduled_id for e in events if e.event_type == closed)
        assert len(ids) == n, f"{instance_id}: {n} {opened.name} expected, got {ids}"
        assert len(set(ids)) == n, f"{instance_id}: duplicate {opened.name} ids {ids}"
        assert done == Counter(ids), (
            f"{instance_id}: {closed.name} per {opened.name} id should be exactly 1: {done}"
        )

    pairs(EventType.TASK_SCHEDULED, EventType.TASK_COMPLETED, tasks)
    pairs(
        EventType.CHILD_WORKFLOW_INSTANCE_CREATED,
        EventType.CHILD_WORKFLOW_INSTANCE_COMPLETED,
        children,
    )
    assert kinds[EventType.TASK_FAILED] == 0
    assert kinds[EventType.CHILD_WORKFLOW_INSTANCE_FAILED] == 0
    assert kinds[EventType.EXECUTION_STARTED] == 1
    assert kinds[EventType.EXECUTION_COMPLETED] == 1
    return events


def pids(runs: list[dict[str, Any]]) -> list[int]:
    return [r["pid"] for r in runs]


def utc_seconds(ts: datetime) -> float:
    return ts.replace(tzinfo=UTC).timestamp()


# --- 1a. killed while an activity runs --------------------------------------------------------


def test_kill_during_activity_reruns_it_once_and_records_it_once(harness: Harness) -> None:
    h = harness
    app1 = h.start_app()
    client = h.client(app1.grpc_address)
    iid = client.schedule_new_workflow("sequence_wf", input={"value": "a", "gate": "a-s2"})
    h.wait_until(lambda: h.runs(iid, "s2"), "the gated activity s2 runs")
    app1.kill()

    app2 = h.start_app()
    client = h.client(app2.grpc_address)
    # The activity the crash interrupted is delivered again, before anyone opens its gate.
    h.wait_until(lambda: len(h.runs(iid, "s2")) == 2, "s2 is redelivered after the restart")
    h.open_gate("a-s2")
    h.wait_completed(client, iid, "a>s1>s2>s3")
    assert_results_recorded_once(client, iid, tasks=3)

    assert pids(h.runs(iid, "s1")) == [app1.pid]
    assert pids(h.runs(iid, "s1", "end")) == [app1.pid]
    s2 = h.runs(iid, "s2")
    assert pids(s2) == [app1.pid, app2.pid]  # at least once: it ran again
    assert pids(h.runs(iid, "s2", "end")) == [app2.pid]
    # The same task both times: its task id and execution id are the activity's identity.
    assert s2[0]["task_id"] == s2[1]["task_id"]
    assert s2[0]["task_execution_id"] == s2[1]["task_execution_id"] != ""
    assert pids(h.runs(iid, "s3")) == [app2.pid]
    assert pids(h.runs(iid, "s3", "end")) == [app2.pid]
    assert not h.refused()


# --- 1b. killed with durable timers pending ---------------------------------------------------


def test_timers_survive_a_kill_including_one_due_while_down(harness: Harness) -> None:
    h = harness
    app1 = h.start_app()
    client = h.client(app1.grpc_address)
    # One timer comes due while the process is down, the other after it is back.
    overdue = client.schedule_new_workflow("timer_wf", input={"value": "o", "seconds": 3})
    pending = client.schedule_new_workflow("timer_wf", input={"value": "p", "seconds": 8})
    created: dict[str, float] = {}
    for iid in (overdue, pending):

        def timer_created(iid: str = iid) -> list[wf.WorkflowHistoryEvent]:
            return [e for e in history(client, iid) if e.event_type == EventType.TIMER_CREATED]

        (ev,) = h.wait_until(timer_created, f"{iid} has created its timer")
        created[iid] = utc_seconds(ev.timestamp)
    assert not h.runs(overdue, "after") and not h.runs(pending, "after")
    killed_at = app1.kill()

    # The workflow clock is at most the commit time of the turn that created the timer.
    overdue_by = created[overdue] + 3
    assert killed_at < overdue_by, "the short timer came due before the kill: too slow"
    time.sleep(max(0.0, overdue_by - time.time()) + 0.5)

    restarted_at = time.time()
    app2 = h.start_app()
    client = h.client(app2.grpc_address)
    h.wait_completed(client, overdue, "o>before>after")
    h.wait_completed(client, pending, "p>before>after")

    for iid in (overdue, pending):
        events = assert_results_recorded_once(client, iid, tasks=2)
        kinds = Counter(e.event_type for e in events)
        assert kinds[EventType.TIMER_CREATED] == 1 and kinds[EventType.TIMER_FIRED] == 1
        assert pids(h.runs(iid, "before")) == [app1.pid]
        assert pids(h.runs(iid, "after")) == [app2.pid]

    (late,) = h.runs(overdue, "after")
    due = late["input"]["due"]
    assert killed_at < due < restarted_at, "the short timer was due while the process was down"
    assert due < late["time"] < app2.ready_at + 10, "the overdue timer fires promptly on restart"

    (on_time,) = h.runs(pending, "after")
    due = on_time["input"]["due"]
    assert app2.ready_at < due, "the long timer was still pending after the restart"
    assert due <= on_time["time"] < due + 10, "the pending timer fires at its due time"
    assert not h.refused()


# --- 1c. killed while a child workflow runs ---------------------------------------------------


def test_kill_during_child_workflow(harness: Harness) -> None:
    h = harness
    app1 = h.start_app()
    client = h.client(app1.grpc_address)
    iid = client.schedule_new_workflow("parent_wf", input={"value": "p", "gate": "c-child"})
    (child_run,) = h.wait_until(
        lambda: [r for r in h.journal() if r.get("label") == "child"], "the child's activity runs"
    )
    child_id = child_run["instance"]
    assert child_id != iid
    app1.kill()

    app2 = h.start_app()
    client = h.client(app2.grpc_address)
    h.wait_until(lambda: len(h.runs(child_id, "child")) == 2, "the child's activity reruns")
    h.open_gate("c-child")
    h.wait_completed(client, iid, "p>p1>child>p2")
    h.wait_completed(client, child_id, "p>p1>child")
    assert_results_recorded_once(client, iid, tasks=2, children=1)
    assert_results_recorded_once(client, child_id, tasks=1)

    assert pids(h.runs(iid, "p1")) == [app1.pid]
    assert pids(h.runs(child_id, "child")) == [app1.pid, app2.pid]
    assert pids(h.runs(child_id, "child", "end")) == [app2.pid]
    assert pids(h.runs(iid, "p2")) == [app2.pid]
    assert not h.refused()


# --- 1d. killed while waiting for an external event -------------------------------------------


def test_kill_while_waiting_for_an_external_event(harness: Harness) -> None:
    h = harness
    app1 = h.start_app()
    client = h.client(app1.grpc_address)
    iid = client.schedule_new_workflow("approval_wf", input={"value": "e"})
    # Once prep's result is in the history, the turn that consumed it, which started the wait,
    # has committed.
    h.wait_until(
        lambda: has_event(client, iid, EventType.TASK_COMPLETED), f"{iid} waits for 'approve'"
    )
    app1.kill()

    app2 = h.start_app()
    client = h.client(app2.grpc_address)
    state = client.get_workflow_state(iid)
    assert state is not None and state.runtime_status == wf.WorkflowStatus.RUNNING
    assert not [r for r in h.journal() if r.get("label", "").startswith("approved")]
    client.raise_workflow_event(iid, "approve", data={"by": "alice"})
    h.wait_completed(client, iid, "e>prep>approved-by-alice")

    events = assert_results_recorded_once(client, iid, tasks=2)
    assert Counter(e.event_type for e in events)[EventType.EVENT_RAISED] == 1
    assert pids(h.runs(iid, "prep")) == [app1.pid]
    assert pids(h.runs(iid, "approved-by-alice")) == [app2.pid]
    assert not h.refused()


# --- 1e. killed at random points, between turns -----------------------------------------------

N_CHAINS = 20
CHAIN_STEPS = 5


@pytest.mark.parametrize("seed", [7, 1234])
def test_random_kills_between_turns(harness: Harness, seed: int) -> None:
    """Three kills at seeded random points while 20 workflows run 100 activities and turns."""
    h = harness
    rng = random.Random(seed)
    app = h.start_app(threads=N_CHAINS + 4)
    client = h.client(app.grpc_address)
    # Every workflow's first activity waits for one shared gate, so that all of them are under
    # way before the first kill is timed.
    ids = [
        client.schedule_new_workflow(
            "chain_wf",
            input={"value": f"v{i}", "steps": CHAIN_STEPS, "gate": "go"},
            instance_id=f"chain-{i}",
        )
        for i in range(N_CHAINS)
    ]
    total = N_CHAINS * CHAIN_STEPS

    def progress(event: str) -> int:
        return len({(r["instance"], r["label"]) for r in h.journal() if r["event"] == event})

    h.wait_until(lambda: progress("start") == N_CHAINS, "every workflow waits at the gate")
    h.open_gate("go")
    killed: list[int] = []
    threshold = N_CHAINS
    for round_ in range(3):
        threshold += rng.randint(10, 30) if round_ == 0 else rng.randint(5, 15)
        h.wait_until(partial(lambda t: progress("start") >= t, threshold), f"{threshold} ran")
        time.sleep(rng.uniform(0.0, 0.03))
        finished_before = progress("end")
        app.kill()
        killed.append(app.pid)
        if round_ == 0:
            assert finished_before < total, "the first kill came after all the work was done"
        app = h.start_app(threads=N_CHAINS + 4)
        client = h.client(app.grpc_address)

    for i, iid in enumerate(ids):
        expected = f"v{i}" + "".join(f">c{k}" for k in range(CHAIN_STEPS))
        h.wait_completed(client, iid, expected)
        assert_results_recorded_once(client, iid, tasks=CHAIN_STEPS)

    journal = h.journal()
    assert not h.refused()
    acked = {(r["instance"], r["task_id"], r["pid"]) for r in journal if r["event"] == "ack"}
    reruns = 0
    for i, iid in enumerate(ids):
        for k in range(CHAIN_STEPS):
            starts = [
                r
                for r in journal
                if r["event"] == "start" and (r["instance"], r["label"]) == (iid, f"c{k}")
            ]
            assert starts, f"{iid} c{k} never ran"
            # Every run of a step, replayed or not, got the recorded result of the one before.
            prefix = f"v{i}" + "".join(f">c{j}" for j in range(k))
            assert {r["input"]["value"] for r in starts} == {prefix}
            assert len({r["task_id"] for r in starts}) == 1
            per_process = Counter(pids(starts))
            assert max(per_process.values()) == 1, f"{iid} c{k} ran twice in one process"
            # It ran again only because a kill interrupted it before the sidecar had accepted
            # its result: a result the sidecar acknowledged is never lost.
            for run in starts[:-1]:
                assert run["pid"] in killed
                assert (iid, run["task_id"], run["pid"]) not in acked, (
                    f"{iid} c{k}: a result the sidecar had acknowledged was lost in the crash"
                )
            reruns += len(starts) - 1
    assert len([r for r in journal if r["event"] == "start"]) == total + reruns
    # Each activity ran once plus once per kill it was caught by, never more.
    assert reruns <= len(killed) * N_CHAINS


# --- 3. a standalone sidecar killed under a connected worker ----------------------------------


def test_worker_reconnects_to_a_restarted_standalone_sidecar(
    harness: Harness, sidecar_process: Callable[..., SidecarProcess]
) -> None:
    h = harness
    listen = f"127.0.0.1:{free_port()}"
    sidecar = h.watch(sidecar_process(h.db, listen=listen, http_listen=None))
    worker = h.start_app(sidecar=sidecar.grpc_address, worker="worker")
    client = h.client(sidecar.grpc_address)
    iid = client.schedule_new_workflow("sequence_wf", input={"value": "r", "gate": "r-s2"})
    h.wait_until(lambda: h.runs(iid, "s2"), "the gated activity s2 runs")
    sidecar.kill()

    sidecar = h.watch(sidecar_process(h.db, listen=listen, http_listen=None))
    assert sidecar.grpc_address == listen
    client = h.client(sidecar.grpc_address)
    # The same worker process reconnects by itself and gets the interrupted activity again.
    h.wait_until(lambda: len(h.runs(iid, "s2")) == 2, "the worker reconnects and reruns s2")
    assert worker.popen.poll() is None
    h.open_gate("r-s2")
    h.wait_completed(client, iid, "r>s1>s2>s3")
    assert_results_recorded_once(client, iid, tasks=3)

    assert pids(h.runs(iid, "s1")) == [worker.pid]
    assert pids(h.runs(iid, "s2")) == [worker.pid, worker.pid]
    assert pids(h.runs(iid, "s3")) == [worker.pid]
    # The copy started before the crash finishes too, and the worker sends its result to the
    # new sidecar (ignored or refused): it must change nothing.
    task_id = h.runs(iid, "s2")[0]["task_id"]

    def answered() -> list[dict[str, Any]]:
        return [
            r
            for r in h.journal()
            if r["event"] in ("ack", "nack") and (r["instance"], r["task_id"]) == (iid, task_id)
        ]

    h.wait_until(lambda: len(answered()) == 2, "both copies of s2 have sent their result")
    state = client.get_workflow_state(iid)
    assert state is not None and json.loads(state.serialized_output) == "r>s1>s2>s3"
    assert_results_recorded_once(client, iid, tasks=3)


# --- 4. a second worker takes over when the first dies ----------------------------------------


def test_second_worker_takes_over_a_dead_workers_activity(
    harness: Harness, sidecar_process: Callable[..., SidecarProcess]
) -> None:
    h = harness
    sidecar = h.watch(sidecar_process(h.db, http_listen=None))
    w1 = h.start_app(sidecar=sidecar.grpc_address, worker="w1")
    client = h.client(sidecar.grpc_address)
    iid = client.schedule_new_workflow("sequence_wf", input={"value": "h", "gate": "h-s2"})
    h.wait_until(lambda: h.runs(iid, "s2"), "w1 runs the gated activity s2")
    w2 = h.start_app(sidecar=sidecar.grpc_address, worker="w2")
    w1.kill()

    h.wait_until(lambda: len(h.runs(iid, "s2")) == 2, "s2 is redelivered to w2")
    h.open_gate("h-s2")
    h.wait_completed(client, iid, "h>s1>s2>s3")
    assert_results_recorded_once(client, iid, tasks=3)
    assert sidecar.popen.poll() is None

    def who(label: str, event: str = "start") -> list[str]:
        return [r["worker"] for r in h.runs(iid, label, event)]

    assert who("s1") == ["w1"] and who("s1", "end") == ["w1"]
    assert who("s2") == ["w1", "w2"]
    assert who("s2", "end") == ["w2"]
    assert [r["pid"] for r in h.runs(iid, "s2")] == [w1.pid, w2.pid]
    assert who("s3") == ["w2"] and who("s3", "end") == ["w2"]
    assert not h.refused()


# --- completion tokens across restarts ---------------------------------------------------


def test_an_answer_to_a_dispatch_from_before_a_restart_is_ignored(
    tmp_path: Path, sidecar_process: Callable[..., SidecarProcess]
) -> None:
    db = tmp_path / "tokens.db"
    sidecar = sidecar_process(db, http_listen=None)
    with grpc.insecure_channel(sidecar.grpc_address) as channel:
        stub = workflow_grpc.TaskHubSidecarServiceStub(channel)
        items = stub.GetWorkItems(pb.GetWorkItemsRequest(), timeout=TIMEOUT)
        # StartInstance waits for the first turn, which is never answered: do not wait for it
        # (but keep the call: a dropped future cancels it).
        start = stub.StartInstance.future(pb.CreateInstanceRequest(instanceId="x", name="wf"))
        before = next(items)
        assert before.workflowRequest.instanceId == "x"
        assert stub.GetInstance(pb.GetInstanceRequest(instanceId="x")).exists  # committed
        sidecar.kill()
        start.cancel()
        items.cancel()

    sidecar = sidecar_process(db, http_listen=None)
    with grpc.insecure_channel(sidecar.grpc_address) as channel:
        stub = workflow_grpc.TaskHubSidecarServiceStub(channel)
        stub.RaiseEvent(
            pb.RaiseEventRequest(
                instanceId="x", name="approve", input=wrappers_pb2.StringValue(value='"yes"')
            )
        )
        items = stub.GetWorkItems(pb.GetWorkItemsRequest(), timeout=TIMEOUT)
        after = next(items)
        kinds = [e.WhichOneof("eventType") for e in after.workflowRequest.newEvents]
        assert kinds == ["workflowStarted", "executionStarted", "eventRaised"]

        def answer(token: str, output: str) -> None:
            stub.CompleteOrchestratorTask(
                pb.WorkflowResponse(
                    instanceId="x",
                    completionToken=token,
                    actions=[
                        pb.WorkflowAction(
                            id=1,
                            completeWorkflow=pb.CompleteWorkflowAction(
                                workflowStatus=pb.ORCHESTRATION_STATUS_COMPLETED,
                                result=wrappers_pb2.StringValue(value=json.dumps(output)),
                            ),
                        )
                    ],
                )
            )

        # The worker that got `before` answers it now, having never seen the event. Ignoring the
        # answer or refusing it are both right.
        with contextlib.suppress(grpc.RpcError):
            answer(before.completionToken, "stale")
        state = stub.GetInstance(pb.GetInstanceRequest(instanceId="x", getInputsAndOutputs=True))
        # Ignored as stale: no turn has committed yet (still PENDING) and `after` is still the
        # turn in flight, with the "approve" event not yet consumed.
        assert state.workflowState.workflowStatus == pb.ORCHESTRATION_STATUS_PENDING
        assert after.completionToken != before.completionToken
        answer(after.completionToken, "fresh")
        state = stub.GetInstance(pb.GetInstanceRequest(instanceId="x", getInputsAndOutputs=True))
        assert state.workflowState.workflowStatus == pb.ORCHESTRATION_STATUS_COMPLETED
        assert json.loads(state.workflowState.output.value) == "fresh"
        items.cancel()
