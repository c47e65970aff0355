"""One sidecar serving several Dapr apps, as daprd does across apps.

Each app has its own gRPC address on the sidecar; a worker belongs to the app whose address it
connects to. Workers here are real `WorkflowRuntime` processes (`tests/sidecar/apps_worker.py`),
one per app. Both apps register an activity named `whoami` that answers with its own app id, so
a call routed to the wrong app shows in the result, and every run is journaled with its pid.
"""

from __future__ import annotations

import asyncio
import json
import os
import select
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dapr.ext.workflow as wf
import grpc
import pytest
from dapr.ext.workflow.logger import LoggerOptions
from pydantic import ValidationError

from gateway.sidecar.protos import pb, workflow_grpc
from gateway.sidecar.server import SidecarError, SidecarThread, _parse_args
from gateway.sidecar.settings import SidecarSettings

from .apps_worker import READY_MARKER
from .conftest import REPO_ROOT, DaprEnv, SidecarFactory, SidecarProcess, sidecar_settings
from .test_crash import free_port

QUIET = LoggerOptions(log_level="WARNING")
TIMEOUT = 60.0  # the longest any single wait may take (the machine is shared)
POLL = 0.02
A, B = "a", "b"


@dataclass
class Worker:
    app: str
    popen: subprocess.Popen[str]
    log_path: Path

    @property
    def pid(self) -> int:
        return self.popen.pid


@dataclass
class Apps:
    """Starts app workers and clients, reads the journal, opens gates; cleans up."""

    root: Path
    workers: list[Worker] = field(default_factory=list)
    clients: list[wf.DaprWorkflowClient] = field(default_factory=list)
    channels: list[grpc.Channel] = field(default_factory=list)
    sidecars: list[SidecarProcess] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.journal_path = self.root / "journal.jsonl"
        self.journal_path.touch()
        self.gates = self.root / "gates"
        self.gates.mkdir()

    def start_worker(self, app: str, address: str) -> Worker:
        log_path = self.root / f"worker-{app}-{len(self.workers)}.log"
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
        cmd = [sys.executable, "-m", "tests.sidecar.apps_worker", "--address", address]
        cmd += ["--app", app, "--journal", str(self.journal_path), "--gates", str(self.gates)]
        with open(log_path, "ab") as log:
            popen = subprocess.Popen(
                cmd, stdout=subprocess.PIPE, stderr=log, text=True, cwd=REPO_ROOT, env=env
            )
        worker = Worker(app, popen, log_path)
        self.workers.append(worker)
        assert popen.stdout is not None
        deadline = time.monotonic() + TIMEOUT
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                pytest.fail(f"worker {app} did not get ready:\n{self.logs()}")
            readable, _, _ = select.select([popen.stdout], [], [], remaining)
            if not readable:
                continue
            line = popen.stdout.readline()
            if not line:
                popen.wait(timeout=10)
                pytest.fail(f"worker {app} exited with {popen.returncode}:\n{self.logs()}")
            if line.startswith(READY_MARKER):
                return worker

    def client(self, address: str) -> wf.DaprWorkflowClient:
        host, _, port = address.rpartition(":")
        client = wf.DaprWorkflowClient(host=host, port=port, logger_options=QUIET)
        self.clients.append(client)
        return client

    def stub(self, address: str) -> workflow_grpc.TaskHubSidecarServiceStub:
        channel = grpc.insecure_channel(address)
        self.channels.append(channel)
        return workflow_grpc.TaskHubSidecarServiceStub(channel)

    def journal(self) -> list[dict[str, Any]]:
        lines = self.journal_path.read_text().split("\n")[:-1]
        return [json.loads(line) for line in lines]

    def runs(self, activity: str, event: str = "start") -> list[dict[str, Any]]:
        return [r for r in self.journal() if r["activity"] == activity and r["event"] == event]

    def logs(self) -> str:
        parts = [
            f"--- worker {w.app} (pid {w.pid}) ---\n{w.log_path.read_text()}" for w in self.workers
        ]
        parts += [f"--- sidecar (pid {s.pid}) ---\n{s.log()}" for s in self.sidecars]
        return "\n".join(parts)

    def wait_until(self, predicate: Callable[[], Any], what: str) -> Any:
        deadline = time.monotonic() + TIMEOUT
        while True:
            value = predicate()
            if value:
                return value
            if time.monotonic() > deadline:
                pytest.fail(f"timed out waiting until {what}\n{self.journal()}\n{self.logs()}")
            time.sleep(POLL)

    def completed(self, client: wf.DaprWorkflowClient, instance_id: str) -> Any:
        try:
            state = client.wait_for_workflow_completion(
                instance_id, timeout_in_seconds=int(TIMEOUT)
            )
        except Exception as exc:  # noqa: BLE001 - reported with the logs
            pytest.fail(f"waiting for {instance_id} failed: {exc!r}\n{self.logs()}")
        assert state is not None
        assert state.runtime_status == wf.WorkflowStatus.COMPLETED, (
            f"{instance_id} is {state.runtime_status}: {state.failure_details}\n{self.logs()}"
        )
        return json.loads(state.serialized_output)

    def close(self) -> None:
        for client in self.clients:
            client.close()
        for channel in self.channels:
            channel.close()
        for worker in self.workers:
            if worker.popen.poll() is None:
                worker.popen.kill()
            worker.popen.wait(timeout=10)
            if worker.popen.stdout is not None:
                worker.popen.stdout.close()


@pytest.fixture
def apps(tmp_path: Path, dapr_env: DaprEnv) -> Iterator[Apps]:
    # dapr_env has removed the developer's DAPR_* variables: the workers inherit a clean env.
    h = Apps(tmp_path)
    try:
        yield h
    finally:
        h.close()


def raw_history(h: Apps, address: str, instance_id: str) -> list[pb.HistoryEvent]:
    request = pb.GetInstanceHistoryRequest(instanceId=instance_id)
    return list(h.stub(address).GetInstanceHistory(request, timeout=TIMEOUT).events)


def kinds(events: list[pb.HistoryEvent]) -> Counter[str]:
    return Counter(str(e.WhichOneof("eventType")) for e in events)


def two_app_sidecar(factory: SidecarFactory) -> SidecarThread:
    return factory(app_id=A, apps={B: "127.0.0.1:0"})


# --- routing ----------------------------------------------------------------------------------


def test_cross_app_activity_and_child_workflow_return_to_the_caller(
    apps: Apps, tmp_path: Path, sidecar_process: Callable[..., SidecarProcess]
) -> None:
    sidecar = sidecar_process(
        tmp_path / "apps.db",
        http_listen=None,
        extra_args=("--app-id", A, "--app", f"127.0.0.1:0={B}"),
    )
    apps.sidecars.append(sidecar)
    assert set(sidecar.apps) == {A, B} and sidecar.apps[A] == sidecar.grpc_address
    worker_a = apps.start_worker(A, sidecar.apps[A])
    worker_b = apps.start_worker(B, sidecar.apps[B])
    client = apps.client(sidecar.apps[A])

    iid = client.schedule_new_workflow("cross_app", input="x")
    assert apps.completed(client, iid) == {
        "local": {"app": A, "input": "x-local"},
        "remote": {"app": B, "input": "x-remote"},
        "child": {"child_ran_on": B, "input": "x-child"},
    }

    # Each activity ran once, in the process of the app it was routed to.
    runs = apps.runs("whoami")
    assert [(r["instance"], r["app"], r["pid"]) for r in runs if r["instance"] == iid] == [
        (iid, A, worker_a.pid),
        (iid, B, worker_b.pid),
    ]
    child_runs = [r for r in runs if r["instance"] != iid]
    assert [(r["app"], r["pid"]) for r in child_runs] == [(B, worker_b.pid)]
    child_id = child_runs[0]["instance"]

    # The parent's history records the routing; the child belongs to the second app.
    events = raw_history(apps, sidecar.apps[A], iid)
    scheduled = [e for e in events if e.HasField("taskScheduled")]
    assert [e.router.targetAppID for e in scheduled] == ["", B]
    created = [e for e in events if e.HasField("childWorkflowInstanceCreated")]
    assert [(e.childWorkflowInstanceCreated.instanceId, e.router.targetAppID) for e in created] == [
        (child_id, B)
    ]
    counts = kinds(events)
    assert counts["taskCompleted"] == 2 and counts["childWorkflowInstanceCompleted"] == 1
    child = apps.stub(sidecar.apps[B]).GetInstance(
        pb.GetInstanceRequest(instanceId=child_id), timeout=TIMEOUT
    )
    assert child.workflowState.parentInstanceId.value == iid
    assert child.workflowState.parentAppId.value == A
    started = next(
        e for e in raw_history(apps, sidecar.apps[B], child_id) if e.HasField("executionStarted")
    )
    assert (started.router.sourceAppID, started.router.targetAppID) == (A, B)


def test_work_for_an_app_waits_for_its_worker_and_never_goes_to_another(
    apps: Apps, sidecar_factory: SidecarFactory
) -> None:
    sidecar = two_app_sidecar(sidecar_factory)
    assert sidecar.sidecar is not None and sidecar.sidecar.engine is not None
    engine = sidecar.sidecar.engine
    addresses = sidecar.sidecar.app_addresses
    worker_a = apps.start_worker(A, addresses[A])
    client = apps.client(addresses[A])

    iid = client.schedule_new_workflow("remote_only", input="w")
    # The activity waits on the second app's queue; the first app's worker, which has an
    # activity of the same name and is idle, is never offered it.
    apps.wait_until(lambda: engine.queued_activities(B) == ["whoami"], "whoami waits for b")
    assert engine.queued_activities(A) == []
    state = client.get_workflow_state(iid)
    assert state is not None and state.runtime_status == wf.WorkflowStatus.RUNNING
    assert apps.runs("whoami") == []

    worker_b = apps.start_worker(B, addresses[B])
    assert apps.completed(client, iid) == {"app": B, "input": "w"}
    assert [(r["app"], r["pid"]) for r in apps.runs("whoami")] == [(B, worker_b.pid)]
    assert worker_a.popen.poll() is None


def test_a_stream_of_one_app_gets_no_work_of_another(
    apps: Apps, sidecar_factory: SidecarFactory
) -> None:
    """At the protocol level: a raw GetWorkItems stream on the first app's address sees the
    first app's turn, and never the activity that turn routes to the second app."""
    sidecar = two_app_sidecar(sidecar_factory)
    assert sidecar.sidecar is not None and sidecar.sidecar.engine is not None
    engine = sidecar.sidecar.engine
    addresses = sidecar.sidecar.app_addresses
    stub_a = apps.stub(addresses[A])
    stream = stub_a.GetWorkItems(pb.GetWorkItemsRequest(), timeout=TIMEOUT)
    stub_a.StartInstance(pb.CreateInstanceRequest(instanceId="raw-1", name="wf"), timeout=TIMEOUT)
    item = next(stream)
    assert item.WhichOneof("request") == "workflowRequest"
    started = next(e for e in item.workflowRequest.newEvents if e.HasField("executionStarted"))
    assert started.router.sourceAppID == A
    action = pb.WorkflowAction(
        id=1,
        scheduleTask=pb.ScheduleTaskAction(name="remote", taskExecutionId="t1"),
        router=pb.TaskRouter(sourceAppID=A, targetAppID=B),
    )
    stub_a.CompleteOrchestratorTask(
        pb.WorkflowResponse(
            instanceId="raw-1", actions=[action], completionToken=item.completionToken
        ),
        timeout=TIMEOUT,
    )
    apps.wait_until(lambda: engine.queued_activities(B) == ["remote"], "the activity waits for b")
    # The second app's stream gets it, with the first app's instance as its workflow.
    stream_b = apps.stub(addresses[B]).GetWorkItems(pb.GetWorkItemsRequest(), timeout=TIMEOUT)
    got = next(stream_b)
    assert got.activityRequest.name == "remote"
    assert got.activityRequest.workflowInstance.instanceId == "raw-1"
    stream.cancel()
    stream_b.cancel()


# --- unknown apps -----------------------------------------------------------------------------


def test_an_unknown_target_app_fails_the_action(
    apps: Apps, sidecar_factory: SidecarFactory
) -> None:
    sidecar = two_app_sidecar(sidecar_factory)
    assert sidecar.sidecar is not None
    addresses = sidecar.sidecar.app_addresses
    apps.start_worker(A, addresses[A])
    client = apps.client(addresses[A])

    iid = client.schedule_new_workflow("unknown_app")
    errors = apps.completed(client, iid)
    assert set(errors) == {"activity", "child", "retried"}
    for what, message in errors.items():
        assert "'nowhere'" in message, (what, message)
        assert "not be available" in message, (what, message)
    counts = kinds(raw_history(apps, addresses[A], iid))
    # One failed call, then one with a retry policy of three attempts: the SDK retried it.
    assert counts["taskScheduled"] == 4 and counts["taskFailed"] == 4
    assert counts["childWorkflowInstanceFailed"] == 1
    assert apps.runs("whoami") == []

    # A client start aimed at an app this sidecar does not serve is refused.
    with pytest.raises(grpc.RpcError) as refused:
        apps.stub(addresses[A]).StartInstance(
            pb.CreateInstanceRequest(
                instanceId="elsewhere", name="wf", router=pb.TaskRouter(targetAppID="nowhere")
            ),
            timeout=TIMEOUT,
        )
    assert refused.value.code() == grpc.StatusCode.NOT_FOUND
    assert "'nowhere' is not served" in str(refused.value.details())


def test_a_start_routed_to_another_app_runs_there(
    apps: Apps, sidecar_factory: SidecarFactory
) -> None:
    """DaprWorkflowClient.schedule_new_workflow(app_id=...) on the first app's address."""
    sidecar = two_app_sidecar(sidecar_factory)
    assert sidecar.sidecar is not None
    addresses = sidecar.sidecar.app_addresses
    apps.start_worker(B, addresses[B])
    client = apps.client(addresses[A])
    iid = client.schedule_new_workflow("b_child", input="direct", app_id=B)
    assert apps.completed(client, iid) == {"child_ran_on": B, "input": "direct"}


# --- durability -------------------------------------------------------------------------------


@pytest.mark.crash
def test_a_pending_cross_app_call_survives_a_sidecar_kill(
    apps: Apps, tmp_path: Path, sidecar_process: Callable[..., SidecarProcess]
) -> None:
    db = tmp_path / "apps.db"
    listen_a, listen_b = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    args = ("--app-id", A, "--app", f"{listen_b}={B}")
    sidecar = sidecar_process(db, listen=listen_a, http_listen=None, extra_args=args)
    apps.sidecars.append(sidecar)
    worker_a = apps.start_worker(A, listen_a)
    worker_b = apps.start_worker(B, listen_b)
    client = apps.client(listen_a)

    iid = client.schedule_new_workflow("remote_gated", input="g1")
    # And a cross-app child workflow, itself waiting on its own (second app's) activity.
    child_parent = client.schedule_new_workflow("remote_child_gated", input="g2")
    apps.wait_until(lambda: len(apps.runs("gated")) == 2, "app b runs both gated activities")
    sidecar.kill()

    sidecar = sidecar_process(db, listen=listen_a, http_listen=None, extra_args=args)
    apps.sidecars.append(sidecar)
    assert sidecar.apps == {A: listen_a, B: listen_b}
    # The same worker processes reconnect; the pending call, restored from the store, goes to
    # the second app's worker again.
    apps.wait_until(lambda: len(apps.runs("gated")) == 4, "app b gets both activities again")
    (apps.gates / "g1").touch()
    (apps.gates / "g2").touch()
    client = apps.client(listen_a)
    assert apps.completed(client, iid) == {
        "first": B,
        "passed": f"{B} passed g1",
        "child": {"child_ran_on": B, "input": "after"},
    }
    # The restored child still belongs to the second app: its turns went to b's worker.
    assert apps.completed(client, child_parent) == {"child_ran_on": B, "passed": f"{B} passed g2"}
    assert {r["pid"] for r in apps.runs("gated")} == {worker_b.pid}
    assert {r["app"] for r in apps.runs("whoami")} == {B}
    counts = kinds(raw_history(apps, listen_a, iid))
    assert counts["taskScheduled"] == 2 and counts["taskCompleted"] == 2
    assert counts["childWorkflowInstanceCompleted"] == 1 and counts["taskFailed"] == 0
    assert worker_a.popen.poll() is None and worker_b.popen.poll() is None


# --- configuration ----------------------------------------------------------------------------


def test_app_settings_are_checked(tmp_path: Path) -> None:
    db = tmp_path / "x.db"
    with pytest.raises(ValidationError, match="the sidecar's own app id"):
        SidecarSettings(db_path=db, app_id="a", apps={"a": "127.0.0.1:5"})
    with pytest.raises(ValidationError, match="both listen on 127.0.0.1:7"):
        SidecarSettings(db_path=db, apps={"b": "127.0.0.1:7", "c": "127.0.0.1:7"})
    with pytest.raises(ValidationError, match="is not HOST:PORT"):
        SidecarSettings(db_path=db, apps={"b": "nowhere"})
    # An app listening beyond loopback needs the API token like any other listener.
    assert SidecarSettings(db_path=db, http_listen=None, apps={"b": "0.0.0.0:1"}).require_token()
    assert not SidecarSettings(
        db_path=db, http_listen=None, apps={"b": "127.0.0.1:1"}
    ).require_token()
    args = _parse_args(["--db", "x.db", "--app", "127.0.0.1:1=b", "--app", "unix:///tmp/s=c"])
    assert dict(args.app) == {"b": "127.0.0.1:1", "c": "unix:///tmp/s"}
    with pytest.raises(SystemExit):
        _parse_args(["--db", "x.db", "--app", "b"])


def test_duragate_sidecar_takes_app_options(tmp_path: Path) -> None:
    def run(*args: str) -> tuple[int, str]:
        env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), COLUMNS="300")
        env.pop("DAPR_API_TOKEN", None)
        cmd = [sys.executable, "-m", "gateway", "sidecar", "--listen", "127.0.0.1:0", *args]
        done = subprocess.run(
            cmd, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=TIMEOUT
        )
        # The error box may wrap lines: compare the words.
        return done.returncode, " ".join(done.stderr.replace("│", " ").split())

    code, err = run("--http-listen", "off", "--app", "0.0.0.0:0=b")
    assert code == 2 and "'--app'" in err and "DAPR_API_TOKEN is not set" in err
    code, err = run("--http-listen", "off", "--app", "b")
    assert code == 2 and "is not LISTEN=APP_ID" in err
    code, err = run("--http-listen", "off", "--app", "127.0.0.1:0=duragate")
    assert code == 2 and "the sidecar's own app id" in err


# --- the gateway's embedded engine ------------------------------------------------------------


async def test_the_gateway_engine_serves_the_configured_apps(apps: Apps, tmp_path: Path) -> None:
    """`engine.apps` in the gateway config: the embedded sidecar (a child process of the
    gateway) also serves app b, whose worker runs in a process of its own."""
    from gateway.config import EmbeddedEngineConfig
    from gateway.runtime import DurableRuntime

    listen_b = f"127.0.0.1:{free_port()}"
    runtime = DurableRuntime(
        EmbeddedEngineConfig(apps={B: listen_b}), tmp_path / "engine.db", lambda name: None
    )
    await runtime.start()
    try:
        await asyncio.to_thread(apps.start_worker, B, listen_b)
        client = apps.client(listen_b)
        iid = await asyncio.to_thread(client.schedule_new_workflow, "b_child", input="gw")
        output = await asyncio.to_thread(apps.completed, client, iid)
        assert output == {"child_ran_on": B, "input": "gw"}
    finally:
        await runtime.stop()


def test_engine_apps_must_be_loopback() -> None:
    from gateway.config import EmbeddedEngineConfig

    with pytest.raises(ValidationError, match="not a loopback address"):
        EmbeddedEngineConfig(apps={B: "0.0.0.0:5000"})
    with pytest.raises(ValidationError, match="cannot be the id of another app"):
        EmbeddedEngineConfig(apps={"duragate": "127.0.0.1:5000"})
    assert EmbeddedEngineConfig(apps={B: "unix:///tmp/b.sock"}).apps == {B: "unix:///tmp/b.sock"}


def test_an_app_address_in_use_stops_the_start_cleanly(
    sidecar_factory: SidecarFactory, tmp_path: Path
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        settings = sidecar_settings(tmp_path / "s.db", apps={B: f"127.0.0.1:{port}"})
        with pytest.raises(SidecarError, match=f"cannot listen on 127.0.0.1:{port}"):
            SidecarThread(settings).start()
    # Nothing was left holding the database: a sidecar starts on it at once.
    sidecar = sidecar_factory(db_path=tmp_path / "s.db", apps={B: "127.0.0.1:0"})
    assert sidecar.sidecar is not None and set(sidecar.sidecar.app_addresses) == {"duragate", B}
