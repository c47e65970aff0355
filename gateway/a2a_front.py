"""The A2A front door (A2A 1.0 through a2a-sdk 1.3; the 0.3 method names are accepted too).

    GET  /.well-known/agent-card.json                 the gateway's card: every tool the caller
                                                      may call is a skill; lists the agents
    POST /a2a                                         JSON-RPC binding of that card
         /a2a/rest/...                                HTTP+JSON binding of that card
    GET  /a2a/agents/{agent}/.well-known/agent-card.json
    POST /a2a/agents/{agent}                          one agent: a configured group of tools,
         /a2a/agents/{agent}/rest/...                 or an agent-like tool of its own

Each request is authenticated as on `/mcp`; cards show a caller only the skills it may call.
Every method is a thin translation over the dispatcher: SendMessage submits a call (the task is
its workflow instance), GetTask / ListTasks / CancelTask read and end instances, streams follow
them. Nothing here stores task state. A policy refusal is a task in A2A's REJECTED state that
is not stored (the audit log has it); a bad message is `InvalidParams` with what to send.
A message on a task that waits for an approval answers it, when its sender may approve.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import uuid
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any

from a2a.server.context import ServerCallContext
from a2a.server.events.event_queue import Event
from a2a.server.request_handlers.request_handler import RequestHandler
from a2a.server.request_handlers.response_helpers import agent_card_to_dict
from a2a.server.routes import create_jsonrpc_routes, create_rest_routes
from a2a.server.routes.common import DefaultServerCallContextBuilder
from a2a.types import (
    AgentCard,
    AuthenticationInfo,
    CancelTaskRequest,
    DeleteTaskPushNotificationConfigRequest,
    GetExtendedAgentCardRequest,
    GetTaskPushNotificationConfigRequest,
    GetTaskRequest,
    InternalError,
    InvalidParamsError,
    InvalidRequestError,
    ListTaskPushNotificationConfigsRequest,
    ListTaskPushNotificationConfigsResponse,
    ListTasksRequest,
    ListTasksResponse,
    Message,
    SendMessageRequest,
    SubscribeToTaskRequest,
    Task,
    TaskNotCancelableError,
    TaskNotFoundError,
    TaskPushNotificationConfig,
    TaskState,
    UnsupportedOperationError,
)
from google.protobuf.json_format import MessageToDict
from opentelemetry.trace import Span
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Mount, Route

from gateway import a2a_render as render
from gateway import telemetry
from gateway.a2a_agents import AgentDef, agents_of
from gateway.a2a_cards import A2AHost, build_card
from gateway.a2a_push import PushConfigError, PushService
from gateway.dispatch import CallRequest, CallState, CallView, Dispatcher, DispatchError
from gateway.mcp_front import PRINCIPAL_SCOPE_KEY
from identity.authenticate import VIA_ANONYMOUS
from identity.principal import Principal

log = logging.getLogger(__name__)

FRONT_DOOR = "a2a"
MAX_PAGE_SIZE = 100
DEFAULT_PAGE_SIZE = 50
# A stream follows its task in slices of this many seconds (each slice a bounded wait).
STREAM_SLICE_SECONDS = 3600.0
STREAM_QUEUE = 64


@dataclass(frozen=True)
class _Answered:
    view: CallView
    follow: bool  # whether the sender may follow the task (it is its owner)
    answered: Any  # the wait it answered (see _wait_key)


def _waits(view: CallView) -> bool:
    return view.state == CallState.INPUT_REQUIRED


def _wait_key(view: CallView) -> Any:
    return (view.waiting_for, view.input_round)


class _Interrupted(Exception):
    """A followed task stopped to wait for input: a blocking call or a stream ends there."""


def _principal(context: ServerCallContext) -> Principal:
    principal = context.state.get("principal")
    if not isinstance(principal, Principal):  # the routes below always set it
        raise InternalError("the request was not authenticated")
    return principal


def _anonymous(principal: Principal) -> bool:
    return principal.via == VIA_ANONYMOUS


def _a2a_error(exc: DispatchError) -> Exception:
    if exc.code == "not_found":
        return TaskNotFoundError(exc.message)
    if exc.code in ("unknown_tool", "invalid_arguments"):
        # The SDK turns `errors` into a google.rpc.BadRequest with one violation per field.
        problems = exc.data if isinstance(exc.data, list) else []
        errors = [
            {"field": str(p.get("path", "")), "message": str(p.get("message", ""))}
            for p in problems
        ]
        return InvalidParamsError(exc.message, {"errors": errors} if errors else None)
    if exc.code in ("idempotency_conflict", "not_waiting"):
        return InvalidRequestError(exc.message)
    return InternalError(exc.message)


class DurableRequestHandler(RequestHandler):
    """Every A2A method over the dispatcher, for whichever agent the route named."""

    def __init__(
        self,
        host: Callable[[], A2AHost],
        push: Callable[[], PushService | None],
    ) -> None:
        self._host = host
        self._push = push

    # --- helpers -----------------------------------------------------------------------------

    @property
    def dispatcher(self) -> Dispatcher:
        return self._host().dispatcher

    def _agent(self, context: ServerCallContext) -> AgentDef:
        agent = agents_of(self._host().config, self.dispatcher.registry).get(
            str(context.state.get("agent", ""))
        )
        if agent is None:
            raise TaskNotFoundError("no such agent")
        return agent

    def _skill(self, message: Message, agent: AgentDef, principal: Principal) -> str:
        visible = [s.name for s in self.dispatcher.tools_for(principal) if agent.offers(s.name)]
        requested = message.metadata.fields.get(render.SKILL_KEY)
        if requested is not None:
            name = requested.string_value
            if name not in visible:
                raise InvalidParamsError(
                    f"unknown skill {name!r}; this agent offers you: {', '.join(visible) or 'none'}"
                )
            return name
        if len(visible) == 1:
            return visible[0]
        raise InvalidParamsError(
            "this agent has several skills: name one in the message metadata "
            f'("{render.SKILL_KEY}": one of {", ".join(visible) or "none"})'
            if visible
            else "this agent offers you no skills"
        )

    async def _view(self, task_id: str, principal: Principal, agent: AgentDef) -> CallView:
        try:
            view = await self.dispatcher.get(task_id, principal)
        except DispatchError as exc:
            raise _a2a_error(exc) from None
        if not agent.offers(view.tool):
            raise TaskNotFoundError(f"no task {task_id!r}")
        return view

    async def _settle(
        self, view: CallView, principal: Principal, timeout: float, answered: Any = None
    ) -> CallView:
        """Wait until the task ends or stops for input, at most `timeout` seconds. `answered`
        is the wait this request just answered: the engine may still show it for a moment."""
        if view.terminal or view.state == CallState.INPUT_REQUIRED:
            return view
        latest = view

        async def on_update(update: CallView) -> None:
            nonlocal latest
            if _waits(update) and _wait_key(update) == answered:
                return
            latest = dataclasses.replace(update)
            if _waits(update):
                raise _Interrupted

        try:
            return await self.dispatcher.wait(
                view.task_id, principal, timeout, on_update=on_update, known=view
            )
        except _Interrupted:
            return latest
        except DispatchError as exc:
            raise _a2a_error(exc) from None

    async def _follow(
        self, view: CallView, principal: Principal, answered: Any = None
    ) -> AsyncGenerator[Event]:
        """Status updates (and the result artifact) until the task ends or waits for input."""
        queue: asyncio.Queue[CallView] = asyncio.Queue(STREAM_QUEUE)

        async def on_update(update: CallView) -> None:
            if _waits(update) and _wait_key(update) == answered:
                return
            if queue.full():  # progress is lossy: keep the newest
                queue.get_nowait()
            queue.put_nowait(dataclasses.replace(update))
            if update.state == CallState.INPUT_REQUIRED:
                raise _Interrupted

        async def follow() -> CallView:
            current = view
            while not current.terminal:
                current = await self.dispatcher.wait(
                    view.task_id,
                    principal,
                    STREAM_SLICE_SECONDS,
                    on_update=on_update,
                    known=current,
                )
            return current

        waiter = asyncio.ensure_future(follow())
        last: tuple[Any, ...] = (view.state, view.message, view.progress)
        try:
            while True:
                getter = asyncio.ensure_future(queue.get())
                await asyncio.wait({waiter, getter}, return_when=asyncio.FIRST_COMPLETED)
                if getter.done():
                    update = getter.result()
                    key = (update.state, update.message, update.progress)
                    if key != last:
                        last = key
                        yield render.status_event(update)
                    if update.state == CallState.INPUT_REQUIRED:
                        return
                    continue
                getter.cancel()
                break
            try:
                final = waiter.result()
            except _Interrupted:
                return  # its status event was queued and sent above
            except DispatchError as exc:
                raise _a2a_error(exc) from None
            while not queue.empty():
                update = queue.get_nowait()
                if (update.state, update.message, update.progress) != last and not update.terminal:
                    yield render.status_event(update)
            if final.state == CallState.COMPLETED:
                yield render.artifact_event(final)
            yield render.status_event(final)
        finally:
            waiter.cancel()

    async def _submit(
        self, params: SendMessageRequest, context: ServerCallContext
    ) -> tuple[CallView | Task, Principal]:
        principal = _principal(context)
        agent = self._agent(context)
        message = params.message
        tool = self._skill(message, agent, principal)
        registered = self.dispatcher.registry.get(tool)
        if registered is None:
            raise InvalidParamsError(f"unknown skill {tool!r}")
        arguments = render.arguments_from(message, tool, registered.spec.input_schema)
        context_id = message.context_id or uuid.uuid4().hex
        # Message ids are the client's: a resent message replays its task instead of running
        # twice (a retrying client, a remote gateway's retried activity). Scoped to the sender,
        # so another caller's message id never matches. Anonymous callers are one principal:
        # for them the message id is a capability, like a task id (clients make them random).
        key = f"a2a:{principal.id}:{message.message_id}" if message.message_id else None
        request = CallRequest(
            tool=tool,
            arguments=arguments,
            principal=principal,
            front_door=FRONT_DOOR,
            idempotency_key=key,
            context_id=context_id,
            trace_context=context.state.get("trace"),
        )
        try:
            view = await self.dispatcher.submit(request)
        except DispatchError as exc:
            if exc.code in ("denied", "limited"):
                details = exc.data if isinstance(exc.data, dict) else {}
                return (
                    render.rejected_task(
                        uuid.uuid4().hex, context_id, tool, exc.message, refusal=exc.code, **details
                    ),
                    principal,
                )
            raise _a2a_error(exc) from None
        config = params.configuration
        if config.HasField("task_push_notification_config"):
            await self._add_push(view.task_id, principal, config.task_push_notification_config)
        return view, principal

    async def _answer(self, message: Message, context: ServerCallContext) -> _Answered:
        """A message on an existing task: the answer to what it waits for (the input its tool
        asked for, from the task's owner; or an approval, from an approver the policy names)."""
        principal = _principal(context)
        agent = self._agent(context)
        task_id = message.task_id
        try:
            view = await self.dispatcher.get(task_id, principal)
        except DispatchError:
            view = None  # not the caller's task: it may still be an approver's to answer
        if view is not None and view.terminal:
            raise UnsupportedOperationError(
                f"task {task_id} is {view.state.value}; send a new message without a task id"
            )
        if view is not None and view.state != CallState.INPUT_REQUIRED:
            raise UnsupportedOperationError(
                f"task {task_id} is {view.state.value} and waits for nothing; "
                "get it or subscribe to it"
            )
        if view is not None and view.waiting_for == "input":
            if not agent.offers(view.tool):
                raise TaskNotFoundError(f"no task {task_id!r}")
            try:
                await self.dispatcher.supply_input(task_id, principal, _input_value(message))
            except DispatchError as exc:
                raise _a2a_error(exc) from None
            resumed = dataclasses.replace(
                view, state=CallState.WORKING, message=f"input received; {view.tool} goes on"
            )
            return _Answered(resumed, follow=True, answered=_wait_key(view))
        approve, reason = _approval_answer(message)
        try:
            decided = await self.dispatcher.decide(task_id, principal, approve, reason)
        except DispatchError as exc:
            if exc.code == "not_found" and view is not None:
                raise InvalidRequestError(
                    f"task {task_id} waits for an approval by someone its policy names; "
                    "you may not give it"
                ) from None
            raise _a2a_error(exc) from None
        if not agent.offers(decided.tool):
            raise TaskNotFoundError(f"no task {task_id!r}")
        verdict = "approved" if approve else "rejected"
        decided = dataclasses.replace(
            decided, state=CallState.WORKING, message=f"{verdict} by {principal.id}"
        )
        # The approver sees the task as its answer left it; following it is its owner's business.
        return _Answered(decided, follow=view is not None, answered=_wait_key(decided))

    async def _add_push(
        self, task_id: str, principal: Principal, config: TaskPushNotificationConfig
    ) -> TaskPushNotificationConfig:
        push = self._push()
        if push is None:
            raise UnsupportedOperationError("push notifications are not available")
        auth = config.authentication if config.HasField("authentication") else None
        try:
            target = await push.add(
                task_id,
                principal,
                config.url,
                token=config.token,
                auth_scheme=auth.scheme if auth else "",
                auth_credentials=auth.credentials if auth else "",
                config_id=config.id,
            )
        except PushConfigError as exc:
            raise InvalidParamsError(str(exc)) from None
        except DispatchError as exc:
            raise _a2a_error(exc) from None
        return _push_config(target.id, task_id, target.url, target.token, target.auth_scheme)

    @contextlib.contextmanager
    def _traced(self, method: str, context: ServerCallContext) -> Iterator[Span]:
        """The call's server span (continuing the caller's `traceparent`), not made current:
        its context reaches the dispatcher and the workflow as `context.state["trace"]`."""
        agent = str(context.state.get("agent", "")) or None
        incoming = telemetry.carrier_from(context.state.get("headers"))
        span = telemetry.front_door_span(
            f"{method} {agent}" if agent else method,
            carrier=incoming,
            auth=context.state.get("auth_timing"),
            attributes={
                "rpc.system": "a2a",
                "rpc.method": method,
                "duragate.front_door": FRONT_DOOR,
                "duragate.a2a.agent": agent,
            },
        )
        # With tracing off here, the workflow input keeps the caller's own context (a worker
        # that traces continues it).
        context.state["trace"] = telemetry.carrier_of(span) or incoming
        try:
            yield span
        except Exception as exc:
            telemetry.failed(span, exc)
            raise
        finally:
            span.end()

    # --- the A2A methods ---------------------------------------------------------------------

    async def on_message_send(
        self, params: SendMessageRequest, context: ServerCallContext
    ) -> Task | Message:
        with self._traced("SendMessage", context) as span:
            answer = await self._message_send(params, context)
            if isinstance(answer, Task) and span.is_recording():
                span.set_attribute("duragate.outcome", TaskState.Name(answer.status.state))
            return answer

    async def _message_send(
        self, params: SendMessageRequest, context: ServerCallContext
    ) -> Task | Message:
        config = params.configuration
        history = config.history_length if config.HasField("history_length") else None
        answered = None
        if params.message.task_id:
            answer = await self._answer(params.message, context)
            principal = _principal(context)
            view, answered = answer.view, answer.answered
            if not answer.follow:
                return render.task_of(view, history_length=history)
        else:
            submitted, principal = await self._submit(params, context)
            if isinstance(submitted, Task):
                return submitted
            view = submitted
        if not config.return_immediately:
            bound = self._host().config.a2a.blocking_wait_seconds
            view = await self._settle(view, principal, bound, answered)
        return render.task_of(view, history_length=history)

    async def on_message_send_stream(
        self, params: SendMessageRequest, context: ServerCallContext
    ) -> AsyncGenerator[Event]:
        with self._traced("SendStreamingMessage", context):
            async for event in self._message_stream(params, context):
                yield event

    async def _message_stream(
        self, params: SendMessageRequest, context: ServerCallContext
    ) -> AsyncGenerator[Event]:
        answered = None
        if params.message.task_id:
            answer = await self._answer(params.message, context)
            principal = _principal(context)
            view, answered = answer.view, answer.answered
            if not answer.follow:
                yield render.task_of(view)
                return
        else:
            submitted, principal = await self._submit(params, context)
            if isinstance(submitted, Task):
                yield submitted
                return
            view = submitted
        yield render.task_of(view)
        async for event in self._follow(view, principal, answered):
            yield event

    async def on_get_task(self, params: GetTaskRequest, context: ServerCallContext) -> Task:
        view = await self._view(params.id, _principal(context), self._agent(context))
        history = params.history_length if params.HasField("history_length") else None
        return render.task_of(view, history_length=history)

    async def on_list_tasks(
        self, params: ListTasksRequest, context: ServerCallContext
    ) -> ListTasksResponse:
        principal = _principal(context)
        agent = self._agent(context)
        size = params.page_size or DEFAULT_PAGE_SIZE
        if not 1 <= size <= MAX_PAGE_SIZE:
            raise InvalidParamsError(f"page_size must be between 1 and {MAX_PAGE_SIZE}")
        if _anonymous(principal):
            # Anonymous callers are all one principal: listing would show each one the others'
            # tasks. They reach their own by id (unguessable), as GetTask does.
            return ListTasksResponse(tasks=[], page_size=size)
        wanted_state = render.CALL_STATES.get(params.status) if params.status else None
        if params.status and wanted_state is None:
            # REJECTED and the like: no stored task is ever in those states.
            return ListTasksResponse(tasks=[], page_size=size)
        after = (
            params.status_timestamp_after.ToDatetime()
            if params.HasField("status_timestamp_after")
            else None
        )
        history = params.history_length if params.HasField("history_length") else 0
        tasks: list[Task] = []
        cursor: str | None = params.page_token or None
        next_token = ""
        for _ in range(10):  # bounded work per page
            views, cursor = await self.dispatcher.list(principal, cursor, limit=size)
            for view in views:
                if not agent.offers(view.tool):
                    continue
                if params.context_id and render.context_of(view) != params.context_id:
                    continue
                if wanted_state is not None and view.state != wanted_state:
                    continue
                if after is not None and view.updated_at.replace(tzinfo=None) <= after:
                    continue
                tasks.append(
                    render.task_of(view, history_length=history, artifacts=params.include_artifacts)
                )
            if len(tasks) >= size or cursor is None:
                next_token = cursor or ""
                break
            next_token = cursor
        return ListTasksResponse(
            tasks=tasks[:size], next_page_token=next_token, page_size=size, total_size=len(tasks)
        )

    async def on_cancel_task(self, params: CancelTaskRequest, context: ServerCallContext) -> Task:
        principal = _principal(context)
        view = await self._view(params.id, principal, self._agent(context))
        if view.terminal:
            raise TaskNotCancelableError(f"task {params.id} is already {view.state.value}")
        try:
            view = await self.dispatcher.cancel(params.id, principal)
        except DispatchError as exc:
            raise _a2a_error(exc) from None
        return render.task_of(view)

    async def on_subscribe_to_task(
        self, params: SubscribeToTaskRequest, context: ServerCallContext
    ) -> AsyncGenerator[Event]:
        principal = _principal(context)
        view = await self._view(params.id, principal, self._agent(context))
        if view.terminal:
            raise UnsupportedOperationError(
                f"task {params.id} is already {view.state.value}: get it instead"
            )
        yield render.task_of(view)
        async for event in self._follow(view, principal):
            yield event

    async def on_create_task_push_notification_config(
        self, params: TaskPushNotificationConfig, context: ServerCallContext
    ) -> TaskPushNotificationConfig:
        principal = _principal(context)
        await self._view(params.task_id, principal, self._agent(context))
        return await self._add_push(params.task_id, principal, params)

    async def on_get_task_push_notification_config(
        self, params: GetTaskPushNotificationConfigRequest, context: ServerCallContext
    ) -> TaskPushNotificationConfig:
        principal = _principal(context)
        await self._view(params.task_id, principal, self._agent(context))
        for target in await self._targets(params.task_id, principal):
            if target.id == params.id:
                return _push_config(
                    target.id, target.task_id, target.url, target.token, target.auth_scheme
                )
        raise InvalidParamsError(f"task {params.task_id} has no push config {params.id!r}")

    async def on_list_task_push_notification_configs(
        self, params: ListTaskPushNotificationConfigsRequest, context: ServerCallContext
    ) -> ListTaskPushNotificationConfigsResponse:
        principal = _principal(context)
        await self._view(params.task_id, principal, self._agent(context))
        configs = [
            _push_config(t.id, t.task_id, t.url, t.token, t.auth_scheme)
            for t in await self._targets(params.task_id, principal)
        ]
        return ListTaskPushNotificationConfigsResponse(configs=configs)

    async def on_delete_task_push_notification_config(
        self, params: DeleteTaskPushNotificationConfigRequest, context: ServerCallContext
    ) -> None:
        principal = _principal(context)
        await self._view(params.task_id, principal, self._agent(context))
        push = self._push()
        if push is None or not await push.remove(params.task_id, principal, params.id):
            raise InvalidParamsError(f"task {params.task_id} has no push config {params.id!r}")

    async def on_get_extended_agent_card(
        self, params: GetExtendedAgentCardRequest, context: ServerCallContext
    ) -> AgentCard:
        # Cards are already drawn for the authenticated caller: the extended card is that card.
        return build_card(
            self._host(),
            self._agent(context),
            _principal(context),
            str(context.state.get("base_url", "")),
        )

    async def _targets(self, task_id: str, principal: Principal) -> list[Any]:
        push = self._push()
        if push is None:
            raise UnsupportedOperationError("push notifications are not available")
        return await push.targets(task_id, principal)


def _push_config(
    config_id: str, task_id: str, url: str, token: str, scheme: str
) -> TaskPushNotificationConfig:
    # Credentials are write-only: they are never sent back.
    config = TaskPushNotificationConfig(id=config_id, task_id=task_id, url=url, token=token)
    if scheme:
        config.authentication.CopyFrom(AuthenticationInfo(scheme=scheme))
    return config


def _input_value(message: Message) -> Any:
    """The value a message gives a tool that asked for input: its data part's value, else its
    text."""
    for part in message.parts:
        if part.WhichOneof("content") == "data":
            return render.integral(MessageToDict(part.data))
    return render.text_of(message)


_APPROVE_WORDS = {"approve", "approved", "yes", "y", "ok", "allow", "accept"}
_DENY_WORDS = {"deny", "denied", "no", "n", "reject", "rejected", "refuse"}


def _approval_answer(message: Message) -> tuple[bool, str]:
    """(approve, reason) from a data part `{"approve": bool, "reason": str}` or a text that
    starts with approve/deny (the rest of the text is the reason)."""
    for part in message.parts:
        if part.WhichOneof("content") == "data":
            data = render.integral(MessageToDict(part.data))
            if not isinstance(data, dict):
                continue
            approve = data.get("approve")
            if isinstance(approve, bool):
                return approve, str(data.get("reason", ""))
    text = render.text_of(message).strip()
    word, _, rest = text.partition(" ")
    if word.lower().rstrip(".,!:") in _APPROVE_WORDS:
        return True, rest.strip()
    if word.lower().rstrip(".,!:") in _DENY_WORDS:
        return False, rest.strip()
    raise InvalidParamsError(
        'this task waits for an approval: answer with a data part {"approve": true|false, '
        '"reason": "..."} or a text starting with "approve" or "deny"'
    )


# --- routes --------------------------------------------------------------------------------


Authenticate = Callable[[Request], Awaitable[Principal | Response]]


_SECRET_HEADERS = {"authorization", "cookie", "proxy-authorization"}


class _ContextBuilder(DefaultServerCallContextBuilder):
    def build(self, request: Request) -> ServerCallContext:
        context = super().build(request)
        # The SDK reads the version header from here; credentials have no business there.
        headers = context.state.get("headers") or {}
        context.state["headers"] = {
            k: v for k, v in headers.items() if k.lower() not in _SECRET_HEADERS
        }
        context.state["principal"] = request.scope[PRINCIPAL_SCOPE_KEY]
        context.state["agent"] = request.path_params.get("agent", "")
        context.state["base_url"] = str(request.base_url)
        context.state["auth_timing"] = request.scope.get(telemetry.AUTH_SCOPE_KEY)
        return context


def build_routes(
    host: A2AHost,
    authenticate: Authenticate,
    authenticate_optional: Callable[[Request], Awaitable[Principal | None]],
    push: Callable[[], PushService | None],
) -> list[BaseRoute]:
    """Every A2A route, each behind authentication and the agent lookup."""
    handler = DurableRequestHandler(lambda: host, push)
    builder = _ContextBuilder()

    def guarded(endpoint: Callable[[Request], Awaitable[Response]]) -> Callable[..., Any]:
        async def guard(request: Request) -> Response:
            agent = request.path_params.get("agent", "")
            if not host.config.a2a.enabled or agent not in agents_of(
                host.config, host.dispatcher.registry
            ):
                return JSONResponse(
                    {"error": "not_found", "message": f"no A2A agent {agent!r} here"}, 404
                )
            principal = await authenticate(request)
            if isinstance(principal, Response):
                return principal
            request.scope[PRINCIPAL_SCOPE_KEY] = principal
            request.scope[telemetry.AUTH_SCOPE_KEY] = telemetry.last_auth()
            return await endpoint(request)

        return guard

    async def card(request: Request) -> Response:
        name = request.path_params.get("agent", "")
        agent = agents_of(host.config, host.dispatcher.registry).get(name)
        if not host.config.a2a.enabled or agent is None:
            return JSONResponse({"error": "not_found", "message": f"no A2A agent {name!r}"}, 404)
        principal = await authenticate_optional(request)
        body = agent_card_to_dict(build_card(host, agent, principal, str(request.base_url)))
        # Cards differ by caller: never from a shared cache.
        return JSONResponse(
            body, headers={"Cache-Control": "private, no-store", "Vary": "Authorization"}
        )

    routes: list[BaseRoute] = [
        Route("/.well-known/agent-card.json", card, methods=["GET"]),
        Route("/a2a/.well-known/agent-card.json", card, methods=["GET"]),
        Route("/a2a/agents/{agent}/.well-known/agent-card.json", card, methods=["GET"]),
    ]
    for prefix in ("/a2a", "/a2a/agents/{agent}"):
        sdk_routes = [
            *create_jsonrpc_routes(handler, prefix, builder, enable_v0_3_compat=True),
            *create_rest_routes(
                handler, builder, enable_v0_3_compat=True, path_prefix=f"{prefix}/rest"
            ),
        ]
        for route in sdk_routes:
            if isinstance(route, Mount):
                continue  # the `/{tenant}` form: agents have paths of their own here
            assert isinstance(route, Route)
            routes.append(
                Route(route.path, guarded(route.endpoint), methods=sorted(route.methods or ()))
            )
    return routes
