"""The `cel-python` backend of `policies.cel`: a pure-Python, tree-walking CEL interpreter.

Why the wrapper's strictness matters here: cel-python 0.5 returns its own `BoolType` (an `int`
subclass) for booleans, so `1`, `"true"`, a list or a `bool(5)` (a BoolType whose value is 5)
would all be "truthy" to Python. Only an exact `BoolType` whose integer value is 1, or Python's
own `True`, counts as true; anything else is an ERROR.

Cost: about 100-250 µs for a simple condition and about 450 µs for one with a macro (`exists`)
on the 2-core reference machine (`python -m bench.policy_bench`); about a quarter of that is
typing `cast(Tuple[...])` calls inside cel-python. The variables are bound once per decision
and shared by all of its conditions, instead of once per evaluation as cel-python's
`InterpretedRunner` does. `CompiledRunner` is never used: it crashed in our trials.
cel-python has no type checker: `1 + 's'` compiles, and fails (denies) at every evaluation.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import celpy
import lark
from celpy import celtypes
from celpy.evaluation import Activation, CELEvalError, Evaluator

from policies.cel import (
    CALL_VARIABLES,
    CEL_PYTHON,
    VARIABLES,
    CelCompileError,
    Result,
    Verdict,
    not_boolean,
    unknown_variable,
)

# Type names are identifiers too (`type(x) == int`).
_TYPE_NAMES = frozenset({"bool", "int", "uint", "double", "string", "bytes", "list", "map"})
_TYPE_NAMES |= {"null_type", "type"}
# Macros whose first argument names a variable bound inside the macro.
_BINDING_MACROS = frozenset({"all", "exists", "exists_one", "map", "filter"})


class CelPythonBackend:
    name = CEL_PYTHON

    def __init__(self) -> None:
        # Building the lark parser costs tens of milliseconds: once per process.
        self._env = celpy.Environment()
        # lark's parser object is shared; compiling is rare, so serialise it.
        self._lock = threading.Lock()
        # The base activation (annotations, function table) is the same for every evaluation:
        # built once here instead of once per evaluation as InterpretedRunner does.
        self._base = Activation(annotations=self._env.annotations, package=self._env.package)

    def compile(self, source: str) -> tuple[Any, bool]:
        with self._lock:
            try:
                ast = self._env.compile(source)
            except celpy.CELParseError as exc:
                raise CelCompileError(_parse_reason(exc), exc.line, exc.column) from None
            except Exception as exc:  # lark, or a RecursionError on absurd nesting
                raise CelCompileError(
                    f"not a CEL expression ({type(exc).__name__}: {exc})"
                ) from None
        names = _free_names(ast)
        unknown = sorted(names - VARIABLES - _TYPE_NAMES)
        if unknown:
            raise unknown_variable(unknown[0])
        # Counting macro-bound names too: over-estimating only means waiting for a call.
        every = {str(t) for t in _idents(ast)}
        return ast, not CALL_VARIABLES.isdisjoint(every)

    def prepare_caller(self, caller: Mapping[str, Any]) -> Any:
        return to_cel(caller)

    def activation(
        self, caller: Any, tool: str, args: Mapping[str, Any] | None, now: datetime | None
    ) -> Activation:
        values: dict[str, Any] = {"caller": caller, "tool": celtypes.StringType(tool)}
        if args is not None:
            values["args"] = to_cel(args)
            values["now"] = to_cel(now or datetime.now(UTC))
        return self._base.nested_activation(vars=values)

    def run(self, program: Any, activation: Any) -> Result:
        try:
            value = Evaluator(program, activation).evaluate()
        except CELEvalError as exc:
            return Result(Verdict.ERROR, str(exc.args[0]) if exc.args else "evaluation failed")
        if is_true(value):
            return Result(Verdict.TRUE)
        if is_false(value):
            return Result(Verdict.FALSE)
        return not_boolean(*_describe(value))


def _free_names(ast: lark.Tree) -> set[str]:
    """The top-level identifiers an expression reads, without variables that macros bind.

    A typo (`arg.x`) would otherwise only show at run time, as a denial of every call."""
    bound: set[str] = set()
    for node in ast.find_data("member_dot_arg"):
        method = node.children[1] if len(node.children) > 1 else None
        if isinstance(method, lark.Token) and str(method) in _BINDING_MACROS:
            exprlist = node.children[2] if len(node.children) > 2 else None
            if isinstance(exprlist, lark.Tree) and exprlist.children:
                first = exprlist.children[0]
                if isinstance(first, lark.Tree):
                    bound |= {str(t) for t in _idents(first)}
    return {str(t) for t in _idents(ast)} - bound


def _idents(tree: lark.Tree) -> list[lark.Token]:
    found = []
    for node in tree.iter_subtrees():
        if node.data in ("ident", "dot_ident") and node.children:
            token = node.children[0]
            if isinstance(token, lark.Token):
                found.append(token)
    return found


def _parse_reason(exc: celpy.CELParseError) -> str:
    where = f" at line {exc.line}, column {exc.column}" if exc.line and exc.column else ""
    # cel-python's own message is the source with a caret under it; lark's says what was found.
    cause = exc.__context__
    detail = ""
    if isinstance(cause, lark.exceptions.UnexpectedToken):
        found = cause.token
        detail = "unexpected end" if found.type == "$END" else f"unexpected {str(found)!r}"
    elif isinstance(cause, lark.exceptions.UnexpectedCharacters):
        detail = f"unexpected character {cause.char!r}"
    return f"not valid CEL{where}" + (f": {detail}" if detail else "")


def to_cel(value: Any) -> Any:
    """JSON-typed Python data as cel-python values (numbers as `policies.cel` says)."""
    if value is None:
        return None
    if isinstance(value, bool):
        return celtypes.BoolType(value)
    if isinstance(value, int):
        return celtypes.IntType(value)
    if isinstance(value, float):
        if math.isfinite(value) and value.is_integer() and abs(value) < 2**63:
            return celtypes.IntType(int(value))
        return celtypes.DoubleType(value)
    if isinstance(value, str):
        return celtypes.StringType(value)
    if isinstance(value, Mapping):
        return celtypes.MapType({celtypes.StringType(str(k)): to_cel(v) for k, v in value.items()})
    if isinstance(value, list | tuple):
        return celtypes.ListType([to_cel(v) for v in value])
    if isinstance(value, datetime):
        return celtypes.TimestampType(value if value.tzinfo else value.replace(tzinfo=UTC))
    raise TypeError(f"{type(value).__name__} is not a JSON type")


def is_true(value: Any) -> bool:
    """A real boolean true: Python's `True`, or exactly cel-python's BoolType holding 1."""
    return value is True or (type(value) is celtypes.BoolType and int(value) == 1)


def is_false(value: Any) -> bool:
    return value is False or (type(value) is celtypes.BoolType and int(value) == 0)


_TYPE_OF = {
    celtypes.BoolType: "bool",
    celtypes.IntType: "int",
    celtypes.UintType: "uint",
    celtypes.DoubleType: "double",
    celtypes.StringType: "string",
    celtypes.BytesType: "bytes",
    celtypes.ListType: "list",
    celtypes.MapType: "map",
    celtypes.TimestampType: "timestamp",
    celtypes.DurationType: "duration",
}


def _describe(value: Any) -> tuple[str, str]:
    """(CEL type name, value as text) for the "not a boolean" report."""
    if value is None:
        return "null", ""
    kind = _TYPE_OF.get(type(value), type(value).__name__)
    if kind == "bool":
        return "bool", f"holding {int(value)}"  # a BoolType that is neither 0 nor 1
    if kind in ("int", "uint", "double"):
        return kind, str(value)
    return kind, repr(_plain(value))


def _plain(value: Any) -> Any:
    """cel-python values as plain Python, for messages that read the same for both backends."""
    if isinstance(value, celtypes.BoolType):
        return bool(value)
    if isinstance(value, celtypes.StringType):
        return str(value)
    if isinstance(value, celtypes.ListType):
        return [_plain(v) for v in value]
    if isinstance(value, celtypes.MapType):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, float):
        return float(value)
    if isinstance(value, int):
        return int(value)
    return value
