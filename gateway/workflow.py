"""The durable workflow every call runs as (`duragate.call`) and the activity that runs a tool.

Workflow code is deterministic: no clocks, randomness or I/O here, only what the context offers.
The workflow's input is the call (see `dispatch.CallInput`); its output is
`{"ok": true, "result": ...}` or `{"ok": false, "error": {"type", "message", "data"}}`; its custom
status is `{"state": ..., "message": ...}`, which front doors turn into progress.

A tool may ask for a person's input (`adapters.base.InputRequired`): the activity returns the
request, the workflow shows `{"state": "input_required", "message": ..., "input": {"round": n,
"request": ...}}` and waits (durably, up to `input_expires_seconds`) for the event
`duragate.input` with `{"value": ..., "by": ..., "round": n}`, then runs the tool again with that
input. What the tool reports as usage comes back as `"usage"` next to the result.

A call with a token budget carries its charge (`"budget_tokens"`, decided at submit time by
`policies.budgets.DaprBudgets.check_tokens`): once the tool answered with usage, the activity
`duragate.charge` adds it to the budget, exactly once, before the call completes. Calls
recorded without that key schedule no charge, so their histories replay unchanged.

A call whose input names a `"workflow"` (a workflow kind, e.g. `dapr_agent`) runs no activity:
that workflow of the tool's app runs it as a child workflow, under an id derived from the call.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections import OrderedDict
from collections.abc import Callable, Generator
from datetime import timedelta
from typing import Any, Protocol

import dapr.ext.workflow as wf
from opentelemetry.trace import Span

from adapters.base import InputRequired, SuppliedInput, ToolContext, ToolError
from adapters.checkpoints import CheckpointStore
from gateway import telemetry
from gateway.progress import ProgressHub
from policies.budgets import token_amount

log = logging.getLogger(__name__)

WORKFLOW_NAME = "duragate.call"
ACTIVITY_NAME = "duragate.tool"
CHARGE_ACTIVITY_NAME = "duragate.charge"
# The budget store may be briefly unreachable (a gateway starting): the charge is retried for
# a few minutes before the call completes uncharged (logged).
CHARGE_RETRY = wf.RetryPolicy(
    first_retry_interval=timedelta(seconds=1),
    max_number_of_attempts=10,
    backoff_coefficient=2.0,
    max_retry_interval=timedelta(seconds=60),
)
APPROVAL_EVENT = "duragate.approval"
INPUT_EVENT = "duragate.input"
DEFAULT_INPUT_EXPIRES_SECONDS = 86400.0
# Inputs one call may ask for; a tool that keeps asking is stopped.
MAX_INPUT_ROUNDS = 100


class NonRetryableError(Exception):
    """The SDK skips retries for a failure whose error type has this name; the message carries
    the structured error as JSON."""


def _status(state: str, message: str) -> str:
    return json.dumps({"state": state, "message": message})


def failure(kind: str, message: str, data: Any = None) -> dict[str, Any]:
    return {"ok": False, "error": {"type": kind, "message": message, "data": data}}


def _decode_failure(details: Any) -> dict[str, Any]:
    """A TaskFailedError's details as the call's structured error."""
    if details.error_type == NonRetryableError.__name__:
        try:
            error = json.loads(details.message)
            return {"ok": False, "error": error}
        except (ValueError, TypeError):
            pass
    return failure(details.error_type or "error", details.message)


def call_workflow(ctx: wf.DaprWorkflowContext, call: dict[str, Any]) -> Generator[Any, Any, Any]:
    tool = call["tool"]
    approval = call.get("approval")
    if approval:
        # The policy asked for a person's approval: wait for it (durably: days if need be),
        # bound to the hash of these arguments, until it expires.
        refusal = yield from _await_approval(ctx, call, approval)
        if refusal is not None:
            return refusal
    ctx.set_custom_status(_status("running", f"running {tool}"))
    retry = call.get("retry") or {}
    attempts = int(retry.get("max_attempts", 1))
    policy = None
    if attempts > 1:
        policy = wf.RetryPolicy(
            first_retry_interval=timedelta(seconds=float(retry.get("first_interval_seconds", 1))),
            max_number_of_attempts=attempts,
            backoff_coefficient=float(retry.get("backoff_coefficient", 2.0)),
            max_retry_interval=timedelta(seconds=float(retry.get("max_interval_seconds", 60))),
        )
    if call.get("workflow"):
        # A workflow kind (`dapr_agent`): the tool's app runs the call as a workflow of its own.
        result: dict[str, Any] = yield from _call_child_workflow(ctx, call, policy)
        return result
    supplied: dict[str, Any] | None = None
    rounds = 0
    while True:
        # `envelope`: the activity answers {"envelope": 1, "result", "usage"} or
        # {"envelope": 1, "input_required"}; histories recorded before envelopes existed hold
        # the bare result, which is still understood on replay.
        activity_input = {
            "tool": tool,
            "arguments": call["arguments"],
            "principal": call["principal"],
            "context_id": call.get("context_id"),
            "envelope": True,
        }
        if supplied is not None:
            activity_input["input"] = supplied
        if call.get("trace"):
            activity_input["trace"] = call["trace"]  # each attempt joins the caller's trace
        # A tool of a worker app runs there (`duragate worker`); calls recorded before tools
        # had apps carry no `app_id` and run here, as they did.
        activity: Any = ctx.call_activity(
            ACTIVITY_NAME, input=activity_input, retry_policy=policy, app_id=call.get("app_id")
        )
        timeout = float(call["timeout_seconds"])
        timer = ctx.create_timer(timedelta(seconds=timeout))
        winner = yield wf.when_any([activity, timer])
        if winner is timer:
            ctx.set_custom_status(_status("failed", f"{tool} timed out"))
            return failure("timeout", f"{tool} did not finish within {timeout:g} s")
        try:
            answer = activity.get_result()
        except Exception as exc:  # TaskFailedError: the tool failed, after its retries
            details = getattr(exc, "details", None)
            ctx.set_custom_status(_status("failed", f"{tool} failed"))
            if details is None:
                return failure("error", str(exc))
            return _decode_failure(details)
        if not isinstance(answer, dict) or answer.get("envelope") != 1:
            answer = {"result": answer}
        request = answer.get("input_required")
        if request is None:
            yield from _charge(ctx, call, answer.get("usage"))
            ctx.set_custom_status(_status("completed", f"{tool} completed"))
            output: dict[str, Any] = {"ok": True, "result": answer.get("result")}
            if answer.get("usage"):
                output["usage"] = answer["usage"]
            return output
        rounds += 1
        if rounds > MAX_INPUT_ROUNDS:
            ctx.set_custom_status(_status("failed", f"{tool} asked for input too often"))
            return failure(
                "too_many_inputs", f"{tool} asked for input more than {MAX_INPUT_ROUNDS} times"
            )
        supplied = yield from _await_input(ctx, call, request, rounds)
        if supplied is None:
            ctx.set_custom_status(_status("failed", f"input for {tool} expired"))
            expires = float(call.get("input_expires_seconds") or DEFAULT_INPUT_EXPIRES_SECONDS)
            return failure("input_expired", f"no input for {tool} within {expires:g} s")
        ctx.set_custom_status(_status("running", f"running {tool} with the input supplied"))


def child_instance_id(instance_id: str, tool: str) -> str:
    """The instance id of the workflow that runs call `instance_id` of a workflow kind's tool:
    derived from the call, so a replayed or retried call addresses the same instance and a
    gateway restart never starts the tool's workflow twice."""
    return f"{instance_id}:{tool}"


def _call_child_workflow(
    ctx: wf.DaprWorkflowContext, call: dict[str, Any], policy: wf.RetryPolicy | None
) -> Generator[Any, Any, dict[str, Any]]:
    """Run the call as the workflow `call["workflow"]` of the app `call["app_id"]` (a child
    workflow, routed to that app as daprd routes it) and wait for it, up to the call's timeout.
    Its output is the call's result; its failure, the tool's error."""
    tool, name, app = call["tool"], call["workflow"], call.get("app_id")
    where = f"workflow {name} of app {app}" if app else f"workflow {name}"
    child_id = child_instance_id(ctx.instance_id, tool)
    child: Any = ctx.call_child_workflow(
        name, input=call["arguments"], instance_id=child_id, retry_policy=policy, app_id=app
    )
    timeout = float(call["timeout_seconds"])
    timer = ctx.create_timer(timedelta(seconds=timeout))
    winner = yield wf.when_any([child, timer])
    if winner is timer:
        # The child is not stopped: a workflow cannot terminate another. Until an app of that
        # id connects, its workflow waits in the sidecar's queue, hence the hint.
        ctx.set_custom_status(_status("failed", f"{tool} timed out"))
        return failure(
            "timeout",
            f"{tool} did not finish within {timeout:g} s: {where} (instance {child_id}) has "
            "not completed; is that app running and connected to its sidecar?",
            {"instance_id": child_id},
        )
    try:
        result = child.get_result()
    except Exception as exc:  # TaskFailedError: the child failed, after its retries
        details = getattr(exc, "details", None)
        message = getattr(details, "message", None) or str(exc)
        ctx.set_custom_status(_status("failed", f"{tool} failed"))
        data = {"instance_id": child_id, "error_type": getattr(details, "error_type", None)}
        return failure("tool_error", f"{tool}: {where} failed: {message}", data)
    ctx.set_custom_status(_status("completed", f"{tool} completed"))
    return {"ok": True, "result": result}


def _charge(
    ctx: wf.DaprWorkflowContext, call: dict[str, Any], usage: Any
) -> Generator[Any, Any, None]:
    """Charge the usage to the call's token budget, if it has one and the tool reported some."""
    charge = call.get("budget_tokens")
    if not charge or not isinstance(usage, dict):
        return
    if token_amount(usage, str(charge.get("usage_key", "total_tokens"))) <= 0:
        return
    try:
        yield ctx.call_activity(
            CHARGE_ACTIVITY_NAME,
            input={"charge": charge, "usage": usage},
            retry_policy=CHARGE_RETRY,
        )
    except Exception as exc:  # noqa: BLE001 - the tool's result stands; the budget missed it
        if not ctx.is_replaying:
            log.error("usage of %s (task %s) not charged: %s", call["tool"], ctx.instance_id, exc)


def make_charge_activity(budgets: Callable[[], Any]) -> Callable[..., Any]:
    """The activity that charges a call's usage to its token budget; `budgets()` returns the
    gateway's `policies.budgets.DaprBudgets` (None until the gateway set it: retried)."""

    async def duragate_charge(ctx: wf.WorkflowActivityContext, inp: dict[str, Any]) -> int:
        store = budgets()
        if store is None:
            raise RuntimeError("the budget store is not ready yet")
        # The marker is keyed by the workflow instance: a repeated activity charges nothing.
        charged: int = await asyncio.to_thread(
            store.charge, inp["charge"], ctx.workflow_id, inp["usage"]
        )
        return charged

    return duragate_charge


def _await_input(
    ctx: wf.DaprWorkflowContext, call: dict[str, Any], request: dict[str, Any], round_: int
) -> Generator[Any, Any, dict[str, Any] | None]:
    """Wait for the input of round `round_`; None if it does not come in time. An input sent
    for another round (a late duplicate) is ignored: it must not answer this request."""
    tool = call["tool"]
    expires = float(call.get("input_expires_seconds") or DEFAULT_INPUT_EXPIRES_SECONDS)
    status = {
        "state": "input_required",
        "message": request.get("message") or f"{tool} is waiting for input",
        "input": {"round": round_, "request": request.get("payload")},
    }
    ctx.set_custom_status(json.dumps(status, default=str))
    expiry = ctx.create_timer(timedelta(seconds=expires))
    for _ in range(MAX_INPUT_ROUNDS):
        event = ctx.wait_for_external_event(INPUT_EVENT)
        winner = yield wf.when_any([event, expiry])
        if winner is expiry:
            return None
        supplied = event.get_result() or {}
        if supplied.get("round") == round_:
            return {"value": supplied.get("value"), "by": supplied.get("by", ""), "round": round_}
    return None


def _await_approval(
    ctx: wf.DaprWorkflowContext, call: dict[str, Any], approval: dict[str, Any]
) -> Generator[Any, Any, dict[str, Any] | None]:
    """None once approved; otherwise the call's failure (denied, expired, other arguments)."""
    tool = call["tool"]
    expires = float(approval.get("expires_seconds", 86400))
    ctx.set_custom_status(_status("waiting_approval", f"{tool} is waiting for approval"))
    decision_task = ctx.wait_for_external_event(APPROVAL_EVENT)
    expiry = ctx.create_timer(timedelta(seconds=expires))
    winner = yield wf.when_any([decision_task, expiry])
    if winner is expiry:
        ctx.set_custom_status(_status("failed", f"approval of {tool} expired"))
        return failure("approval_expired", f"no approval for {tool} within {expires:g} s")
    decision = decision_task.get_result() or {}
    if decision.get("arguments_hash") != call.get("arguments_hash"):
        ctx.set_custom_status(_status("failed", f"{tool}: approval for other arguments"))
        return failure("approval_mismatch", "the approval was given for other arguments")
    if not decision.get("approved"):
        ctx.set_custom_status(_status("failed", f"{tool} was not approved"))
        reason = decision.get("reason") or "no reason given"
        return failure("not_approved", f"not approved by {decision.get('by')}: {reason}")
    return None


def make_tool_activity(
    lookup: Callable[[str], Any],
    hub: ProgressHub,
    checkpoints: CheckpointStore | None = None,
    delegation: Callable[[], Any] | None = None,
) -> Callable[..., Any]:
    """The activity that runs one tool; `lookup(name)` returns its prepared tool or None, what
    the tool reports as progress goes to `hub`, and its checkpoints go to `checkpoints`.
    `delegation()` (a `gateway.delegation.Delegation`, or None) gives tools the gateway's
    other tools, called for the call's principal."""
    # Runs of each task execution seen by this process: the attempt number tools are given
    # (a retry in another process, or after a restart, starts counting again).
    attempts: OrderedDict[str, int] = OrderedDict()

    async def duragate_tool(ctx: wf.WorkflowActivityContext, inp: dict[str, Any]) -> Any:
        name = inp["tool"]
        tool = lookup(name)
        if tool is None:
            raise NonRetryableError(
                json.dumps(
                    {
                        "type": "unknown_tool",
                        "message": f"tool {name!r} is not configured on this worker",
                        "data": None,
                    }
                )
            )
        execution_id = getattr(ctx.get_inner_context(), "task_execution_id", "")
        attempt = attempts.pop(execution_id, 0) + 1
        attempts[execution_id] = attempt
        if len(attempts) > 10_000:
            attempts.popitem(last=False)
        # Each attempt is a span of its own, a child of the call's front door span (carried in
        # the workflow input, so even after a gateway restart), parent of upstream calls.
        with telemetry.span(
            f"duragate.tool {name}",
            parent=telemetry.extract(inp.get("trace")),
            attributes={
                "gen_ai.operation.name": "execute_tool",
                "gen_ai.tool.name": name,
                "duragate.task.id": ctx.workflow_id,
                "duragate.attempt": attempt,
            },
        ) as span:
            return await _run_tool(tool, name, inp, ctx, execution_id, attempt, span)

    async def _run_tool(
        tool: Any,
        name: str,
        inp: dict[str, Any],
        ctx: wf.WorkflowActivityContext,
        execution_id: str,
        attempt: int,
        span: Span,
    ) -> Any:
        supplied = inp.get("input")
        delegated = delegation() if delegation is not None else None
        principal = inp.get("principal")
        context = ToolContext(
            instance_id=ctx.workflow_id,
            task_execution_id=execution_id,
            attempt=attempt,
            report_progress=hub.reporter(ctx.workflow_id),
            checkpoints=checkpoints,
            supplied_input=(
                SuppliedInput(supplied.get("value"), supplied.get("by", ""), supplied["round"])
                if supplied
                else None
            ),
            principal=principal,
            context_id=inp.get("context_id"),
            tools=delegated.bind(principal) if delegated is not None else None,
        )
        try:
            result = await tool.invoke(inp["arguments"], context)
        except ToolError as exc:
            telemetry.failed(span, "tool_error")
            payload = {"type": "tool_error", "message": exc.message, "data": exc.data}
            raise NonRetryableError(json.dumps(payload, default=str)) from exc
        except InputRequired as exc:
            if span.is_recording():
                span.set_attribute("duragate.outcome", "input_required")
            if not inp.get("envelope"):  # a workflow of an older version cannot wait for input
                message = f"{name} asked for input, which this call cannot wait for"
                payload = {"type": "tool_error", "message": message, "data": exc.payload}
                raise NonRetryableError(json.dumps(payload, default=str)) from exc
            return {
                "envelope": 1,
                "input_required": {"message": exc.message, "payload": exc.payload},
            }
        if not inp.get("envelope"):
            return result
        answer = {"envelope": 1, "result": result}
        if context.usage:
            answer["usage"] = context.usage
            _usage_attributes(span, context.usage)
        return answer

    return duragate_tool


def _usage_attributes(span: Span, usage: dict[str, float]) -> None:
    """Token counts a tool reported (an LLM behind it), as GenAI usage attributes."""
    if not span.is_recording():
        return
    for key, attribute in (
        ("prompt_tokens", "gen_ai.usage.input_tokens"),
        ("completion_tokens", "gen_ai.usage.output_tokens"),
    ):
        if isinstance(usage.get(key), int | float):
            span.set_attribute(attribute, int(usage[key]))


class CallObserver(Protocol):
    """Told when a call's workflow ends (gateway.metrics.GatewayMetrics)."""

    def call_ended(self, call: dict[str, Any], output: Any, seconds: float | None) -> None: ...


def _observed(
    ctx: wf.DaprWorkflowContext, call: dict[str, Any], output: Any, started: Any, observer: Any
) -> None:
    # Replays re-run the workflow code: only the turn that really ends the call reports it.
    if observer is None or ctx.is_replaying:
        return
    try:
        seconds = (ctx.current_utc_datetime - started).total_seconds()
        observer.call_ended(call, output, seconds)
    except Exception:  # noqa: BLE001 - metrics never fail a call
        log.exception("the end of a call could not be counted")


def register(
    runtime: wf.WorkflowRuntime,
    lookup: Callable[[str], Any],
    hub: ProgressHub,
    checkpoints: CheckpointStore | None = None,
    delegation: Callable[[], Any] | None = None,
    observer: CallObserver | None = None,
    budgets: Callable[[], Any] = lambda: None,
) -> None:
    # A fresh function per runtime: the SDK marks a registered function and refuses it in a
    # second runtime of the same process (tests, a reloaded gateway).
    def duragate_call(
        ctx: wf.DaprWorkflowContext, call: dict[str, Any]
    ) -> Generator[Any, Any, Any]:
        started = ctx.current_utc_datetime  # the workflow's own clock: the same on replay
        output = yield from call_workflow(ctx, call)
        _observed(ctx, call, output, started, observer)
        return output

    runtime.register_workflow(duragate_call, name=WORKFLOW_NAME)
    runtime.register_activity(
        make_tool_activity(lookup, hub, checkpoints, delegation), name=ACTIVITY_NAME
    )
    runtime.register_activity(make_charge_activity(budgets), name=CHARGE_ACTIVITY_NAME)
