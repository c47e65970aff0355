"""The MCP front door (mcp SDK 1.30, protocol 2025-11-25): a thin translation over the Dispatcher.

One `McpFront` serves one transport (Streamable HTTP or stdio) of a gateway. It builds a
low-level `mcp.server.lowlevel.Server` whose handlers only translate:

    tools/list                 -> dispatcher.tools_for(principal)
    tools/call                 -> dispatcher.submit, then dispatcher.wait (progress, cancellation)
    tools/call + `task`        -> dispatcher.submit, CreateTaskResult at once      (see "Tasks")
    tasks/get|result|list|cancel -> dispatcher.get / wait / list / cancel          (see "Tasks")
    logging/setLevel           -> per-session level for the call log notifications

It keeps no call state of its own: the workflow instance is the task, and its id is the MCP task
id, so a task can be polled from any session of any gateway process sharing the engine.

Error mapping (spec 2025-11-25, server/tools "Error Handling"; basic/utilities/tasks):
- unknown tool: JSON-RPC -32602;
- arguments that do not fit the input schema: a tool execution error (`isError`), naming the
  field (SEP-1303: input validation errors are tool execution errors, so that a model can
  correct itself); for a task-augmented call, where no result can be carried, -32602;
- a tool that fails: `isError` with the tool's message;
- task mode misuse (a `required` tool without a task, a `forbidden` one with a task): -32601;
- idempotency conflict: -32602; policy denial: -32003; engine unavailable: -32603.
"""

from __future__ import annotations

import json
import logging
import weakref
from typing import Any, Protocol

import anyio
from mcp import types
from mcp.server.lowlevel import NotificationOptions, Server
from mcp.server.models import InitializationOptions
from mcp.server.session import ServerSession
from mcp.shared.context import RequestContext
from mcp.shared.exceptions import McpError

from adapters.base import ToolSpec
from gateway import __version__, telemetry
from gateway.config import GatewayConfig
from gateway.dispatch import CallRequest, CallState, CallView, Dispatcher, DispatchError
from identity.principal import Principal

log = logging.getLogger(__name__)

IDEMPOTENCY_META = "io.duragate/idempotency-key"
TASK_ID_META = "io.duragate/task-id"
REPLAYED_META = "io.duragate/replayed"
ERROR_META = "io.duragate/error"
USAGE_META = "io.duragate/usage"
RELATED_TASK_META = "io.modelcontextprotocol/related-task"
# Where the HTTP layer puts the authenticated caller (ASGI scope key).
PRINCIPAL_SCOPE_KEY = "duragate.principal"

DENIED = -32003  # implementation-defined server error (JSON-RPC reserves -32000..-32099)
MAX_IDEMPOTENCY_KEY = 256
# A plain call waits for the tool's own timeout plus this margin (scheduling, retries' gaps),
# and never longer than `limits.max_wait_seconds`.
WAIT_MARGIN_SECONDS = 5.0
# A session that cannot take a notification this fast is dropped from the list, not waited for.
NOTIFY_TIMEOUT_SECONDS = 5.0
LOG_LEVELS: tuple[types.LoggingLevel, ...] = (
    "debug",
    "info",
    "notice",
    "warning",
    "error",
    "critical",
    "alert",
    "emergency",
)


class GatewayHost(Protocol):
    """What the front door needs of the gateway; read at each request, so a reload shows."""

    @property
    def dispatcher(self) -> Dispatcher: ...

    @property
    def config(self) -> GatewayConfig: ...


def protocol_error(code: int, message: str, data: Any = None) -> McpError:
    return McpError(types.ErrorData(code=code, message=message, data=data))


def _jsonable(value: Any) -> Any:
    """Error details as JSON (the registry's argument problems are dataclasses)."""
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if hasattr(value, "path") and hasattr(value, "message"):
        return {"path": value.path, "message": value.message}
    try:
        json.dumps(value)
        return value
    except (TypeError, ValueError):
        return str(value)


def dispatch_error(exc: DispatchError) -> McpError:
    """A refused call or task request as the JSON-RPC error the spec asks for."""
    data = {"type": exc.code, "details": _jsonable(exc.data)} if exc.data else {"type": exc.code}
    if exc.code == "denied":
        return protocol_error(DENIED, exc.message, data)
    if exc.code == "unavailable":
        return protocol_error(types.INTERNAL_ERROR, exc.message, data)
    if exc.code == "limited":
        # -32004: implementation-defined, next to DENIED. The retry time sits at the top of
        # `data` so clients need not dig into details to back off.
        limited = exc.data or {}
        data = {
            "type": "limited",
            "limit": limited.get("limit"),
            "retry_after_seconds": limited.get("retry_after_seconds"),
        }
        return protocol_error(-32004, exc.message, data)
    # unknown_tool, invalid_arguments, idempotency_conflict, not_found
    return protocol_error(types.INVALID_PARAMS, exc.message, data)


# --- live sessions ---------------------------------------------------------------------------


class LiveSessions:
    """The MCP sessions of this process (the SDK keeps no such list): for `tools/list_changed`
    and each session's logging level."""

    def __init__(self) -> None:
        self._sessions: weakref.WeakSet[ServerSession] = weakref.WeakSet()
        self._levels: weakref.WeakKeyDictionary[ServerSession, types.LoggingLevel] = (
            weakref.WeakKeyDictionary()
        )

    def add(self, session: ServerSession) -> None:
        self._sessions.add(session)

    def __len__(self) -> int:
        return len(self._sessions)

    def set_level(self, session: ServerSession, level: types.LoggingLevel) -> None:
        self._levels[session] = level

    def wants(self, session: ServerSession, level: types.LoggingLevel) -> bool:
        # Per-call info logs are opt-in (logging/setLevel): unasked, they cost every call two
        # notifications nobody reads.
        threshold = self._levels.get(session, "warning")
        return LOG_LEVELS.index(level) >= LOG_LEVELS.index(threshold)

    async def notify_tools_changed(self) -> int:
        """Send `notifications/tools/list_changed` to every live session; returns how many."""
        sent = 0
        for session in list(self._sessions):
            try:
                with anyio.fail_after(NOTIFY_TIMEOUT_SECONDS):
                    await session.send_tool_list_changed()
                sent += 1
            except Exception:  # noqa: BLE001 - a session that is gone is simply forgotten
                self._sessions.discard(session)
        return sent


class DuragateServer(Server[Any, Any]):
    """The SDK's low-level server, with `tools.listChanged` on by default (the session manager
    calls `create_initialization_options()` without arguments), the tasks capability, and every
    session registered in `LiveSessions` as its first message arrives."""

    def __init__(self, sessions: LiveSessions) -> None:
        super().__init__(
            "duragate",
            version=__version__,
            instructions="Tools served by Duragate; every call runs as a durable workflow.",
        )
        self.sessions = sessions

    def create_initialization_options(
        self,
        notification_options: NotificationOptions | None = None,
        experimental_capabilities: dict[str, dict[str, Any]] | None = None,
    ) -> InitializationOptions:
        return super().create_initialization_options(
            notification_options or NotificationOptions(tools_changed=True),
            experimental_capabilities,
        )

    def get_capabilities(
        self,
        notification_options: NotificationOptions,
        experimental_capabilities: dict[str, dict[str, Any]],
    ) -> types.ServerCapabilities:
        capabilities = super().get_capabilities(notification_options, experimental_capabilities)
        capabilities.tasks = TASKS_CAPABILITY
        return capabilities

    async def _handle_message(
        self, message: Any, session: ServerSession, *args: Any, **kwargs: Any
    ) -> None:
        self.sessions.add(session)
        await super()._handle_message(message, session, *args, **kwargs)


# --- the front door --------------------------------------------------------------------------


class _Progress:
    """Progress notifications for one request (a no-op without a progress token). The value
    must increase with each notification: the tool's own progress is forwarded when it moves
    forward; a change of status message alone counts up by one while the tool reports none."""

    def __init__(self, ctx: RequestContext[ServerSession, Any, Any]) -> None:
        self.session = ctx.session
        self.token = ctx.meta.progressToken if ctx.meta is not None else None
        self.request_id = str(ctx.request_id)
        self.last: float | None = None

    async def send(self, progress: float, total: float | None, message: str | None) -> None:
        if self.token is None or (self.last is not None and progress <= self.last):
            return
        self.last = progress
        try:
            await self.session.send_progress_notification(
                self.token, progress, total, message, related_request_id=self.request_id
            )
        except (anyio.ClosedResourceError, anyio.BrokenResourceError):
            pass

    async def on_update(self, view: CallView) -> None:
        if view.progress is not None:
            await self.send(view.progress, view.total, view.message)
        elif self.last is not None:
            await self.send(self.last + 1, None, view.message)


class McpFront:
    """The MCP server of one transport. `default_principal` is the caller when the transport
    itself says who it is (stdio: the local user); over HTTP the caller comes from the request
    (`scope[PRINCIPAL_SCOPE_KEY]`, set by the HTTP layer) and there is no default."""

    def __init__(
        self,
        host: GatewayHost,
        sessions: LiveSessions,
        *,
        front_door: str,
        default_principal: Principal | None = None,
    ) -> None:
        self.host = host
        self.front_door = front_door
        self.default_principal = default_principal
        self.server = DuragateServer(sessions)
        self.sessions = sessions
        handlers = self.server.request_handlers
        handlers[types.ListToolsRequest] = self._list_tools
        handlers[types.CallToolRequest] = self._call_tool
        handlers[types.SetLevelRequest] = self._set_level
        self.tasks = McpTasks(self)
        self.tasks.register(handlers)

    # -- helpers

    @property
    def dispatcher(self) -> Dispatcher:
        return self.host.dispatcher

    def context(self) -> RequestContext[ServerSession, Any, Any]:
        return self.server.request_context

    def principal(self, ctx: RequestContext[ServerSession, Any, Any]) -> Principal:
        request = ctx.request
        scope = getattr(request, "scope", None)
        if isinstance(scope, dict):
            found = scope.get(PRINCIPAL_SCOPE_KEY)
            if isinstance(found, Principal):
                return found
        if self.default_principal is not None:
            return self.default_principal
        raise protocol_error(types.INVALID_REQUEST, "the caller is not authenticated")

    async def log(
        self, ctx: RequestContext[ServerSession, Any, Any], level: types.LoggingLevel, data: Any
    ) -> None:
        if not self.sessions.wants(ctx.session, level):
            return
        try:
            await ctx.session.send_log_message(
                level, data, logger="duragate", related_request_id=str(ctx.request_id)
            )
        except (anyio.ClosedResourceError, anyio.BrokenResourceError):
            pass

    # -- tools/list

    async def _list_tools(self, req: types.ListToolsRequest) -> types.ServerResult:
        principal = self.principal(self.context())
        tools = [_tool(spec) for spec in self.dispatcher.tools_for(principal)]
        return types.ServerResult(types.ListToolsResult(tools=tools))

    # -- logging/setLevel

    async def _set_level(self, req: types.SetLevelRequest) -> types.ServerResult:
        self.sessions.set_level(self.context().session, req.params.level)
        return types.ServerResult(types.EmptyResult())

    # -- tools/call

    async def _call_tool(self, req: types.CallToolRequest) -> types.ServerResult:
        """One call, in a server span that continues the caller's trace (`_meta.traceparent`,
        else the HTTP `traceparent` header); its context goes with the call to the workflow."""
        ctx = self.context()
        name = req.params.name
        known = self.dispatcher.registry.get(name) is not None
        incoming = telemetry.carrier_from(_meta_of(req.params), _request_attr(ctx, "headers"))
        scope = _request_attr(ctx, "scope")
        span = telemetry.front_door_span(
            f"tools/call {name}" if known else "tools/call",
            carrier=incoming,
            auth=scope.get(telemetry.AUTH_SCOPE_KEY) if isinstance(scope, dict) else None,
            attributes={
                "rpc.system": "jsonrpc",
                "rpc.method": "tools/call",
                "mcp.method.name": "tools/call",
                "jsonrpc.request.id": str(ctx.request_id),
                "gen_ai.operation.name": "execute_tool",
                "gen_ai.tool.name": name[:128],
                "duragate.front_door": self.front_door,
            },
        )
        try:
            result = await self._run_call(req, ctx, telemetry.carrier_of(span) or incoming)
            if span.is_recording():
                root = result.root
                outcome = "task" if isinstance(root, types.CreateTaskResult) else "ok"
                if getattr(root, "isError", False):
                    outcome = "error"
                span.set_attribute("duragate.outcome", outcome)
            return result
        except Exception as exc:
            telemetry.failed(span, exc)
            raise
        finally:
            span.end()

    async def _run_call(
        self,
        req: types.CallToolRequest,
        ctx: RequestContext[ServerSession, Any, Any],
        trace: dict[str, str],
    ) -> types.ServerResult:
        principal = self.principal(ctx)
        params = req.params
        spec = next(
            (s for s in self.dispatcher.tools_for(principal) if s.name == params.name), None
        )
        wants_task = params.task is not None
        if spec is not None:
            self.tasks.check_mode(spec, wants_task)
        call = CallRequest(
            tool=params.name,
            arguments=dict(params.arguments or {}),
            principal=principal,
            front_door=self.front_door,
            idempotency_key=_idempotency_key(params),
            trace_context=trace,
        )
        try:
            view = await self.dispatcher.submit(call)
        except DispatchError as exc:
            if exc.code == "invalid_arguments" and not wants_task:
                return types.ServerResult(_error_result(exc.message, exc.code, _jsonable(exc.data)))
            raise dispatch_error(exc) from None
        await self.log(
            ctx,
            "info",
            {"event": "call started", "tool": params.name, "task": view.task_id},
        )
        if wants_task:
            return types.ServerResult(self.tasks.created(view))
        # (spec is None only if a reload removed the tool since submit accepted the call)
        limit = self.host.config.limits.max_wait_seconds
        if spec is not None:
            limit = min(limit, spec.timeout_seconds + WAIT_MARGIN_SECONDS)
        try:
            view = await self._wait_plain(ctx, principal, view, limit)
        except DispatchError as exc:
            raise dispatch_error(exc) from None
        finished = {"event": "call finished", "tool": params.name, "task": view.task_id}
        await self.log(ctx, "info", {**finished, "state": str(view.state)})
        return types.ServerResult(render(view))

    async def _wait_plain(
        self,
        ctx: RequestContext[ServerSession, Any, Any],
        principal: Principal,
        view: CallView,
        bound: float,
    ) -> CallView:
        """Wait up to `bound` seconds for a plain call, sending progress;
        `notifications/cancelled` terminates its workflow."""
        if view.terminal:  # an idempotent replay of a finished call
            return view
        progress = _Progress(ctx)
        try:
            await progress.send(0, None, view.message)
            on_update = progress.on_update if progress.token is not None else None
            return await self.dispatcher.wait(view.task_id, principal, bound, on_update, known=view)
        except anyio.get_cancelled_exc_class():
            if _cancelled_by_client(ctx):
                with anyio.move_on_after(15, shield=True):
                    await self.dispatcher.cancel(view.task_id, principal)
                    log.info("call %s cancelled by the client", view.task_id)
            raise


def _cancelled_by_client(ctx: RequestContext[ServerSession, Any, Any]) -> bool:
    """True when this request's handler is being cancelled by `notifications/cancelled`, as
    opposed to the session or the gateway going away (which must leave the workflow running).
    The SDK marks the request's responder as cancelled; it stays in the session's in-flight
    table until the handler returns."""
    in_flight = getattr(ctx.session, "_in_flight", {})
    responder = in_flight.get(ctx.request_id)
    return bool(responder is not None and responder.cancelled)


def _meta_of(params: types.CallToolRequestParams) -> dict[str, Any]:
    return (params.meta.model_extra or {}) if params.meta is not None else {}


def _request_attr(ctx: RequestContext[ServerSession, Any, Any], name: str) -> Any:
    """An attribute of the HTTP request behind this MCP request (None over stdio)."""
    return getattr(ctx.request, name, None)


def _idempotency_key(params: types.CallToolRequestParams) -> str | None:
    extra = (params.meta.model_extra or {}) if params.meta is not None else {}
    key = extra.get(IDEMPOTENCY_META)
    if key is None:
        return None
    if not isinstance(key, str) or not key or len(key) > MAX_IDEMPOTENCY_KEY:
        raise protocol_error(
            types.INVALID_PARAMS,
            f"_meta[{IDEMPOTENCY_META!r}] must be a non-empty string of at most "
            f"{MAX_IDEMPOTENCY_KEY} characters",
        )
    return key


def _tool(spec: ToolSpec) -> types.Tool:
    return types.Tool(
        name=spec.name,
        description=spec.description or None,
        inputSchema=spec.input_schema,
        outputSchema=spec.output_schema,
        execution=types.ToolExecution(taskSupport=spec.task_support),
    )


def _error_result(message: str, kind: str, data: Any = None) -> types.CallToolResult:
    error = {"type": kind, "message": message, "data": data}
    return types.CallToolResult(
        content=[types.TextContent(type="text", text=message)],
        isError=True,
        _meta={ERROR_META: error},
    )


def render(view: CallView) -> types.CallToolResult:
    """A call's view as the MCP result a plain `tools/call` (or `tasks/result`) returns."""
    meta: dict[str, Any] = {TASK_ID_META: view.task_id}
    if view.replayed:
        meta[REPLAYED_META] = True
    if view.usage:
        meta[USAGE_META] = view.usage
    if view.state == CallState.COMPLETED:
        value = view.result
        if isinstance(value, dict):
            text = json.dumps(value, ensure_ascii=False)
            return types.CallToolResult(
                content=[types.TextContent(type="text", text=text)],
                structuredContent=value,
                _meta=meta,
            )
        text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
        return types.CallToolResult(content=[types.TextContent(type="text", text=text)], _meta=meta)
    if view.terminal:
        error = view.error or {"type": str(view.state), "message": f"the call {view.state}"}
        result = _error_result(
            str(error.get("message") or view.state), str(error.get("type")), error.get("data")
        )
    else:
        result = _error_result(
            f"{view.tool} is still running; it goes on as task {view.task_id}: poll it with "
            "tasks/get and fetch its result with tasks/result",
            "still_running",
        )
        meta[RELATED_TASK_META] = {"taskId": view.task_id}
    result.meta = {**(result.meta or {}), **meta}
    return result


# --- Tasks -----------------------------------------------------------------------------------
#
# Everything about MCP tasks (2025-11-25, experimental; moving into the extension
# `io.modelcontextprotocol/tasks`) is below. The task id is the workflow instance id; every
# answer comes from the engine through the Dispatcher, never from the SDK's task runner.

TASK_TTL_MS = 7 * 24 * 3600 * 1000  # what we promise to keep a task for (numeric, as clients want)
TASK_POLL_INTERVAL_MS = 500
TASK_PAGE_SIZE = 50

TASKS_CAPABILITY = types.ServerTasksCapability(
    list=types.TasksListCapability(),
    cancel=types.TasksCancelCapability(),
    requests=types.ServerTasksRequestsCapability(
        tools=types.TasksToolsCapability(call=types.TasksCallCapability())
    ),
)


def _task(view: CallView) -> dict[str, Any]:
    return {
        "taskId": view.task_id,
        "status": str(view.state),
        "statusMessage": _status_message(view),
        "createdAt": view.created_at,
        "lastUpdatedAt": view.updated_at,
        "ttl": TASK_TTL_MS,
        "pollInterval": TASK_POLL_INTERVAL_MS,
    }


def _status_message(view: CallView) -> str | None:
    if view.state in (CallState.FAILED, CallState.CANCELLED) and view.error:
        return str(view.error.get("message") or view.message)
    return view.message


class McpTasks:
    """tools/call with a `task`, and tasks/get, tasks/result, tasks/list, tasks/cancel."""

    def __init__(self, front: McpFront) -> None:
        self.front = front

    def register(self, handlers: dict[type, Any]) -> None:
        handlers[types.GetTaskRequest] = self._get
        handlers[types.GetTaskPayloadRequest] = self._result
        handlers[types.ListTasksRequest] = self._list
        handlers[types.CancelTaskRequest] = self._cancel

    @staticmethod
    def check_mode(spec: ToolSpec, wants_task: bool) -> None:
        """Tool-level negotiation: -32601 for a `required` tool called without a task or a
        `forbidden` one called with one."""
        if spec.task_support == "required" and not wants_task:
            raise protocol_error(
                types.METHOD_NOT_FOUND,
                f"tool {spec.name!r} must be called as a task (execution.taskSupport: required)",
            )
        if spec.task_support == "forbidden" and wants_task:
            raise protocol_error(
                types.METHOD_NOT_FOUND,
                f"tool {spec.name!r} cannot be called as a task (execution.taskSupport: forbidden)",
            )

    @staticmethod
    def created(view: CallView) -> types.CreateTaskResult:
        meta = {REPLAYED_META: True} if view.replayed else None
        return types.CreateTaskResult(task=types.Task(**_task(view)), _meta=meta)

    async def _view(self, task_id: str) -> tuple[Principal, CallView]:
        front = self.front
        principal = front.principal(front.context())
        try:
            return principal, await front.dispatcher.get(task_id, principal)
        except DispatchError as exc:
            raise dispatch_error(exc) from None

    async def _get(self, req: types.GetTaskRequest) -> types.ServerResult:
        _, view = await self._view(req.params.taskId)
        return types.ServerResult(types.GetTaskResult(**_task(view)))

    async def _result(self, req: types.GetTaskPayloadRequest) -> types.ServerResult:
        principal, view = await self._view(req.params.taskId)
        if not view.terminal:  # tasks/result blocks until the task is terminal
            try:
                view = await self.front.dispatcher.wait(view.task_id, principal, None)
            except DispatchError as exc:
                raise dispatch_error(exc) from None
        result = render(view)
        result.meta = {**(result.meta or {}), RELATED_TASK_META: {"taskId": view.task_id}}
        return types.ServerResult(result)

    async def _list(self, req: types.ListTasksRequest) -> types.ServerResult:
        front = self.front
        principal = front.principal(front.context())
        cursor = req.params.cursor if req.params is not None else None
        try:
            views, next_cursor = await front.dispatcher.list(principal, cursor, TASK_PAGE_SIZE)
        except DispatchError as exc:
            raise dispatch_error(exc) from None
        except Exception as exc:
            if cursor is None:
                raise
            raise protocol_error(types.INVALID_PARAMS, f"invalid cursor {cursor!r}") from exc
        tasks = [types.Task(**_task(v)) for v in views]
        return types.ServerResult(types.ListTasksResult(tasks=tasks, nextCursor=next_cursor))

    async def _cancel(self, req: types.CancelTaskRequest) -> types.ServerResult:
        principal, view = await self._view(req.params.taskId)
        if not view.terminal:
            try:
                view = await self.front.dispatcher.cancel(view.task_id, principal)
            except DispatchError as exc:
                raise dispatch_error(exc) from None
            if view.state == CallState.CANCELLED:
                return types.ServerResult(types.CancelTaskResult(**_task(view)))
        raise protocol_error(
            types.INVALID_PARAMS,
            f"task {view.task_id} is already {view.state} and cannot be cancelled",
        )
