"""The workflow engine behind the embedded sidecar.

Live instances (not yet terminal) are held in memory: their committed history, the inbox of
events not yet delivered to a worker, and pending timers. Every change is computed on the
event loop, turned into SQL statements and committed by the store's writer; the RPC that made
the change answers only after that commit. Finished instances live only in SQLite.

The semantics follow daprd's workflow backend as the Dapr SDK sees it
(`shared/reference/dapr-sidecar-protocol.md`): one workflow turn in flight per instance,
FIFO work-item streams that give back what they held when they close, completion tokens that
make late answers harmless, timers that survive restarts.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from google.protobuf import timestamp_pb2, wrappers_pb2

from .protos import pb
from .settings import SidecarSettings
from .store import Op, StoreClosedError, WorkflowStore

log = logging.getLogger(__name__)

RUNNING = pb.ORCHESTRATION_STATUS_RUNNING
COMPLETED = pb.ORCHESTRATION_STATUS_COMPLETED
CONTINUED_AS_NEW = pb.ORCHESTRATION_STATUS_CONTINUED_AS_NEW
FAILED = pb.ORCHESTRATION_STATUS_FAILED
CANCELED = pb.ORCHESTRATION_STATUS_CANCELED
TERMINATED = pb.ORCHESTRATION_STATUS_TERMINATED
PENDING = pb.ORCHESTRATION_STATUS_PENDING
SUSPENDED = pb.ORCHESTRATION_STATUS_SUSPENDED
STALLED = pb.ORCHESTRATION_STATUS_STALLED
TERMINAL = frozenset({COMPLETED, FAILED, TERMINATED, CANCELED})

# The SDK's "wait forever" timer fires at 9999-12-31T23:59:59.999999999Z: record it, never fire.
NEVER_SECONDS = 253402300799
MAX_INSTANCE_ID = 1024
DEFAULT_PAGE_SIZE = 100
FINISHED_CACHE = 4096
MAX_PAGE_SIZE = 10_000


class EngineError(Exception):
    """An error the servicer turns into a gRPC status; `code` names a grpc.StatusCode."""

    code = "INTERNAL"


class NotFoundError(EngineError):
    code = "NOT_FOUND"


class AlreadyExistsError(EngineError):
    code = "ALREADY_EXISTS"


class InvalidArgumentError(EngineError):
    code = "INVALID_ARGUMENT"


class FailedPreconditionError(EngineError):
    code = "FAILED_PRECONDITION"


class ResourceExhaustedError(EngineError):
    """Too big, or too many: RESOURCE_EXHAUSTED."""

    code = "RESOURCE_EXHAUSTED"


class UnavailableError(EngineError):
    code = "UNAVAILABLE"


def now_timestamp() -> timestamp_pb2.Timestamp:
    ns = time.time_ns()
    return timestamp_pb2.Timestamp(seconds=ns // 1_000_000_000, nanos=ns % 1_000_000_000)


def ts_seconds(ts: timestamp_pb2.Timestamp) -> float:
    return ts.seconds + ts.nanos / 1e9


def _event(**kwargs: Any) -> pb.HistoryEvent:
    kwargs.setdefault("eventId", -1)
    kwargs.setdefault("timestamp", now_timestamp())
    return pb.HistoryEvent(**kwargs)


def _resolution_key(ev: pb.HistoryEvent) -> tuple[str, int] | None:
    """Events that resolve something exactly once; a second one for the same id is dropped."""
    kind = ev.WhichOneof("eventType")
    if kind == "taskCompleted":
        return ("task", ev.taskCompleted.taskScheduledId)
    if kind == "taskFailed":
        return ("task", ev.taskFailed.taskScheduledId)
    if kind == "timerFired":
        return ("timer", ev.timerFired.timerId)
    if kind == "childWorkflowInstanceCompleted":
        return ("child", ev.childWorkflowInstanceCompleted.taskScheduledId)
    if kind == "childWorkflowInstanceFailed":
        return ("child", ev.childWorkflowInstanceFailed.taskScheduledId)
    if kind == "executionStarted":
        return ("started", 0)
    return None


def target_app(router: pb.TaskRouter | None, default: str) -> str:
    """The app an action or a start is routed to: the router's target, else `default`."""
    if router is not None and router.targetAppID:
        return router.targetAppID
    return default


def owner_app(started: pb.HistoryEvent, default: str) -> str:
    """The app that runs an instance, as its ExecutionStarted event records it (the SDK reads
    the same router to learn its own app id: target first, else source)."""
    if not started.HasField("router"):
        return default
    return started.router.targetAppID or started.router.sourceAppID or default


def status_name(status: int) -> str:
    """RUNNING, COMPLETED, ... (or the number, for a value the protocol does not define)."""
    try:
        return pb.OrchestrationStatus.Name(status).removeprefix("ORCHESTRATION_STATUS_")
    except ValueError:
        return str(status)


def _failure(error_type: str, message: str) -> pb.TaskFailureDetails:
    return pb.TaskFailureDetails(errorType=error_type, errorMessage=message)


# --- in-memory records ------------------------------------------------------------------


@dataclass(eq=False)
class ActivityItem:
    row_id: int
    instance_id: str
    execution_id: str
    request: pb.ActivityRequest
    app_id: str  # the app whose workers run it


@dataclass(eq=False)
class Dispatch:
    """A work item handed to a stream and not yet answered."""

    token: str
    stream: WorkerStream
    instance_id: str
    activity: ActivityItem | None = None  # None for a workflow turn
    n_inbox: int = 0
    started: pb.HistoryEvent | None = None
    execution_id: str = ""
    at: float = field(default_factory=time.monotonic)


@dataclass(eq=False)
class WorkerStream:
    id: int
    stateful_history: bool
    app_id: str
    dispatched: dict[str, Dispatch] = field(default_factory=dict)
    # instance id -> (execution id, number of history events the worker has cached)
    history_cache: dict[str, tuple[str, int]] = field(default_factory=dict)


@dataclass(eq=False)
class Instance:
    state: pb.WorkflowState
    app_id: str  # the app whose workers run its turns
    history: list[pb.HistoryEvent] = field(default_factory=list)
    inbox: list[tuple[int, pb.HistoryEvent]] = field(default_factory=list)
    timers: dict[int, pb.HistoryEvent] = field(default_factory=dict)
    resolved: set[tuple[str, int]] = field(default_factory=set)
    dispatch: Dispatch | None = None
    parent: pb.ParentInstanceInfo | None = None
    started: bool = False
    suspended: bool = False
    stalled: bool = False

    @property
    def id(self) -> str:
        return self.state.instanceId

    @property
    def execution_id(self) -> str:
        return self.state.executionId.value

    def live_status(self) -> int:
        if self.stalled:
            return STALLED
        if self.suspended:
            return SUSPENDED
        return RUNNING if self.started else PENDING

    def child_ids(self) -> list[str]:
        return [
            e.childWorkflowInstanceCreated.instanceId
            for e in self.history
            if e.HasField("childWorkflowInstanceCreated")
        ]


def _expire(fut: asyncio.Future[Any]) -> None:
    if not fut.done():
        fut.set_exception(TimeoutError())


@dataclass(eq=False)
class _Waiter:
    predicate: Callable[[pb.WorkflowState | None], bool]
    future: asyncio.Future[pb.WorkflowState | None]


# --- SQL --------------------------------------------------------------------------------

SQL_UPSERT_INSTANCE = (
    "INSERT OR REPLACE INTO wf_instances (instance_id, status, created_at, parent_id, state) "
    "VALUES (?, ?, ?, ?, ?)"
)
SQL_INSERT_HISTORY = "INSERT OR REPLACE INTO wf_history (instance_id, seq, event) VALUES (?, ?, ?)"
SQL_INSERT_INBOX = "INSERT INTO wf_inbox (id, instance_id, visible_at, event) VALUES (?, ?, ?, ?)"
SQL_DELETE_INBOX = "DELETE FROM wf_inbox WHERE id = ?"
SQL_INSERT_ACTIVITY = "INSERT INTO wf_activities (id, instance_id, request) VALUES (?, ?, ?)"
SQL_DELETE_ACTIVITY = "DELETE FROM wf_activities WHERE id = ?"


def _ops_delete_instance_rows(instance_id: str, *, keep_instance: bool) -> list[Op]:
    ops: list[Op] = [
        ("DELETE FROM wf_history WHERE instance_id = ?", (instance_id,)),
        ("DELETE FROM wf_inbox WHERE instance_id = ?", (instance_id,)),
        ("DELETE FROM wf_activities WHERE instance_id = ?", (instance_id,)),
    ]
    if not keep_instance:
        ops.append(("DELETE FROM wf_instances WHERE instance_id = ?", (instance_id,)))
    return ops


class Engine:
    """The durable workflow engine. All methods run on one event loop."""

    def __init__(self, settings: SidecarSettings) -> None:
        self.settings = settings
        self.store = WorkflowStore(settings.db_path, settings.synchronous)
        self._instances: dict[str, Instance] = {}
        # Work is queued per app: a worker stream only ever takes its own app's work.
        self.apps: tuple[str, ...] = tuple(settings.app_listeners())
        self._ready: dict[str, deque[str]] = {app: deque() for app in self.apps}
        self._ready_set: set[str] = set()
        self._activities: dict[str, deque[ActivityItem]] = {app: deque() for app in self.apps}
        self._dispatches: dict[str, Dispatch] = {}
        self._streams: dict[int, WorkerStream] = {}
        self._work_waiters: dict[str, list[asyncio.Future[None]]] = {app: [] for app in self.apps}
        self._waiters: dict[str, list[_Waiter]] = {}
        self._timer_heap: list[tuple[float, int, str]] = []
        self._timer_wakeup = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._ids = itertools.count(1)
        # Tokens carry a per-process boot id, so an answer to a dispatch made before a restart
        # never matches a dispatch made after it.
        self._boot = uuid.uuid4().hex[:12]
        self._inbox_ids = itertools.count(1)
        self._activity_ids = itertools.count(1)
        # The last few finished instances, so "start then wait" needs no read from disk.
        self._finished: OrderedDict[str, pb.WorkflowState] = OrderedDict()
        self._prefer_activity = False
        self._closing = False
        self._started = False
        # For metrics (gateway.sidecar.metrics): instances finished since start, by status, and
        # who is told each workflow turn's latency (dispatch to a worker until its answer).
        self.finished_counts: dict[int, int] = {}
        self.turn_observer: Callable[[float], None] | None = None

    # --- life cycle -----------------------------------------------------------------------
    async def start(self) -> None:
        self.store.open()
        loaded, activities, max_inbox, max_act = await asyncio.to_thread(self.store.load_live)
        self._inbox_ids = itertools.count(max_inbox + 1)
        self._activity_ids = itertools.count(max_act + 1)
        now = time.time()
        for rec in loaded:
            self._restore(rec.state, rec.history, rec.inbox, now)
        for row_id, iid, blob in activities:
            inst = self._instances.get(iid)
            req = pb.ActivityRequest.FromString(blob)
            if inst is not None and req.workflowInstance.executionId.value == inst.execution_id:
                app = self._scheduled_app(inst, req.taskId)
                self._activities[app].append(ActivityItem(row_id, iid, inst.execution_id, req, app))
        self._tasks = [
            asyncio.create_task(self._timer_loop(), name="wf-timers"),
            asyncio.create_task(self._lock_expiry_loop(), name="wf-lock-expiry"),
        ]
        self._started = True
        if loaded:
            log.info(
                "resumed %d live workflow instance(s), %d queued activities",
                len(loaded),
                sum(len(q) for q in self._activities.values()),
            )

    def _scheduled_app(self, inst: Instance, task_id: int) -> str:
        """The app a queued activity was routed to, from its TaskScheduled event."""
        for ev in reversed(inst.history):
            if ev.eventId == task_id and ev.HasField("taskScheduled"):
                app = target_app(ev.router if ev.HasField("router") else None, inst.app_id)
                # An app no longer configured: its work waits on the owner's queue, where a
                # worker of the owner app fails it as an unknown activity rather than hang.
                return app if app in self._ready else inst.app_id
        return inst.app_id

    def _restore(
        self,
        state_blob: bytes,
        history: list[bytes],
        inbox: list[tuple[int, float, bytes]],
        now: float,
    ) -> None:
        state = pb.WorkflowState.FromString(state_blob)
        events = [pb.HistoryEvent.FromString(b) for b in history]
        queued = [(row, at, pb.HistoryEvent.FromString(b)) for row, at, b in inbox]
        started = next(
            (ev for ev in [*events, *(q[2] for q in queued)] if ev.HasField("executionStarted")),
            None,
        )
        app = self.settings.app_id if started is None else owner_app(started, self.settings.app_id)
        if app not in self._ready:
            log.warning(
                "workflow instance '%s' belongs to app '%s', which this sidecar no longer "
                "serves; its work goes to app '%s'",
                state.instanceId,
                app,
                self.settings.app_id,
            )
            app = self.settings.app_id
        inst = Instance(state=state, app_id=app, history=events)
        inst.suspended = state.workflowStatus == SUSPENDED
        inst.stalled = state.workflowStatus == STALLED
        for ev in inst.history:
            self._note_history_event(inst, ev)
        # The new execution's start must come first even if older rows of a
        # continued-as-new execution were written before it.
        ordered = sorted(
            queued, key=lambda r: (0 if r[2].HasField("executionStarted") else 1, r[0])
        )
        for row_id, visible_at, ev in ordered:
            key = _resolution_key(ev)
            if key is not None:
                inst.resolved.add(key)
            if visible_at > now:
                inst.timers[row_id] = ev
                heapq.heappush(self._timer_heap, (visible_at, row_id, inst.id))
            else:
                inst.inbox.append((row_id, ev))
            if ev.HasField("executionStarted") and ev.executionStarted.HasField("parentInstance"):
                inst.parent = ev.executionStarted.parentInstance
        self._instances[inst.id] = inst
        self._mark_ready(inst)

    def _note_history_event(self, inst: Instance, ev: pb.HistoryEvent) -> None:
        key = _resolution_key(ev)
        if key is not None:
            inst.resolved.add(key)
        if ev.HasField("executionStarted"):
            inst.started = True
            if ev.executionStarted.HasField("parentInstance"):
                inst.parent = ev.executionStarted.parentInstance

    def close_streams(self) -> None:
        """Refuse new work and end every work-item stream, so the server can stop at once."""
        self._closing = True
        self._wake_streams()

    async def stop(self) -> None:
        self._closing = True
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            try:
                await t
            except asyncio.CancelledError:
                pass
        self._wake_streams()
        for waiters in self._waiters.values():
            for w in waiters:
                if not w.future.done():
                    w.future.set_exception(UnavailableError("the sidecar is shutting down"))
        self._waiters.clear()
        await self.store.drain()
        self.store.close()

    def _check_open(self) -> None:
        if self._closing or not self._started:
            raise UnavailableError("the sidecar is not serving (starting up or shutting down)")

    async def _commit(self, ops: list[Op]) -> None:
        if not ops:
            return
        try:
            await self.store.submit(ops)
        except StoreClosedError as exc:
            raise UnavailableError(str(exc)) from exc

    # --- work-item streams ----------------------------------------------------------------
    def open_stream(self, capabilities: Iterable[int], app_id: str | None = None) -> WorkerStream:
        """A work-item stream for a worker of `app_id` (the sidecar's own app by default)."""
        self._check_open()
        app = app_id or self.settings.app_id
        if app not in self._ready:
            raise NotFoundError(f"app '{app}' is not served by this sidecar")
        stateful = self.settings.stateful_history and pb.WORKER_CAPABILITY_STATEFUL_HISTORY in set(
            capabilities
        )
        stream = WorkerStream(id=next(self._ids), stateful_history=stateful, app_id=app)
        self._streams[stream.id] = stream
        # A new worker may have the workflow version a stalled instance was waiting for.
        for inst in self._instances.values():
            if inst.stalled and inst.app_id == app:
                inst.stalled = False
                self._mark_ready(inst, force=True)
        log.debug(
            "worker stream %d of app '%s' opened (stateful history: %s)", stream.id, app, stateful
        )
        return stream

    def close_stream(self, stream: WorkerStream) -> None:
        """Everything dispatched to a stream that goes away goes back on the queue."""
        self._streams.pop(stream.id, None)
        requeued = 0
        activities: list[ActivityItem] = []
        for d in list(stream.dispatched.values()):
            self._forget(d)
            requeued += 1
            if d.activity is not None:
                inst = self._instances.get(d.instance_id)
                if inst is not None and inst.execution_id == d.activity.execution_id:
                    activities.append(d.activity)
            else:
                inst = self._instances.get(d.instance_id)
                if inst is not None and inst.dispatch is d:
                    inst.dispatch = None
                    self._mark_ready(inst)
        # Back at the head of their app's queue, in the order they were first handed out.
        for item in reversed(activities):
            self._activities[item.app_id].appendleft(item)
        if requeued:
            log.info("worker stream %d closed; %d work item(s) requeued", stream.id, requeued)
            self._wake_streams()

    async def work_items(self, stream: WorkerStream) -> AsyncIterator[pb.WorkItem]:
        loop = asyncio.get_running_loop()
        while not self._closing:
            item = self._next_work_item(stream)
            if item is not None:
                yield item
                continue
            fut: asyncio.Future[None] = loop.create_future()
            waiters = self._work_waiters[stream.app_id]
            waiters.append(fut)
            try:
                await fut
            finally:
                if not fut.done():
                    fut.cancel()
                    try:
                        self._work_waiters[stream.app_id].remove(fut)
                    except ValueError:
                        pass

    def _wake_streams(self, app_id: str | None = None) -> None:
        """Wake the idle streams of one app (of every app when None)."""
        for app in self.apps if app_id is None else (app_id,):
            waiters, self._work_waiters[app] = self._work_waiters[app], []
            for fut in waiters:
                if not fut.done():
                    fut.set_result(None)

    def _mark_ready(self, inst: Instance, *, force: bool = False) -> None:
        if inst.dispatch is not None or inst.suspended or inst.stalled:
            return
        if not inst.inbox and not force:
            return
        if inst.id not in self._ready_set:
            self._ready_set.add(inst.id)
            self._ready[inst.app_id].append(inst.id)
            if self._work_waiters[inst.app_id]:
                self._wake_streams(inst.app_id)

    def _next_work_item(self, stream: WorkerStream) -> pb.WorkItem | None:
        # Alternate between turns and activities so neither starves the other.
        self._prefer_activity = not self._prefer_activity
        order = (
            (self._next_activity, self._next_turn)
            if self._prefer_activity
            else (self._next_turn, self._next_activity)
        )
        for take in order:
            item = take(stream)
            if item is not None:
                return item
        return None

    def _next_turn(self, stream: WorkerStream) -> pb.WorkItem | None:
        ready = self._ready[stream.app_id]
        while ready:
            iid = ready.popleft()
            self._ready_set.discard(iid)
            inst = self._instances.get(iid)
            if inst is None or inst.dispatch is not None or inst.suspended or inst.stalled:
                continue
            return self._dispatch_turn(inst, stream)
        return None

    def _next_activity(self, stream: WorkerStream) -> pb.WorkItem | None:
        queue = self._activities[stream.app_id]
        while queue:
            item = queue.popleft()
            inst = self._instances.get(item.instance_id)
            if inst is None or inst.execution_id != item.execution_id:
                continue
            token = f"{self._boot}.{stream.id}.{next(self._ids)}"
            d = Dispatch(token=token, stream=stream, instance_id=item.instance_id, activity=item)
            self._remember(d)
            return pb.WorkItem(activityRequest=item.request, completionToken=token)
        return None

    def _dispatch_turn(self, inst: Instance, stream: WorkerStream) -> pb.WorkItem:
        started = _event(workflowStarted=pb.WorkflowStartedEvent())
        token = f"{self._boot}.{stream.id}.{next(self._ids)}"
        d = Dispatch(
            token=token,
            stream=stream,
            instance_id=inst.id,
            n_inbox=len(inst.inbox),
            started=started,
            execution_id=inst.execution_id,
        )
        inst.dispatch = d
        self._remember(d)
        req = pb.WorkflowRequest(
            instanceId=inst.id,
            executionId=wrappers_pb2.StringValue(value=inst.execution_id),
            newEvents=[started, *(ev for _, ev in inst.inbox)],
        )
        history = inst.history
        cached = stream.history_cache.get(inst.id) if stream.stateful_history else None
        if cached is not None and cached[0] == inst.execution_id and cached[1] <= len(history):
            req.pastEvents.extend(history[cached[1] :])
            req.cachedHistory.eventCount = cached[1]
        else:
            req.pastEvents.extend(history)
        if stream.stateful_history:
            stream.history_cache[inst.id] = (inst.execution_id, len(history))
        return pb.WorkItem(workflowRequest=req, completionToken=token)

    def _remember(self, d: Dispatch) -> None:
        self._dispatches[d.token] = d
        d.stream.dispatched[d.token] = d

    def _forget(self, d: Dispatch) -> None:
        self._dispatches.pop(d.token, None)
        d.stream.dispatched.pop(d.token, None)

    # --- completions from workers ---------------------------------------------------------
    async def complete_activity(self, res: pb.ActivityResponse) -> None:
        self._check_open()
        d = self._dispatches.get(res.completionToken)
        if d is None or d.activity is None:
            if res.instanceId not in self._instances and not res.completionToken:
                raise NotFoundError(f"no workflow instance '{res.instanceId}' awaits this task")
            log.debug("ignoring a stale activity completion for %s", res.instanceId)
            return
        if res.instanceId != d.instance_id or res.taskId != d.activity.request.taskId:
            raise InvalidArgumentError(
                f"the completion token belongs to task {d.activity.request.taskId} of "
                f"'{d.instance_id}', not task {res.taskId} of '{res.instanceId}'"
            )
        self._forget(d)
        item = d.activity
        ops: list[Op] = [(SQL_DELETE_ACTIVITY, (item.row_id,))]
        inst = self._instances.get(item.instance_id)
        if inst is not None and inst.execution_id == item.execution_id:
            if res.HasField("failureDetails"):
                ev = _event(
                    taskFailed=pb.TaskFailedEvent(
                        taskScheduledId=item.request.taskId,
                        failureDetails=res.failureDetails,
                        taskExecutionId=item.request.taskExecutionId,
                    )
                )
            else:
                ev = _event(
                    taskCompleted=pb.TaskCompletedEvent(
                        taskScheduledId=item.request.taskId,
                        result=res.result if res.HasField("result") else None,
                        taskExecutionId=item.request.taskExecutionId,
                    )
                )
            self._add_inbox(inst, ev, ops)
        await self._commit(ops)

    async def complete_turn(self, res: pb.WorkflowResponse) -> None:
        self._check_open()
        d = self._dispatches.get(res.completionToken)
        if d is None or d.activity is not None:
            if res.instanceId not in self._instances and not res.completionToken:
                raise NotFoundError(f"no workflow instance '{res.instanceId}' awaits this turn")
            log.debug("ignoring a stale workflow completion for %s", res.instanceId)
            return
        if res.instanceId != d.instance_id:
            raise InvalidArgumentError(
                f"the completion token belongs to '{d.instance_id}', not '{res.instanceId}'"
            )
        self._forget(d)
        if self.turn_observer is not None:
            self.turn_observer(time.monotonic() - d.at)
        inst = self._instances.get(d.instance_id)
        if inst is None or inst.dispatch is not d:
            return
        inst.dispatch = None
        ops: list[Op] = []
        try:
            _Turn(self, inst, d, res, ops).apply()
        except Exception as exc:  # a response the engine cannot apply: fail the instance
            log.exception("cannot apply the turn of '%s'", inst.id)
            ops = []
            if inst.id in self._instances:
                failure = _failure(
                    "SidecarError", f"the sidecar could not apply the workflow's actions: {exc}"
                )
                self._finish(inst, FAILED, None, failure, ops)
            await self._commit(ops)
            raise InvalidArgumentError(f"cannot apply the workflow's actions: {exc}") from exc
        await self._commit(ops)

    # --- the pieces a turn is made of -----------------------------------------------------
    def _add_inbox(
        self,
        inst: Instance,
        ev: pb.HistoryEvent,
        ops: list[Op],
        visible_at: float | None = None,
    ) -> None:
        key = _resolution_key(ev)
        if key is not None:
            if key in inst.resolved:
                log.debug("dropping a second %s for %s on %s", key[0], key[1], inst.id)
                return
            inst.resolved.add(key)
        row_id = next(self._inbox_ids)
        now = time.time()
        at = now if visible_at is None else visible_at
        ops.append((SQL_INSERT_INBOX, (row_id, inst.id, at, ev.SerializeToString())))
        if at > now:
            inst.timers[row_id] = ev
            self._push_timer(at, row_id, inst.id)
        else:
            inst.inbox.append((row_id, ev))
            self._mark_ready(inst)

    def _append_history(self, inst: Instance, events: list[pb.HistoryEvent], ops: list[Op]) -> None:
        base = len(inst.history)
        for i, ev in enumerate(events):
            ops.append((SQL_INSERT_HISTORY, (inst.id, base + i, ev.SerializeToString())))
            self._note_history_event(inst, ev)
        inst.history.extend(events)

    def _save_instance(self, inst: Instance, ops: list[Op]) -> None:
        st = inst.state
        st.lastUpdatedTimestamp.CopyFrom(now_timestamp())
        parent_id = st.parentInstanceId.value if st.HasField("parentInstanceId") else None
        ops.append(
            (
                SQL_UPSERT_INSTANCE,
                (
                    inst.id,
                    st.workflowStatus,
                    ts_seconds(st.createdTimestamp),
                    parent_id,
                    st.SerializeToString(),
                ),
            )
        )

    def _create_instance(
        self,
        instance_id: str,
        name: str,
        *,
        version: wrappers_pb2.StringValue | None,
        input: wrappers_pb2.StringValue | None,
        ops: list[Op],
        parent: pb.ParentInstanceInfo | None = None,
        scheduled_start: timestamp_pb2.Timestamp | None = None,
        tags: dict[str, str] | None = None,
        trace: pb.TraceContext | None = None,
        app_id: str | None = None,
        source_app: str | None = None,
    ) -> Instance:
        """Create (or reset) an instance of `app_id` (the sidecar's own app by default) and
        queue its ExecutionStarted event. `source_app` is the app that asked for it, when it
        is another one (a cross-app child workflow)."""
        app = app_id or self.settings.app_id
        ops.extend(_ops_delete_instance_rows(instance_id, keep_instance=True))
        self._finished.pop(instance_id, None)
        execution_id = uuid.uuid4().hex
        now = now_timestamp()
        state = pb.WorkflowState(
            instanceId=instance_id,
            name=name,
            version=version,
            workflowStatus=PENDING,
            createdTimestamp=now,
            lastUpdatedTimestamp=now,
            input=input,
            executionId=wrappers_pb2.StringValue(value=execution_id),
            scheduledStartTimestamp=scheduled_start,
            tags=tags or {},
        )
        if parent is not None:
            state.parentInstanceId.value = parent.workflowInstance.instanceId
            if parent.appID:
                state.parentAppId.value = parent.appID
        # The router tells the worker which app it runs as (the SDK copies it into the
        # routers of the actions it sends), as daprd's ExecutionStarted does.
        if source_app is not None and source_app != app:
            router = pb.TaskRouter(sourceAppID=source_app, targetAppID=app)
        else:
            router = pb.TaskRouter(sourceAppID=app)
        started = pb.ExecutionStartedEvent(
            name=name,
            version=version,
            input=input,
            workflowInstance=pb.WorkflowInstance(
                instanceId=instance_id,
                executionId=wrappers_pb2.StringValue(value=execution_id),
            ),
            parentInstance=parent,
            scheduledStartTimestamp=scheduled_start,
            parentTraceContext=trace,
            tags=tags or {},
        )
        inst = Instance(state=state, app_id=app, parent=parent)
        self._instances[instance_id] = inst
        self._save_instance(inst, ops)
        visible_at = ts_seconds(scheduled_start) if scheduled_start is not None else None
        self._add_inbox(inst, _event(executionStarted=started, router=router), ops, visible_at)
        self._notify(inst.id, inst.state)
        return inst

    def _finish(
        self,
        inst: Instance,
        status: int,
        result: wrappers_pb2.StringValue | None,
        failure: pb.TaskFailureDetails | None,
        ops: list[Op],
    ) -> None:
        """Make an instance terminal: record it, tell its parent and its waiters."""
        st = inst.state
        st.workflowStatus = status  # type: ignore[assignment]
        if result is not None:
            st.output.CopyFrom(result)
        else:
            st.ClearField("output")
        if failure is not None:
            st.failureDetails.CopyFrom(failure)
        else:
            st.ClearField("failureDetails")
        st.completedTimestamp.CopyFrom(now_timestamp())
        self.finished_counts[status] = self.finished_counts.get(status, 0) + 1
        self._save_instance(inst, ops)
        ops.append(("DELETE FROM wf_inbox WHERE instance_id = ?", (inst.id,)))
        ops.append(("DELETE FROM wf_activities WHERE instance_id = ?", (inst.id,)))
        if inst.dispatch is not None:
            self._forget(inst.dispatch)
            inst.dispatch = None
        del self._instances[inst.id]
        self._finished[inst.id] = st
        if len(self._finished) > FINISHED_CACHE:
            self._finished.popitem(last=False)
        for stream in self._streams.values():
            stream.history_cache.pop(inst.id, None)
        self._tell_parent(inst, status, result, failure, ops)
        self._notify(inst.id, st)

    def _tell_parent(
        self,
        inst: Instance,
        status: int,
        result: wrappers_pb2.StringValue | None,
        failure: pb.TaskFailureDetails | None,
        ops: list[Op],
    ) -> None:
        p = inst.parent
        if p is None or not p.workflowInstance.instanceId:
            return
        parent = self._instances.get(p.workflowInstance.instanceId)
        if parent is None or (
            p.workflowInstance.HasField("executionId")
            and parent.execution_id != p.workflowInstance.executionId.value
        ):
            return  # the parent finished or moved on to a new execution
        if status == COMPLETED:
            ev = _event(
                childWorkflowInstanceCompleted=pb.ChildWorkflowInstanceCompletedEvent(
                    taskScheduledId=p.taskScheduledId, result=result
                )
            )
        else:
            if failure is None:
                name = status_name(status)
                failure = _failure(
                    "WorkflowTerminated" if status == TERMINATED else "WorkflowFailed",
                    f"child workflow '{inst.id}' ended with status {name}",
                )
            ev = _event(
                childWorkflowInstanceFailed=pb.ChildWorkflowInstanceFailedEvent(
                    taskScheduledId=p.taskScheduledId, failureDetails=failure
                )
            )
        self._add_inbox(parent, ev, ops)

    def _terminate(
        self,
        inst: Instance,
        output: wrappers_pb2.StringValue | None,
        recursive: bool,
        ops: list[Op],
    ) -> None:
        # Done here rather than by a worker turn: it then works with no worker connected, for
        # a pending or suspended instance too, and cancels any turn in flight.
        events = [
            _event(
                executionTerminated=pb.ExecutionTerminatedEvent(input=output, recurse=recursive)
            ),
            _event(
                executionCompleted=pb.ExecutionCompletedEvent(
                    workflowStatus=TERMINATED, result=output
                )
            ),
        ]
        self._append_history(inst, events, ops)
        children = inst.child_ids() if recursive else []
        self._finish(inst, TERMINATED, output, None, ops)
        for child_id in children:
            child = self._instances.get(child_id)
            if child is not None:
                self._terminate(child, output, True, ops)

    # --- timers and locks -----------------------------------------------------------------
    def _push_timer(self, at: float, row_id: int, instance_id: str) -> None:
        first = self._timer_heap[0][0] if self._timer_heap else None
        heapq.heappush(self._timer_heap, (at, row_id, instance_id))
        if first is None or at < first:
            self._timer_wakeup.set()

    async def _timer_loop(self) -> None:
        while True:
            now = time.time()
            while self._timer_heap and self._timer_heap[0][0] <= now:
                _, row_id, iid = heapq.heappop(self._timer_heap)
                inst = self._instances.get(iid)
                if inst is None:
                    continue
                ev = inst.timers.pop(row_id, None)
                if ev is None:
                    continue
                inst.inbox.append((row_id, ev))
                self._mark_ready(inst)
            delay = self._timer_heap[0][0] - now if self._timer_heap else 60.0
            self._timer_wakeup.clear()
            try:
                await asyncio.wait_for(self._timer_wakeup.wait(), timeout=min(delay, 60.0))
            except TimeoutError:
                pass

    async def _lock_expiry_loop(self) -> None:
        limit = self.settings.turn_lock_seconds
        while True:
            await asyncio.sleep(min(limit / 4, 5.0))
            cutoff = time.monotonic() - limit
            for d in list(self._dispatches.values()):
                if d.activity is None and d.at < cutoff:
                    inst = self._instances.get(d.instance_id)
                    self._forget(d)
                    if inst is not None and inst.dispatch is d:
                        log.warning(
                            "workflow turn of '%s' not answered in %.0f s; dispatching it again",
                            d.instance_id,
                            limit,
                        )
                        inst.dispatch = None
                        self._mark_ready(inst)

    # --- waiting on instances -------------------------------------------------------------
    def _notify(self, instance_id: str, state: pb.WorkflowState | None) -> None:
        waiters = self._waiters.get(instance_id)
        if not waiters:
            return
        keep = []
        for w in waiters:
            if w.future.done():
                continue
            if w.predicate(state):
                w.future.set_result(state)
            else:
                keep.append(w)
        if keep:
            self._waiters[instance_id] = keep
        else:
            del self._waiters[instance_id]

    async def _wait_for(
        self,
        instance_id: str,
        predicate: Callable[[pb.WorkflowState | None], bool],
        timeout: float | None,
    ) -> pb.WorkflowState | None:
        """Wait until the instance's state satisfies `predicate` (None: it does not exist)."""
        loop = asyncio.get_running_loop()
        # Registered before the first read, so a change made while reading is not missed.
        fut: asyncio.Future[pb.WorkflowState | None] = loop.create_future()
        waiter = _Waiter(predicate, fut)
        self._waiters.setdefault(instance_id, []).append(waiter)
        expiry: asyncio.TimerHandle | None = None
        try:
            state = self._peek_state(instance_id)
            if state is None:
                state = await self.get_state(instance_id)
            if not predicate(state):
                if timeout is not None:
                    expiry = loop.call_later(timeout, _expire, fut)
                state = await fut
        finally:
            if expiry is not None:
                expiry.cancel()
            waiters = self._waiters.get(instance_id)
            if waiters and waiter in waiters:
                waiters.remove(waiter)
                if not waiters:
                    del self._waiters[instance_id]
        await self.store.barrier()  # answer only with what is committed
        return state

    def _peek_state(self, instance_id: str) -> pb.WorkflowState | None:
        """The state held in memory (live or recently finished), without waiting."""
        inst = self._instances.get(instance_id)
        if inst is not None:
            return inst.state
        return self._finished.get(instance_id)

    # --- client API -----------------------------------------------------------------------
    async def get_state(self, instance_id: str) -> pb.WorkflowState | None:
        """The committed state of an instance, or None if it does not exist."""
        self._check_open()
        await self.store.barrier()
        state = self._peek_state(instance_id)
        if state is not None:
            return state
        blob = await asyncio.to_thread(self.store.read_state, instance_id)
        inst = self._instances.get(instance_id)  # it may have been started meanwhile
        if inst is not None:
            return inst.state
        return pb.WorkflowState.FromString(blob) if blob is not None else None

    def _check_payload(self, what: str, value: wrappers_pb2.StringValue | None) -> None:
        limit = self.settings.max_payload_bytes
        if value is not None and len(value.value.encode()) > limit:
            raise ResourceExhaustedError(
                f"{what} is {len(value.value.encode())} bytes; the sidecar accepts at most "
                f"{limit} bytes (max_payload_bytes)"
            )

    @staticmethod
    def _check_instance_id(instance_id: str) -> None:
        if len(instance_id) > MAX_INSTANCE_ID:
            raise InvalidArgumentError(
                f"instance ID is {len(instance_id)} characters; at most {MAX_INSTANCE_ID} allowed"
            )
        if any(ord(c) < 0x20 or ord(c) == 0x7F for c in instance_id):
            raise InvalidArgumentError("instance ID must not contain control characters")

    async def start_instance(self, req: pb.CreateInstanceRequest, app_id: str | None = None) -> str:
        """Start a workflow on the app the request's router targets, else on `app_id` (the
        app of the address the client called; the sidecar's own app by default)."""
        self._check_open()
        if not req.name:
            raise InvalidArgumentError("a workflow name is required")
        app = target_app(
            req.router if req.HasField("router") else None, app_id or self.settings.app_id
        )
        if app not in self._ready:
            raise NotFoundError(
                f"app '{app}' is not served by this sidecar (it serves: {', '.join(self.apps)})"
            )
        instance_id = req.instanceId or uuid.uuid4().hex
        self._check_instance_id(instance_id)
        self._check_payload("workflow input", req.input if req.HasField("input") else None)
        if req.enforceUniqueInstanceId:
            if await self.get_state(instance_id) is not None:
                raise AlreadyExistsError(f"a workflow instance with ID '{instance_id}' exists")
        if len(self._instances) >= self.settings.max_live_instances:
            raise ResourceExhaustedError(
                f"the sidecar already holds {len(self._instances)} unfinished workflow instances"
                f" (max_live_instances); retry when some have finished"
            )
        if instance_id in self._instances:
            status = status_name(self._instances[instance_id].live_status())
            raise AlreadyExistsError(
                f"workflow instance '{instance_id}' already exists and is "
                f"{status}; it can be started again "
                f"once it has finished, or purged"
            )
        ops: list[Op] = []
        scheduled = req.scheduledStartTimestamp if req.HasField("scheduledStartTimestamp") else None
        if scheduled is not None and ts_seconds(scheduled) <= time.time():
            scheduled = None
        self._create_instance(
            instance_id,
            req.name,
            version=req.version if req.HasField("version") and req.version.value else None,
            input=req.input if req.HasField("input") else None,
            ops=ops,
            scheduled_start=scheduled,
            tags=dict(req.tags),
            trace=req.parentTraceContext if req.HasField("parentTraceContext") else None,
            app_id=app,
        )
        await self._commit(ops)
        if scheduled is None and self.settings.start_wait_seconds > 0:
            # daprd answers once the first turn has committed; bounded, so a start with no
            # worker connected still returns.
            try:
                await self._wait_for(
                    instance_id,
                    lambda s: s is None or s.workflowStatus != PENDING,
                    self.settings.start_wait_seconds,
                )
            except TimeoutError:
                pass
        return instance_id

    async def wait_for_start(
        self, instance_id: str, timeout: float | None
    ) -> pb.WorkflowState | None:
        return await self._wait_for(
            instance_id, lambda s: s is None or s.workflowStatus != PENDING, timeout
        )

    async def wait_for_completion(
        self, instance_id: str, timeout: float | None
    ) -> pb.WorkflowState | None:
        return await self._wait_for(
            instance_id, lambda s: s is None or s.workflowStatus in TERMINAL, timeout
        )

    async def raise_event(
        self, instance_id: str, name: str, data: wrappers_pb2.StringValue | None
    ) -> None:
        self._check_open()
        if not name:
            raise InvalidArgumentError("an event name is required")
        self._check_payload(f"event '{name}' data", data)
        inst = self._instances.get(instance_id)
        if inst is None:
            if await self.get_state(instance_id) is None:
                raise NotFoundError(f"no workflow instance with ID '{instance_id}'")
            return  # a finished instance drops new events, as daprd does
        ops: list[Op] = []
        self._add_inbox(inst, _event(eventRaised=pb.EventRaisedEvent(name=name, input=data)), ops)
        await self._commit(ops)

    async def terminate(
        self, instance_id: str, output: wrappers_pb2.StringValue | None, recursive: bool
    ) -> None:
        self._check_open()
        self._check_payload("termination output", output)
        inst = self._instances.get(instance_id)
        if inst is None:
            if await self.get_state(instance_id) is None:
                raise NotFoundError(f"no workflow instance with ID '{instance_id}'")
            return  # already finished
        ops: list[Op] = []
        self._terminate(inst, output, recursive, ops)
        await self._commit(ops)

    async def suspend(self, instance_id: str, reason: wrappers_pb2.StringValue | None) -> None:
        self._check_open()
        inst = await self._require_live(instance_id, "suspend")
        if inst.suspended:
            return
        ops: list[Op] = []
        # The event waits in the inbox and reaches the worker together with the resume.
        inst.suspended = True
        self._add_inbox(
            inst, _event(executionSuspended=pb.ExecutionSuspendedEvent(input=reason)), ops
        )
        inst.state.workflowStatus = inst.live_status()  # type: ignore[assignment]
        self._save_instance(inst, ops)
        self._notify(inst.id, inst.state)
        await self._commit(ops)

    async def resume(self, instance_id: str, reason: wrappers_pb2.StringValue | None) -> None:
        self._check_open()
        inst = await self._require_live(instance_id, "resume")
        if not inst.suspended:
            return
        ops: list[Op] = []
        inst.suspended = False
        inst.state.workflowStatus = inst.live_status()  # type: ignore[assignment]
        self._add_inbox(inst, _event(executionResumed=pb.ExecutionResumedEvent(input=reason)), ops)
        self._save_instance(inst, ops)
        self._notify(inst.id, inst.state)
        await self._commit(ops)

    async def _require_live(self, instance_id: str, verb: str) -> Instance:
        inst = self._instances.get(instance_id)
        if inst is not None:
            return inst
        state = await self.get_state(instance_id)
        if state is None:
            raise NotFoundError(f"no workflow instance with ID '{instance_id}'")
        raise FailedPreconditionError(
            f"cannot {verb} workflow instance '{instance_id}': it has already finished "
            f"({status_name(state.workflowStatus)})"
        )

    async def purge(self, req: pb.PurgeInstancesRequest) -> int:
        self._check_open()
        force = req.force if req.HasField("force") else False
        ops: list[Op] = []
        if req.HasField("purgeInstanceFilter"):
            f = req.purgeInstanceFilter
            await self.store.barrier()
            ids = await asyncio.to_thread(
                self.store.query_ids,
                ts_seconds(f.createdTimeFrom) if f.HasField("createdTimeFrom") else None,
                ts_seconds(f.createdTimeTo) if f.HasField("createdTimeTo") else None,
                list(f.runtimeStatus),
            )
            count = 0
            for iid in ids:
                count += await self._purge_one(iid, req.recursive, force, ops, strict=False)
        else:
            if not req.instanceId:
                raise InvalidArgumentError("an instance ID or a purge filter is required")
            count = await self._purge_one(req.instanceId, req.recursive, force, ops, strict=True)
        await self._commit(ops)
        return count

    async def _purge_one(
        self, instance_id: str, recursive: bool, force: bool, ops: list[Op], *, strict: bool
    ) -> int:
        inst = self._instances.get(instance_id)
        if inst is not None:
            if not force:
                if strict:
                    raise FailedPreconditionError(
                        f"workflow instance '{instance_id}' has not finished; terminate it "
                        f"first, or purge with force"
                    )
                return 0
            children = inst.child_ids()
            if inst.dispatch is not None:
                self._forget(inst.dispatch)
            del self._instances[instance_id]
        else:
            if await self.get_state(instance_id) is None:
                if strict:
                    raise NotFoundError(f"no workflow instance with ID '{instance_id}'")
                return 0
            if self._instances.get(instance_id) is not None:  # restarted meanwhile
                return await self._purge_one(instance_id, recursive, force, ops, strict=strict)
            children = []
            if recursive:
                blobs = await asyncio.to_thread(self.store.read_history, instance_id)
                for b in blobs:
                    ev = pb.HistoryEvent.FromString(b)
                    if ev.HasField("childWorkflowInstanceCreated"):
                        children.append(ev.childWorkflowInstanceCreated.instanceId)
        ops.extend(_ops_delete_instance_rows(instance_id, keep_instance=False))
        self._finished.pop(instance_id, None)
        self._notify(instance_id, None)
        count = 1
        if recursive:
            for child_id in children:
                count += await self._purge_one(child_id, True, force, ops, strict=False)
        return count

    async def list_instance_ids(self, after: str, page_size: int | None) -> tuple[list[str], str]:
        self._check_open()
        size = min(page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
        await self.store.barrier()
        ids = await asyncio.to_thread(self.store.list_ids, after, size + 1)
        more = len(ids) > size
        ids = ids[:size]
        return ids, (ids[-1] if more and ids else "")

    async def history(self, instance_id: str) -> list[pb.HistoryEvent]:
        self._check_open()
        await self.store.barrier()
        inst = self._instances.get(instance_id)
        if inst is not None:
            return list(inst.history)
        blobs = await asyncio.to_thread(self.store.read_history, instance_id)
        if not blobs and await self.get_state(instance_id) is None:
            raise NotFoundError(f"no workflow instance with ID '{instance_id}'")
        return [pb.HistoryEvent.FromString(b) for b in blobs]

    # --- introspection (metrics, tests) ---------------------------------------------------
    def live_states(self) -> Iterator[tuple[int, str, str]]:
        """(status, workflow name, custom status) of each live instance: in memory, no I/O."""
        for inst in list(self._instances.values()):
            yield inst.live_status(), inst.state.name, inst.state.customStatus.value

    def stats(self) -> dict[str, int]:
        return {
            "live_instances": len(self._instances),
            "ready_instances": sum(len(q) for q in self._ready.values()),
            "queued_activities": sum(len(q) for q in self._activities.values()),
            "in_flight": len(self._dispatches),
            "streams": len(self._streams),
            "timers": len(self._timer_heap),
            "commits": self.store.commits,
        }

    def queued_activities(self, app_id: str) -> list[str]:
        """Names of the activities waiting for a worker of `app_id` (tests, diagnostics)."""
        return [item.request.name for item in self._activities.get(app_id, ())]


class _Turn:
    """Applies one workflow response: the events it consumed and the actions it returned."""

    def __init__(
        self,
        engine: Engine,
        inst: Instance,
        d: Dispatch,
        res: pb.WorkflowResponse,
        ops: list[Op],
    ) -> None:
        self.e = engine
        self.inst = inst
        self.d = d
        self.res = res
        self.ops = ops
        self.events: list[pb.HistoryEvent] = []
        self.finished = False

    def apply(self) -> None:
        inst, d, res = self.inst, self.d, self.res
        assert d.started is not None
        if res.HasField("version"):
            d.started.workflowStarted.version.CopyFrom(res.version)
        consumed = inst.inbox[: d.n_inbox]
        del inst.inbox[: d.n_inbox]
        self.events.append(d.started)
        for row_id, ev in consumed:
            self.ops.append((SQL_DELETE_INBOX, (row_id,)))
            self.events.append(ev)
        if res.HasField("customStatus"):
            inst.state.customStatus.CopyFrom(res.customStatus)
        else:
            inst.state.ClearField("customStatus")
        for action in res.actions:
            if self.finished:
                break  # the first completion wins
            kind = action.WhichOneof("workflowActionType")
            handler = getattr(self, f"_on_{kind}", None)
            if handler is None:
                log.warning("ignoring unknown workflow action %r from %s", kind, inst.id)
                continue
            handler(action)
        if self.finished:
            return
        self.e._append_history(inst, self.events, self.ops)
        inst.state.workflowStatus = inst.live_status()  # type: ignore[assignment]
        self.e._save_instance(inst, self.ops)
        self.e._notify(inst.id, inst.state)
        self.e._mark_ready(inst)

    def _on_scheduleTask(self, action: pb.WorkflowAction) -> None:
        a = action.scheduleTask
        inst = self.inst
        router = action.router if action.HasField("router") else None
        app = target_app(router, inst.app_id)
        self.events.append(
            _event(
                eventId=action.id,
                taskScheduled=pb.TaskScheduledEvent(
                    name=a.name,
                    version=a.version if a.HasField("version") else None,
                    input=a.input if a.HasField("input") else None,
                    taskExecutionId=a.taskExecutionId,
                ),
                router=router,
            )
        )
        if app not in self.e._ready:
            # Not a configured app: fail the task at once with daprd's dispatch error, so the
            # workflow's retry policy applies and then the workflow sees the error. (daprd
            # cannot tell an unknown app from one that is down and retries the dispatch; the
            # apps here are configured, so waiting could only wait forever.)
            ev = _event(
                taskFailed=pb.TaskFailedEvent(
                    taskScheduledId=action.id,
                    failureDetails=_failure(
                        "AppNotFound",
                        f"failed to dispatch activity '{a.name}' to remote app '{app}' (the app"
                        f" may not be available): this sidecar serves only"
                        f" {', '.join(self.e.apps)}",
                    ),
                    taskExecutionId=a.taskExecutionId,
                )
            )
            self.e._add_inbox(inst, ev, self.ops)
            return
        request = pb.ActivityRequest(
            name=a.name,
            version=a.version if a.HasField("version") else None,
            input=a.input if a.HasField("input") else None,
            workflowInstance=pb.WorkflowInstance(
                instanceId=inst.id,
                executionId=wrappers_pb2.StringValue(value=inst.execution_id),
            ),
            taskId=action.id,
            taskExecutionId=a.taskExecutionId,
        )
        row_id = next(self.e._activity_ids)
        self.ops.append((SQL_INSERT_ACTIVITY, (row_id, inst.id, request.SerializeToString())))
        self.e._activities[app].append(
            ActivityItem(row_id, inst.id, inst.execution_id, request, app)
        )
        if self.e._work_waiters[app]:
            self.e._wake_streams(app)

    def _on_createTimer(self, action: pb.WorkflowAction) -> None:
        a = action.createTimer
        created = pb.TimerCreatedEvent(fireAt=a.fireAt)
        if a.HasField("name"):
            created.name = a.name
        origin = a.WhichOneof("origin")
        if origin is not None:
            getattr(created, origin).CopyFrom(getattr(a, origin))
        self.events.append(_event(eventId=action.id, timerCreated=created))
        if a.fireAt.seconds >= NEVER_SECONDS:
            return  # "wait forever": recorded, never fired
        fired = _event(timerFired=pb.TimerFiredEvent(fireAt=a.fireAt, timerId=action.id))
        fired.timestamp.CopyFrom(a.fireAt)
        self.e._add_inbox(self.inst, fired, self.ops, visible_at=ts_seconds(a.fireAt))

    def _on_createChildWorkflow(self, action: pb.WorkflowAction) -> None:
        a = action.createChildWorkflow
        inst = self.inst
        version = a.version if a.HasField("version") else None
        child_input = a.input if a.HasField("input") else None
        router = action.router if action.HasField("router") else None
        app = target_app(router, inst.app_id)
        self.events.append(
            _event(
                eventId=action.id,
                childWorkflowInstanceCreated=pb.ChildWorkflowInstanceCreatedEvent(
                    instanceId=a.instanceId, name=a.name, version=version, input=child_input
                ),
                router=router,
            )
        )
        failure: pb.TaskFailureDetails | None = None
        if a.instanceId in self.e._instances or not a.instanceId:
            reason = "no instance ID" if not a.instanceId else "that ID is already running"
            failure = _failure(
                "WorkflowAlreadyExists", f"cannot start child workflow '{a.instanceId}': {reason}"
            )
        elif app not in self.e._ready:
            failure = _failure(
                "AppNotFound",
                f"failed to start child workflow '{a.name}' on remote app '{app}' (the app may"
                f" not be available): this sidecar serves only {', '.join(self.e.apps)}",
            )
        if failure is not None:
            ev = _event(
                childWorkflowInstanceFailed=pb.ChildWorkflowInstanceFailedEvent(
                    taskScheduledId=action.id, failureDetails=failure
                )
            )
            self.e._add_inbox(inst, ev, self.ops)
            return
        parent = pb.ParentInstanceInfo(
            taskScheduledId=action.id,
            name=wrappers_pb2.StringValue(value=inst.state.name),
            workflowInstance=pb.WorkflowInstance(
                instanceId=inst.id,
                executionId=wrappers_pb2.StringValue(value=inst.execution_id),
            ),
            appID=inst.app_id,
        )
        self.e._create_instance(
            a.instanceId,
            a.name,
            version=version,
            input=child_input,
            ops=self.ops,
            parent=parent,
            app_id=app,
            source_app=inst.app_id,
        )

    def _on_completeWorkflow(self, action: pb.WorkflowAction) -> None:
        a = action.completeWorkflow
        result = a.result if a.HasField("result") else None
        if a.workflowStatus == CONTINUED_AS_NEW:
            self._continue_as_new(a, result)
            return
        failure = a.failureDetails if a.HasField("failureDetails") else None
        status = a.workflowStatus
        if status not in TERMINAL:
            failure = _failure(
                "InvalidCompletion",
                f"the worker completed the workflow with status {status_name(status)}, "
                "which is not a final status",
            )
            status = FAILED
        self.events.append(
            _event(
                eventId=action.id,
                executionCompleted=pb.ExecutionCompletedEvent(
                    workflowStatus=status, result=result, failureDetails=failure
                ),
            )
        )
        self.finished = True
        self.e._append_history(self.inst, self.events, self.ops)
        self.e._finish(self.inst, status, result, failure, self.ops)

    def _continue_as_new(
        self, a: pb.CompleteWorkflowAction, result: wrappers_pb2.StringValue | None
    ) -> None:
        inst = self.inst
        old = next(
            (ev for ev in [*inst.history, *self.events] if ev.HasField("executionStarted")), None
        )
        execution_id = uuid.uuid4().hex
        started = pb.ExecutionStartedEvent()
        if old is not None:
            started.CopyFrom(old.executionStarted)
        else:
            started.name = inst.state.name
        if result is not None:
            started.input.CopyFrom(result)
        else:
            started.ClearField("input")
        if a.HasField("newVersion"):
            started.version.CopyFrom(a.newVersion)
        started.ClearField("scheduledStartTimestamp")
        started.workflowInstance.executionId.value = execution_id
        self.finished = True
        # The old execution's history, pending timers and queued activities are dropped.
        self.ops.append(("DELETE FROM wf_history WHERE instance_id = ?", (inst.id,)))
        self.ops.append(("DELETE FROM wf_activities WHERE instance_id = ?", (inst.id,)))
        for row_id in inst.timers:
            self.ops.append((SQL_DELETE_INBOX, (row_id,)))
        inst.timers.clear()
        inst.history = []
        inst.resolved = set()
        remaining = inst.inbox
        inst.inbox = []
        for stream in self.e._streams.values():
            stream.history_cache.pop(inst.id, None)
        st = inst.state
        st.executionId.value = execution_id
        if result is not None:
            st.input.CopyFrom(result)
        else:
            st.ClearField("input")
        st.ClearField("output")
        st.ClearField("failureDetails")
        router = old.router if old is not None and old.HasField("router") else None
        self.e._add_inbox(inst, _event(executionStarted=started, router=router), self.ops)
        for ev in a.carryoverEvents:
            self.e._add_inbox(inst, ev, self.ops)
        for row_id, ev in remaining:
            key = _resolution_key(ev)
            if key is not None:
                inst.resolved.add(key)
            inst.inbox.append((row_id, ev))
        inst.state.workflowStatus = inst.live_status()  # type: ignore[assignment]
        self.e._save_instance(inst, self.ops)
        self.e._notify(inst.id, inst.state)
        self.e._mark_ready(inst)

    def _on_workflowVersionNotAvailable(self, action: pb.WorkflowAction) -> None:
        self.events.append(
            _event(
                eventId=action.id,
                executionStalled=pb.ExecutionStalledEvent(
                    reason=pb.VERSION_NOT_AVAILABLE,
                    description="no connected worker has the workflow version this instance needs",
                ),
            )
        )
        self.inst.stalled = True

    def _on_sendEvent(self, action: pb.WorkflowAction) -> None:
        a = action.sendEvent
        target_id = a.instance.instanceId
        data = a.data if a.HasField("data") else None
        self.events.append(
            _event(
                eventId=action.id,
                eventSent=pb.EventSentEvent(instanceId=target_id, name=a.name, input=data),
            )
        )
        target = self.e._instances.get(target_id)
        if target is not None:
            ev = _event(eventRaised=pb.EventRaisedEvent(name=a.name, input=data))
            self.e._add_inbox(target, ev, self.ops)

    def _on_terminateWorkflow(self, action: pb.WorkflowAction) -> None:
        a = action.terminateWorkflow
        target = self.e._instances.get(a.instanceId)
        if target is not None and target is not self.inst:
            reason = a.reason if a.HasField("reason") else None
            self.e._terminate(target, reason, a.recurse, self.ops)

    def _on_createDetachedWorkflow(self, action: pb.WorkflowAction) -> None:
        a = action.createDetachedWorkflow
        instance_id = a.instanceId or uuid.uuid4().hex
        self.events.append(
            _event(
                eventId=action.id,
                detachedWorkflowInstanceCreated=pb.DetachedWorkflowInstanceCreatedEvent(
                    instanceId=instance_id
                ),
            )
        )
        if instance_id in self.e._instances:
            return
        app = target_app(action.router if action.HasField("router") else None, self.inst.app_id)
        if app not in self.e._ready:
            log.warning(
                "not starting detached workflow '%s': app '%s' is not served", instance_id, app
            )
            return
        scheduled = a.scheduledStartTimestamp if a.HasField("scheduledStartTimestamp") else None
        if scheduled is not None and ts_seconds(scheduled) <= time.time():
            scheduled = None
        self.e._create_instance(
            instance_id,
            a.name,
            version=a.version if a.HasField("version") else None,
            input=a.input if a.HasField("input") else None,
            ops=self.ops,
            scheduled_start=scheduled,
            tags=dict(a.tags),
            app_id=app,
            source_app=self.inst.app_id,
        )
