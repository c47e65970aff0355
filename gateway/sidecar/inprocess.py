"""The gateway's own worker and workflow client on an embedded engine in its process: the same
protocol, without gRPC between them.

With `engine.sidecar: inprocess` (the default) the embedded sidecar runs on the gateway's event
loop. Its gRPC servers still serve every other process (`duragate worker` apps, Dapr Agents apps,
the state API); only the gateway's own two connections skip the network:

- `InProcessChannel` stands in for a `grpc.aio` channel: the Dapr SDK's own `DaprWorkflowClient`
  (and any `TaskHubSidecarServiceStub`) calls the sidecar's servicer directly, with the same
  protocol messages, status codes and deadlines, but nothing serialized and no HTTP/2.
- `InProcessWorker` takes an app's work items from the engine and runs them with the SDK's own
  executors (`_OrchestrationExecutor`, `_ActivityExecutor`: the code the SDK's
  `TaskHubGrpcWorker` runs for each item), on this loop instead of across the SDK worker's
  threads, and hands the responses back to the engine. Workflows and activities are the ones
  registered on a `WorkflowRuntime`, exactly as for the SDK's worker.

Why: a call is three work items and five RPCs; over loopback gRPC and the SDK worker's thread
hand-offs that cost about 7 ms of CPU per call across two processes, several times the work
itself (bench/README.md). The SDK's executors are private API of the pinned dapr minor version
(see gateway/sidecar/protos.py); this module is the one place that uses them.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
from dapr.ext.workflow import WorkflowRuntime
from dapr.ext.workflow._durabletask import worker as sdk_worker
from dapr.ext.workflow._durabletask.internal import helpers as ph
from dapr.ext.workflow._durabletask.internal.shared import is_async_callable
from dapr.ext.workflow.aio import DaprWorkflowClient
from dapr.ext.workflow.propagation import PropagatedHistory

from .engine import Engine, EngineError
from .protos import pb, workflow_grpc
from .server import MESSAGE_HEADROOM_BYTES

log = logging.getLogger(__name__)

# Threads of the loop's default executor beyond one per running activity (see start()).
SPARE_THREADS = 32
# How many work items the worker may run one after another before it lets the loop run others.
BURST_ITEMS = 16

# The logger given to the SDK's executors: they log every turn at INFO (and build DEBUG
# summaries whenever the logger's own level allows DEBUG), which the SDK worker keeps at WARNING.
SDK_LOG = logging.getLogger("duragate.workflow.executor")
SDK_LOG.setLevel(logging.WARNING)


def rpc_error(code: grpc.StatusCode, details: str) -> grpc.aio.AioRpcError:
    """The error a gRPC client would see for this status."""
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details)


class _Context:
    """The part of `grpc.aio.ServicerContext` the sidecar's servicers use."""

    def __init__(self, timeout: float | None) -> None:
        self._deadline = None if timeout is None else time.monotonic() + timeout
        # Set by handlers that fail without abort() (the generated base class's UNIMPLEMENTED).
        self.code: grpc.StatusCode | None = None
        self.details = ""

    async def abort(self, code: grpc.StatusCode, details: str = "", *_: Any) -> None:
        raise rpc_error(code, details)

    def time_remaining(self) -> float | None:
        return None if self._deadline is None else self._deadline - time.monotonic()

    def set_code(self, code: grpc.StatusCode) -> None:
        self.code = code

    def set_details(self, details: str) -> None:
        self.details = details


class _UnaryUnary:
    def __init__(self, handler: Callable[..., Awaitable[Any]] | None, method: str) -> None:
        self._handler = handler
        self._method = method

    def __call__(self, request: Any, *, timeout: float | None = None, **_: Any) -> Awaitable[Any]:
        return self._invoke(request, timeout)

    async def _invoke(self, request: Any, timeout: float | None) -> Any:
        if self._handler is None:
            raise rpc_error(grpc.StatusCode.UNIMPLEMENTED, f"method {self._method} not found")
        context = _Context(timeout)
        try:
            async with asyncio.timeout(timeout):
                answer = self._handler(request, context)
                return await answer if inspect.isawaitable(answer) else answer
        except grpc.aio.AioRpcError:
            raise
        except TimeoutError:
            raise rpc_error(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded") from None
        except Exception as exc:  # what a gRPC server answers for a handler that raised
            if context.code is not None:
                raise rpc_error(context.code, context.details) from None
            log.exception("in-process call %s failed", self._method)
            detail = f"Unexpected {type(exc).__name__}: {exc}"
            raise rpc_error(grpc.StatusCode.UNKNOWN, detail) from exc


class _UnaryStream:
    def __init__(self, handler: Callable[..., AsyncIterator[Any]] | None, method: str) -> None:
        self._handler = handler
        self._method = method

    def __call__(
        self, request: Any, *, timeout: float | None = None, **_: Any
    ) -> AsyncIterator[Any]:
        if self._handler is None:
            raise rpc_error(grpc.StatusCode.UNIMPLEMENTED, f"method {self._method} not found")
        return self._handler(request, _Context(timeout))


class InProcessChannel:
    """A `grpc.aio.Channel` stand-in whose calls run `servicer`'s handlers on this loop.

    Only what the generated stubs and the SDK's aio client use: unary-unary calls, with an
    optional deadline, and unary-stream calls. Handlers see the caller's own request object
    (nothing is serialized): the sidecar's servicers copy what they keep and change none."""

    def __init__(self, servicer: Any) -> None:
        self._servicer = servicer

    def _handler(self, method: str) -> Any:
        return getattr(self._servicer, method.rpartition("/")[2], None)

    def unary_unary(self, method: str, *_: Any, **__: Any) -> _UnaryUnary:
        return _UnaryUnary(self._handler(method), method)

    def unary_stream(self, method: str, *_: Any, **__: Any) -> _UnaryStream:
        return _UnaryStream(self._handler(method), method)

    def stream_unary(self, method: str, *_: Any, **__: Any) -> _UnaryUnary:
        return _UnaryUnary(None, method)  # the workflow API has no client-streaming call

    stream_stream = stream_unary

    async def close(self, grace: float | None = None) -> None:
        return None

    async def channel_ready(self) -> None:
        return None


def workflow_stub(servicer: Any) -> workflow_grpc.TaskHubSidecarServiceStub:
    return workflow_grpc.TaskHubSidecarServiceStub(InProcessChannel(servicer))


def inprocess_client(servicer: Any, address: str) -> DaprWorkflowClient:
    """The SDK's aio workflow client, its calls going to `servicer` in this process. `address`
    (the sidecar's gRPC address) is only what the client is built with: it is never dialled."""
    host, _, port = address.rpartition(":")
    client = DaprWorkflowClient(host=host, port=port, logger_options=None)
    # The client makes its channel and stub on first use; this stub is used instead.
    inner = client._DaprWorkflowClient__obj  # type: ignore[attr-defined]
    inner._stub = workflow_stub(servicer)
    return client


def registry_of(runtime: WorkflowRuntime) -> Any:
    """The workflows and activities registered on `runtime` (the SDK's `_Registry`)."""
    return runtime._WorkflowRuntime__worker._registry  # type: ignore[attr-defined]


class InProcessWorker:
    """Runs the workflow turns and activities of one app from an engine in this process.

    Turns run inline on the loop (replaying a history is pure computation); activities run as
    tasks, at most `max_activities` at once (the SDK worker's default), so a slow tool never
    holds up the turns of other calls. A response goes back to the engine as soon as it is
    made; the engine records it (and commits) as it does for a gRPC worker, and a worker that
    stops hands back what it had not finished, as a closed gRPC stream does."""

    def __init__(
        self,
        engine: Engine,
        registry: Any,
        app_id: str | None = None,
        max_activities: int | None = None,
    ) -> None:
        self.engine = engine
        self.app_id = app_id
        self._registry = registry
        default = sdk_worker.ConcurrencyOptions().maximum_concurrent_activity_work_items
        self.max_activities = max_activities or default
        self._slots = asyncio.Semaphore(self.max_activities)
        self._activity_executor = sdk_worker._ActivityExecutor(SDK_LOG)
        self._payload_limit = engine.settings.max_payload_bytes + MESSAGE_HEADROOM_BYTES
        self._tasks: set[asyncio.Task[None]] = set()
        self._run_task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Start taking work items, on the running loop.

        Activities run on this loop, so what they hand to threads (`asyncio.to_thread`: sync
        tools, crews, checkpoints) shares the loop's default executor with the gateway and the
        engine. It is sized so that activities can never hold every thread: a crew waiting in
        a thread for a call it made through the gateway must not wait for a thread itself."""
        loop = asyncio.get_running_loop()
        loop.set_default_executor(
            ThreadPoolExecutor(
                max_workers=self.max_activities + SPARE_THREADS, thread_name_prefix="duragate"
            )
        )
        self._run_task = loop.create_task(self._run(), name="duragate-inprocess-worker")
        self._run_task.add_done_callback(self._stopped)

    @property
    def running(self) -> bool:
        """Whether it takes work items (the gateway is not ready without)."""
        return self._run_task is not None and not self._run_task.done()

    def _stopped(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error("the in-process workflow worker stopped", exc_info=task.exception())

    async def stop(self) -> None:
        """Stop taking work; unfinished activities are cancelled and go back to the queue."""
        run, self._run_task = self._run_task, None
        if run is not None:
            run.cancel()
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await run  # a worker that had failed was reported by _stopped
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _run(self) -> None:
        stream = self.engine.open_stream((), self.app_id)
        taken = 0
        try:
            async for item in self.engine.work_items(stream):
                taken += 1
                if item.HasField("workflowRequest"):
                    self._spawn(self._send_turn(self._turn(item)))
                elif item.HasField("activityRequest"):
                    self._spawn(self._activity(item))
                # The engine hands out ready items without waiting (a burst after a restart or
                # a bulk approval): the loop's other work (front doors, commits, the turns'
                # completions) gets its turn at least every BURST_ITEMS items.
                if taken % BURST_ITEMS == 0:
                    await asyncio.sleep(0)
        finally:
            # What this worker was given and did not answer goes back on the queue.
            self.engine.close_stream(stream)

    def _spawn(self, coro: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # --- workflow turns: what TaskHubGrpcWorker._execute_orchestrator does -------------------

    def _turn(self, item: pb.WorkItem) -> pb.WorkflowResponse:
        req = item.workflowRequest
        token = item.completionToken
        try:
            executor = sdk_worker._OrchestrationExecutor(self._registry, SDK_LOG)
            propagated = (
                PropagatedHistory.from_proto(req.propagatedHistory)
                if req.HasField("propagatedHistory")
                else None
            )
            result = executor.execute(
                req.instanceId, req.pastEvents, req.newEvents, propagated_history=propagated
            )
            version = None
            if result.version_name or result.patches:
                version = pb.WorkflowVersion()
                if result.version_name:
                    version.name = result.version_name
                if result.patches:
                    version.patches.extend(result.patches)
            res = pb.WorkflowResponse(
                instanceId=req.instanceId,
                actions=result.actions,
                customStatus=ph.get_string_value(result.encoded_custom_status),
                completionToken=token,
                version=version,
            )
        except Exception as exc:  # noqa: BLE001 - the SDK fails the workflow, and so do we
            log.exception("workflow '%s' could not run its turn", req.instanceId)
            return _failed_turn(req.instanceId, token, exc)
        if res.ByteSize() > self._payload_limit:
            # Over gRPC the response could not be sent: the SDK then fails the workflow.
            return _failed_turn(
                req.instanceId,
                token,
                RuntimeError(
                    f"the workflow's response is {res.ByteSize()} bytes, over the "
                    f"{self._payload_limit} bytes a sidecar message may carry"
                ),
            )
        return res

    async def _send_turn(self, res: pb.WorkflowResponse) -> None:
        try:
            await self.engine.complete_turn(res)
        except EngineError as exc:
            log.warning("the engine refused the turn of '%s': %s", res.instanceId, exc)

    # --- activities: what TaskHubGrpcWorker._execute_activity(_async) does -----------------

    async def _activity(self, item: pb.WorkItem) -> None:
        req = item.activityRequest
        instance_id = req.workflowInstance.instanceId
        async with self._slots:
            fn = self._registry.get_activity(req.name)
            propagated = (
                PropagatedHistory.from_proto(req.propagatedHistory)
                if req.HasField("propagatedHistory")
                else None
            )
            args = (fn, instance_id, req.name, req.taskId, req.input.value, req.taskExecutionId)
            try:
                if fn is not None and is_async_callable(fn):
                    result = await self._activity_executor.execute_async(
                        *args, propagated_history=propagated
                    )
                else:  # sync activities run in a thread, as the SDK's pool runs them
                    result = await asyncio.to_thread(
                        self._activity_executor.execute, *args, propagated_history=propagated
                    )
                size = len(result.encode()) if result else 0
                if size > self._payload_limit:
                    raise RuntimeError(
                        f"the activity's result is {size} bytes, over the "
                        f"{self._payload_limit} bytes a sidecar message may carry"
                    )
                res = pb.ActivityResponse(
                    instanceId=instance_id,
                    taskId=req.taskId,
                    result=ph.get_string_value(result),
                    completionToken=item.completionToken,
                )
            except Exception as exc:  # noqa: BLE001 - the activity failed: the workflow decides
                res = pb.ActivityResponse(
                    instanceId=instance_id,
                    taskId=req.taskId,
                    failureDetails=ph.new_failure_details(exc),
                    completionToken=item.completionToken,
                )
        try:
            await self.engine.complete_activity(res)
        except EngineError as exc:
            log.warning(
                "the engine refused the result of %s#%d of '%s': %s",
                req.name,
                req.taskId,
                instance_id,
                exc,
            )


def _failed_turn(instance_id: str, token: str, exc: Exception) -> pb.WorkflowResponse:
    """What the SDK sends when a turn cannot run: the workflow fails with the error."""
    action = ph.new_complete_workflow_action(
        -1,
        pb.ORCHESTRATION_STATUS_FAILED,  # type: ignore[arg-type]
        "",
        ph.new_failure_details(exc),
    )
    return pb.WorkflowResponse(instanceId=instance_id, actions=[action], completionToken=token)


__all__: Sequence[str] = (
    "InProcessChannel",
    "InProcessWorker",
    "inprocess_client",
    "registry_of",
    "rpc_error",
    "workflow_stub",
)
