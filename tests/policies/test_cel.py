"""policies.cel: compiling at load, and the fail-closed wrapper: only a real `true` holds."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest
from celpy import celtypes
from celpy.evaluation import Evaluator

from policies.cel import (
    Bindings,
    CelCompileError,
    Outcome,
    Verdict,
    compile_condition,
    evaluate,
    is_true,
    to_cel,
)

CALLER = {
    "id": "spiffe://acme.test/people/alice",
    "trust_domain": "acme.test",
    "path": "/people/alice",
    "via": "mtls",
    "groups": ["ops"],
    "chain": ["spiffe://acme.test/agents/planner"],
}
NOW = datetime(2026, 1, 5, 10, 30, tzinfo=UTC)


def run(source: str, args: dict[str, Any] | None = None, tool: str = "pay") -> Outcome:
    bindings = Bindings(CALLER, tool, {} if args is None else args, NOW)
    return evaluate(compile_condition(source), bindings)


@pytest.mark.parametrize(
    ("source", "args", "verdict"),
    [
        ("true", {}, Verdict.TRUE),
        ("false", {}, Verdict.FALSE),
        ("args.amount <= 100", {"amount": 100}, Verdict.TRUE),
        ("args.amount <= 100", {"amount": 101}, Verdict.FALSE),
        ("'ops' in caller.groups && caller.trust_domain == 'acme.test'", {}, Verdict.TRUE),
        ("caller.path.startsWith('/people/') && caller.via == 'mtls'", {}, Verdict.TRUE),
        ("size(caller.chain) == 1 && caller.chain[0].endsWith('/planner')", {}, Verdict.TRUE),
        ("tool == 'pay'", {}, Verdict.TRUE),
        ("now > timestamp('2026-01-05T10:00:00Z')", {}, Verdict.TRUE),
        ("now.getHours() >= 17", {}, Verdict.FALSE),
        (
            "args.items.exists(i, i.price > 10)",
            {"items": [{"price": 5}, {"price": 20}]},
            Verdict.TRUE,
        ),
        ("has(args.note)", {}, Verdict.FALSE),
        # CEL's commutative || and &&: an error on one side is absorbed by a decisive other side.
        ("args.missing || true", {}, Verdict.TRUE),
        ("args.missing && false", {}, Verdict.FALSE),
    ],
)
def test_real_booleans(source: str, args: dict[str, Any], verdict: Verdict) -> None:
    outcome = run(source, args)
    assert outcome.verdict is verdict, outcome.detail
    assert outcome.holds is (verdict is Verdict.TRUE)


@pytest.mark.parametrize(
    ("source", "args", "reason"),
    [
        # Not booleans: truthy to Python, and still never a permission.
        ("1", {}, "returned IntType(1), not a boolean"),
        ("'true'", {}, "returned StringType('true'), not a boolean"),
        ("args.flag", {"flag": "yes"}, "not a boolean"),
        ("[true]", {}, "not a boolean"),
        ("{'a': true}", {}, "not a boolean"),
        ("null", {}, "returned None, not a boolean"),
        ("0", {}, "not a boolean"),
        ("args.amount", {"amount": 1}, "not a boolean"),
        # A BoolType whose value is 5: `True` to Python, not a canonical CEL true.
        ("bool(5)", {}, "not a boolean"),
        # Errors of every kind.
        ("args.amount > 1", {}, "no such member in mapping: 'amount'"),
        ("args.amount + 's' == 'x'", {"amount": 1}, "no matching overload"),
        ("1 / args.zero == 1", {"zero": 0}, "divide by zero"),
        ("args.items[3] == 1", {"items": [1]}, "invalid_argument"),
        ("args.amount > 1.5", {"amount": 2}, "no matching overload"),
        ("args.missing || false", {}, "no such member"),
    ],
)
def test_everything_else_is_an_error(source: str, args: dict[str, Any], reason: str) -> None:
    outcome = run(source, args)
    assert outcome.verdict is Verdict.ERROR
    assert not outcome.holds and not outcome.clear
    # The report names the expression and the reason.
    assert f"`{source}`" in outcome.detail
    assert reason in outcome.detail


def test_is_true_checks_the_exact_type_and_value() -> None:
    assert is_true(True) and is_true(celtypes.BoolType(True))
    for value in (
        1,
        celtypes.IntType(1),
        celtypes.UintType(1),
        celtypes.BoolType(5),
        celtypes.StringType("true"),
        "true",
        celtypes.DoubleType(1.0),
        False,
        celtypes.BoolType(False),
        None,
    ):
        assert not is_true(value), repr(value)

    class Sneaky(celtypes.BoolType):
        pass

    assert not is_true(Sneaky(True))


def test_a_crash_inside_the_library_denies(monkeypatch: pytest.MonkeyPatch) -> None:
    condition = compile_condition("true")

    def explode(self: Evaluator, context: Any = None) -> Any:
        raise RuntimeError("internal failure")

    monkeypatch.setattr(Evaluator, "evaluate", explode)
    outcome = evaluate(condition, Bindings(CALLER, "pay", {}, NOW))
    assert outcome.verdict is Verdict.ERROR
    assert "RuntimeError: internal failure" in outcome.detail


def test_recursion_inside_the_library_denies(monkeypatch: pytest.MonkeyPatch) -> None:
    def recurse(self: Evaluator, context: Any = None) -> Any:
        raise RecursionError("maximum recursion depth exceeded")

    monkeypatch.setattr(Evaluator, "evaluate", recurse)
    assert run("true").verdict is Verdict.ERROR


def test_arguments_that_are_not_json_deny() -> None:
    outcome = run("true", {"odd": {1, 2}})
    assert outcome.verdict is Verdict.ERROR
    assert "not a JSON type" in outcome.detail


def test_call_conditions_cannot_be_evaluated_without_a_call() -> None:
    condition = compile_condition("args.amount > 1")
    assert condition.needs_call
    outcome = evaluate(condition, Bindings(CALLER, "pay"))
    assert outcome.verdict is Verdict.ERROR
    assert "not known here" in outcome.detail
    caller_only = compile_condition("'ops' in caller.groups && tool == 'pay'")
    assert not caller_only.needs_call
    assert evaluate(caller_only, Bindings(CALLER, "pay")).holds


@pytest.mark.parametrize(
    ("source", "needs_call"),
    [
        ("caller.id == 'x'", False),
        ("tool.startsWith('db.')", False),
        ("caller.chain.exists(c, c.endsWith('/planner'))", False),
        ("args.x == 1", True),
        ("now > timestamp('2026-01-01T00:00:00Z')", True),
        ("caller.groups.exists(args, args == 'ops')", True),  # over-estimated: harmless
    ],
)
def test_which_conditions_need_the_call(source: str, needs_call: bool) -> None:
    assert compile_condition(source).needs_call is needs_call


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("args.a >", "not valid CEL at line 1, column 8: unexpected end"),
        ("a ==== b", "not valid CEL at line 1, column 5: unexpected '=='"),
        ('"open', "unexpected character"),
        ("args.a &&\n  ||", "at line 2, column 3"),
        ("arg.amount > 1", "unknown variable 'arg' (did you mean 'args'?)"),
        ("user.id == 'x'", "unknown variable 'user'"),
    ],
)
def test_compile_errors(source: str, message: str) -> None:
    with pytest.raises(CelCompileError) as info:
        compile_condition(source)
    assert message in str(info.value)


def test_macro_variables_and_type_names_are_not_unknown() -> None:
    compile_condition("args.items.all(item, item.qty > 0) && type(args.n) == int")
    compile_condition("args.tags.map(t, t + '!').filter(u, u != '').size() > 0")


@pytest.mark.parametrize(
    ("source", "args", "verdict"),
    [
        # Integral numbers are ints whichever way the JSON spelt them (A2A sends 5 as 5.0).
        ("args.n == 5", {"n": 5}, Verdict.TRUE),
        ("args.n == 5", {"n": 5.0}, Verdict.TRUE),
        ("args.n > 4", {"n": 4.5}, Verdict.TRUE),
        ("double(args.n) > 4.5", {"n": 5}, Verdict.TRUE),
        ("double(args.n) > 4.5", {"n": 4.75}, Verdict.TRUE),
        ("args.n == 5", {"n": 5.5}, Verdict.ERROR),  # no mixed equality in cel-python
        ("args.big == 10000000000000000000.0", {"big": 1e19}, Verdict.TRUE),  # beyond int64
        ("args.flag", {"flag": True}, Verdict.TRUE),
        ("args.v == null", {"v": None}, Verdict.TRUE),
    ],
)
def test_numbers_and_json_types(source: str, args: dict[str, Any], verdict: Verdict) -> None:
    assert run(source, args).verdict is verdict


def test_to_cel_types() -> None:
    assert type(to_cel(True)) is celtypes.BoolType
    assert type(to_cel(3)) is celtypes.IntType
    assert type(to_cel(3.0)) is celtypes.IntType
    assert type(to_cel(3.5)) is celtypes.DoubleType
    assert type(to_cel(float("nan"))) is celtypes.DoubleType
    assert type(to_cel("x")) is celtypes.StringType
    assert type(to_cel({"a": [1]})) is celtypes.MapType
    assert type(to_cel(NOW)) is celtypes.TimestampType
    with pytest.raises(TypeError):
        to_cel(object())


def test_bindings_are_built_once_and_shared() -> None:
    bindings = Bindings(CALLER, "pay", {"amount": 5}, NOW)
    assert bindings.activation() is bindings.activation()
    first = compile_condition("args.amount == 5")
    second = compile_condition("caller.id.endsWith('alice')")
    assert evaluate(first, bindings).holds and evaluate(second, bindings).holds
