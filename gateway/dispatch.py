"""The one path every call takes, whatever front door it came through.

    authenticate (front door)  ->  Dispatcher.submit: known tool? policy decision, argument
    validation, admission, then the workflow `duragate.call` under a random or idempotent id
    ->  Dispatcher.wait / get / cancel / list: the workflow instance *is* the task.

Front doors translate to and from `CallRequest` / `CallView`; they never talk to adapters and
keep no task state of their own.
"""

from __future__ import annotations

import asyncio
import builtins
import hashlib
import json
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, Protocol

import grpc
from google.protobuf import wrappers_pb2
from opentelemetry.context import Context
from opentelemetry.trace import Span

from gateway import telemetry
from gateway.audit import audit_obligations
from gateway.metrics import GatewayMetrics
from gateway.runtime import DurableRuntime
from gateway.sidecar.protos import pb
from gateway.workflow import APPROVAL_EVENT, INPUT_EVENT, WORKFLOW_NAME, failure
from identity.principal import Principal
from policies.limits import Admission, LimitExceeded, call_hold_seconds

log = logging.getLogger(__name__)

CALL_VERSION = 1
# How long a decision waits for the workflow to take it: 200 polls of 50 ms, 10 s.
DECISION_TAKEN_POLLS = 200
TERMINAL_STATUSES = {"COMPLETED", "FAILED", "TERMINATED", "CANCELED"}


class DispatchError(Exception):
    """A call refused before it ran, or a task that cannot be shown. `code` is one of:
    unknown_tool, invalid_arguments, idempotency_conflict, denied, limited, not_found,
    not_waiting (neither an approval nor an input is awaited), unavailable."""

    def __init__(self, code: str, message: str, data: Any = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.data = data
        # For the audit log, never for the caller: the audit level and redact paths of the
        # tool a refused call named (gateway.audit.audit_obligations).
        self.audit: dict[str, Any] | None = None


class CallState(StrEnum):
    WORKING = "working"
    INPUT_REQUIRED = "input_required"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"


@dataclass(frozen=True)
class CallRequest:
    tool: str
    arguments: dict[str, Any]
    principal: Principal
    front_door: str
    idempotency_key: str | None = None
    trace_context: dict[str, str] | None = None
    # The conversation the call belongs to (A2A contextId); kept with the call.
    context_id: str | None = None


@dataclass
class CallView:
    """A call as front doors show it: the state of its workflow instance."""

    task_id: str
    tool: str
    state: CallState
    created_at: datetime
    updated_at: datetime
    message: str | None = None
    progress: float | None = None
    total: float | None = None
    result: Any = None
    error: dict[str, Any] | None = None
    replayed: bool = False
    context_id: str | None = None
    arguments: dict[str, Any] | None = None
    # While INPUT_REQUIRED: "approval" (a person's decision) or "input" (the tool asked for a
    # value: `input_request` is what it asked, `input_round` numbers the requests of the call).
    waiting_for: str | None = None
    input_request: Any = None
    input_round: int | None = None
    # What the tool reported it used (e.g. token counts), once completed.
    usage: dict[str, float] | None = None
    audit: dict[str, Any] | None = field(default=None, repr=False)  # the call's audit level
    front_door: str | None = None  # where the call came in

    @property
    def terminal(self) -> bool:
        return self.state in (CallState.COMPLETED, CallState.FAILED, CallState.CANCELLED)


# --- seams: where identity, policy and audit plug in ------------------------------------


class Policy(Protocol):
    """Decides, before anything is scheduled, whether a principal may list or call a tool."""

    def may_list(self, principal: Principal, tool: str) -> bool: ...

    def check_call(
        self, principal: Principal, tool: str, arguments: dict[str, Any]
    ) -> dict[str, Any] | None:
        """Raise DispatchError("denied", ...) to refuse; return obligations to attach to the
        call (today: `{"approval": {"expires_seconds": N}}` makes it wait for a person). A
        `decision` entry (`{"effect", "rule", "reason"}`) is only for the audit log."""

    def may_approve(self, approver: Principal, tool: str, caller: dict[str, Any]) -> bool: ...


class AllowConfiguredTools:
    """Until tenant policies exist: every configured tool may be listed and called by any
    authenticated caller (whom the front door has already let in); a call may be approved by
    a principal of its own tenant."""

    def may_list(self, principal: Principal, tool: str) -> bool:
        return True

    def check_call(
        self, principal: Principal, tool: str, arguments: dict[str, Any]
    ) -> dict[str, Any] | None:
        return None

    def may_approve(self, approver: Principal, tool: str, caller: dict[str, Any]) -> bool:
        return approver.tenant == caller.get("tenant")


class Audit(Protocol):
    def record(
        self, event: str, principal: Principal, tool: str | None, **details: Any
    ) -> None: ...


class LogAudit:
    """Decisions to the log, for a dispatcher built without an audit log (gateway.audit is the
    real one); never the arguments or results themselves."""

    def record(self, event: str, principal: Principal, tool: str | None, **details: Any) -> None:
        shown = {k: v for k, v in details.items() if k not in _NOT_LOGGED}
        log.info(
            "audit %s tool=%s principal=%s tenant=%s %s",
            event,
            tool,
            principal.id,
            principal.tenant,
            " ".join(f"{k}={v}" for k, v in shown.items()),
        )


_NOT_LOGGED = frozenset({"arguments", "result", "audit"})


class ToolRegistry(Protocol):
    def get(self, name: str) -> Any: ...

    def specs(self) -> list[Any]: ...

    def validate_arguments(self, name: str, arguments: dict[str, Any]) -> None: ...


# --- helpers ------------------------------------------------------------------------------


def arguments_hash(arguments: dict[str, Any]) -> str:
    canonical = json.dumps(arguments, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


def owns(principal: Principal, owner: dict[str, Any]) -> bool:
    """Whether `principal` is the caller a call was made by: same tenant, same SPIFFE ID, and
    acting for the same people (an agent acting for Alice does not see what it did for Bob)."""
    return (
        owner.get("tenant") == principal.tenant
        and owner.get("id") == principal.id
        and list(owner.get("chain") or []) == list(principal.chain)
    )


def idempotent_task_id(principal: Principal, tool: str, key: str) -> str:
    digest = hashlib.sha256("\0".join([principal.tenant, tool, key]).encode()).hexdigest()
    return f"idem-{digest[:40]}"


def _as_datetime(value: Any) -> datetime:
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    return datetime.now(UTC)


def _as_dict(value: Any) -> Any:
    return value.model_dump() if hasattr(value, "model_dump") else value


def _custom_status(raw: str | None) -> dict[str, Any]:
    if not raw:
        return {}
    try:
        data = json.loads(raw)
        return data if isinstance(data, dict) else {"message": str(data)}
    except ValueError:
        return {"message": raw}


def _decided(span: Span, metrics: GatewayMetrics, rule: str | None, effect: str) -> None:
    """A policy decision, in the call's trace and the metrics."""
    metrics.decision(rule, effect)
    if span.is_recording():
        span.set_attribute("duragate.policy.effect", effect)
        span.set_attribute("duragate.policy.rule", rule or "")


# --- the dispatcher -----------------------------------------------------------------------


@dataclass
class Dispatcher:
    registry: ToolRegistry
    runtime: DurableRuntime
    policy: Policy = field(default_factory=AllowConfiguredTools)
    audit: Audit = field(default_factory=LogAudit)
    status_interval: float = 1.0
    # Rate, concurrency and budget obligations; a call without them costs a few dict lookups.
    admission: Admission = field(default_factory=Admission)
    _decisions: dict[str, asyncio.Lock] = field(default_factory=dict, init=False, repr=False)
    metrics: GatewayMetrics = field(default_factory=GatewayMetrics)

    def tools_for(self, principal: Principal) -> list[Any]:
        """The tools this principal may see (list time)."""
        return [s for s in self.registry.specs() if self.policy.may_list(principal, s.name)]

    def __post_init__(self) -> None:
        # Tool labels of the metrics: the configured tools (read per call: reloads swap them).
        self.metrics.tool.allowed = lambda name: self.registry.get(name) is not None

    async def submit(self, req: CallRequest) -> CallView:
        """Validate, decide and schedule a call; returns at once with its task. Its steps are
        spans of the call's trace (`req.trace_context`, the front door's span); a refusal is
        counted in the metrics by its reason."""
        try:
            with telemetry.call_trace(req.trace_context):  # audit records carry the trace id
                return await self._submit(req, telemetry.extract(req.trace_context))
        except DispatchError as exc:
            outcome = exc.code if exc.code in ("denied", "limited", "unavailable") else "refused"
            self.metrics.call_refused(req.tool, req.principal.tenant, req.front_door, outcome)
            raise

    async def _submit(self, req: CallRequest, parent: Context | None) -> CallView:
        tool = self.registry.get(req.tool)
        if tool is None or not self.policy.may_list(req.principal, req.tool):
            self.audit.record("refused", req.principal, req.tool, reason="unknown_tool")
            raise DispatchError("unknown_tool", f"unknown tool {req.tool!r}")
        with telemetry.span("duragate.policy", parent=parent) as span:
            try:
                obligations = self.policy.check_call(req.principal, req.tool, req.arguments) or {}
            except DispatchError as exc:
                rule = exc.data.get("rule") if isinstance(exc.data, dict) else None
                _decided(span, self.metrics, rule, "deny")
                self.audit.record(
                    "denied",
                    req.principal,
                    req.tool,
                    rule=rule,
                    reason=exc.message,
                    arguments=req.arguments,
                    audit=exc.audit,
                )
                raise
            decided = obligations.get("decision") or {}
            _decided(span, self.metrics, decided.get("rule"), decided.get("effect", "allow"))
        audit = audit_obligations(obligations)
        try:
            self._validate(req)
        except DispatchError as exc:
            self.audit.record(
                "refused",
                req.principal,
                req.tool,
                reason=exc.message,
                arguments=req.arguments,
                audit=audit,
            )
            raise
        spec = tool.spec
        digest = arguments_hash(req.arguments)
        call = {
            "v": CALL_VERSION,
            "tool": req.tool,
            "arguments": req.arguments,
            "arguments_hash": digest,
            "principal": req.principal.to_json(),
            "front_door": req.front_door,
            # The policy's obligations win over the tool's own settings.
            "timeout_seconds": obligations.get("timeout_seconds", spec.timeout_seconds),
            "retry": obligations.get("retry") or _as_dict(spec.retry),
            "trace": req.trace_context or {},
            "approval": obligations.get("approval"),
            "context_id": req.context_id,
            "audit": audit,  # so the result is audited at the level of the decision
        }
        if getattr(spec, "app_id", None):
            call["app_id"] = spec.app_id  # the worker app that runs the tool
        if getattr(spec, "workflow", None):
            call["workflow"] = spec.workflow  # that app's workflow runs the call (child workflow)
        if req.idempotency_key:
            task_id = idempotent_task_id(req.principal, req.tool, req.idempotency_key)
        else:
            task_id = secrets.token_hex(16)  # unguessable: the task id is a capability
        try:
            ticket = await self._admit(req, obligations, call, parent)
        except LimitExceeded as exc:
            # A replay spends nothing, so no limit refuses it: show the stored call (a key
            # reused with other arguments is a conflict, whatever the limits say).
            state = None
            if req.idempotency_key:
                state = await self.runtime.client.get_workflow_state(task_id, fetch_payloads=True)
            if state is not None:
                view = self._replay(task_id, state, digest, req.principal)
                self.audit.record("replayed", req.principal, req.tool, task=task_id, audit=audit)
                return view
            self.audit.record(
                "limited",
                req.principal,
                req.tool,
                rule=decided.get("rule"),
                reason=exc.message,
                limit=exc.limit,
                retry_after_seconds=exc.retry_after_seconds,
                arguments=req.arguments,
                audit=audit,
            )
            data = {"limit": exc.limit, "retry_after_seconds": exc.retry_after_seconds}
            raise DispatchError("limited", exc.message, data) from None
        if ticket.tokens is not None:
            call["budget_tokens"] = ticket.tokens  # charged by the workflow after the call
        try:
            with telemetry.span("duragate.schedule", parent=parent) as span:
                if span.is_recording():
                    span.set_attribute("duragate.task.id", task_id)
                if req.idempotency_key:
                    replay = await self._start_idempotent(task_id, call, digest, req.principal)
                else:
                    replay = None
                    await self._schedule(task_id, call)
        except BaseException:
            ticket.refund()  # nothing was started: the call spent nothing
            raise
        if replay is not None:
            ticket.refund()  # a replay runs nothing
            self.audit.record("replayed", req.principal, req.tool, task=task_id, audit=audit)
            return replay
        # Released when a wait/get/list/cancel sees the call end, or at the ticket's expiry.
        self.admission.bind(task_id, ticket)
        self.audit.record(
            "scheduled",
            req.principal,
            req.tool,
            task=task_id,
            outcome=decided.get("effect", "allow"),
            rule=decided.get("rule"),
            reason=decided.get("reason"),
            arguments=req.arguments,
            audit=audit,
        )
        now = datetime.now(UTC)
        return CallView(
            task_id,
            req.tool,
            CallState.WORKING,
            now,
            now,
            f"running {req.tool}",
            context_id=req.context_id,
            arguments=req.arguments,
        )

    async def _admit(
        self,
        req: CallRequest,
        obligations: dict[str, Any],
        call: dict[str, Any],
        parent: Context | None,
    ) -> Any:
        with telemetry.span("duragate.admission", parent=parent) as span:
            try:
                return await self.admission.acquire(
                    req.principal.tenant,
                    req.principal.id,
                    req.tool,
                    obligations,
                    hold_seconds=call_hold_seconds(call),
                )
            except LimitExceeded as exc:
                self.metrics.limit_hit(exc.limit)
                if span.is_recording():
                    span.set_attribute("duragate.limit", exc.limit)
                raise

    def _validate(self, req: CallRequest) -> None:
        try:
            self.registry.validate_arguments(req.tool, req.arguments)
        except Exception as exc:
            errors = getattr(exc, "errors", None)
            if errors is None:
                raise
            detail = "; ".join(str(e) for e in errors)
            data = [
                {"path": getattr(e, "path", ""), "message": getattr(e, "message", str(e))}
                for e in errors
            ]
            raise DispatchError(
                "invalid_arguments", f"invalid arguments for {req.tool}: {detail}", data
            ) from exc

    async def _schedule(self, task_id: str, call: dict[str, Any]) -> None:
        try:
            await self.runtime.client.schedule_new_workflow(
                WORKFLOW_NAME, input=call, instance_id=task_id
            )
        except grpc.RpcError as exc:
            raise DispatchError(
                "unavailable", f"the workflow engine refused the call: {exc}"
            ) from exc

    async def _start_idempotent(
        self, task_id: str, call: dict[str, Any], digest: str, principal: Principal
    ) -> CallView | None:
        """Start under the derived id unless it exists; if it does, replay it (same arguments)
        or refuse (different ones). The SDK client cannot ask for a unique id, so this start
        goes through the protocol stub with enforceUniqueInstanceId: race-free across
        gateway processes."""
        request = pb.CreateInstanceRequest(
            instanceId=task_id,
            name=WORKFLOW_NAME,
            input=wrappers_pb2.StringValue(value=json.dumps(call)),
            enforceUniqueInstanceId=True,
        )
        try:
            await self.runtime.stub.StartInstance(request, metadata=self.runtime.metadata)
            return None
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.ALREADY_EXISTS:
                raise DispatchError(
                    "unavailable", f"the workflow engine refused: {exc.details()}"
                ) from exc
        state = await self.runtime.client.get_workflow_state(task_id, fetch_payloads=True)
        if state is None:  # purged between the two calls: start again
            return await self._start_idempotent(task_id, call, digest, principal)
        return self._replay(task_id, state, digest, principal)

    def _replay(self, task_id: str, state: Any, digest: str, principal: Principal) -> CallView:
        """The stored call under an idempotency key: replayed if its arguments are the same,
        refused if they differ. Keys are per tenant (the id is derived from it); within a
        tenant a call is its caller's: another caller gets neither the call nor its result."""
        stored = json.loads(state.serialized_input or "{}")
        if not owns(principal, stored.get("principal") or {}):
            raise DispatchError(
                "idempotency_conflict",
                "this idempotency key was already used by another caller; use a new key",
            )
        if stored.get("arguments_hash") != digest:
            raise DispatchError(
                "idempotency_conflict",
                "this idempotency key was already used for a call with different arguments; "
                "use a new key for a different call",
            )
        view = self._view(task_id, state, stored)
        view.replayed = True
        return view

    async def get(self, task_id: str, principal: Principal) -> CallView:
        state = await self.runtime.client.get_workflow_state(task_id, fetch_payloads=True)
        view = self._owned_view(task_id, state, principal)
        if view.terminal:
            self._ended(view, principal)  # frees the concurrency slot of a task call
        return view

    def _ended(self, view: CallView, principal: Principal) -> None:
        """A view showed the call `view.task_id` ended: free its admission slot and, at the
        `full` audit level, record its result (the audit log keeps one per task)."""
        self.admission.release(view.task_id)
        if view.audit and view.audit.get("level") == "full":
            self.audit.record(
                "result",
                principal,
                view.tool,
                task=view.task_id,
                outcome=view.state.value,
                result=view.result if view.error is None else {"error": view.error},
                audit=view.audit,
            )

    def _owned_view(self, task_id: str, state: Any, principal: Principal) -> CallView:
        if state is None or state.name != WORKFLOW_NAME:
            raise DispatchError("not_found", f"no task {task_id!r}")
        call = json.loads(state.serialized_input or "{}")
        # A task belongs to its tenant and caller; anyone else is told it does not exist.
        if not owns(principal, call.get("principal") or {}):
            raise DispatchError("not_found", f"no task {task_id!r}")
        return self._view(task_id, state, call)

    @staticmethod
    def _view(task_id: str, state: Any, call: dict[str, Any] | None = None) -> CallView:
        call = call if call is not None else json.loads(state.serialized_input or "{}")
        status = state.runtime_status.name
        custom = _custom_status(state.serialized_custom_status)
        view = CallView(
            task_id=task_id,
            tool=call.get("tool", ""),
            state=CallState.WORKING,
            created_at=_as_datetime(state.created_at),
            updated_at=_as_datetime(state.last_updated_at),
            message=custom.get("message"),
            context_id=call.get("context_id"),
            arguments=call.get("arguments"),
            audit=call.get("audit"),
            front_door=call.get("front_door"),
        )
        if custom.get("state") == "waiting_approval":
            view.state, view.waiting_for = CallState.INPUT_REQUIRED, "approval"
        elif custom.get("state") == "input_required":
            view.state, view.waiting_for = CallState.INPUT_REQUIRED, "input"
            asked = custom.get("input")
            asked = asked if isinstance(asked, dict) else {}
            view.input_request, view.input_round = asked.get("request"), asked.get("round")
        if status == "COMPLETED":
            output = json.loads(state.serialized_output or "null") or {}
            if output.get("ok"):
                view.state, view.result = CallState.COMPLETED, output.get("result")
                view.usage = output.get("usage")
            else:
                view.state = CallState.FAILED
                view.error = output.get("error") or failure("error", "failed")["error"]
        elif status == "FAILED":
            details = state.failure_details
            message = details.message if details is not None else "the workflow failed"
            view.state, view.error = CallState.FAILED, failure("workflow_failed", message)["error"]
        elif status in ("TERMINATED", "CANCELED"):
            view.state = CallState.CANCELLED
            output = json.loads(state.serialized_output or "null")
            view.error = (output or {}).get("error") or failure("cancelled", "cancelled")["error"]
        return view

    async def wait(
        self,
        task_id: str,
        principal: Principal,
        timeout: float | None,
        on_update: Callable[[CallView], Awaitable[None]] | None = None,
        known: CallView | None = None,
    ) -> CallView:
        """Wait until the task is terminal or `timeout` passes; returns its latest view.

        `on_update` gets a view whenever the tool reports progress (in-process, at once) or the
        workflow's status message changes (checked every `status_interval` seconds). `known` is
        the view `submit` just returned for this principal: it spares a read of the task."""
        view = known if known is not None else await self.get(task_id, principal)
        if view.terminal:
            self._ended(view, principal)
            return view
        client = self.runtime.client
        completion = asyncio.ensure_future(
            client.wait_for_workflow_completion(
                task_id,
                fetch_payloads=True,
                timeout_in_seconds=timeout or 0,  # type: ignore[arg-type]
            )
        )
        try:
            if on_update is None:
                state = await completion
            else:
                state = await self._follow(task_id, principal, view, completion, on_update)
        except TimeoutError:
            state = await client.get_workflow_state(task_id, fetch_payloads=True)
        finally:
            completion.cancel()
        view = self._owned_view(task_id, state, principal)
        # A replay that joined the call still running under its key stays a replay.
        view.replayed = known is not None and known.replayed
        if view.terminal:
            self._ended(view, principal)  # plain calls: the front door's wait ends them
        return view

    async def _follow(
        self,
        task_id: str,
        principal: Principal,
        view: CallView,
        completion: asyncio.Future[Any],
        on_update: Callable[[CallView], Awaitable[None]],
    ) -> Any:
        hub = self.runtime.progress
        seen = 0
        message = view.message
        next_status = time.monotonic() + self.status_interval
        while not completion.done():
            change = asyncio.ensure_future(hub.changed(task_id, seen, self.status_interval))
            await asyncio.wait({completion, change}, return_when=asyncio.FIRST_COMPLETED)
            if completion.done():
                change.cancel()
                break
            report = change.result()
            if report is not None:
                seen = report.seq
                view.progress, view.total = report.progress, report.total
                view.message = report.message or view.message
                await on_update(view)
            if time.monotonic() >= next_status:
                next_status = time.monotonic() + self.status_interval
                state = await self.runtime.client.get_workflow_state(task_id, fetch_payloads=True)
                fresh = self._owned_view(task_id, state, principal)
                if fresh.terminal:
                    return state
                if fresh.message != message:
                    message = fresh.message
                    fresh.progress, fresh.total = view.progress, view.total
                    await on_update(fresh)
        return completion.result()

    async def decide(
        self, task_id: str, approver: Principal, approved: bool, reason: str = ""
    ) -> CallView:
        """Approve or deny a call that waits for approval. The decision is bound to the hash
        of the arguments the approver was shown, which the workflow checks.

        Decisions on one task are taken one at a time in this process, and each returns once
        the workflow has taken it (bounded): a second decision then finds the call no longer
        waiting, instead of racing the first into the engine (where it would sit unused)."""
        lock = self._decisions.setdefault(task_id, asyncio.Lock())
        try:
            async with lock:
                return await self._decide(task_id, approver, approved, reason)
        finally:
            if not lock.locked():
                self._decisions.pop(task_id, None)

    async def _decide(
        self, task_id: str, approver: Principal, approved: bool, reason: str
    ) -> CallView:
        state = await self.runtime.client.get_workflow_state(task_id, fetch_payloads=True)
        if state is None or state.name != WORKFLOW_NAME:
            raise DispatchError("not_found", f"no task {task_id!r}")
        call = json.loads(state.serialized_input or "{}")
        if not self.policy.may_approve(approver, call.get("tool", ""), call.get("principal", {})):
            raise DispatchError("not_found", f"no task {task_id!r}")
        view = self._view(task_id, state, call)
        if view.waiting_for != "approval":
            raise DispatchError(
                "not_waiting", f"task {task_id!r} is not waiting for approval ({view.state})"
            )
        decision = {
            "approved": approved,
            "by": approver.id,
            "reason": reason,
            "arguments_hash": call.get("arguments_hash"),
        }
        await self.runtime.client.raise_workflow_event(task_id, APPROVAL_EVENT, data=decision)
        owner = call.get("principal") or {}
        self.audit.record(
            "approved" if approved else "rejected",
            approver,
            view.tool,
            task=task_id,
            rule=(call.get("approval") or {}).get("rule"),
            reason=reason or None,
            caller=owner.get("id"),
            arguments=call.get("arguments"),
            audit=view.audit,
        )
        for _ in range(DECISION_TAKEN_POLLS):
            state = await self.runtime.client.get_workflow_state(task_id, fetch_payloads=True)
            if state is None or self._view(task_id, state, call).waiting_for != "approval":
                break
            await asyncio.sleep(0.05)
        return view

    async def supply_input(self, task_id: str, principal: Principal, value: Any) -> CallView:
        """Give a call that waits for input (its tool asked) the value it asked for. Only the
        call's owner may; to anyone else the task does not exist. The value answers the
        request shown now: the workflow ignores it if a later request has replaced that one."""
        state = await self.runtime.client.get_workflow_state(task_id, fetch_payloads=True)
        view = self._owned_view(task_id, state, principal)
        if view.waiting_for != "input":
            raise DispatchError(
                "not_waiting", f"task {task_id!r} is not waiting for input ({view.state})"
            )
        supplied = {"value": value, "by": principal.id, "round": view.input_round}
        await self.runtime.client.raise_workflow_event(task_id, INPUT_EVENT, data=supplied)
        self.audit.record("input_supplied", principal, view.tool, task=task_id)
        return view

    async def cancel(self, task_id: str, principal: Principal) -> CallView:
        view = await self.get(task_id, principal)
        if view.terminal:
            return view
        output = failure("cancelled", f"cancelled by {principal.id}")
        await self.runtime.client.terminate_workflow(task_id, output=output, recursive=True)
        self.admission.release(task_id)  # terminated: its slot is free whatever happens next
        self.audit.record("cancelled", principal, view.tool, task=task_id, audit=view.audit)
        self.metrics.call_cancelled(view.tool, principal.tenant, view.front_door)
        for _ in range(50):
            view = await self.get(task_id, principal)
            if view.terminal:
                break
            await asyncio.sleep(0.05)
        return view

    async def list(
        self, principal: Principal, cursor: str | None = None, limit: int = 50
    ) -> tuple[list[CallView], str | None]:
        """The principal's tasks, a page at a time (bounded work per page)."""
        views: list[CallView] = []
        token = cursor
        for _ in range(20):
            page = await self.runtime.client.list_workflow_instance_ids(
                page_size=100, continuation_token=token
            )
            for task_id in page.instance_ids:
                state = await self.runtime.client.get_workflow_state(task_id, fetch_payloads=True)
                try:
                    view = self._owned_view(task_id, state, principal)
                except DispatchError:
                    continue
                if view.terminal:
                    self._ended(view, principal)
                views.append(view)
                if len(views) >= limit:
                    return views, task_id
            token = page.continuation_token
            if not token:
                return views, None
        return views, token

    async def pending_approvals(
        self, approver: Principal, limit: int = 100
    ) -> builtins.list[CallView]:  # `list` is the method above, in this class
        """Calls waiting for an approval that `approver` may give (bounded work)."""
        views: builtins.list[CallView] = []
        token: str | None = None
        for _ in range(20):
            page = await self.runtime.client.list_workflow_instance_ids(
                page_size=100, continuation_token=token
            )
            for task_id in page.instance_ids:
                state = await self.runtime.client.get_workflow_state(task_id, fetch_payloads=True)
                if state is None or state.name != WORKFLOW_NAME:
                    continue
                call = json.loads(state.serialized_input or "{}")
                view = self._view(task_id, state, call)
                if view.waiting_for != "approval":
                    continue
                if not self.policy.may_approve(approver, view.tool, call.get("principal", {})):
                    continue
                views.append(view)
                if len(views) >= limit:
                    return views
            token = page.continuation_token
            if not token:
                break
        return views
