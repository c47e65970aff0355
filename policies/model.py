"""The model of one tenant's policy file (`config/policies/<tenant>.yaml`).

    tenant: acme
    members: [spiffe://acme.example/**]          # who belongs to the tenant at all
    groups:
      ops: [spiffe://acme.example/people/alice, spiffe://acme.example/agents/ops/*]
    admins: [group:ops]                          # the tenant's admins (admin API, dashboard)
    tools:
      add:                                       # a tool name, or an fnmatch pattern ("word_*")
        call: [group:ops]                        # who may call it (nobody when left out)
        list: [group:members]                    # who may see it (default: who may call)
        when: "args.a < 1000"                    # CEL; the call is allowed only when true
        deny: [{when: "args.b == 0", reason: "no zero"}]
        approval: {when: "args.a > 100", approvers: [group:ops], expires_seconds: 3600}
        obligations: {timeout_seconds: 5, retry: {max_attempts: 3}, audit: full}

This module checks the shape of the file only. What needs the whole file or another library
(group references resolve, the tenant matches the file name, CEL compiles) is checked by
`policies.loader`, which also places every error on its file, line and key.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

# Tenant names are shared with the identity layer (which maps callers to tenants), so that
# every tenant a caller can be put in can also have a policy file.
from gateway.config import RetryConfig, check_tenant_name
from identity.spiffe_id import SpiffeIdError, SpiffeIdPattern

GROUP_PREFIX = "group:"
# The tenant's own `members` list, usable wherever a group is: "everyone in this tenant".
MEMBERS_GROUP = "members"
GROUP_RE = re.compile(r"[A-Za-z][A-Za-z0-9_-]{0,62}")
# Tool names are MCP tool names (gateway.config.TOOL_NAME_RE) plus fnmatch's `*?[]!`.
TOOL_KEY_RE = re.compile(r"[A-Za-z0-9_.\-*?\[\]!]{1,128}")
GLOB_CHARS = frozenset("*?[")
# A field of the arguments or of the result: `args.card.number`, `result.items[*].token`.
REDACT_RE = re.compile(r"(args|result)(\.[A-Za-z_][A-Za-z0-9_-]*|\[(\d+|\*)\])+")


def _pattern(value: str) -> str:
    try:
        SpiffeIdPattern.parse(value)
    except SpiffeIdError as exc:
        raise ValueError(str(exc)) from None
    return value


def _reference(value: str) -> str:
    """A SPIFFE ID pattern, or `group:<name>` (checked against the file by the loader)."""
    if value.startswith(GROUP_PREFIX):
        name = value[len(GROUP_PREFIX) :]
        if not GROUP_RE.fullmatch(name):
            raise ValueError(f"{value!r}: a group name is a letter then letters, digits, '_', '-'")
        return value
    if not value.startswith("spiffe://"):
        raise ValueError(f"{value!r} is neither a SPIFFE ID pattern nor a `group:<name>` reference")
    return _pattern(value)


def _group_name(value: str) -> str:
    if value == MEMBERS_GROUP:
        raise ValueError(f"{value!r} is reserved: `group:{value}` means the tenant's members")
    if not GROUP_RE.fullmatch(value):
        raise ValueError(f"{value!r}: a group name is a letter then letters, digits, '_', '-'")
    return value


def _tool_key(value: str) -> str:
    if not TOOL_KEY_RE.fullmatch(value):
        raise ValueError(
            f"{value!r} is neither a tool name nor a pattern of tool names (letters, digits, "
            "'_', '-', '.', and '*', '?', '[...]')"
        )
    return value


Pattern = Annotated[str, AfterValidator(_pattern)]
GroupName = Annotated[str, AfterValidator(_group_name)]
ToolKey = Annotated[str, AfterValidator(_tool_key)]
Reference = Annotated[str, AfterValidator(_reference)]
# Compiled (and refused when it does not compile) by the loader, which knows the file and line.
CelText = Annotated[str, Field(min_length=1)]


def is_glob(key: str) -> bool:
    return not GLOB_CHARS.isdisjoint(key)


def literal_length(key: str) -> int:
    """How specific a pattern is: its characters outside `*`, `?` and `[...]`."""
    return len(re.sub(r"\[[^\]]*\]|[*?]", "", key))


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class DenyRule(_Strict):
    """Refuse the call when `when` holds (always, when left out), or when it fails."""

    when: CelText | None = None
    reason: str = Field(min_length=1)


class ApprovalRule(_Strict):
    """Make the call wait for a person when `when` holds (always, when left out)."""

    when: CelText | None = None
    approvers: list[Reference] = Field(min_length=1)
    expires_seconds: float = Field(default=86400.0, gt=0)
    # Four eyes by default: the caller cannot approve its own call even if it is an approver.
    allow_self: bool = False


class RateObligation(_Strict):
    calls: int = Field(ge=1)
    per_seconds: float = Field(gt=0)


class ConcurrencyObligation(_Strict):
    max: int = Field(ge=1)


class BudgetObligation(_Strict):
    """`calls` and/or `tokens` per `per_seconds`, kept across restarts (policies.budgets);
    counted for the whole tenant, or for each calling principal (`per: caller`).

    `tokens`: the usage the tool reports (`ToolContext.report_usage`), figure `usage_key`
    (`total_tokens` by default), summed over the calls that started in the period. A call is
    refused once the period's sum reaches `tokens`; nothing is reserved before a call, so the
    last call admitted may overshoot the budget by its own usage. Usage is charged once, after
    the call, by its workflow (`duragate.charge`)."""

    calls: int | None = Field(default=None, ge=1)
    tokens: int | None = Field(default=None, ge=1)
    per_seconds: float = Field(gt=0)
    per: Literal["tenant", "caller"] = "tenant"
    usage_key: str = Field(default="total_tokens", pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")

    @model_validator(mode="after")
    def _something_counted(self) -> BudgetObligation:
        if self.calls is None and self.tokens is None:
            raise ValueError(
                "a budget counts calls, tokens or both: give `calls: N` and/or `tokens: N`"
            )
        return self


# minimal: refusals and approvals only; standard: every decision; full: every decision with the
# (redacted) arguments and result.
AuditLevel = Literal["minimal", "standard", "full"]


class Obligations(_Strict):
    """What travels with an allowed call. Unset keys leave the tool's own settings in force."""

    timeout_seconds: float | None = Field(default=None, gt=0)
    retry: RetryConfig | None = None
    rate: RateObligation | None = None
    concurrency: ConcurrencyObligation | None = None
    budget: BudgetObligation | None = None
    redact: list[str] | None = None
    audit: AuditLevel | None = None

    @field_validator("redact")
    @classmethod
    def _paths(cls, value: list[str] | None) -> list[str] | None:
        for path in value or []:
            if not REDACT_RE.fullmatch(path):
                raise ValueError(
                    f"{path!r} is not a field path: write args.<field>... or result.<field>..., "
                    "with [N] or [*] for list items"
                )
        return value


class ToolRule(_Strict):
    """The rule for one tool name or pattern of names."""

    # `list` is a builtin: the attribute is `list_`, the key in the file is `list`.
    list_: list[Reference] | None = Field(default=None, alias="list")
    call: list[Reference] = Field(default_factory=list)
    when: CelText | None = None
    deny: list[DenyRule] = Field(default_factory=list)
    approval: ApprovalRule | None = None
    obligations: Obligations | None = None

    @property
    def visible_to(self) -> list[str]:
        return self.call if self.list_ is None else self.list_


class TenantPolicy(_Strict):
    """One tenant's policy file."""

    tenant: str
    members: list[Pattern] = Field(min_length=1)
    groups: dict[GroupName, list[Pattern]] = Field(default_factory=dict)
    # Who administers this tenant (its calls, approvals, audit records in the admin API and the
    # dashboard); only members count. Global admins are `admin.principals` in gateway.yaml.
    admins: list[Reference] = Field(default_factory=list)
    tools: dict[ToolKey, ToolRule] = Field(default_factory=dict)

    @field_validator("tenant")
    @classmethod
    def _tenant(cls, value: str) -> str:
        return check_tenant_name(value)
