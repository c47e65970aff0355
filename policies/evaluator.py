"""Policy decisions: the dispatcher's `Policy`, on the tenant policies of a `PolicyStore`.

    engine = PolicyEngine(store)
    engine.decide(principal, "add", {"a": 1, "b": 2})
      -> Decision(effect="allow", rule="default.yaml:tools[add].call", reason=..., obligations)

Order of a decision (DESIGN.md, "Policy"), the first step that refuses decides:
1. the call chain: an id twice in `chain + [id]` (a cycle), or more than `max_chain_depth` ids;
2. the tenant: `principal.tenant` must have a policy file, and the principal's id must match
   one of its `members` patterns;
3. default deny: some rule must name the tool (exactly or by pattern) and admit the caller in
   its `call` list;
4. deny rules of every rule naming the tool, in order: one that holds, or that fails to
   evaluate, denies;
5. allow: the `when` of a rule admitting the caller must hold (a rule without `when` allows);
   one that fails to evaluate denies;
6. approval rules of every rule naming the tool: one that holds makes the call wait for a
   person (`effect="approve"`); one that fails to evaluate denies.
So deny beats approval beats allow, and an error anywhere denies. Obligations of all the rules
naming the tool are merged key by key, most specific rule first (the exact rule, then patterns
with more literal characters, then file order): the first rule that sets a key wins. Rate,
concurrency and budget are only passed on, in the decision, for admission to enforce.

List time (`may_list`) has no arguments and no call time, so conditions that use `args` or
`now` are not evaluated there: the tool is shown if the caller is in the rule's `list` (default:
its `call`), unless a deny rule needing neither holds (or fails) for this caller, or, without an
explicit `list`, every admitting rule's caller-only `when` is false. The call itself is still
decided in full, so a tool shown is not a promise that every call is allowed.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, Protocol

from gateway.audit import audit_obligations
from gateway.config import ConfigError
from gateway.dispatch import DispatchError
from identity.principal import Principal
from identity.spiffe_id import SpiffeId, SpiffeIdError
from policies.cel import (
    Bindings,
    CelBackend,
    Condition,
    Outcome,
    PreparedCaller,
    evaluate,
    prepare_caller,
)
from policies.loader import (
    SUFFIX,
    ApprovalCheck,
    CompiledRule,
    LoadedPolicy,
    load_policy_file,
    valid_tenant,
)

DEFAULT_MAX_CHAIN_DEPTH = 5
Effect = Literal["allow", "deny", "approve"]


@dataclass(frozen=True)
class Decision:
    effect: Effect
    rule: str  # what decided: "default.yaml:tools[add].deny[0]", "chain", "default.yaml:members"
    reason: str
    obligations: dict[str, Any] = field(default_factory=dict)

    @property
    def allowed(self) -> bool:
        """The call may go ahead (at once, or once approved)."""
        return self.effect != "deny"

    def to_json(self) -> dict[str, Any]:
        return {
            "effect": self.effect,
            "rule": self.rule,
            "reason": self.reason,
            "obligations": self.obligations,
        }


class PolicySource(Protocol):
    def get(self, tenant: str) -> LoadedPolicy | None: ...


@dataclass(frozen=True)
class _Caller:
    """What a policy knows about one principal: computed once per policy and principal."""

    spiffe_id: SpiffeId | None  # None: not a valid SPIFFE ID
    member: bool
    cel: PreparedCaller | None  # the `caller` variable, in the policy's CEL backend's form


class _Denied(Exception):
    def __init__(self, rule: str, reason: str) -> None:
        self.decision = Decision("deny", rule, reason)


class PolicyEngine:
    """Implements gateway.dispatch.Policy. Thread-safe: it only reads the store's snapshots."""

    def __init__(
        self, store: PolicySource, *, max_chain_depth: int = DEFAULT_MAX_CHAIN_DEPTH
    ) -> None:
        if max_chain_depth < 1:
            raise ValueError("max_chain_depth must be at least 1")
        self.store = store
        self.max_chain_depth = max_chain_depth

    # --- the dispatch seam --------------------------------------------------------------------

    def check_call(
        self, principal: Principal, tool: str, arguments: dict[str, Any]
    ) -> dict[str, Any] | None:
        decision = self.decide(principal, tool, arguments)
        if decision.effect == "deny":
            error = DispatchError("denied", decision.reason, {"rule": decision.rule})
            error.audit = self._audit_of(principal, tool)
            raise error
        # Who decided, for the audit log (the dispatcher reads it; it is no obligation).
        about = {"effect": decision.effect, "rule": decision.rule, "reason": decision.reason}
        return {**decision.obligations, "decision": about}

    def _audit_of(self, principal: Principal, tool: str) -> dict[str, Any] | None:
        """The audit level and redact paths the tool's rules set, for the record of a refusal
        (a denial carries no obligations, but its arguments deserve the same care)."""
        policy = self.store.get(principal.tenant)
        if policy is None:
            return None
        merged = _merge(policy.rules_for(tool))
        return audit_obligations(merged)

    def may_list(self, principal: Principal, tool: str) -> bool:
        try:
            policy, caller = self._admit(principal)
            sid = caller.spiffe_id
            assert sid is not None
            rules = policy.rules_for(tool)
            assert caller.cel is not None
            bindings = Bindings(caller.cel, tool)
            for rule in rules:
                for deny in rule.denies:
                    if deny.condition is None:
                        return False
                    if deny.condition.needs_call:
                        continue
                    if not self._test(policy, deny.condition, bindings, principal, tool).clear:
                        return False
            for rule in rules:
                if not rule.visible.admits(sid):
                    continue
                if rule.list_explicit or rule.when is None or rule.when.needs_call:
                    return True
                if self._test(policy, rule.when, bindings, principal, tool).holds:
                    return True
            return False
        except _Denied:
            return False

    def may_approve(self, approver: Principal, tool: str, caller: dict[str, Any]) -> bool:
        """Only a member of the caller's own tenant whom an approval rule of this tool names.

        The seam gives the tool and the caller but not the arguments, so this cannot know which
        approval rule fired: any approval rule naming the tool qualifies. The policy in force
        now decides, not the one of the time of the call."""
        if approver.tenant != caller.get("tenant"):
            return False
        try:
            policy, facts = self._admit(approver)
        except _Denied:
            return False
        assert facts.spiffe_id is not None
        own = approver.id == caller.get("id")
        for rule in policy.rules_for(tool):
            check = rule.approval
            if check is None or (own and not check.allow_self):
                continue
            if check.approvers.admits(facts.spiffe_id):
                return True
        return False

    # --- the decision -------------------------------------------------------------------------

    def decide(
        self,
        principal: Principal,
        tool: str,
        arguments: Mapping[str, Any],
        now: datetime | None = None,
    ) -> Decision:
        try:
            return self._decide(principal, tool, arguments, now)
        except _Denied as denied:
            return denied.decision

    def _decide(
        self,
        principal: Principal,
        tool: str,
        arguments: Mapping[str, Any],
        now: datetime | None,
    ) -> Decision:
        policy, caller = self._admit(principal)
        assert caller.spiffe_id is not None
        rules = policy.rules_for(tool)
        default = f"{policy.name}:default-deny"
        if not rules:
            raise _Denied(default, f"no rule of tenant {policy.tenant!r} names tool {tool!r}")
        granting = [r for r in rules if r.callers.admits(caller.spiffe_id)]
        if not granting:
            raise _Denied(default, f"{principal.id} may not call {tool!r}")
        assert caller.cel is not None  # _admit refused principals without a SPIFFE ID
        bindings = Bindings(caller.cel, tool, arguments, now or datetime.now(UTC))

        for rule in rules:
            for deny in rule.denies:
                if deny.condition is None:
                    raise _Denied(deny.where, deny.reason)
                outcome = self._test(policy, deny.condition, bindings, principal, tool)
                if outcome.holds:
                    raise _Denied(deny.where, deny.reason)
                if not outcome.clear:
                    raise _Denied(deny.where, _failed(outcome))

        allowed_by = self._allowing_rule(policy, granting, bindings, principal, tool)
        obligations = _merge(rules)
        for rule in rules:
            check = rule.approval
            if check is None:
                continue
            if check.condition is not None:
                outcome = self._test(policy, check.condition, bindings, principal, tool)
                if not outcome.holds:
                    if outcome.clear:
                        continue
                    raise _Denied(check.where, _failed(outcome))
            obligations["approval"] = _approval(check)
            return Decision("approve", check.where, "needs a person's approval", obligations)
        return Decision("allow", allowed_by, "allowed", obligations)

    def _allowing_rule(
        self,
        policy: LoadedPolicy,
        granting: list[CompiledRule],
        bindings: Bindings,
        principal: Principal,
        tool: str,
    ) -> str:
        for rule in granting:
            if rule.when is None:
                return f"{rule.where}.call"
            outcome = self._test(policy, rule.when, bindings, principal, tool)
            if outcome.holds:
                return f"{rule.where}.when"
            if not outcome.clear:
                raise _Denied(f"{rule.where}.when", _failed(outcome))
        first = granting[0]
        assert first.when is not None
        raise _Denied(f"{first.where}.when", f"the condition `{first.when.source}` is false")

    # --- helpers ------------------------------------------------------------------------------

    def _admit(self, principal: Principal) -> tuple[LoadedPolicy, _Caller]:
        """The chain checks and tenant membership, before anything else."""
        ids = [*principal.chain, principal.id]
        seen: set[str] = set()
        for spiffe_id in ids:
            if spiffe_id in seen:
                raise _Denied("chain", f"the call chain has a cycle: {spiffe_id} appears twice")
            seen.add(spiffe_id)
        if len(ids) > self.max_chain_depth:
            raise _Denied(
                "chain",
                f"the call chain has {len(ids)} callers; at most {self.max_chain_depth} allowed",
            )
        policy = self.store.get(principal.tenant)
        if policy is None:
            raise _Denied("tenant", f"tenant {principal.tenant!r} has no policy")
        caller = policy.memo(
            ("caller", principal.id, principal.via, principal.chain),
            lambda: _caller_facts(policy, principal),
        )
        if caller.spiffe_id is None:
            raise _Denied(f"{policy.name}:members", f"{principal.id!r} is not a SPIFFE ID")
        if not caller.member:
            raise _Denied(
                f"{policy.name}:members",
                f"{principal.id} is not a member of tenant {policy.tenant!r}",
            )
        return policy, caller

    @staticmethod
    def _test(
        policy: LoadedPolicy,
        condition: Condition,
        bindings: Bindings,
        principal: Principal,
        tool: str,
    ) -> Outcome:
        if condition.needs_call:
            return evaluate(condition, bindings)
        # Caller-only conditions depend on nothing but the principal and the tool: their
        # outcome is kept with the policy (a reload brings a new policy, hence a fresh memo).
        key = ("cond", id(condition), principal.id, principal.via, principal.chain, tool)
        return policy.memo(key, lambda: evaluate(condition, bindings))


def _caller_facts(policy: LoadedPolicy, principal: Principal) -> _Caller:
    try:
        sid = SpiffeId.parse(principal.id)
    except SpiffeIdError:
        return _Caller(None, False, None)
    facts = {
        "id": principal.id,
        "trust_domain": sid.trust_domain,
        "path": sid.path,
        "via": principal.via,
        "groups": policy.groups_of(sid),
        "chain": list(principal.chain),
    }
    return _Caller(sid, policy.members.admits(sid), prepare_caller(policy.cel, facts))


def _failed(outcome: Outcome) -> str:
    return f"the condition could not be evaluated, which denies: {outcome.detail}"


def _merge(rules: tuple[CompiledRule, ...]) -> dict[str, Any]:
    merged: dict[str, Any] = {}
    for rule in rules:
        for key, value in rule.obligations.items():
            merged.setdefault(key, value)
    return merged


def _approval(check: ApprovalCheck) -> dict[str, Any]:
    return {
        "expires_seconds": check.expires_seconds,
        "approvers": check.approvers.describe(),
        "allow_self": check.allow_self,
        "rule": check.where,
    }


# ---------------------------------------------------------------------------------------------
# `policy explain`


def explain(
    path: Path,
    *,
    tenant: str,
    caller: str,
    tool: str,
    arguments: Mapping[str, Any],
    chain: tuple[str, ...] = (),
    via: str = "explain",
    now: datetime | None = None,
    max_chain_depth: int = DEFAULT_MAX_CHAIN_DEPTH,
    cel: CelBackend | str | None = None,
) -> Decision:
    """The decision for one call, against the tenant's file in `path` (a directory of policy
    files, or one file). A broken file raises ConfigError rather than explain a guess."""
    if not valid_tenant(tenant):
        raise ValueError(f"{tenant!r} is not a tenant name")
    file = path / f"{tenant}{SUFFIX}" if path.is_dir() else path
    policy = load_policy_file(file, cel)
    if policy.tenant != tenant:
        raise ConfigError.at(
            str(file), None, None, f"this is the policy of {policy.tenant!r}, not {tenant!r}"
        )
    engine = PolicyEngine(_One(policy), max_chain_depth=max_chain_depth)
    principal = Principal(id=caller, tenant=tenant, via=via, chain=tuple(chain))
    return engine.decide(principal, tool, arguments, now)


@dataclass(frozen=True)
class _One:
    policy: LoadedPolicy

    def get(self, tenant: str) -> LoadedPolicy | None:
        return self.policy if tenant == self.policy.tenant else None
