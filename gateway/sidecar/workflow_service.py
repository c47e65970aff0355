"""gRPC servicer for `TaskHubSidecarService`: a thin translation onto the engine."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

import grpc
from google.protobuf import empty_pb2, wrappers_pb2

from .engine import Engine, EngineError
from .protos import pb, workflow_grpc

log = logging.getLogger(__name__)

T = TypeVar("T")


async def _call(context: grpc.aio.ServicerContext, fn: Callable[[], Awaitable[T]]) -> T:
    """Run an engine call, turning its errors into the matching gRPC status."""
    try:
        return await fn()
    except EngineError as exc:
        await context.abort(getattr(grpc.StatusCode, exc.code), str(exc))
        raise  # unreachable: abort raises


def _deadline(context: grpc.aio.ServicerContext) -> float | None:
    remaining = context.time_remaining()
    return None if remaining is None else max(remaining, 0.0)


def _state_response(state: pb.WorkflowState | None, with_payloads: bool) -> pb.GetInstanceResponse:
    if state is None:
        return pb.GetInstanceResponse(exists=False)
    out = pb.WorkflowState()
    out.CopyFrom(state)
    if not with_payloads:
        out.ClearField("input")
        out.ClearField("output")
        out.ClearField("customStatus")
    return pb.GetInstanceResponse(exists=True, workflowState=out)


class WorkflowServicer(workflow_grpc.TaskHubSidecarServiceServicer):
    """The workflow API as one app sees it: a worker that connects here runs `app_id`'s
    workflows and activities, and a start without a router target starts on `app_id`."""

    def __init__(self, engine: Engine, app_id: str | None = None) -> None:
        self.engine = engine
        self.app_id = app_id or engine.settings.app_id

    async def Hello(
        self, request: empty_pb2.Empty, context: grpc.aio.ServicerContext
    ) -> empty_pb2.Empty:
        return empty_pb2.Empty()

    # --- worker side ----------------------------------------------------------------------
    async def GetWorkItems(
        self, request: pb.GetWorkItemsRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.WorkItem]:
        try:
            stream = self.engine.open_stream(request.capabilities, self.app_id)
        except EngineError as exc:
            await context.abort(getattr(grpc.StatusCode, exc.code), str(exc))
            return
        try:
            async for item in self.engine.work_items(stream):
                yield item
        finally:
            self.engine.close_stream(stream)

    async def CompleteActivityTask(
        self, request: pb.ActivityResponse, context: grpc.aio.ServicerContext
    ) -> pb.CompleteTaskResponse:
        await _call(context, lambda: self.engine.complete_activity(request))
        return pb.CompleteTaskResponse()

    async def CompleteOrchestratorTask(
        self, request: pb.WorkflowResponse, context: grpc.aio.ServicerContext
    ) -> pb.CompleteTaskResponse:
        await _call(context, lambda: self.engine.complete_turn(request))
        return pb.CompleteTaskResponse()

    CompleteWorkflowTask = CompleteOrchestratorTask

    # --- client side ----------------------------------------------------------------------
    async def StartInstance(
        self, request: pb.CreateInstanceRequest, context: grpc.aio.ServicerContext
    ) -> pb.CreateInstanceResponse:
        instance_id = await _call(context, lambda: self.engine.start_instance(request, self.app_id))
        return pb.CreateInstanceResponse(instanceId=instance_id)

    async def GetInstance(
        self, request: pb.GetInstanceRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetInstanceResponse:
        state = await _call(context, lambda: self.engine.get_state(request.instanceId))
        return _state_response(state, request.getInputsAndOutputs)

    async def WaitForInstanceStart(
        self, request: pb.GetInstanceRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetInstanceResponse:
        return await self._wait(request, context, self.engine.wait_for_start)

    async def WaitForInstanceCompletion(
        self, request: pb.GetInstanceRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetInstanceResponse:
        return await self._wait(request, context, self.engine.wait_for_completion)

    async def _wait(
        self,
        request: pb.GetInstanceRequest,
        context: grpc.aio.ServicerContext,
        wait: Callable[[str, float | None], Awaitable[pb.WorkflowState | None]],
    ) -> pb.GetInstanceResponse:
        try:
            state = await _call(context, lambda: wait(request.instanceId, _deadline(context)))
        except TimeoutError:
            await context.abort(
                grpc.StatusCode.DEADLINE_EXCEEDED,
                f"workflow instance '{request.instanceId}' did not reach the awaited state "
                f"before the deadline",
            )
            raise
        return _state_response(state, request.getInputsAndOutputs)

    async def RaiseEvent(
        self, request: pb.RaiseEventRequest, context: grpc.aio.ServicerContext
    ) -> pb.RaiseEventResponse:
        data = request.input if request.HasField("input") else None
        await _call(
            context, lambda: self.engine.raise_event(request.instanceId, request.name, data)
        )
        return pb.RaiseEventResponse()

    async def TerminateInstance(
        self, request: pb.TerminateRequest, context: grpc.aio.ServicerContext
    ) -> pb.TerminateResponse:
        output = request.output if request.HasField("output") else None
        await _call(
            context,
            lambda: self.engine.terminate(request.instanceId, output, request.recursive),
        )
        return pb.TerminateResponse()

    async def SuspendInstance(
        self, request: pb.SuspendRequest, context: grpc.aio.ServicerContext
    ) -> pb.SuspendResponse:
        reason = request.reason if request.HasField("reason") else None
        await _call(context, lambda: self.engine.suspend(request.instanceId, reason))
        return pb.SuspendResponse()

    async def ResumeInstance(
        self, request: pb.ResumeRequest, context: grpc.aio.ServicerContext
    ) -> pb.ResumeResponse:
        reason = request.reason if request.HasField("reason") else None
        await _call(context, lambda: self.engine.resume(request.instanceId, reason))
        return pb.ResumeResponse()

    async def PurgeInstances(
        self, request: pb.PurgeInstancesRequest, context: grpc.aio.ServicerContext
    ) -> pb.PurgeInstancesResponse:
        count = await _call(context, lambda: self.engine.purge(request))
        return pb.PurgeInstancesResponse(
            deletedInstanceCount=count, isComplete=wrappers_pb2.BoolValue(value=True)
        )

    async def ListInstanceIDs(
        self, request: pb.ListInstanceIDsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListInstanceIDsResponse:
        page_size = request.pageSize if request.HasField("pageSize") else None
        after = request.continuationToken if request.HasField("continuationToken") else ""
        ids, token = await _call(context, lambda: self.engine.list_instance_ids(after, page_size))
        return pb.ListInstanceIDsResponse(instanceIds=ids, continuationToken=token or None)

    async def GetInstanceHistory(
        self, request: pb.GetInstanceHistoryRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetInstanceHistoryResponse:
        events = await _call(context, lambda: self.engine.history(request.instanceId))
        return pb.GetInstanceHistoryResponse(events=events)
