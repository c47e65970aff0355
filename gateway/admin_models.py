"""The admin API's request and response models, and its OpenAPI 3.1 document built from them.

The handlers (gateway.admin_api) answer with these models, and the document's schemas are the
models' own JSON Schemas (pydantic's, which OpenAPI 3.1 takes as they are): the document cannot
drift from what the API sends. The schemathesis test checks the two against each other.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field
from pydantic.json_schema import models_json_schema

from gateway import __version__
from gateway.dispatch import CallState

CallStateName = Literal["working", "input_required", "completed", "failed", "cancelled"]
CALL_STATES: list[str] = list(get_args(CallStateName))
assert set(CALL_STATES) == {s.value for s in CallState}

MAX_CALLS_PAGE = 200
MAX_AUDIT_PAGE = 500
DEFAULT_PAGE = 50
MAX_REASON = 1000


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ErrorBody(_Model):
    """Every refusal: a code, what went wrong, and the parameter at fault when there is one."""

    error: str
    message: str
    parameter: str | None = None


class Me(_Model):
    principal: str
    tenant: str
    via: str
    scope: Literal["global", "tenant"]
    tenants: list[str] | None = Field(description="the tenants seen; null: every tenant")


class CallSummary(_Model):
    task_id: str
    tool: str
    tenant: str
    principal: str
    front_door: str | None
    state: CallStateName
    waiting_for: Literal["approval", "input"] | None = None
    message: str | None = None
    created_at: datetime
    updated_at: datetime


class CallPage(_Model):
    calls: list[CallSummary]
    next_cursor: str | None = Field(description="pass as `cursor` for the next page; null: done")
    scanned: int = Field(description="workflow instances read for this page (bounded)")


class Activity(_Model):
    """One attempt of an activity: a retried activity shows one entry per attempt."""

    event_id: int
    name: str
    attempt: int
    scheduled_at: datetime
    ended_at: datetime | None
    duration_ms: float | None
    outcome: Literal["running", "completed", "failed"]
    error: str | None = None


class Timer(_Model):
    event_id: int
    purpose: Literal["retry", "timer"]
    created_at: datetime
    fire_at: datetime | None
    fired_at: datetime | None


class RaisedEvent(_Model):
    name: str
    at: datetime
    detail: dict[str, Any] | None = None


class HistoryEntry(_Model):
    event_id: int
    kind: str
    at: datetime
    name: str | None = None


class CallDetail(CallSummary):
    chain: list[str]
    via: str | None
    arguments: Any = Field(description="redacted as the audit log would")
    result: Any = None
    error: dict[str, Any] | None = None
    usage: dict[str, float] | None = None
    timeout_seconds: float | None = None
    retry: dict[str, Any] | None = None
    approval: dict[str, Any] | None = None
    duration_ms: float | None = None
    activities: list[Activity]
    timers: list[Timer]
    events: list[RaisedEvent]
    history: list[HistoryEntry]
    history_truncated: bool


class Approval(_Model):
    task_id: str
    tool: str
    tenant: str
    principal: str
    message: str | None
    created_at: datetime
    may_decide: bool = Field(description="whether the policy lets this admin approve or deny it")
    why_not: str | None = None


class ApprovalPage(_Model):
    approvals: list[Approval]
    next_cursor: str | None
    scanned: int


class ApproveRequest(_Model):
    reason: str = Field(default="", max_length=MAX_REASON)


class DenyRequest(_Model):
    reason: str = Field(min_length=1, max_length=MAX_REASON)


class DecisionResult(_Model):
    task_id: str
    tool: str
    approved: bool


class PolicyFile(_Model):
    file: str = Field(description='the file name; "" for the directory itself')
    tenant: str | None
    loaded: bool = Field(description="a version of this file is in force")
    digest: str | None = None
    members: list[str] = Field(default_factory=list)
    admins: list[str] = Field(default_factory=list)
    groups: list[str] = Field(default_factory=list)
    tools: list[str] = Field(default_factory=list)
    errors: list[str] = Field(
        default_factory=list, description="why its last change was refused (older one in force)"
    )


class PolicyStatus(_Model):
    enabled: bool = Field(description="false: no policy.dir; every configured tool is allowed")
    directory: str | None
    generation: int | None
    files: list[PolicyFile]


class ToolInfo(_Model):
    name: str
    kind: str
    target: str
    description: str
    input_schema: dict[str, Any]
    output_schema: dict[str, Any] | None
    timeout_seconds: float
    retry: dict[str, Any]
    task_support: str


class ToolList(_Model):
    tools: list[ToolInfo]


class AuditRecord(BaseModel):
    """One line of the audit log (gateway.audit); the fields below are always there, others
    (limit, caller, arguments, result ...) depend on the event."""

    model_config = ConfigDict(extra="allow")

    time: str
    event: str
    outcome: str | None = None
    principal: str | None = None
    tenant: str | None = None
    tool: str | None = None
    rule: str | None = None
    reason: str | None = None
    task: str | None = None


class AuditPage(_Model):
    records: list[AuditRecord]
    next_cursor: str | None
    scanned_bytes: int


RESPONSES: tuple[type[BaseModel], ...] = (
    ErrorBody,
    Me,
    CallPage,
    CallDetail,
    ApprovalPage,
    DecisionResult,
    PolicyStatus,
    ToolList,
    AuditPage,
)
REQUESTS: tuple[type[BaseModel], ...] = (ApproveRequest, DenyRequest)


# --- the OpenAPI document ---------------------------------------------------------------


def _ref(model: type[BaseModel]) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{model.__name__}"}


def _json(model: type[BaseModel]) -> dict[str, Any]:
    return {"application/json": {"schema": _ref(model)}}


_ERRORS = {
    "400": "a parameter or the body is not valid (the parameter is named)",
    "401": "not authenticated (RFC 6750 challenge)",
    "403": "authenticated but not an admin, or not allowed this tenant or decision; or "
    "(text/plain) an Origin that is not allowed",
    "404": "no such call among the tenants this admin sees",
    "409": "the call is not waiting for that",
    "413": "the body is larger than limits.max_body_bytes",
    "421": "a Host that is not allowed (DNS-rebinding protection on loopback)",
    "503": "the workflow engine does not answer",
}


def _responses(ok: type[BaseModel], *codes: str) -> dict[str, Any]:
    answers: dict[str, Any] = {"200": {"description": "OK", "content": _json(ok)}}
    for code in ("400", "401", "403", *codes, "503"):
        answers[code] = {"description": _ERRORS[code], "content": _json(ErrorBody)}
    # The Host/Origin checks (the mcp SDK's, shared with /mcp) answer in plain text.
    answers["403"]["content"]["text/plain"] = {"schema": {"type": "string"}}
    answers["421"] = {
        "description": _ERRORS["421"],
        "content": {"text/plain": {"schema": {"type": "string"}}},
    }
    return answers


def _query(name: str, schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {
        "name": name,
        "in": "query",
        "required": False,
        "schema": schema,
        "description": description,
    }


_TENANT_SCHEMA = {"type": "string", "pattern": r"^[a-z0-9](?:[a-z0-9._-]{0,253}[a-z0-9])?$"}
_TEXT = {"type": "string", "minLength": 1, "maxLength": 256}
_TIME = {"type": "string", "format": "date-time"}
_CURSOR = {"type": "string", "minLength": 1, "maxLength": 2048}


def _limit(maximum: int) -> dict[str, Any]:
    return _query(
        "limit",
        {"type": "integer", "minimum": 1, "maximum": maximum, "default": DEFAULT_PAGE},
        "most items in the page",
    )


_TASK_ID = {
    "name": "task_id",
    "in": "path",
    "required": True,
    "schema": {"type": "string", "minLength": 1, "maxLength": 256},
}
_FILTERS = [
    _query("tenant", _TENANT_SCHEMA, "only this tenant's calls"),
    _query("tool", _TEXT, "only calls of this tool"),
    _query("since", _TIME, "created at or after (RFC 3339)"),
    _query("until", _TIME, "created before (RFC 3339)"),
    _query("cursor", _CURSOR, "next_cursor of the previous page"),
]


def openapi_document() -> dict[str, Any]:
    """The admin API's OpenAPI 3.1 document."""
    _, defs = models_json_schema(
        [(m, "serialization") for m in RESPONSES] + [(m, "validation") for m in REQUESTS],
        ref_template="#/components/schemas/{model}",
    )
    status = _query(
        "status",
        {"type": "string", "enum": CALL_STATES},
        "only this state",
    )
    paths: dict[str, Any] = {
        "/admin/api/me": {
            "get": {
                "operationId": "me",
                "summary": "Who the caller is as an admin, and the tenants it sees",
                "responses": _responses(Me),
            }
        },
        "/admin/api/calls": {
            "get": {
                "operationId": "listCalls",
                "summary": "Calls (tasks) of the tenants this admin sees, a bounded page at a time",
                "parameters": [*_FILTERS, status, _limit(MAX_CALLS_PAGE)],
                "responses": _responses(CallPage),
            }
        },
        "/admin/api/calls/{task_id}": {
            "get": {
                "operationId": "getCall",
                "summary": "One call with its workflow history: activities, retries, timers",
                "parameters": [_TASK_ID],
                "responses": _responses(CallDetail, "404"),
            }
        },
        "/admin/api/approvals": {
            "get": {
                "operationId": "listApprovals",
                "summary": "Calls waiting for an approval, in the tenants this admin sees",
                "parameters": [*_FILTERS, _limit(MAX_CALLS_PAGE)],
                "responses": _responses(ApprovalPage),
            }
        },
        "/admin/api/approvals/{task_id}/approve": {
            "post": {
                "operationId": "approve",
                "summary": "Approve a waiting call (the tenant's policy decides who may)",
                "parameters": [_TASK_ID],
                "requestBody": {"required": True, "content": _json(ApproveRequest)},
                "responses": _responses(DecisionResult, "404", "409", "413"),
            }
        },
        "/admin/api/approvals/{task_id}/deny": {
            "post": {
                "operationId": "deny",
                "summary": "Deny a waiting call, with the reason the caller will see",
                "parameters": [_TASK_ID],
                "requestBody": {"required": True, "content": _json(DenyRequest)},
                "responses": _responses(DecisionResult, "404", "409", "413"),
            }
        },
        "/admin/api/policies": {
            "get": {
                "operationId": "policyStatus",
                "summary": "The tenant policy files: loaded, and the last error of each",
                "responses": _responses(PolicyStatus),
            }
        },
        "/admin/api/tools": {
            "get": {
                "operationId": "listTools",
                "summary": "The configured tools (a tenant admin: those its policy names)",
                "responses": _responses(ToolList),
            }
        },
        "/admin/api/audit": {
            "get": {
                "operationId": "queryAudit",
                "summary": "Audit records, newest first, a bounded read at a time",
                "parameters": [
                    _query("tenant", _TENANT_SCHEMA, "only this tenant's records"),
                    _query("tool", _TEXT, "only records of this tool"),
                    _query("event", _TEXT, "only this event (scheduled, denied, approved ...)"),
                    _query("since", _TIME, "at or after (RFC 3339)"),
                    _query("until", _TIME, "before (RFC 3339)"),
                    _query("cursor", _CURSOR, "next_cursor of the previous page"),
                    _limit(MAX_AUDIT_PAGE),
                ],
                "responses": _responses(AuditPage, "404"),
            }
        },
    }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Duragate admin API",
            "version": __version__,
            "description": (
                "Operate a Duragate gateway: its calls and their workflow history, approvals, "
                "policy status, tools and audit log. Authenticate as on /mcp (client "
                "certificate, or `Authorization: Bearer` JWT-SVID or OAuth token); the caller "
                "must be an admin (admin.principals in gateway.yaml, or `admins` in its "
                "tenant's policy file)."
            ),
        },
        "paths": paths,
        "components": {
            "schemas": defs.get("$defs", {}),
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"},
                "mtls": {"type": "mutualTLS"},
            },
        },
        "security": [{"bearer": []}, {"mtls": []}, {}],
    }
