"""The gateway's own connection to an engine in its process (gateway/sidecar/inprocess.py): the
Dapr SDK's aio workflow client over `InProcessChannel`, and `InProcessWorker`.

The workflow behaviours themselves (activities, retries, timers, events, children, ...) run
against the in-process worker in tests/sidecar/test_workflows.py; these tests cover what is
particular to the in-process path: the protocol's status codes and deadlines without gRPC, a
worker that stops mid-activity, results too large for a sidecar message, and a gateway runtime
that starts no sidecar process yet still serves other processes over gRPC.
"""

from __future__ import annotations

import asyncio
import functools
import os
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import dapr.ext.workflow as wf
import grpc
import pytest
from dapr.ext.workflow.logger import LoggerOptions

from gateway.config import EmbeddedEngineConfig
from gateway.runtime import DurableRuntime
from gateway.sidecar.inprocess import (
    InProcessWorker,
    inprocess_client,
    registry_of,
    workflow_stub,
)
from gateway.sidecar.protos import pb
from gateway.sidecar.server import Sidecar
from gateway.sidecar.workflow_service import WorkflowServicer

from .conftest import sidecar_settings

QUIET = LoggerOptions(log_level="WARNING")

# What the activities below saw, per test: key -> number of runs.
runs: dict[str, int] = {}


def echo(ctx: wf.WorkflowActivityContext, value: Any) -> Any:
    return value


async def slow_once(ctx: wf.WorkflowActivityContext, key: str) -> str:
    """Blocks on its first run (until the test stops the worker), returns on the next."""
    runs[key] = runs.get(key, 0) + 1
    if runs[key] == 1:
        await asyncio.sleep(3600)
    return f"run {runs[key]}"


def huge(ctx: wf.WorkflowActivityContext, size: int) -> str:
    return "x" * size


def one_step(ctx: wf.DaprWorkflowContext, value: Any) -> Any:
    return (yield ctx.call_activity(echo, input=value))


def slow_workflow(ctx: wf.DaprWorkflowContext, key: str) -> Any:
    return (yield ctx.call_activity(slow_once, input=key))


def huge_workflow(ctx: wf.DaprWorkflowContext, size: int) -> Any:
    try:
        yield ctx.call_activity(huge, input=size)
    except Exception as exc:  # noqa: BLE001 - the failure is what the test looks at
        return f"failed: {exc}"
    return "delivered"


def waits(ctx: wf.DaprWorkflowContext, _: Any) -> Any:
    return (yield ctx.wait_for_external_event("go"))


turns_run: list[int] = []


def counted(ctx: wf.DaprWorkflowContext, i: int) -> Any:
    turns_run.append(i)
    return i


@functools.cache
def _registry() -> Any:
    """Registered once: the SDK marks a registered function and refuses it a second time."""
    runtime = wf.WorkflowRuntime(logger_options=QUIET)
    for w in (one_step, slow_workflow, huge_workflow, waits, counted):
        runtime.register_workflow(w)
    for a in (echo, slow_once, huge):
        runtime.register_activity(a)
    return registry_of(runtime)


@pytest.fixture
async def sidecar(tmp_path: Path) -> AsyncIterator[Sidecar]:
    sc = Sidecar(sidecar_settings(tmp_path / "engine.db", max_payload_bytes=64 * 1024))
    await sc.start()
    yield sc
    await sc.stop()


def _client(sc: Sidecar) -> Any:
    assert sc.engine is not None
    return inprocess_client(WorkflowServicer(sc.engine), sc.grpc_address)


async def test_the_sdk_client_runs_a_workflow_in_process(sidecar: Sidecar) -> None:
    assert sidecar.engine is not None
    worker = InProcessWorker(sidecar.engine, _registry())
    worker.start()
    client = _client(sidecar)
    try:
        iid = await client.schedule_new_workflow(one_step, input={"n": 1})
        state = await client.wait_for_workflow_completion(iid, timeout_in_seconds=30)
        assert state is not None
        assert state.runtime_status == wf.WorkflowStatus.COMPLETED
        assert state.serialized_output == '{"n": 1}'
        assert await client.get_workflow_state("no-such-instance") is None
    finally:
        await worker.stop()


async def test_status_codes_and_deadlines_are_the_protocols(sidecar: Sidecar) -> None:
    assert sidecar.engine is not None
    worker = InProcessWorker(sidecar.engine, _registry())
    worker.start()
    client = _client(sidecar)
    stub = workflow_stub(WorkflowServicer(sidecar.engine))
    try:
        # An unknown instance: the same NOT_FOUND a gRPC client gets.
        with pytest.raises(grpc.aio.AioRpcError) as unknown:
            await stub.RaiseEvent(pb.RaiseEventRequest(instanceId="nobody", name="go"))
        assert unknown.value.code() == grpc.StatusCode.NOT_FOUND
        # A wait that outlasts its deadline: DEADLINE_EXCEEDED, which the SDK reports as a
        # timeout; the instance is untouched.
        iid = await client.schedule_new_workflow(waits)
        with pytest.raises(TimeoutError):
            await client.wait_for_workflow_completion(iid, timeout_in_seconds=1)
        with pytest.raises(grpc.aio.AioRpcError) as late:
            await stub.WaitForInstanceCompletion(pb.GetInstanceRequest(instanceId=iid), timeout=0.2)
        assert late.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        # A reused id of a running instance, and a call the sidecar does not implement.
        with pytest.raises(grpc.aio.AioRpcError) as exists:
            await stub.StartInstance(
                pb.CreateInstanceRequest(instanceId=iid, name="waits", enforceUniqueInstanceId=True)
            )
        assert exists.value.code() == grpc.StatusCode.ALREADY_EXISTS
        with pytest.raises(grpc.aio.AioRpcError) as missing:
            await stub.RerunWorkflowFromEvent(
                pb.RerunWorkflowFromEventRequest(sourceInstanceID=iid)
            )
        assert missing.value.code() == grpc.StatusCode.UNIMPLEMENTED
        await client.raise_workflow_event(iid, "go", data="now")
        state = await client.wait_for_workflow_completion(iid, timeout_in_seconds=30)
        assert state is not None and state.serialized_output == '"now"'
    finally:
        await worker.stop()


async def test_a_stopped_worker_hands_back_its_activity(sidecar: Sidecar) -> None:
    """At least once: the activity the first worker never finished runs again on the next
    one, and the workflow records one result."""
    assert sidecar.engine is not None
    registry = _registry()
    first = InProcessWorker(sidecar.engine, registry)
    first.start()
    client = _client(sidecar)
    key = uuid.uuid4().hex
    iid = await client.schedule_new_workflow(slow_workflow, input=key)
    for _ in range(500):
        if runs.get(key):
            break
        await asyncio.sleep(0.01)
    assert runs.get(key) == 1
    await first.stop()
    second = InProcessWorker(sidecar.engine, registry)
    second.start()
    try:
        state = await client.wait_for_workflow_completion(iid, timeout_in_seconds=30)
        assert state is not None
        assert state.serialized_output == '"run 2"'
        assert runs[key] == 2
        history = await client.get_workflow_history(iid)
        completed = [e for e in history if e.event_type.value == "taskCompleted"]
        assert len(completed) == 1
    finally:
        await second.stop()


async def test_a_result_too_large_for_a_message_fails_the_activity(sidecar: Sidecar) -> None:
    """Over gRPC such a result could not be sent (the SDK then fails the activity); in
    process it is refused the same way instead of being stored."""
    assert sidecar.engine is not None
    worker = InProcessWorker(sidecar.engine, _registry())
    worker.start()
    client = _client(sidecar)
    limit = sidecar.settings.max_payload_bytes
    try:
        small = await client.schedule_new_workflow(huge_workflow, input=1000)
        big = await client.schedule_new_workflow(huge_workflow, input=limit * 40)
        ok = await client.wait_for_workflow_completion(small, timeout_in_seconds=30)
        refused = await client.wait_for_workflow_completion(big, timeout_in_seconds=30)
        assert ok is not None and ok.serialized_output == '"delivered"'
        assert refused is not None and refused.serialized_output is not None
        assert "failed:" in refused.serialized_output
        assert "bytes a sidecar message may carry" in refused.serialized_output
    finally:
        await worker.stop()


async def test_a_burst_of_ready_work_lets_the_loop_run_in_between(tmp_path: Path) -> None:
    """Work items that are all ready at once (a restart, a bulk approval) are not run in one
    go: the front doors on the same loop get their turn every few items."""
    sc = Sidecar(sidecar_settings(tmp_path / "engine.db", start_wait_seconds=0))
    await sc.start()
    assert sc.engine is not None
    try:
        client = _client(sc)
        for i in range(64):  # no worker yet: 64 first turns wait, ready
            await client.schedule_new_workflow(counted, input=i)
        turns_run.clear()
        worker = InProcessWorker(sc.engine, _registry())
        worker.start()
        seen: list[int] = []
        asyncio.get_running_loop().call_soon(lambda: seen.append(len(turns_run)))
        for _ in range(200):
            if len(turns_run) == 64:
                break
            await asyncio.sleep(0.01)
        assert len(turns_run) == 64
        assert 0 < seen[0] < 64, seen
        await worker.stop()
    finally:
        await sc.stop()


async def test_the_gateway_runtime_runs_the_engine_in_its_own_process(tmp_path: Path) -> None:
    """`engine.sidecar: inprocess` (the default): no sidecar process, calls reach the engine
    directly, and other processes still find the engine's gRPC and state API."""
    config = EmbeddedEngineConfig()
    assert config.sidecar == "inprocess"
    runtime = DurableRuntime(config, tmp_path / "engine.db", lambda name: None)
    children_before = _children()
    await runtime.start()
    try:
        assert _children() == children_before
        assert await runtime.ready()
        host, _, port = runtime.address.rpartition(":")
        assert host == "127.0.0.1" and int(port) > 0

        # The state API, over gRPC, as adapters' checkpoints (and apps of other processes)
        # reach it.
        store = runtime.checkpoints
        assert store is not None
        await store.aput("k", {"v": 1})
        assert await store.aget("k") == {"v": 1}
        # A worker that stops taking work makes the gateway not ready (/readyz).
        worker = runtime._worker
        assert isinstance(worker, InProcessWorker) and worker.running
        assert worker._run_task is not None
        worker._run_task.cancel()
        await asyncio.sleep(0)
        assert not worker.running
        assert not await runtime.ready()
    finally:
        await runtime.stop()


def _children() -> set[int]:
    path = Path(f"/proc/{os.getpid()}/task/{os.getpid()}/children")
    return {int(p) for p in path.read_text().split()} if path.exists() else set()
