"""policies.cel: compiling at load, and the fail-closed wrapper: only a real `true` holds.

Every table runs against both backends (the `cel` fixture). Where the two libraries differ on
purpose (the C++ one type-checks at load, and compares int with double by value), a case says
what each backend does; a failure reason is a regular expression covering both wordings."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from datetime import UTC, datetime
from typing import Any

import pytest
from celpy import celtypes
from celpy.evaluation import Evaluator

from policies.cel import (
    BACKEND_ENV,
    CEL_EXPR_PYTHON,
    CEL_PYTHON,
    Bindings,
    CelBackend,
    CelCompileError,
    Condition,
    Outcome,
    Result,
    Verdict,
    compile_condition,
    default_backend,
    evaluate,
    get_backend,
)
from policies.cel_python import is_true, to_cel

CALLER = {
    "id": "spiffe://acme.test/people/alice",
    "trust_domain": "acme.test",
    "path": "/people/alice",
    "via": "mtls",
    "groups": ["ops"],
    "chain": ["spiffe://acme.test/agents/planner"],
}
NOW = datetime(2026, 1, 5, 10, 30, tzinfo=UTC)
# A compile-time refusal: stronger than an evaluation error (the file never loads).
REFUSED = "refused at load"


def run(cel: CelBackend, source: str, args: dict[str, Any] | None = None) -> Outcome:
    bindings = Bindings(CALLER, "pay", {} if args is None else args, NOW)
    return evaluate(compile_condition(source, cel), bindings)


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
        ("1 / args.zero == 1 || true", {"zero": 0}, Verdict.TRUE),
        # String operations on non-ASCII text count characters, not bytes.
        ("size(args.s) == 5 && args.s.contains('é')", {"s": "héllo"}, Verdict.TRUE),
        ("args.s.matches('^h.llo$')", {"s": "héllo"}, Verdict.TRUE),
        ("args.s + '!' == 'héllo!'", {"s": "héllo"}, Verdict.TRUE),
        ("args.flag", {"flag": True}, Verdict.TRUE),
        ("args.flags[1]", {"flags": [True, False]}, Verdict.FALSE),
    ],
)
def test_real_booleans(
    cel: CelBackend, source: str, args: dict[str, Any], verdict: Verdict
) -> None:
    outcome = run(cel, source, args)
    assert outcome.verdict is verdict, outcome.detail
    assert outcome.holds is (verdict is Verdict.TRUE)


# (source, args, reason pattern, or a dict of backend -> pattern or REFUSED)
NOT_TRUE: list[tuple[str, dict[str, Any], str | dict[str, str]]] = [
    # Not booleans: truthy to Python, and still never a permission.
    ("1", {}, "returned int 1, not a boolean"),
    ("'true'", {}, "returned string 'true', not a boolean"),
    ("args.flag", {"flag": "yes"}, "returned string 'yes', not a boolean"),
    ("[true]", {}, r"returned list \[True\], not a boolean"),
    ("{'a': true}", {}, r"returned map \{'a': True\}, not a boolean"),
    ("null", {}, "returned null, not a boolean"),
    ("0", {}, "returned int 0, not a boolean"),
    ("args.amount", {"amount": 1}, "returned int 1, not a boolean"),
    ("args.ratio", {"ratio": 0.5}, "returned double 0.5, not a boolean"),
    ("args.when", {"when": "2026-01-01"}, "not a boolean"),
    ("now", {}, "returned timestamp .*, not a boolean"),
    # A BoolType whose value is 5 in cel-python: `True` to Python, not a canonical CEL true.
    ("bool(5)", {}, {CEL_PYTHON: "returned bool holding 5", CEL_EXPR_PYTHON: REFUSED}),
    # Errors of every kind. Missing fields:
    ("args.amount > 1", {}, r"no such member in mapping: 'amount'|Key not found in map.*amount"),
    ("args.missing || false", {}, "no such member|Key not found"),
    ("args.a.b.c == 1", {"a": {}}, "no such member|Key not found"),
    ("caller.nope == 'x'", {}, "no such member|Key not found"),
    # Division by zero, integer overflow, bad index, bad conversions:
    ("1 / args.zero == 1", {"zero": 0}, "divide by zero"),
    ("args.n % 0 == 1", {"n": 3}, "divide by zero|modulus"),
    ("args.n + 1 > 0", {"n": 2**63 - 1}, "overflow"),
    ("-9223372036854775807 - 2 < 0", {}, "overflow"),
    ("args.items[3] == 1", {"items": [1]}, "invalid_argument|[Ii]ndex"),
    ("int(args.s) == 1", {"s": "abc"}, "overflow|cannot convert"),
    # Type mismatches:
    ("args.amount + 's' == 'x'", {"amount": 1}, "no matching overload|No matching overloads"),
    ("args.s > 1", {"s": "x"}, "no matching overload|No matching overloads"),
    (
        "args.s.startsWith(1)",
        {"s": "x"},
        {CEL_PYTHON: "no such overload", CEL_EXPR_PYTHON: REFUSED},
    ),
    ("1 + 's' == 'x'", {}, {CEL_PYTHON: "no matching overload", CEL_EXPR_PYTHON: REFUSED}),
    ("args.tags.exists(t, t > 1)", {"tags": ["a"]}, "no matching overload|No matching overloads"),
    # Huge integers in the arguments: beyond int64, every condition on the call denies.
    ("args.n > 1", {"n": 2**70}, "overflow|out of range"),
    ("args.other == 1", {"n": 2**70, "other": 1}, "overflow|out of range"),
    ("args.n < 1", {"n": -(2**64)}, "overflow|out of range"),
    # A bad regular expression is an error, not a no-match.
    ("args.s.matches('[')", {"s": "x"}, "match error|invalid regular expression"),
    # Arguments that are not JSON at all.
    ("true", {"odd": {1, 2}}, "set is not a JSON type"),
]


@pytest.mark.parametrize(("source", "args", "reason"), NOT_TRUE)
def test_everything_else_is_an_error(
    cel: CelBackend, source: str, args: dict[str, Any], reason: str | dict[str, str]
) -> None:
    expected = reason[cel.name] if isinstance(reason, dict) else reason
    if expected == REFUSED:
        with pytest.raises(CelCompileError, match="does not type-check at line 1"):
            compile_condition(source, cel)
        return
    outcome = run(cel, source, args)
    assert outcome.verdict is Verdict.ERROR, outcome
    assert not outcome.holds and not outcome.clear
    # The report names the expression and the reason.
    assert outcome.detail.startswith(f"`{source}`: ")
    assert re.search(expected, outcome.detail), outcome.detail


def test_cel_python_is_true_checks_the_exact_type_and_value() -> None:
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


def test_a_crash_inside_cel_python_denies(monkeypatch: pytest.MonkeyPatch) -> None:
    condition = compile_condition("true", CEL_PYTHON)

    def explode(self: Evaluator, context: Any = None) -> Any:
        raise RuntimeError("internal failure")

    monkeypatch.setattr(Evaluator, "evaluate", explode)
    outcome = evaluate(condition, Bindings(CALLER, "pay", {}, NOW))
    assert outcome.verdict is Verdict.ERROR
    assert "RuntimeError: internal failure" in outcome.detail
    monkeypatch.setattr(Evaluator, "evaluate", lambda self, context=None: _raise(RecursionError()))
    assert evaluate(condition, Bindings(CALLER, "pay", {}, NOW)).verdict is Verdict.ERROR


def _raise(exc: BaseException) -> Any:
    raise exc


class _Program:
    """Stands in for a compiled C++ expression (its type cannot be patched)."""

    def __init__(self, result: Any) -> None:
        self.result = result

    def eval(self, activation: Any) -> Any:
        if isinstance(self.result, BaseException):
            raise self.result
        return self.result


class _Truthy:
    """What a runtime error looks like from Python: an object, hence truthy."""

    def __init__(self, kind: Any, value: Any) -> None:
        self.kind, self.raw = kind, value

    def type(self) -> Any:
        return self.kind

    def value(self) -> Any:
        return self.raw

    def plain_value(self) -> Any:
        return self.raw


def test_cel_expr_python_results_other_than_a_real_bool_deny() -> None:
    from cel_expr_python import cel as cx

    backend = get_backend(CEL_EXPR_PYTHON)
    bindings = Bindings(CALLER, "pay", {}, NOW)
    cases = [
        (RuntimeError("internal failure"), "RuntimeError: internal failure"),
        (_Truthy(cx.Type.ERROR, "INVALID_ARGUMENT: boom"), "`x`: boom"),
        (_Truthy(cx.Type.UNKNOWN, None), "not known here"),
        (_Truthy(cx.Type.BOOL, 1), "not a boolean"),  # a 1 that claims to be a bool
        (_Truthy(cx.Type.BOOL, "true"), "not a boolean"),
        (_Truthy(cx.Type.INT, 1), "returned int 1"),
    ]
    for result, reason in cases:
        condition = Condition("x", _Program(result), False, backend)
        outcome = evaluate(condition, bindings)
        assert outcome.verdict is Verdict.ERROR, (result, outcome)
        assert reason in outcome.detail
    real = evaluate(Condition("x", _Program(_Truthy(cx.Type.BOOL, True)), False, backend), bindings)
    assert real.holds


def test_a_backend_that_misbehaves_denies(cel: CelBackend, monkeypatch: pytest.MonkeyPatch) -> None:
    condition = compile_condition("true", cel)
    monkeypatch.setattr(cel, "run", lambda program, activation: True)  # not a Result
    assert evaluate(condition, Bindings(CALLER, "pay", {}, NOW)).verdict is Verdict.ERROR
    monkeypatch.setattr(cel, "run", lambda program, activation: _raise(MemoryError()))
    assert evaluate(condition, Bindings(CALLER, "pay", {}, NOW)).verdict is Verdict.ERROR
    monkeypatch.setattr(cel, "run", lambda program, activation: Result(Verdict.TRUE))
    assert evaluate(condition, Bindings(CALLER, "pay", {}, NOW)).holds


def test_call_conditions_cannot_be_evaluated_without_a_call(cel: CelBackend) -> None:
    condition = compile_condition("args.amount > 1", cel)
    assert condition.needs_call
    outcome = evaluate(condition, Bindings(CALLER, "pay"))
    assert outcome.verdict is Verdict.ERROR
    assert "not known here" in outcome.detail
    caller_only = compile_condition("'ops' in caller.groups && tool == 'pay'", cel)
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
        # A macro variable named like a call variable: cel-python over-estimates (harmless,
        # the condition waits for the call); the C++ checker knows better.
        (
            "caller.groups.exists(args, args == 'ops')",
            {CEL_PYTHON: True, CEL_EXPR_PYTHON: False},
        ),
    ],
)
def test_which_conditions_need_the_call(
    cel: CelBackend, source: str, needs_call: bool | dict[str, bool]
) -> None:
    expected = needs_call[cel.name] if isinstance(needs_call, dict) else needs_call
    assert compile_condition(source, cel).needs_call is expected


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("args.a >", r"not valid CEL at line 1, column [89]: unexpected end"),
        ("a ==== b", "not valid CEL at line 1, column 5: unexpected '=='"),
        ('"open', "unexpected character '\"'|unexpected character"),
        ("args.a &&\n  ||", "at line 2, column 3"),
        ("arg.amount > 1", r"unknown variable 'arg' \(did you mean 'args'\?\)"),
        ("user.id == 'x'", "unknown variable 'user'"),
        ("args.a > 1 && nows > 1", r"unknown variable 'nows' \(did you mean 'now'\?\)"),
    ],
)
def test_compile_errors(cel: CelBackend, source: str, message: str) -> None:
    with pytest.raises(CelCompileError) as info:
        compile_condition(source, cel)
    assert re.search(message, str(info.value)), str(info.value)


def test_cel_expr_python_refuses_more_at_load() -> None:
    for source, message in [
        ("args.s.lowerAscii() == 'a'", "unknown function 'lowerAscii' at line 1, column 18"),
        ("size([1]) == 1.0", "does not type-check at line 1, column 11"),
        ("args.n < 99999999999999999999", "invalid int literal"),
    ]:
        with pytest.raises(CelCompileError, match=re.escape(message)) as info:
            compile_condition(source, CEL_EXPR_PYTHON)
        assert info.value.line == 1 and info.value.column


def test_macro_variables_and_type_names_are_not_unknown(cel: CelBackend) -> None:
    compile_condition("args.items.all(item, item.qty > 0) && type(args.n) == int", cel)
    compile_condition("args.tags.map(t, t + '!').filter(u, u != '').size() > 0", cel)


@pytest.mark.parametrize(
    ("source", "args", "verdict"),
    [
        # Integral numbers are ints whichever way the JSON spelt them (A2A sends 5 as 5.0).
        ("args.n == 5", {"n": 5}, Verdict.TRUE),
        ("args.n == 5", {"n": 5.0}, Verdict.TRUE),
        ("type(args.n) == int", {"n": 5.0}, Verdict.TRUE),
        ("type(args.n) == double", {"n": 5.5}, Verdict.TRUE),
        ("args.n > 4", {"n": 4.5}, {CEL_PYTHON: Verdict.TRUE, CEL_EXPR_PYTHON: Verdict.TRUE}),
        ("double(args.n) > 4.5", {"n": 5}, Verdict.TRUE),
        ("double(args.n) > 4.5", {"n": 4.75}, Verdict.TRUE),
        # int against double: cel-python refuses the mix (a denial); the C++ runtime compares
        # by value as today's CEL spec says.
        ("args.n == 5", {"n": 5.5}, {CEL_PYTHON: Verdict.ERROR, CEL_EXPR_PYTHON: Verdict.FALSE}),
        ("args.n > 1.5", {"n": 2}, {CEL_PYTHON: Verdict.ERROR, CEL_EXPR_PYTHON: Verdict.TRUE}),
        ("args.big == 10000000000000000000.0", {"big": 1e19}, Verdict.TRUE),  # beyond int64
        ("args.flag", {"flag": True}, Verdict.TRUE),
        ("args.v == null", {"v": None}, Verdict.TRUE),
        ("args.x / 0.0 > 1.0", {"x": 1.5}, Verdict.TRUE),  # IEEE: +inf, not an error
    ],
)
def test_numbers_and_json_types(
    cel: CelBackend, source: str, args: dict[str, Any], verdict: Verdict | dict[str, Verdict]
) -> None:
    expected = verdict[cel.name] if isinstance(verdict, dict) else verdict
    outcome = run(cel, source, args)
    assert outcome.verdict is expected, outcome.detail


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


def test_bindings_are_built_once_and_shared(cel: CelBackend) -> None:
    bindings = Bindings(CALLER, "pay", {"amount": 5}, NOW)
    assert bindings.activation(cel) is bindings.activation(cel)
    first = compile_condition("args.amount == 5", cel)
    second = compile_condition("caller.id.endsWith('alice')", cel)
    assert evaluate(first, bindings).holds and evaluate(second, bindings).holds


def test_the_default_backend_and_its_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(BACKEND_ENV, raising=False)
    assert default_backend() == CEL_EXPR_PYTHON
    assert compile_condition("true").backend.name == CEL_EXPR_PYTHON
    monkeypatch.setenv(BACKEND_ENV, CEL_PYTHON)
    assert compile_condition("true").backend.name == CEL_PYTHON
    monkeypatch.setenv(BACKEND_ENV, "cel-go")
    with pytest.raises(ValueError, match="'cel-go' is not a CEL backend; use one of"):
        compile_condition("true")


def test_policy_check_names_a_bad_backend(tmp_path: Any) -> None:
    env = {**os.environ, BACKEND_ENV: "nope"}
    (tmp_path / "a.yaml").write_text("tenant: a\nmembers: [spiffe://a.test/**]\n")
    done = subprocess.run(
        [sys.executable, "-m", "gateway", "policy", "check", str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert done.returncode != 0
    assert "'nope' is not a CEL backend" in done.stdout + done.stderr
