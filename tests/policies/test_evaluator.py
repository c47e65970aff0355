"""policies.evaluator: decisions (table-driven), list filtering, approvers, the dispatch seam."""

from __future__ import annotations

import textwrap
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from gateway.config import ConfigError
from gateway.dispatch import Dispatcher, DispatchError
from identity.principal import Principal
from policies.cel import CelBackend
from policies.evaluator import Decision, PolicyEngine, explain
from policies.loader import PolicyStore

POLICY = """\
tenant: acme
members:
  - spiffe://acme.test/**
groups:
  ops: [spiffe://acme.test/people/ops/*]
  agents: [spiffe://acme.test/agents/**]
  approvers: [spiffe://acme.test/people/boss, spiffe://acme.test/people/ops/*]
tools:
  "*":
    deny:
      - when: "caller.path.startsWith('/quarantine/')"
        reason: quarantined callers may call nothing
    obligations: {timeout_seconds: 30, audit: standard}
  open:
    call: [group:members]
  guarded:
    call: [group:members]
    when: "args.amount <= 100"
    deny:
      - when: "args.currency == 'XXX'"
        reason: no test currency
  pay:
    call: [group:members]
    deny:
      - when: "args.amount > 10000"
        reason: too much
    approval:
      when: "args.amount > 1000"
      approvers: [group:approvers]
      expires_seconds: 600
    obligations: {timeout_seconds: 5, rate: {calls: 10, per_seconds: 60}}
  broken_when:
    call: [group:members]
    when: "args.limit > 0"
  returns_int:
    call: [group:members]
    when: "1"
  returns_string:
    call: [group:members]
    when: "'true'"
  ops_only:
    call: [group:ops]
  "report_*":
    call: [group:agents, group:ops]
    obligations: {audit: full, timeout_seconds: 120}
  report_secret:
    call: [group:ops]
    obligations: {redact: [result.secret]}
  hours:
    call: [group:members]
    when: "now.getHours() >= 9 && now.getHours() < 17"
  no_delegation:
    call: [group:members]
    deny:
      - when: "size(caller.chain) > 0"
        reason: call this yourself
  frozen:
    call: [group:members]
    deny:
      - reason: frozen for the audit
  unlisted:
    list: []
    call: [group:members]
  ops_listed:
    list: [group:members]
    call: [group:ops]
  agents_when:
    call: [group:members]
    when: "'agents' in caller.groups"
  review:
    call: [group:members]
    approval:
      when: "size(args.reviewers) < 2"
      approvers: [group:approvers]
  self_approved:
    call: [group:members]
    approval:
      approvers: [group:members]
      allow_self: true
"""

ALICE = "spiffe://acme.test/people/alice"
OLGA = "spiffe://acme.test/people/ops/olga"
BOSS = "spiffe://acme.test/people/boss"
BOT = "spiffe://acme.test/agents/bot"
QUARANTINED = "spiffe://acme.test/quarantine/q"
STRANGER = "spiffe://evil.test/people/alice"
NOON = datetime(2026, 1, 5, 12, 0, tzinfo=UTC)


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory, cel: CelBackend) -> PolicyStore:
    """The policy under each CEL backend in turn (tests/policies/conftest.py)."""
    directory = tmp_path_factory.mktemp("policies")
    (directory / "acme.yaml").write_text(POLICY)
    return PolicyStore.open(directory, cel=cel)


@pytest.fixture(scope="module")
def engine(store: PolicyStore) -> PolicyEngine:
    return PolicyEngine(store)


def who(spiffe_id: str, *chain: str, tenant: str = "acme") -> Principal:
    return Principal(id=spiffe_id, tenant=tenant, via="mtls", chain=tuple(chain))


@dataclass(frozen=True)
class Case:
    name: str
    principal: Principal
    tool: str
    args: dict[str, Any]
    effect: str
    rule: str
    reason: str | tuple[str, ...] = ""  # a part of the reason (one of them, for a tuple)
    now: datetime = NOON


CASES = [
    Case("allow", who(ALICE), "open", {}, "allow", "acme.yaml:tools[open].call", "allowed"),
    Case(
        "deny rule",
        who(ALICE),
        "pay",
        {"amount": 20000},
        "deny",
        "acme.yaml:tools[pay].deny[0]",
        "too much",
    ),
    Case(
        "deny over allow",
        who(ALICE),
        "guarded",
        {"amount": 5, "currency": "XXX"},
        "deny",
        "acme.yaml:tools[guarded].deny[0]",
        "no test currency",
    ),
    Case(
        "condition on arguments: true",
        who(ALICE),
        "guarded",
        {"amount": 100, "currency": "EUR"},
        "allow",
        "acme.yaml:tools[guarded].when",
    ),
    Case(
        "condition on arguments: false",
        who(ALICE),
        "guarded",
        {"amount": 101, "currency": "EUR"},
        "deny",
        "acme.yaml:tools[guarded].when",
        "the condition `args.amount <= 100` is false",
    ),
    Case(
        "approval over allow",
        who(ALICE),
        "pay",
        {"amount": 5000},
        "approve",
        "acme.yaml:tools[pay].approval",
        "approval",
    ),
    Case(
        "no approval below the threshold",
        who(ALICE),
        "pay",
        {"amount": 50},
        "allow",
        "acme.yaml:tools[pay].call",
    ),
    Case(
        "deny over approval",
        who(ALICE),
        "pay",
        {"amount": 50000},
        "deny",
        "acme.yaml:tools[pay].deny[0]",
        "too much",
    ),
    Case(
        "a condition that errors denies",
        who(ALICE),
        "broken_when",
        {},
        "deny",
        "acme.yaml:tools[broken_when].when",
        (
            "could not be evaluated, which denies: `args.limit > 0`: "
            "no such member in mapping: 'limit'",
            "could not be evaluated, which denies: `args.limit > 0`: "
            'Key not found in map : "limit"',
        ),
    ),
    Case(
        "a deny rule that errors denies",
        who(ALICE),
        "pay",
        {"amount": "lots"},
        "deny",
        "acme.yaml:tools[pay].deny[0]",
        (
            "`args.amount > 10000`: found no matching overload",
            "`args.amount > 10000`: No matching overloads found",
        ),
    ),
    Case(
        "an approval rule that errors denies",
        who(ALICE),
        "review",
        {},
        "deny",
        "acme.yaml:tools[review].approval",
        ("`size(args.reviewers) < 2`: no such member", "`size(args.reviewers) < 2`: Key not found"),
    ),
    Case(
        "an int is not true",
        who(ALICE),
        "returns_int",
        {},
        "deny",
        "acme.yaml:tools[returns_int].when",
        "returned int 1, not a boolean",
    ),
    Case(
        "a string is not true",
        who(ALICE),
        "returns_string",
        {},
        "deny",
        "acme.yaml:tools[returns_string].when",
        "returned string 'true', not a boolean",
    ),
    Case(
        "unknown tool",
        who(ALICE),
        "nope",
        {},
        "deny",
        "acme.yaml:default-deny",
        f"{ALICE} may not call 'nope'",
    ),
    Case("tool pattern", who(BOT), "report_daily", {}, "allow", "acme.yaml:tools[report_*].call"),
    Case(
        "tool pattern, not for this caller",
        who(ALICE),
        "report_daily",
        {},
        "deny",
        "acme.yaml:default-deny",
    ),
    Case(
        "exact rule and pattern both grant",
        who(OLGA),
        "report_secret",
        {},
        "allow",
        "acme.yaml:tools[report_secret].call",
    ),
    Case(
        "exact rule narrows nothing",
        who(BOT),
        "report_secret",
        {},
        "allow",
        "acme.yaml:tools[report_*].call",
    ),
    Case(
        "non-member",
        who(STRANGER),
        "open",
        {},
        "deny",
        "acme.yaml:members",
        f"{STRANGER} is not a member of tenant 'acme'",
    ),
    Case(
        "not a SPIFFE ID",
        who("alice"),
        "open",
        {},
        "deny",
        "acme.yaml:members",
        "is not a SPIFFE ID",
    ),
    Case(
        "tenant without policy",
        who(ALICE, tenant="beta"),
        "open",
        {},
        "deny",
        "tenant",
        "'beta' has no policy",
    ),
    Case(
        "cycle",
        who(BOT, ALICE, BOT),
        "open",
        {},
        "deny",
        "chain",
        f"the call chain has a cycle: {BOT} appears twice",
    ),
    Case(
        "cycle before membership",
        who(STRANGER, STRANGER),
        "open",
        {},
        "deny",
        "chain",
        "cycle",
    ),
    Case(
        "too deep",
        who(BOT, *(f"spiffe://acme.test/agents/a{i}" for i in range(5))),
        "open",
        {},
        "deny",
        "chain",
        "the call chain has 6 callers; at most 5 allowed",
    ),
    Case(
        "deep but within the limit",
        who(BOT, *(f"spiffe://acme.test/agents/a{i}" for i in range(4))),
        "open",
        {},
        "allow",
        "acme.yaml:tools[open].call",
    ),
    Case("group reference", who(OLGA), "ops_only", {}, "allow", "acme.yaml:tools[ops_only].call"),
    Case(
        "group reference, not in it", who(ALICE), "ops_only", {}, "deny", "acme.yaml:default-deny"
    ),
    Case(
        "caller condition on groups",
        who(BOT),
        "agents_when",
        {},
        "allow",
        "acme.yaml:tools[agents_when].when",
    ),
    Case(
        "a pattern rule's deny applies to every tool",
        who(QUARANTINED),
        "open",
        {},
        "deny",
        "acme.yaml:tools[*].deny[0]",
        "quarantined",
    ),
    Case("condition on the time", who(ALICE), "hours", {}, "allow", "acme.yaml:tools[hours].when"),
    Case(
        "condition on the time, after hours",
        who(ALICE),
        "hours",
        {},
        "deny",
        "acme.yaml:tools[hours].when",
        "is false",
        now=datetime(2026, 1, 5, 20, tzinfo=UTC),
    ),
    Case(
        "condition on the chain",
        who(BOT, ALICE),
        "no_delegation",
        {},
        "deny",
        "acme.yaml:tools[no_delegation].deny[0]",
        "call this yourself",
    ),
    Case(
        "unconditional deny",
        who(ALICE),
        "frozen",
        {},
        "deny",
        "acme.yaml:tools[frozen].deny[0]",
        "frozen",
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_decisions(engine: PolicyEngine, case: Case) -> None:
    decision = engine.decide(case.principal, case.tool, case.args, now=case.now)
    assert (decision.effect, decision.rule) == (case.effect, case.rule), decision.reason
    reasons = (case.reason,) if isinstance(case.reason, str) else case.reason
    assert any(r in decision.reason for r in reasons), decision.reason
    if decision.effect == "deny":
        assert decision.obligations == {}


def test_obligations_most_specific_rule_first(engine: PolicyEngine) -> None:
    pay = engine.decide(who(ALICE), "pay", {"amount": 1}, now=NOON)
    assert pay.obligations == {
        "timeout_seconds": 5.0,  # the tool's own rule beats "*"
        "rate": {"calls": 10, "per_seconds": 60.0},
        "audit": "standard",  # from "*"
    }
    secret = engine.decide(who(OLGA), "report_secret", {}, now=NOON)
    assert secret.obligations == {
        "redact": ["result.secret"],
        "audit": "full",  # report_* beats *: more literal characters
        "timeout_seconds": 120.0,
    }


def test_approval_obligation(engine: PolicyEngine) -> None:
    decision = engine.decide(who(ALICE), "pay", {"amount": 5000}, now=NOON)
    assert decision.obligations["approval"] == {
        "expires_seconds": 600.0,
        "approvers": [BOSS, "spiffe://acme.test/people/ops/*"],
        "allow_self": False,
        "rule": "acme.yaml:tools[pay].approval",
    }
    assert decision.obligations["timeout_seconds"] == 5.0
    assert decision.allowed


def test_check_call_is_the_dispatch_seam(engine: PolicyEngine) -> None:
    assert engine.check_call(who(ALICE), "open", {}) == {
        "timeout_seconds": 30.0,
        "audit": "standard",
        "decision": {"effect": "allow", "rule": "acme.yaml:tools[open].call", "reason": "allowed"},
    }
    obligations = engine.check_call(who(ALICE), "pay", {"amount": 5000})
    assert obligations is not None and obligations["approval"]["expires_seconds"] == 600.0
    with pytest.raises(DispatchError) as info:
        engine.check_call(who(ALICE), "pay", {"amount": 50000})
    assert info.value.code == "denied"
    assert info.value.message == "too much"
    assert info.value.data == {"rule": "acme.yaml:tools[pay].deny[0]"}
    assert info.value.audit == {"level": "standard"}  # for the audit log, not the caller
    with pytest.raises(DispatchError) as info:
        engine.check_call(who(ALICE), "report_secret", {})  # not hers to call
    assert info.value.audit == {"level": "full", "redact": ["result.secret"]}


@pytest.mark.parametrize(
    ("principal", "tool", "visible"),
    [
        (who(ALICE), "open", True),
        (who(ALICE), "nope", False),  # default deny: invisible
        (who(ALICE), "ops_only", False),
        (who(OLGA), "ops_only", True),
        (who(ALICE), "pay", True),  # conditions on args are left for call time
        (who(ALICE), "guarded", True),
        (who(ALICE), "hours", True),  # conditions on `now` too
        (who(ALICE), "unlisted", False),  # `list: []`: callable but never shown
        (who(ALICE), "ops_listed", True),  # an explicit `list` wider than `call`
        (who(ALICE), "frozen", False),  # an unconditional deny hides it
        (who(QUARANTINED), "open", False),  # a caller-only deny that holds hides it
        (who(ALICE), "agents_when", False),  # a caller-only `when` that is false hides it
        (who(BOT), "agents_when", True),
        (who(BOT, ALICE), "no_delegation", False),
        (who(ALICE), "no_delegation", True),
        (who(STRANGER), "open", False),
        (who(ALICE, tenant="beta"), "open", False),
        (who(BOT, ALICE, BOT), "open", False),
        (who(BOT), "report_weekly", True),
        (who(ALICE), "report_weekly", False),
    ],
)
def test_may_list(engine: PolicyEngine, principal: Principal, tool: str, visible: bool) -> None:
    assert engine.may_list(principal, tool) is visible


def test_list_filtering_through_the_dispatcher(engine: PolicyEngine) -> None:
    @dataclass
    class Spec:
        name: str

    class Registry:
        def get(self, name: str) -> Any:
            return None

        def specs(self) -> list[Any]:
            return [Spec(n) for n in ("open", "ops_only", "pay", "unnamed", "report_daily")]

        def validate_arguments(self, name: str, arguments: dict[str, Any]) -> None:
            pass

    dispatcher = Dispatcher(registry=Registry(), runtime=None, policy=engine)  # type: ignore[arg-type]
    assert [s.name for s in dispatcher.tools_for(who(ALICE))] == ["open", "pay"]
    assert [s.name for s in dispatcher.tools_for(who(OLGA))] == [
        "open",
        "ops_only",
        "pay",
        "report_daily",
    ]


@pytest.mark.parametrize(
    ("approver", "tool", "caller", "may"),
    [
        (who(BOSS), "pay", who(ALICE), True),
        (who(OLGA), "pay", who(ALICE), True),
        (who(ALICE), "pay", who(BOT), False),  # not named by the rule
        (who(BOSS), "open", who(ALICE), False),  # the tool has no approval rule
        (who(OLGA), "pay", who(OLGA), False),  # four eyes: not one's own call
        (who(ALICE), "self_approved", who(ALICE), True),  # unless the rule allows it
        (who(BOSS, tenant="beta"), "pay", who(ALICE), False),  # another tenant
        (who(STRANGER), "pay", who(ALICE), False),
        (who(BOSS, BOT, BOSS), "pay", who(ALICE), False),  # a cycle in the approver's chain
    ],
)
def test_may_approve(
    engine: PolicyEngine, approver: Principal, tool: str, caller: Principal, may: bool
) -> None:
    assert engine.may_approve(approver, tool, caller.to_json()) is may


def test_the_chain_limit_is_configurable(store: PolicyStore) -> None:
    strict = PolicyEngine(store, max_chain_depth=1)
    assert strict.decide(who(ALICE), "open", {}).effect == "allow"
    decision = strict.decide(who(ALICE, BOT), "open", {})
    assert (decision.effect, decision.rule) == ("deny", "chain")
    with pytest.raises(ValueError):
        PolicyEngine(store, max_chain_depth=0)


def test_a_reload_changes_decisions(tmp_path: Path, cel: CelBackend) -> None:
    path = tmp_path / "acme.yaml"
    path.write_text(POLICY)
    store = PolicyStore.open(tmp_path, cel=cel)
    engine = PolicyEngine(store)
    assert engine.decide(who(BOT), "agents_when", {}).effect == "allow"  # memoised per policy
    assert engine.may_list(who(BOT), "agents_when")
    path.write_text(POLICY.replace("'agents' in caller.groups", "'ops' in caller.groups"))
    store.refresh()
    assert engine.decide(who(BOT), "agents_when", {}).effect == "deny"
    assert not engine.may_list(who(BOT), "agents_when")
    path.unlink()
    store.refresh()
    decision = engine.decide(who(BOT), "open", {})
    assert (decision.effect, decision.rule) == ("deny", "tenant")


def test_a_policy_with_no_rule_for_the_tool(tmp_path: Path) -> None:
    (tmp_path / "beta.yaml").write_text("tenant: beta\nmembers: [spiffe://beta.test/**]\n")
    engine = PolicyEngine(PolicyStore.open(tmp_path))
    decision = engine.decide(who("spiffe://beta.test/x", tenant="beta"), "open", {})
    assert decision == Decision(
        "deny", "beta.yaml:default-deny", "no rule of tenant 'beta' names tool 'open'"
    )


def test_explain(tmp_path: Path, cel: CelBackend) -> None:
    (tmp_path / "acme.yaml").write_text(textwrap.dedent(POLICY))
    decision = explain(
        tmp_path, tenant="acme", caller=ALICE, tool="pay", arguments={"amount": 5000}, cel=cel
    )
    assert (decision.effect, decision.rule) == ("approve", "acme.yaml:tools[pay].approval")
    assert decision.to_json()["obligations"]["approval"]["expires_seconds"] == 600.0
    by_file = explain(
        tmp_path / "acme.yaml",
        tenant="acme",
        caller=BOT,
        tool="open",
        arguments={},
        chain=(ALICE,),
    )
    assert by_file.effect == "allow"
    with pytest.raises(ConfigError):
        explain(tmp_path, tenant="beta", caller=ALICE, tool="open", arguments={})
    with pytest.raises(ValueError):
        explain(tmp_path, tenant="../etc", caller=ALICE, tool="open", arguments={})
