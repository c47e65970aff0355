"""The admin HTTP API (`/admin/api/...`) and its OpenAPI document (`/admin/openapi.json`).

    GET  /admin/api/me                          who the caller is as an admin
    GET  /admin/api/calls                       calls of the tenants it sees (filters, cursor)
    GET  /admin/api/calls/{task_id}             one call with its workflow timeline
    GET  /admin/api/approvals                   calls waiting for an approval
    POST /admin/api/approvals/{task_id}/approve {"reason": "..."}
    POST /admin/api/approvals/{task_id}/deny    {"reason": "..."} (required)
    GET  /admin/api/policies                    tenant policy files: loaded, last error
    GET  /admin/api/tools                       the configured tools
    GET  /admin/api/audit                       audit records, newest first (filters, cursor)

Callers are authenticated exactly as on `/mcp` (401 with a challenge when refused) and must be
admins (gateway.admin_access; 403 with the reason otherwise). A tenant admin sees its tenant
only: another tenant's call is "no such call" (404), a filter naming another tenant is 403.
Bad parameters are 400 naming the parameter; unknown query parameters are refused too, so a
misspelt filter never silently widens a query. The Host/Origin checks of `/mcp` apply (DNS
rebinding), and a POST must carry a JSON body: a page of another origin cannot send one without
the browser asking first (CORS), and the gateway allows no other origin.

Approving from the admin API is the same decision as `/approvals`: the admin decides as itself,
and the tenant's policy says whether it may (its approval rules name the approvers, four eyes by
default). The admin role shows everything in its scope; it does not bypass the policy.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Awaitable, Callable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, Protocol

import grpc
from mcp.server.transport_security import TransportSecurityMiddleware
from pydantic import BaseModel, ValidationError
from starlette.datastructures import Headers, QueryParams
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from gateway.admin_access import AdminScope, NotAdmin, admin_scope
from gateway.admin_audit import AuditFilter, BadAuditCursor, parse_cursor, query_audit
from gateway.admin_calls import (
    BadCursor,
    CallFilter,
    detail,
    find_call,
    history_of,
    scan_calls,
    summary,
)
from gateway.admin_models import (
    MAX_AUDIT_PAGE,
    MAX_CALLS_PAGE,
    Approval,
    ApprovalPage,
    ApproveRequest,
    AuditPage,
    AuditRecord,
    CallPage,
    DecisionResult,
    DenyRequest,
    ErrorBody,
    Me,
    PolicyFile,
    PolicyStatus,
    ToolInfo,
    ToolList,
    openapi_document,
)
from gateway.audit import STDOUT
from gateway.config import TENANT_NAME_RE, GatewayConfig
from gateway.dispatch import CallState, Dispatcher, DispatchError
from identity.authenticate import AuthenticationError
from identity.principal import Principal
from identity.tls import peer_of
from policies.loader import PolicyStore

log = logging.getLogger(__name__)

TASK_ID_RE = re.compile(r"[A-Za-z0-9._:-]{1,256}")
MAX_TEXT_PARAM = 256
JSON_HEADERS = {"Cache-Control": "no-store"}


class AdminHost(Protocol):
    """What the admin API needs of the gateway (read per request: a reload shows)."""

    @property
    def config(self) -> GatewayConfig: ...

    @property
    def runtime(self) -> Any: ...

    @property
    def dispatcher(self) -> Dispatcher: ...


class BadParameter(Exception):
    def __init__(self, parameter: str, message: str) -> None:
        super().__init__(message)
        self.parameter = parameter
        self.message = message


def _error(status: int, error: str, message: str, parameter: str | None = None) -> Response:
    body = ErrorBody(error=error, message=message, parameter=parameter)
    answer = body.model_dump(exclude_none=True)
    return JSONResponse(answer, status_code=status, headers=JSON_HEADERS)


def _ok(model: BaseModel) -> Response:
    return Response(model.model_dump_json(), media_type="application/json", headers=JSON_HEADERS)


class Query:
    """The query string, each parameter checked; unknown or repeated ones are refused."""

    def __init__(self, params: QueryParams, allowed: set[str]) -> None:
        for name in params:
            if name not in allowed:
                known = ", ".join(sorted(allowed)) or "none"
                raise BadParameter(name, f"unknown parameter {name!r} (known: {known})")
            if len(params.getlist(name)) > 1:
                raise BadParameter(name, f"{name!r} is given more than once")
        self.params = params

    def text(self, name: str) -> str | None:
        value = self.params.get(name)
        if value is None:
            return None
        if not value or len(value) > MAX_TEXT_PARAM:
            raise BadParameter(name, f"{name} must be 1 to {MAX_TEXT_PARAM} characters")
        return value

    def tenant(self, scope: AdminScope) -> str | None:
        value = self.params.get("tenant")
        if value is None:
            return None
        if not TENANT_NAME_RE.fullmatch(value):
            raise BadParameter("tenant", f"{value[:80]!r} is not a tenant name")
        if not scope.sees(value):
            raise Forbidden(f"{scope.principal.id} administers {scope.describe()}, not {value!r}")
        return value

    def time(self, name: str) -> datetime | None:
        value = self.params.get(name)
        if value is None:
            return None
        try:
            at = datetime.fromisoformat(value)
        except ValueError:
            raise BadParameter(
                name, f"{name} must be an RFC 3339 time, e.g. 2026-01-05T10:30:00Z"
            ) from None
        return at if at.tzinfo else at.replace(tzinfo=UTC)

    def limit(self, maximum: int, default: int = 50) -> int:
        value = self.params.get("limit")
        if value is None:
            return default
        if not value.isdigit() or not 1 <= int(value) <= maximum:
            raise BadParameter("limit", f"limit must be an integer from 1 to {maximum}")
        return int(value)

    def choice(self, name: str, choices: list[str]) -> str | None:
        value = self.params.get(name)
        if value is not None and value not in choices:
            raise BadParameter(name, f"{name} must be one of {', '.join(choices)}")
        return value


class Forbidden(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


Handler = Callable[[Request, AdminScope], Awaitable[Response]]


class CallerAuthenticator(Protocol):
    """What the admin API needs of the gateway's authenticator (counted or not)."""

    async def authenticate(self, headers: Mapping[str, str], peer: Any = None) -> Principal: ...


class AdminApi:
    """The admin routes of one gateway."""

    def __init__(
        self,
        host: AdminHost,
        authenticator: Callable[[], CallerAuthenticator],
        security: TransportSecurityMiddleware,
        refuse: Callable[[AuthenticationError, Request], Response],
        listen_host_is_loopback: bool,
    ) -> None:
        self.host = host
        self.authenticator = authenticator
        self.security = security
        self.refuse = refuse
        self.loopback = listen_host_is_loopback
        self._openapi: bytes | None = None

    # --- plumbing -------------------------------------------------------------------------

    def _policies(self) -> PolicyStore | None:
        store = getattr(self.host, "policy_store", None)
        return store if isinstance(store, PolicyStore) else None

    async def _admin(self, request: Request) -> AdminScope | Response:
        refused = await self.security.validate_request(request, is_post=False)
        if refused is not None:
            return refused
        try:
            principal = await self.authenticator().authenticate(
                Headers(scope=request.scope), peer_of(request.scope)
            )
        except AuthenticationError as exc:
            log.info("audit admin unauthenticated status=%d reason=%s", exc.status, exc.reason)
            return self.refuse(exc, request)
        try:
            return admin_scope(
                principal, self.host.config, self._policies(), loopback=self.loopback
            )
        except NotAdmin as exc:
            log.info("audit admin forbidden principal=%s reason=%s", principal.id, exc.reason)
            return _error(403, "forbidden", exc.reason)

    def route(self, handler: Handler) -> Callable[[Request], Awaitable[Response]]:
        async def endpoint(request: Request) -> Response:
            scope = await self._admin(request)
            if isinstance(scope, Response):
                return scope
            try:
                return await handler(request, scope)
            except BadParameter as exc:
                return _error(400, "bad_parameter", exc.message, exc.parameter)
            except Forbidden as exc:
                return _error(403, "forbidden", exc.reason)
            except grpc.RpcError as exc:
                log.warning("admin API: the workflow engine failed: %s", exc)
                return _error(503, "unavailable", "the workflow engine does not answer")

        return endpoint

    async def _body(self, request: Request, model: type[BaseModel]) -> Any:
        content_type = request.headers.get("content-type", "")
        if not content_type.lower().startswith("application/json"):
            raise BadParameter("content-type", "send the body as application/json")
        raw = await request.body()
        try:
            return model.model_validate_json(raw or b"null")
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first.get("loc", ())) or "body"
            raise BadParameter(where, f"{where}: {first.get('msg')}") from None

    # --- endpoints ------------------------------------------------------------------------

    async def openapi(self, request: Request) -> Response:
        refused = await self.security.validate_request(request, is_post=False)
        if refused is not None:
            return refused
        if self._openapi is None:
            self._openapi = bytes(JSONResponse(openapi_document()).body)
        return Response(self._openapi, media_type="application/json")

    async def me(self, request: Request, scope: AdminScope) -> Response:
        Query(request.query_params, set())
        p = scope.principal
        tenants = None if scope.tenants is None else sorted(scope.tenants)
        kind: Literal["global", "tenant"] = "global" if scope.is_global else "tenant"
        return _ok(Me(principal=p.id, tenant=p.tenant, via=p.via, scope=kind, tenants=tenants))

    def _call_filter(self, query: Query, scope: AdminScope, **extra: Any) -> CallFilter:
        return CallFilter(
            tenant=query.tenant(scope),
            tool=query.text("tool"),
            since=query.time("since"),
            until=query.time("until"),
            **extra,
        )

    async def calls(self, request: Request, scope: AdminScope) -> Response:
        filters = {"tenant", "tool", "status", "since", "until", "limit", "cursor"}
        query = Query(request.query_params, filters)
        state = query.choice("status", [s.value for s in CallState])
        wanted = self._call_filter(query, scope, state=state)
        limit = query.limit(MAX_CALLS_PAGE)
        try:
            found, cursor, scanned = await scan_calls(
                self.host.runtime, scope, wanted, limit=limit, cursor=query.text("cursor")
            )
        except BadCursor as exc:
            raise BadParameter("cursor", str(exc)) from None
        page = CallPage(calls=[summary(f) for f in found], next_cursor=cursor, scanned=scanned)
        return _ok(page)

    async def call(self, request: Request, scope: AdminScope) -> Response:
        Query(request.query_params, set())
        task_id = request.path_params["task_id"]
        found = await find_call(self.host.runtime, scope, task_id) if _is_id(task_id) else None
        if found is None:
            return _not_found(task_id, scope)
        events = await history_of(self.host.runtime, task_id)
        return _ok(detail(found, events))

    async def approvals(self, request: Request, scope: AdminScope) -> Response:
        filters = {"tenant", "tool", "since", "until", "limit", "cursor"}
        query = Query(request.query_params, filters)
        wanted = self._call_filter(query, scope, waiting_for="approval")
        limit = query.limit(MAX_CALLS_PAGE)
        try:
            found, cursor, scanned = await scan_calls(
                self.host.runtime, scope, wanted, limit=limit, cursor=query.text("cursor")
            )
        except BadCursor as exc:
            raise BadParameter("cursor", str(exc)) from None
        items = []
        for f in found:
            s = summary(f)
            why = self._why_not(scope.principal, f.view.tool, f.call.get("principal") or {})
            items.append(
                Approval(
                    task_id=s.task_id,
                    tool=s.tool,
                    tenant=s.tenant,
                    principal=s.principal,
                    message=s.message,
                    created_at=s.created_at,
                    may_decide=why is None,
                    why_not=why,
                )
            )
        return _ok(ApprovalPage(approvals=items, next_cursor=cursor, scanned=scanned))

    def _why_not(self, admin: Principal, tool: str, owner: dict[str, Any]) -> str | None:
        """None if the policy lets `admin` decide on this call, else why not."""
        if self.host.dispatcher.policy.may_approve(admin, tool, owner):
            return None
        if admin.id == owner.get("id"):
            return "the policy does not let a caller approve its own call of " + tool
        return (
            f"the policy of tenant {owner.get('tenant')!r} does not name {admin.id} "
            f"as an approver of {tool}"
        )

    async def approve(self, request: Request, scope: AdminScope) -> Response:
        body = await self._body(request, ApproveRequest)
        return await self._decide(request, scope, True, body.reason)

    async def deny(self, request: Request, scope: AdminScope) -> Response:
        body = await self._body(request, DenyRequest)
        return await self._decide(request, scope, False, body.reason)

    async def _decide(
        self, request: Request, scope: AdminScope, approve: bool, reason: str
    ) -> Response:
        Query(request.query_params, set())
        task_id = request.path_params["task_id"]
        found = await find_call(self.host.runtime, scope, task_id) if _is_id(task_id) else None
        if found is None:
            return _not_found(task_id, scope)
        if found.view.waiting_for != "approval":
            return _error(
                409,
                "not_waiting",
                f"call {task_id} is not waiting for approval ({found.view.state.value})",
            )
        why = self._why_not(scope.principal, found.view.tool, found.call.get("principal") or {})
        if why is not None:
            return _error(403, "forbidden", why)
        try:
            view = await self.host.dispatcher.decide(task_id, scope.principal, approve, reason)
        except DispatchError as exc:
            status = 404 if exc.code == "not_found" else 409
            return _error(status, exc.code, exc.message)
        return _ok(DecisionResult(task_id=view.task_id, tool=view.tool, approved=approve))

    async def policies(self, request: Request, scope: AdminScope) -> Response:
        Query(request.query_params, set())
        store = self._policies()
        if store is None:
            return _ok(PolicyStatus(enabled=False, directory=None, generation=None, files=[]))
        files: dict[str, PolicyFile] = {}
        for loaded in store.tenants():
            policy = store.get(loaded)
            if policy is None or not scope.sees(loaded):
                continue
            model = policy.model
            files[policy.name] = PolicyFile(
                file=policy.name,
                tenant=loaded,
                loaded=True,
                digest=policy.digest,
                members=list(model.members),
                admins=list(model.admins),
                groups=sorted(model.groups),
                tools=list(model.tools),
            )
        for name, errors in store.file_errors().items():
            tenant: str | None = name.removesuffix(".yaml") if name else None
            if tenant is None and not scope.is_global:
                continue  # the directory itself: a global admin's concern
            if tenant is not None and not scope.sees(tenant):
                continue
            entry = files.get(name) or PolicyFile(file=name, tenant=tenant, loaded=False)
            files[name] = entry.model_copy(update={"errors": errors})
        status = PolicyStatus(
            enabled=True,
            directory=str(store.directory),
            generation=store.generation,
            files=[files[k] for k in sorted(files)],
        )
        return _ok(status)

    async def tools(self, request: Request, scope: AdminScope) -> Response:
        Query(request.query_params, set())
        store = self._policies()
        specs = self.host.dispatcher.registry.specs()
        if not scope.is_global and store is not None:
            policy = store.get(scope.principal.tenant)
            specs = [s for s in specs if policy is not None and policy.rules_for(s.name)]
        tools = [
            ToolInfo(
                name=s.name,
                kind=s.kind,
                target=s.target,
                description=s.description,
                input_schema=s.input_schema,
                output_schema=s.output_schema,
                timeout_seconds=s.timeout_seconds,
                retry=s.retry.model_dump(),
                task_support=s.task_support,
            )
            for s in specs
        ]
        return _ok(ToolList(tools=tools))

    async def audit(self, request: Request, scope: AdminScope) -> Response:
        filters = {"tenant", "tool", "event", "since", "until", "limit", "cursor"}
        query = Query(request.query_params, filters)
        wanted = AuditFilter(
            tenant=query.tenant(scope),
            tool=query.text("tool"),
            event=query.text("event"),
            since=query.time("since"),
            until=query.time("until"),
        )
        limit = query.limit(MAX_AUDIT_PAGE)
        text = query.text("cursor")
        try:
            cursor = parse_cursor(text) if text is not None else None
        except BadAuditCursor as exc:
            raise BadParameter("cursor", str(exc)) from None
        target = getattr(self.host, "audit_target", None)
        if target is None or target == STDOUT:
            return _error(
                404, "no_audit_file", "the audit log goes to stdout (audit.path: -), not a file"
            )
        records, next_cursor, read = await asyncio.to_thread(
            query_audit, Path(target), scope, wanted, limit=limit, cursor=cursor
        )
        page = AuditPage(
            records=[AuditRecord.model_validate(r) for r in records],
            next_cursor=next_cursor,
            scanned_bytes=read,
        )
        return _ok(page)

    def routes(self) -> list[Route]:
        r = self.route
        return [
            Route("/admin/openapi.json", self.openapi, methods=["GET"]),
            Route("/admin/api/me", r(self.me), methods=["GET"]),
            Route("/admin/api/calls", r(self.calls), methods=["GET"]),
            Route("/admin/api/calls/{task_id}", r(self.call), methods=["GET"]),
            Route("/admin/api/approvals", r(self.approvals), methods=["GET"]),
            Route("/admin/api/approvals/{task_id}/approve", r(self.approve), methods=["POST"]),
            Route("/admin/api/approvals/{task_id}/deny", r(self.deny), methods=["POST"]),
            Route("/admin/api/policies", r(self.policies), methods=["GET"]),
            Route("/admin/api/tools", r(self.tools), methods=["GET"]),
            Route("/admin/api/audit", r(self.audit), methods=["GET"]),
        ]


def _is_id(task_id: str) -> bool:
    return TASK_ID_RE.fullmatch(task_id) is not None


def _not_found(task_id: str, scope: AdminScope) -> Response:
    shown = task_id[:80]
    return _error(404, "not_found", f"no call {shown!r} in {scope.describe()}")
