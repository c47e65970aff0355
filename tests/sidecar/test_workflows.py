"""The unmodified Dapr workflow SDK against the embedded sidecar, behaviour by behaviour."""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import dapr.ext.workflow as wf
import grpc
import pytest
from dapr.ext.workflow.aio import DaprWorkflowClient as AioWorkflowClient
from dapr.ext.workflow.logger import LoggerOptions

from gateway.sidecar.inprocess import InProcessWorker, registry_of
from gateway.sidecar.protos import pb, workflow_grpc
from gateway.sidecar.server import SidecarThread

from .conftest import sidecar_settings

QUIET = LoggerOptions(log_level="WARNING")
TIMEOUT = 30

# Activity executions, counted across the module: (activity, key) -> count.
calls: Counter[tuple[str, str]] = Counter()
calls_lock = threading.Lock()


def _count(name: str, key: str) -> int:
    with calls_lock:
        calls[(name, key)] += 1
        return calls[(name, key)]


# --- activities ----------------------------------------------------------------------------


def echo(ctx: wf.WorkflowActivityContext, value: Any) -> Any:
    return value


def flaky(ctx: wf.WorkflowActivityContext, inp: dict[str, Any]) -> str:
    """Fails the first `failures` times it runs for `key`."""
    n = _count("flaky", inp["key"])
    if n <= inp["failures"]:
        raise RuntimeError(f"flaky failure {n}")
    return f"ok after {n}"


def always_fails(ctx: wf.WorkflowActivityContext, key: str) -> None:
    _count("always_fails", key)
    raise ValueError(f"broken activity for {key}")


# --- workflows -----------------------------------------------------------------------------


def sequence(ctx: wf.DaprWorkflowContext, n: int) -> Any:
    out = []
    for i in range(n):
        out.append((yield ctx.call_activity(echo, input=i)))
    return out


def fan_out(ctx: wf.DaprWorkflowContext, n: int) -> Any:
    results = yield wf.when_all([ctx.call_activity(echo, input=i) for i in range(n)])
    return sum(results)


def retrying(ctx: wf.DaprWorkflowContext, inp: dict[str, Any]) -> Any:
    policy = wf.RetryPolicy(
        first_retry_interval=timedelta(milliseconds=50),
        max_number_of_attempts=inp["attempts"],
        backoff_coefficient=1.0,
    )
    return (yield ctx.call_activity(flaky, input=inp, retry_policy=policy))


def failing(ctx: wf.DaprWorkflowContext, key: str) -> Any:
    yield ctx.call_activity(always_fails, input=key)


def timer_then_echo(ctx: wf.DaprWorkflowContext, seconds: float) -> Any:
    start = ctx.current_utc_datetime
    yield ctx.create_timer(timedelta(seconds=seconds))
    waited = (ctx.current_utc_datetime - start).total_seconds()
    return {"waited": waited, "echo": (yield ctx.call_activity(echo, input="after timer"))}


def approval(ctx: wf.DaprWorkflowContext, _: Any) -> Any:
    ctx.set_custom_status("waiting for approval")
    decision = yield ctx.wait_for_external_event("Approve")
    ctx.set_custom_status("approved")
    return decision


def approval_with_timeout(ctx: wf.DaprWorkflowContext, seconds: float) -> Any:
    event = ctx.wait_for_external_event("approve")
    timeout = ctx.create_timer(timedelta(seconds=seconds))
    winner = yield wf.when_any([event, timeout])
    return "timed out" if winner == timeout else winner.get_result()


def two_events(ctx: wf.DaprWorkflowContext, _: Any) -> Any:
    a = yield ctx.wait_for_external_event("a")
    b = yield ctx.wait_for_external_event("b")
    return [a, b]


def child(ctx: wf.DaprWorkflowContext, n: int) -> Any:
    return (yield ctx.call_activity(echo, input=n * 10))


def failing_child(ctx: wf.DaprWorkflowContext, key: str) -> Any:
    yield ctx.call_activity(always_fails, input=key)


def waiting_child(ctx: wf.DaprWorkflowContext, _: Any) -> Any:
    return (yield ctx.wait_for_external_event("never"))


def parent(ctx: wf.DaprWorkflowContext, n: int) -> Any:
    results = yield wf.when_all([ctx.call_child_workflow(child, input=i) for i in range(n)])
    return results


def parent_of_failing(ctx: wf.DaprWorkflowContext, key: str) -> Any:
    try:
        yield ctx.call_child_workflow(failing_child, input=key)
    except Exception as exc:  # noqa: BLE001 - the point of the test
        return f"child failed: {exc}"
    return "child succeeded"


def parent_of_waiting(ctx: wf.DaprWorkflowContext, _: Any) -> Any:
    return (yield ctx.call_child_workflow(waiting_child, input=None))


def counter(ctx: wf.DaprWorkflowContext, state: dict[str, Any]) -> Any:
    """Continues as new until it has counted to `until`, keeping events raised meanwhile."""
    if state["n"] >= state["until"]:
        return state
    yield ctx.call_activity(echo, input=state["n"])
    if state["n"] == 1:
        got = yield ctx.wait_for_external_event("bump")
        state = {**state, "bumped": got}
    ctx.continue_as_new({**state, "n": state["n"] + 1}, save_events=True)


WORKFLOWS: list[Any] = [
    sequence,
    fan_out,
    retrying,
    failing,
    timer_then_echo,
    approval,
    approval_with_timeout,
    two_events,
    child,
    failing_child,
    waiting_child,
    parent,
    parent_of_failing,
    parent_of_waiting,
    counter,
]
ACTIVITIES: list[Any] = [echo, flaky, always_fails]


def registered(runtime: wf.WorkflowRuntime) -> wf.WorkflowRuntime:
    for w in WORKFLOWS:
        runtime.register_workflow(w)
    for a in ACTIVITIES:
        runtime.register_activity(a)
    return runtime


class InProcessRuntime:
    """The gateway's in-process worker (gateway/sidecar/inprocess.py) with the same
    registrations, on the sidecar thread's own loop: every behaviour of this module is checked
    against it as well as against the SDK's worker."""

    def __init__(self, sidecar: SidecarThread, registrations: wf.WorkflowRuntime) -> None:
        assert sidecar.sidecar is not None and sidecar.sidecar.engine is not None
        assert sidecar._loop is not None
        self._loop = sidecar._loop
        registry = registry_of(registrations)
        engine = sidecar.sidecar.engine

        async def start() -> InProcessWorker:
            worker = InProcessWorker(engine, registry)
            worker.start()
            return worker

        self._worker = asyncio.run_coroutine_threadsafe(start(), self._loop).result(TIMEOUT)

    def shutdown(self) -> None:
        asyncio.run_coroutine_threadsafe(self._worker.stop(), self._loop).result(TIMEOUT)


def make_client(address: str) -> wf.DaprWorkflowClient:
    host, _, port = address.rpartition(":")
    return wf.DaprWorkflowClient(host=host, port=port, logger_options=QUIET)


def new_id() -> str:
    return uuid.uuid4().hex


@pytest.fixture(scope="module")
def engine_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("wf") / "engine.db"


@pytest.fixture(scope="module")
def sidecar_mod(engine_db: Path) -> Iterator[SidecarThread]:
    thread = SidecarThread(sidecar_settings(engine_db, http_listen=None))
    thread.start()
    yield thread
    thread.stop()


@pytest.fixture(scope="module")
def registrations(sidecar_mod: SidecarThread) -> wf.WorkflowRuntime:
    """The module's workflows and activities, registered once (the SDK marks a registered
    function and refuses it in a second runtime)."""
    host, _, port = sidecar_mod.grpc_address.rpartition(":")
    return registered(wf.WorkflowRuntime(host=host, port=port, logger_options=QUIET))


@pytest.fixture(scope="module", params=["sdk-worker", "in-process-worker"])
def runtime(
    request: pytest.FixtureRequest, sidecar_mod: SidecarThread, registrations: wf.WorkflowRuntime
) -> Iterator[wf.WorkflowRuntime | InProcessRuntime]:
    rt: wf.WorkflowRuntime | InProcessRuntime
    if request.param == "sdk-worker":
        rt = registrations
        rt.start()
    else:
        rt = InProcessRuntime(sidecar_mod, registrations)
    yield rt
    rt.shutdown()


@pytest.fixture(scope="module")
def client(sidecar_mod: SidecarThread, runtime: Any) -> wf.DaprWorkflowClient:
    return make_client(sidecar_mod.grpc_address)


def run(client: wf.DaprWorkflowClient, workflow: Any, inp: Any = None) -> wf.WorkflowState:
    return done(client, client.schedule_new_workflow(workflow, input=inp, instance_id=new_id()))


def done(client: wf.DaprWorkflowClient, iid: str) -> wf.WorkflowState:
    state = client.wait_for_workflow_completion(iid, timeout_in_seconds=TIMEOUT)
    assert state is not None, f"{iid} does not exist"
    return state


def state_of(client: wf.DaprWorkflowClient, iid: str) -> wf.WorkflowState:
    state = client.get_workflow_state(iid)
    assert state is not None, f"{iid} does not exist"
    return state


def wait_status(
    client: wf.DaprWorkflowClient, iid: str, status: wf.WorkflowStatus, timeout: float = TIMEOUT
) -> wf.WorkflowState:
    deadline = time.monotonic() + timeout
    while True:
        state = client.get_workflow_state(iid)
        if state is not None and state.runtime_status == status:
            return state
        if time.monotonic() > deadline:
            raise AssertionError(f"{iid} never reached {status}; last state {state}")
        time.sleep(0.02)


def history_types(client: wf.DaprWorkflowClient, iid: str) -> list[str]:
    return [e.event_type.value for e in client.get_workflow_history(iid)]


# --- activities, retries, failures ---------------------------------------------------------


def test_activity_sequence_completes_with_result(client: wf.DaprWorkflowClient) -> None:
    state = run(client, sequence, 3)
    assert state.runtime_status == wf.WorkflowStatus.COMPLETED
    assert state.serialized_output == "[0, 1, 2]"
    assert state.serialized_input == "3"


def test_fan_out_fan_in(client: wf.DaprWorkflowClient) -> None:
    state = run(client, fan_out, 20)
    assert state.runtime_status == wf.WorkflowStatus.COMPLETED
    assert state.serialized_output == str(sum(range(20)))


def test_activity_retries_are_driven_by_the_sdk(client: wf.DaprWorkflowClient) -> None:
    key = new_id()
    state = run(client, retrying, {"key": key, "failures": 2, "attempts": 5})
    assert state.runtime_status == wf.WorkflowStatus.COMPLETED
    assert state.serialized_output == '"ok after 3"'
    assert calls[("flaky", key)] == 3
    types = history_types(client, state.instance_id)
    # Each retry waits on a retry timer the sidecar recorded and fired.
    assert types.count("timerCreated") == 2 and types.count("timerFired") == 2
    assert types.count("taskFailed") == 2 and types.count("taskCompleted") == 1


def test_retries_exhausted_fail_the_workflow(client: wf.DaprWorkflowClient) -> None:
    key = new_id()
    state = run(client, retrying, {"key": key, "failures": 10, "attempts": 2})
    assert state.runtime_status == wf.WorkflowStatus.FAILED
    assert calls[("flaky", key)] == 2
    assert state.failure_details is not None
    assert "flaky failure 2" in state.failure_details.message


def test_activity_failure_fails_workflow_with_details(client: wf.DaprWorkflowClient) -> None:
    key = new_id()
    state = run(client, failing, key)
    assert state.runtime_status == wf.WorkflowStatus.FAILED
    assert state.failure_details is not None
    assert f"broken activity for {key}" in state.failure_details.message


def test_unregistered_workflow_fails_clearly(client: wf.DaprWorkflowClient) -> None:
    iid = client.schedule_new_workflow("no_such_workflow", instance_id=new_id())
    state = done(client, iid)
    assert state is not None and state.runtime_status == wf.WorkflowStatus.FAILED
    assert "no_such_workflow" in state.failure_details.message


# --- timers and external events ------------------------------------------------------------


def test_durable_timer_fires(client: wf.DaprWorkflowClient) -> None:
    t0 = time.monotonic()
    state = run(client, timer_then_echo, 0.5)
    assert time.monotonic() - t0 >= 0.5
    assert state.runtime_status == wf.WorkflowStatus.COMPLETED
    out = state.serialized_output
    assert '"echo": "after timer"' in out
    # The workflow's clock (WorkflowStarted timestamps) moved by at least the timer.
    assert float(out.split('"waited": ')[1].split(",")[0]) >= 0.5


def test_external_event_and_custom_status(client: wf.DaprWorkflowClient) -> None:
    iid = client.schedule_new_workflow(approval, instance_id=new_id())
    state = wait_status(client, iid, wf.WorkflowStatus.RUNNING)
    deadline = time.monotonic() + TIMEOUT
    while state.serialized_custom_status != "waiting for approval":
        assert time.monotonic() < deadline
        time.sleep(0.02)
        state = state_of(client, iid)
    # The SDK matches event names case-insensitively.
    client.raise_workflow_event(iid, "APPROVE", data={"by": "alice"})
    state = done(client, iid)
    assert state.runtime_status == wf.WorkflowStatus.COMPLETED
    assert state.serialized_output == '{"by": "alice"}'
    assert state.serialized_custom_status == "approved"


def test_events_raised_early_are_buffered(client: wf.DaprWorkflowClient) -> None:
    iid = client.schedule_new_workflow(two_events, instance_id=new_id())
    client.raise_workflow_event(iid, "b", data=2)
    client.raise_workflow_event(iid, "a", data=1)
    state = done(client, iid)
    assert state.serialized_output == "[1, 2]"


def test_event_or_timeout(client: wf.DaprWorkflowClient) -> None:
    assert run(client, approval_with_timeout, 0.3).serialized_output == '"timed out"'
    iid = client.schedule_new_workflow(approval_with_timeout, input=30, instance_id=new_id())
    wait_status(client, iid, wf.WorkflowStatus.RUNNING)
    client.raise_workflow_event(iid, "approve", data="yes")
    state = done(client, iid)
    assert state.serialized_output == '"yes"'


def test_wait_forever_timer_is_recorded_never_fired(client: wf.DaprWorkflowClient) -> None:
    iid = client.schedule_new_workflow(approval, instance_id=new_id())
    wait_status(client, iid, wf.WorkflowStatus.RUNNING)
    time.sleep(0.2)
    events = client.get_workflow_history(iid)
    assert [e.event_type.value for e in events].count("timerFired") == 0
    client.raise_workflow_event(iid, "approve", data=1)
    state = done(client, iid)
    assert state.runtime_status == wf.WorkflowStatus.COMPLETED


def test_raise_event_on_unknown_instance_is_not_found(client: wf.DaprWorkflowClient) -> None:
    with pytest.raises(grpc.RpcError) as info:
        client.raise_workflow_event("no-such-instance", "approve", data=1)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


# --- suspend, resume, terminate ------------------------------------------------------------


def test_suspend_holds_events_until_resume(client: wf.DaprWorkflowClient) -> None:
    iid = client.schedule_new_workflow(two_events, instance_id=new_id())
    wait_status(client, iid, wf.WorkflowStatus.RUNNING)
    client.pause_workflow(iid)
    assert state_of(client, iid).runtime_status == wf.WorkflowStatus.SUSPENDED
    client.raise_workflow_event(iid, "a", data=1)
    client.raise_workflow_event(iid, "b", data=2)
    time.sleep(0.3)
    assert state_of(client, iid).runtime_status == wf.WorkflowStatus.SUSPENDED
    client.resume_workflow(iid)
    state = done(client, iid)
    assert state.runtime_status == wf.WorkflowStatus.COMPLETED
    assert state.serialized_output == "[1, 2]"
    types = history_types(client, iid)
    assert types.index("executionSuspended") < types.index("executionResumed")


def test_terminate_running_and_suspended(client: wf.DaprWorkflowClient) -> None:
    iid = client.schedule_new_workflow(approval, instance_id=new_id())
    wait_status(client, iid, wf.WorkflowStatus.RUNNING)
    client.terminate_workflow(iid, output="stopped by test")
    state = done(client, iid)
    assert state.runtime_status == wf.WorkflowStatus.TERMINATED
    assert state.serialized_output == '"stopped by test"'

    iid = client.schedule_new_workflow(approval, instance_id=new_id())
    wait_status(client, iid, wf.WorkflowStatus.RUNNING)
    client.pause_workflow(iid)
    client.terminate_workflow(iid)
    state = done(client, iid)
    assert state.runtime_status == wf.WorkflowStatus.TERMINATED
    # A finished instance drops later events quietly, as daprd does.
    client.raise_workflow_event(iid, "approve", data=1)
    assert state_of(client, iid).runtime_status == wf.WorkflowStatus.TERMINATED


def test_recursive_terminate_stops_children(client: wf.DaprWorkflowClient) -> None:
    iid = client.schedule_new_workflow(parent_of_waiting, instance_id=new_id())
    child_id = f"{iid}:0001"
    wait_status(client, child_id, wf.WorkflowStatus.RUNNING)
    client.terminate_workflow(iid, recursive=True)
    assert done(client, child_id).runtime_status == (wf.WorkflowStatus.TERMINATED)

    iid = client.schedule_new_workflow(parent_of_waiting, instance_id=new_id())
    child_id = f"{iid}:0001"
    wait_status(client, child_id, wf.WorkflowStatus.RUNNING)
    client.terminate_workflow(iid, recursive=False)
    wait_status(client, iid, wf.WorkflowStatus.TERMINATED)
    assert state_of(client, child_id).runtime_status == wf.WorkflowStatus.RUNNING
    client.terminate_workflow(child_id)


def test_suspend_finished_instance_is_refused(client: wf.DaprWorkflowClient) -> None:
    state = run(client, sequence, 1)
    with pytest.raises(grpc.RpcError) as info:
        client.pause_workflow(state.instance_id)
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "already finished" in info.value.details()


# --- children and continue-as-new ----------------------------------------------------------


def test_child_workflows(client: wf.DaprWorkflowClient) -> None:
    state = run(client, parent, 3)
    assert state.runtime_status == wf.WorkflowStatus.COMPLETED
    assert state.serialized_output == "[0, 10, 20]"
    kid = client.get_workflow_state(f"{state.instance_id}:0001")
    assert kid is not None and kid.runtime_status == wf.WorkflowStatus.COMPLETED


def test_child_failure_reaches_parent(client: wf.DaprWorkflowClient) -> None:
    key = new_id()
    state = run(client, parent_of_failing, key)
    assert state.runtime_status == wf.WorkflowStatus.COMPLETED
    assert state.serialized_output.startswith('"child failed:')


def test_continue_as_new_carries_events(client: wf.DaprWorkflowClient) -> None:
    iid = client.schedule_new_workflow(counter, input={"n": 0, "until": 4}, instance_id=new_id())
    # Raised early: it must survive the continue-as-new that happens before it is awaited.
    client.raise_workflow_event(iid, "bump", data="bumped!")
    state = done(client, iid)
    assert state.runtime_status == wf.WorkflowStatus.COMPLETED
    assert state.serialized_output == '{"n": 4, "until": 4, "bumped": "bumped!"}'
    # History holds only the last execution.
    types = history_types(client, iid)
    assert types.count("executionStarted") == 1 and types.count("taskScheduled") == 0


# --- instance management -------------------------------------------------------------------


def test_instance_id_reuse_rules(client: wf.DaprWorkflowClient) -> None:
    iid = new_id()
    client.schedule_new_workflow(approval, instance_id=iid)
    wait_status(client, iid, wf.WorkflowStatus.RUNNING)
    with pytest.raises(grpc.RpcError) as info:
        client.schedule_new_workflow(approval, instance_id=iid)
    assert info.value.code() == grpc.StatusCode.ALREADY_EXISTS
    client.raise_workflow_event(iid, "approve", data="first")
    first = done(client, iid)
    # A finished id can be used again: a fresh execution with its own history.
    client.schedule_new_workflow(sequence, input=2, instance_id=iid)
    second = done(client, iid)
    assert second.serialized_output == "[0, 1]"
    assert second.name == "sequence" and first.name == "approval"
    assert history_types(client, iid).count("executionStarted") == 1


def test_enforce_unique_instance_id(sidecar_mod: SidecarThread, client: Any) -> None:
    state = run(client, sequence, 1)
    with grpc.insecure_channel(sidecar_mod.grpc_address) as channel:
        stub = workflow_grpc.TaskHubSidecarServiceStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            stub.StartInstance(
                pb.CreateInstanceRequest(
                    instanceId=state.instance_id, name="sequence", enforceUniqueInstanceId=True
                )
            )
    assert info.value.code() == grpc.StatusCode.ALREADY_EXISTS


def test_purge_rules(client: wf.DaprWorkflowClient) -> None:
    state = run(client, parent, 2)
    iid = state.instance_id
    client.purge_workflow(iid, recursive=True)
    assert client.get_workflow_state(iid) is None
    assert client.get_workflow_state(f"{iid}:0001") is None
    with pytest.raises(grpc.RpcError) as info:
        client.get_workflow_history(iid)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as info:
        client.purge_workflow("never-existed")
    assert info.value.code() == grpc.StatusCode.NOT_FOUND

    running = client.schedule_new_workflow(approval, instance_id=new_id())
    wait_status(client, running, wf.WorkflowStatus.RUNNING)
    with pytest.raises(grpc.RpcError) as info:
        client.purge_workflow(running)
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION


def test_force_purge_of_running_instance(sidecar_mod: SidecarThread, client: Any) -> None:
    running = client.schedule_new_workflow(approval, instance_id=new_id())
    wait_status(client, running, wf.WorkflowStatus.RUNNING)
    with grpc.insecure_channel(sidecar_mod.grpc_address) as channel:
        stub = workflow_grpc.TaskHubSidecarServiceStub(channel)
        res = stub.PurgeInstances(pb.PurgeInstancesRequest(instanceId=running, force=True))
    assert res.deletedInstanceCount == 1
    assert client.get_workflow_state(running) is None


def test_purge_by_filter(sidecar_mod: SidecarThread, client: Any) -> None:
    before = datetime.now(UTC)
    done = [run(client, sequence, 1).instance_id for _ in range(3)]
    still = client.schedule_new_workflow(approval, instance_id=new_id())
    wait_status(client, still, wf.WorkflowStatus.RUNNING)
    with grpc.insecure_channel(sidecar_mod.grpc_address) as channel:
        stub = workflow_grpc.TaskHubSidecarServiceStub(channel)
        flt = pb.PurgeInstanceFilter(runtimeStatus=[pb.ORCHESTRATION_STATUS_COMPLETED])
        flt.createdTimeFrom.FromDatetime(before)
        res = stub.PurgeInstances(pb.PurgeInstancesRequest(purgeInstanceFilter=flt))
    assert res.deletedInstanceCount == 3
    assert all(client.get_workflow_state(i) is None for i in done)
    assert client.get_workflow_state(still) is not None
    client.terminate_workflow(still)


def test_list_instance_ids_pages(client: wf.DaprWorkflowClient) -> None:
    ids = {run(client, sequence, 0).instance_id for _ in range(5)}
    seen: list[str] = []
    token = None
    while True:
        page = client.list_workflow_instance_ids(page_size=2, continuation_token=token)
        assert len(page.instance_ids) <= 2
        seen.extend(page.instance_ids)
        token = page.continuation_token
        if not token:
            break
    assert ids <= set(seen)
    assert len(seen) == len(set(seen))


def test_history_shape(client: wf.DaprWorkflowClient) -> None:
    state = run(client, sequence, 2)
    types = history_types(client, state.instance_id)
    assert types[0] == "workflowStarted" and types[1] == "executionStarted"
    assert types.count("taskScheduled") == 2 and types.count("taskCompleted") == 2
    assert types[-1] == "executionCompleted"


def test_wait_for_start_and_scheduled_start(client: wf.DaprWorkflowClient) -> None:
    start_at = datetime.now(UTC) + timedelta(seconds=0.6)
    iid = client.schedule_new_workflow(sequence, input=1, instance_id=new_id(), start_at=start_at)
    assert state_of(client, iid).runtime_status == wf.WorkflowStatus.PENDING
    started = client.wait_for_workflow_start(iid, timeout_in_seconds=TIMEOUT)
    assert started is not None and started.runtime_status != wf.WorkflowStatus.PENDING
    assert datetime.now(UTC) >= start_at
    state = done(client, iid)
    assert state.serialized_output == "[0]"


def test_wait_honours_client_deadline(client: wf.DaprWorkflowClient) -> None:
    iid = client.schedule_new_workflow(approval, instance_id=new_id())
    t0 = time.monotonic()
    with pytest.raises(TimeoutError):
        client.wait_for_workflow_completion(iid, timeout_in_seconds=1)
    assert time.monotonic() - t0 < 5
    client.terminate_workflow(iid)


def test_get_unknown_instance(client: wf.DaprWorkflowClient) -> None:
    assert client.get_workflow_state("does-not-exist") is None


def test_aio_client(sidecar_mod: SidecarThread, runtime: Any) -> None:
    host, _, port = sidecar_mod.grpc_address.rpartition(":")

    async def main() -> list[Any]:
        aclient = AioWorkflowClient(host=host, port=port, logger_options=QUIET)
        ids = [
            await aclient.schedule_new_workflow(sequence, input=i, instance_id=new_id())
            for i in range(1, 6)
        ]
        states = await asyncio.gather(
            *(aclient.wait_for_workflow_completion(i, timeout_in_seconds=TIMEOUT) for i in ids)
        )
        return [s.serialized_output if s else None for s in states]

    outputs = asyncio.run(main())
    assert outputs == [str(list(range(i))).replace(" ", " ") for i in range(1, 6)]


def test_long_history_with_and_without_stateful_history(tmp_path: Path) -> None:
    for stateful in (True, False):
        settings = sidecar_settings(
            tmp_path / f"s{stateful}.db", http_listen=None, stateful_history=stateful
        )
        with SidecarThread(settings) as sc:
            host, _, port = sc.grpc_address.rpartition(":")
            rt = wf.WorkflowRuntime(host=host, port=port, logger_options=QUIET)

            # A runtime of its own needs functions of its own: the SDK marks registered ones.
            def add_one(ctx: wf.WorkflowActivityContext, value: int) -> int:
                return value + 1

            def fifty(ctx: wf.DaprWorkflowContext, n: int) -> Any:
                total = 0
                for i in range(n):
                    total += yield ctx.call_activity(add_one, input=i)
                return total

            rt.register_activity(add_one)
            rt.register_workflow(fifty)
            rt.start()
            try:
                c = make_client(sc.grpc_address)
                state = run(c, fifty, 50)
                assert state.serialized_output == str(sum(range(1, 51)))
                assert history_types(c, state.instance_id).count("taskCompleted") == 50
            finally:
                rt.shutdown()


# --- bad input -----------------------------------------------------------------------------


def test_bad_requests_get_clear_errors(sidecar_mod: SidecarThread, client: Any) -> None:
    with grpc.insecure_channel(sidecar_mod.grpc_address) as channel:
        stub = workflow_grpc.TaskHubSidecarServiceStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            stub.StartInstance(pb.CreateInstanceRequest(instanceId="x", name=""))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(grpc.RpcError) as info:
            stub.StartInstance(pb.CreateInstanceRequest(instanceId="x" * 2000, name="sequence"))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(grpc.RpcError) as info:
            stub.RaiseEvent(pb.RaiseEventRequest(instanceId="nope", name=""))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(grpc.RpcError) as info:
            stub.GetInstanceHistory(pb.GetInstanceHistoryRequest(instanceId="nope"))
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
        with pytest.raises(grpc.RpcError) as info:
            stub.TerminateInstance(pb.TerminateRequest(instanceId="nope"))
        assert info.value.code() == grpc.StatusCode.NOT_FOUND


def test_oversized_input_is_refused(tmp_path: Path) -> None:
    settings = sidecar_settings(tmp_path / "small.db", http_listen=None, max_payload_bytes=4096)
    with SidecarThread(settings) as sc:
        c = make_client(sc.grpc_address)
        with pytest.raises(grpc.RpcError) as info:
            c.schedule_new_workflow("sequence", input="x" * 5000)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "4096" in info.value.details()
        # Nothing was stored.
        assert c.list_workflow_instance_ids().instance_ids == []


# --- work-item streams at the protocol level -------------------------------------------------


def _next_item(stream: Any) -> pb.WorkItem:
    for item in stream:
        if not item.HasField("healthPing"):
            return item
    raise AssertionError("the stream ended")


def test_closed_stream_requeues_and_stale_token_is_ignored(tmp_path: Path) -> None:
    settings = sidecar_settings(tmp_path / "raw.db", http_listen=None)
    with SidecarThread(settings) as sc, grpc.insecure_channel(sc.grpc_address) as channel:
        stub = workflow_grpc.TaskHubSidecarServiceStub(channel)
        stub.StartInstance(pb.CreateInstanceRequest(instanceId="raw-1", name="raw"))
        first = stub.GetWorkItems(pb.GetWorkItemsRequest())
        item = _next_item(first)
        assert item.workflowRequest.instanceId == "raw-1"
        new_events = [e.WhichOneof("eventType") for e in item.workflowRequest.newEvents]
        assert new_events == ["workflowStarted", "executionStarted"]
        assert item.workflowRequest.newEvents[0].timestamp.seconds > 1_700_000_000
        old_token = item.completionToken
        first.cancel()  # the worker goes away holding the turn

        second = stub.GetWorkItems(pb.GetWorkItemsRequest())
        again = _next_item(second)
        assert again.workflowRequest.instanceId == "raw-1"
        assert again.completionToken != old_token

        done = pb.WorkflowAction(
            id=0,
            completeWorkflow=pb.CompleteWorkflowAction(
                workflowStatus=pb.ORCHESTRATION_STATUS_COMPLETED,
                result=pb.wrappers_pb2.StringValue(value='"stale"'),
            ),
        )
        # The late answer of the first worker changes nothing.
        stub.CompleteOrchestratorTask(
            pb.WorkflowResponse(instanceId="raw-1", actions=[done], completionToken=old_token)
        )
        state = stub.GetInstance(pb.GetInstanceRequest(instanceId="raw-1"))
        assert state.workflowState.workflowStatus == pb.ORCHESTRATION_STATUS_PENDING

        done.completeWorkflow.result.value = '"fresh"'
        stub.CompleteOrchestratorTask(
            pb.WorkflowResponse(
                instanceId="raw-1", actions=[done], completionToken=again.completionToken
            )
        )
        state = stub.GetInstance(
            pb.GetInstanceRequest(instanceId="raw-1", getInputsAndOutputs=True)
        )
        assert state.workflowState.workflowStatus == pb.ORCHESTRATION_STATUS_COMPLETED
        assert state.workflowState.output.value == '"fresh"'
        second.cancel()


def test_second_task_completion_is_dropped(tmp_path: Path) -> None:
    """A duplicate resolution of one task (e.g. a redelivered completion) is not delivered."""
    settings = sidecar_settings(tmp_path / "dup.db", http_listen=None)
    with SidecarThread(settings) as sc, grpc.insecure_channel(sc.grpc_address) as channel:
        stub = workflow_grpc.TaskHubSidecarServiceStub(channel)
        stub.StartInstance(pb.CreateInstanceRequest(instanceId="dup-1", name="raw"))
        stream = stub.GetWorkItems(pb.GetWorkItemsRequest())
        turn = _next_item(stream)
        schedule = pb.WorkflowAction(id=0, scheduleTask=pb.ScheduleTaskAction(name="act"))
        stub.CompleteOrchestratorTask(
            pb.WorkflowResponse(
                instanceId="dup-1", actions=[schedule], completionToken=turn.completionToken
            )
        )
        act = _next_item(stream)
        assert act.activityRequest.taskId == 0
        assert act.activityRequest.workflowInstance.instanceId == "dup-1"
        result = pb.wrappers_pb2.StringValue(value="1")
        response = pb.ActivityResponse(
            instanceId="dup-1", taskId=0, result=result, completionToken=act.completionToken
        )
        stub.CompleteActivityTask(response)
        stub.CompleteActivityTask(response)  # a second answer with the same token: ignored
        turn2 = _next_item(stream)
        kinds = [e.WhichOneof("eventType") for e in turn2.workflowRequest.newEvents]
        assert kinds == ["workflowStarted", "taskCompleted"]
        past = [e.WhichOneof("eventType") for e in turn2.workflowRequest.pastEvents]
        assert past == ["workflowStarted", "executionStarted", "taskScheduled"]
        stream.cancel()


def test_too_many_live_instances_is_refused(tmp_path: Path) -> None:
    settings = sidecar_settings(
        tmp_path / "cap.db", http_listen=None, max_live_instances=2, start_wait_seconds=0
    )
    with SidecarThread(settings) as sc:
        c = make_client(sc.grpc_address)
        c.schedule_new_workflow("approval", instance_id="a")
        c.schedule_new_workflow("approval", instance_id="b")
        with pytest.raises(grpc.RpcError) as info:
            c.schedule_new_workflow("approval", instance_id="c")
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "max_live_instances" in info.value.details()
        c.terminate_workflow("a")
        c.schedule_new_workflow("approval", instance_id="c")  # room again


def test_garbage_bytes_are_refused_and_the_sidecar_keeps_serving(sidecar_mod: Any) -> None:
    with grpc.insecure_channel(sidecar_mod.grpc_address) as channel:
        for method in ("StartInstance", "CompleteOrchestratorTask", "RaiseEvent"):
            call = channel.unary_unary(
                f"/TaskHubSidecarService/{method}",
                request_serializer=lambda b: b,
                response_deserializer=lambda b: b,
            )
            with pytest.raises(grpc.RpcError) as info:
                call(b"\xff\xff\xff\xff\x0f not a protobuf message", timeout=10)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "malformed" in info.value.details()
        unknown = channel.unary_unary("/TaskHubSidecarService/NoSuchMethod")
        with pytest.raises(grpc.RpcError) as info:
            unknown(b"", timeout=10)
        assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED
        stub = workflow_grpc.TaskHubSidecarServiceStub(channel)
        assert not stub.GetInstance(pb.GetInstanceRequest(instanceId="still-alive")).exists


def test_a_completion_with_a_non_final_status_fails_the_workflow(tmp_path: Path) -> None:
    settings = sidecar_settings(tmp_path / "bad.db", http_listen=None, start_wait_seconds=0)
    with SidecarThread(settings) as sc, grpc.insecure_channel(sc.grpc_address) as channel:
        stub = workflow_grpc.TaskHubSidecarServiceStub(channel)
        stub.StartInstance(pb.CreateInstanceRequest(instanceId="odd", name="raw"))
        stream = stub.GetWorkItems(pb.GetWorkItemsRequest())
        turn = _next_item(stream)
        odd = pb.WorkflowAction(
            id=0,
            completeWorkflow=pb.CompleteWorkflowAction(workflowStatus=999),  # type: ignore[arg-type]
        )
        stub.CompleteOrchestratorTask(
            pb.WorkflowResponse(
                instanceId="odd", actions=[odd], completionToken=turn.completionToken
            )
        )
        state = stub.GetInstance(pb.GetInstanceRequest(instanceId="odd")).workflowState
        assert state.workflowStatus == pb.ORCHESTRATION_STATUS_FAILED
        assert "not a final status" in state.failureDetails.errorMessage
        stream.cancel()
