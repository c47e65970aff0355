"""Translations between A2A 1.0 messages and tasks and the gateway's calls.

A call's workflow instance *is* the A2A task: its id is the task id, its state the task's state,
its result the task's artifact. Nothing here stores anything.

Arguments travel in the message: one data part holding the arguments object, or text. Text is
taken as the value of a tool's single string argument, or else parsed as a JSON object. Numbers
in data parts arrive as doubles (protobuf `Value`): integral ones are given back as integers,
which is what JSON meant by them.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from datetime import datetime
from typing import Any

from a2a.types import (
    Artifact,
    InvalidParamsError,
    Message,
    Part,
    Role,
    Task,
    TaskArtifactUpdateEvent,
    TaskState,
    TaskStatus,
    TaskStatusUpdateEvent,
)
from google.protobuf import struct_pb2
from google.protobuf.json_format import MessageToDict, ParseDict

from gateway.dispatch import CallState, CallView

RESULT_ARTIFACT_ID = "result"
# Message metadata key naming the skill (tool) a message is for, when an agent has several.
SKILL_KEY = "skill"
# Beyond 2**53 a double no longer holds every integer: leave such numbers as they came.
_EXACT_INT_LIMIT = 2**53

STATES = {
    CallState.WORKING: TaskState.TASK_STATE_WORKING,
    CallState.INPUT_REQUIRED: TaskState.TASK_STATE_INPUT_REQUIRED,
    CallState.COMPLETED: TaskState.TASK_STATE_COMPLETED,
    CallState.FAILED: TaskState.TASK_STATE_FAILED,
    CallState.CANCELLED: TaskState.TASK_STATE_CANCELED,
}
CALL_STATES = {value: key for key, value in STATES.items()}


def integral(value: Any) -> Any:
    """`value` with every integral double turned back into an int (recursively)."""
    if isinstance(value, float) and value.is_integer() and abs(value) <= _EXACT_INT_LIMIT:
        return int(value)
    if isinstance(value, dict):
        return {k: integral(v) for k, v in value.items()}
    if isinstance(value, list):
        return [integral(v) for v in value]
    return value


def struct(data: Mapping[str, Any]) -> struct_pb2.Struct:
    out = struct_pb2.Struct()
    out.update(_json_safe(dict(data)))
    return out


def _json_safe(value: Any) -> Any:
    # Through JSON and back: tuples become lists, NaN and other strays become strings.
    return json.loads(json.dumps(value, default=str, allow_nan=False, ensure_ascii=False))


def value_of(data: Any) -> struct_pb2.Value:
    out = struct_pb2.Value()
    ParseDict(_json_safe_value(data), out)
    return out


def _json_safe_value(data: Any) -> Any:
    if isinstance(data, float) and not math.isfinite(data):
        return str(data)
    try:
        return _json_safe(data)
    except ValueError:  # NaN or infinity inside a structure
        return json.loads(json.dumps(data, default=str))


def text_of(message: Message) -> str:
    return "\n".join(part.text for part in message.parts if part.WhichOneof("content") == "text")


def arguments_from(message: Message, tool: str, input_schema: Mapping[str, Any]) -> dict[str, Any]:
    """The tool's arguments carried by `message`, or InvalidParamsError saying how to send them."""
    data_parts = [p for p in message.parts if p.WhichOneof("content") == "data"]
    if len(data_parts) > 1:
        raise InvalidParamsError(
            f"skill {tool!r} takes one data part with its arguments; the message has "
            f"{len(data_parts)}"
        )
    if data_parts:
        value = integral(MessageToDict(data_parts[0].data))
        if not isinstance(value, dict):
            raise InvalidParamsError(
                f"the data part for skill {tool!r} must be an object of arguments, "
                f"not {type(value).__name__}"
            )
        return value
    if any(p.WhichOneof("content") in ("raw", "url") for p in message.parts):
        raise InvalidParamsError(
            f"skill {tool!r} takes a data part (an object of arguments) or text; files are "
            "not accepted"
        )
    text = text_of(message)
    properties = input_schema.get("properties") or {}
    strings = [
        n for n, s in properties.items() if isinstance(s, dict) and s.get("type") == "string"
    ]
    if len(properties) == 1 and len(strings) == 1:
        return {strings[0]: text}
    try:
        parsed = json.loads(text) if text.strip() else None
    except ValueError:
        parsed = None
    if isinstance(parsed, dict):
        return integral(parsed)
    if not properties and not text.strip():
        return {}
    expected = ", ".join(sorted(properties)) or "none"
    raise InvalidParamsError(
        f"skill {tool!r} takes the arguments ({expected}): send them as a data part holding a "
        "JSON object (or as a JSON object in text)"
    )


def agent_message(task_id: str, context_id: str, text: str, **metadata: Any) -> Message:
    message = Message(
        message_id=f"{task_id}-status",
        context_id=context_id,
        task_id=task_id,
        role=Role.ROLE_AGENT,
        parts=[Part(text=text)],
    )
    if metadata:
        message.metadata.CopyFrom(struct(metadata))
    return message


def _status(view: CallView, context_id: str) -> TaskStatus:
    status = TaskStatus(state=STATES[view.state])
    status.timestamp.FromDatetime(_utc_naive(view.updated_at))
    text = _status_text(view)
    if text:
        extra: dict[str, Any] = {}
        if view.error:
            extra["error"] = view.error
        if view.waiting_for:
            extra["waiting_for"] = view.waiting_for
        if view.input_request is not None:
            extra["input_request"] = view.input_request
        if view.progress is not None:
            extra["progress"] = view.progress
            if view.total is not None:
                extra["total"] = view.total
        status.message.CopyFrom(agent_message(view.task_id, context_id, text, **extra))
    return status


def _status_text(view: CallView) -> str:
    if view.state == CallState.FAILED and view.error:
        return str(view.error.get("message") or "the call failed")
    if view.state == CallState.CANCELLED and view.error:
        return str(view.error.get("message") or "cancelled")
    return view.message or ""


def _utc_naive(moment: datetime) -> datetime:
    # protobuf's FromDatetime reads naive datetimes as UTC.
    return moment.replace(tzinfo=None) if moment.tzinfo is None else moment


def result_artifact(view: CallView) -> Artifact:
    artifact = Artifact(artifact_id=RESULT_ARTIFACT_ID, name=f"{view.tool} result")
    artifact.parts.append(Part(data=value_of(view.result)))
    artifact.parts.append(Part(text=json.dumps(view.result, default=str, ensure_ascii=False)))
    return artifact


def user_message(view: CallView, context_id: str) -> Message:
    """The request as history: the arguments the call was made with."""
    message = Message(
        message_id=f"{view.task_id}-request",
        context_id=context_id,
        task_id=view.task_id,
        role=Role.ROLE_USER,
        parts=[Part(data=value_of(view.arguments or {}))],
    )
    message.metadata.CopyFrom(struct({SKILL_KEY: view.tool}))
    return message


def context_of(view: CallView) -> str:
    # Calls that came in without a context (through MCP) get one of their own.
    return view.context_id or view.task_id


def task_of(view: CallView, *, history_length: int | None = None, artifacts: bool = True) -> Task:
    context_id = context_of(view)
    task = Task(id=view.task_id, context_id=context_id, status=_status(view, context_id))
    task.metadata.CopyFrom(struct({SKILL_KEY: view.tool}))
    if artifacts and view.state == CallState.COMPLETED:
        task.artifacts.append(result_artifact(view))
    if history_length is None or history_length > 0:
        history = [user_message(view, context_id)]
        if view.state in (CallState.COMPLETED, CallState.FAILED, CallState.CANCELLED):
            history.append(task.status.message)
        if history_length:
            history = history[-history_length:]
        task.history.extend(history)
    return task


def status_event(view: CallView) -> TaskStatusUpdateEvent:
    context_id = context_of(view)
    return TaskStatusUpdateEvent(
        task_id=view.task_id, context_id=context_id, status=_status(view, context_id)
    )


def artifact_event(view: CallView) -> TaskArtifactUpdateEvent:
    return TaskArtifactUpdateEvent(
        task_id=view.task_id,
        context_id=context_of(view),
        artifact=result_artifact(view),
        append=False,
        last_chunk=True,
    )


def rejected_task(task_id: str, context_id: str, tool: str, reason: str, **details: Any) -> Task:
    """A call the policy or the limits refused before anything ran: A2A's REJECTED state (the
    agent decided not to perform the task). Nothing is stored for it."""
    status = TaskStatus(state=TaskState.TASK_STATE_REJECTED)
    status.message.CopyFrom(agent_message(task_id, context_id, reason, **details))
    task = Task(id=task_id, context_id=context_id, status=status)
    task.metadata.CopyFrom(struct({SKILL_KEY: tool}))
    return task
