"""CEL conditions of policy files, on cel-python, behind a fail-closed wrapper.

    condition = compile_condition("args.amount <= 100 && 'ops' in caller.groups")  # at load
    bindings = Bindings(caller={...}, tool="pay", args={...}, now=datetime.now(UTC))
    outcome = evaluate(condition, bindings)     # Outcome(verdict=TRUE | FALSE | ERROR, detail)
    outcome.holds                               # True only for a real boolean `true`

Why a wrapper: cel-python 0.5 returns its own `BoolType` (an `int` subclass) for booleans, so
`1`, `"true"`, a list or a `bool(5)` (a BoolType whose value is 5) would all be "truthy" to
Python. Only an exact `BoolType` whose integer value is 1, or Python's own `True`, counts as
true; every other value, and every error (missing key, type mismatch, a crash inside the
library), is an ERROR, which callers turn into a denial with `detail` as the reason.

Variables a condition sees:
    caller  {id, trust_domain, path, via, groups: [names], chain: [ids, outermost first]}
    tool    the tool's name
    args    the call's arguments (JSON types)
    now     the decision time (a CEL timestamp)

Numbers: a JSON number with an integral value (5, or 5.0 as A2A delivers integers) is a CEL
int, any other a CEL double, so one policy means the same through every front door.
cel-python has no mixed int/double equality and refuses `int > double`: compare an argument
with a fractional threshold as `double(args.x) > 9.5`. A mismatch is an error, hence a denial.

Cost: cel-python is a tree-walking interpreter over lark trees: about 100-250 µs for a simple
condition and about 450 µs for one with a macro (`exists`) on the 2-core reference machine
(`python -m bench.policy_bench`); about a quarter of that is typing `cast(Tuple[...])` calls
inside cel-python. The variables are bound once per decision (`Bindings`) and shared by all of
its conditions, instead of once per evaluation as cel-python's `InterpretedRunner` does.
`CompiledRunner` is never used: it crashed in our trials (library notes).
"""

from __future__ import annotations

import difflib
import math
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import Enum
from typing import Any

import celpy
import lark
from celpy import celtypes
from celpy.evaluation import Activation, CELEvalError, Evaluator

# Conditions that mention these can only be evaluated with a call in hand (not at list time).
CALL_VARIABLES = frozenset({"args", "now"})
VARIABLES = frozenset({"caller", "tool"}) | CALL_VARIABLES


class CelCompileError(ValueError):
    """The text is not a CEL expression; `line` and `column` are within the expression."""

    def __init__(self, message: str, line: int | None = None, column: int | None = None) -> None:
        super().__init__(message)
        self.line = line
        self.column = column


@dataclass(frozen=True, eq=False)
class Condition:
    """A compiled expression. `needs_call`: it mentions `args` or `now`."""

    source: str
    ast: lark.Tree
    needs_call: bool


class Verdict(Enum):
    TRUE = "true"
    FALSE = "false"
    ERROR = "error"


@dataclass(frozen=True)
class Outcome:
    verdict: Verdict
    detail: str = ""  # for ERROR: what went wrong, with the expression

    @property
    def holds(self) -> bool:
        """Only a real `true`: what an allow or an approval requirement needs."""
        return self.verdict is Verdict.TRUE

    @property
    def clear(self) -> bool:
        """Only a real `false`: what a deny rule must return for the call to go on."""
        return self.verdict is Verdict.FALSE


# One environment for the process: building the lark parser costs tens of milliseconds.
_environment: celpy.Environment | None = None
_lock = threading.Lock()  # lark's parser object is shared; compiling is rare, so serialise it
_base: Activation | None = None


def _env() -> celpy.Environment:
    global _environment, _base
    if _environment is None:
        _environment = celpy.Environment()
        # The base activation (annotations, function table) is the same for every evaluation:
        # built once here instead of once per evaluation as InterpretedRunner does.
        _base = Activation(annotations=_environment.annotations, package=_environment.package)
    return _environment


def compile_condition(source: str) -> Condition:
    """Parse `source`; raise CelCompileError with a one-line reason if it is not CEL."""
    with _lock:
        env = _env()
        try:
            ast = env.compile(source)
        except celpy.CELParseError as exc:
            raise CelCompileError(_parse_reason(exc), exc.line, exc.column) from None
        except Exception as exc:  # lark, or a RecursionError on absurd nesting
            raise CelCompileError(f"not a CEL expression ({type(exc).__name__}: {exc})") from None
    names = _free_names(ast)
    unknown = sorted(names - VARIABLES - _TYPE_NAMES)
    if unknown:
        close = difflib.get_close_matches(unknown[0], sorted(VARIABLES), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise CelCompileError(
            f"unknown variable {unknown[0]!r}{hint}; a condition sees "
            + ", ".join(sorted(VARIABLES))
        )
    # Counting macro-bound names too: over-estimating only means waiting for a call.
    every = {str(t) for t in _idents(ast)}
    return Condition(source, ast, needs_call=not CALL_VARIABLES.isdisjoint(every))


# Type names are identifiers too (`type(x) == int`).
_TYPE_NAMES = frozenset({"bool", "int", "uint", "double", "string", "bytes", "list", "map"})
_TYPE_NAMES |= {"null_type", "type"}
# Macros whose first argument names a variable bound inside the macro.
_BINDING_MACROS = frozenset({"all", "exists", "exists_one", "map", "filter"})


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
    """JSON-typed Python data as CEL values (numbers as the module docstring says)."""
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


class Bindings:
    """The variables of one decision, converted once and shared by all of its conditions.

    `args` and `now` may be None (list time): then only conditions without `needs_call` may be
    evaluated, and any other is an ERROR."""

    __slots__ = ("_activation", "_caller", "_tool", "_args", "_now")

    def __init__(
        self,
        caller: Any,
        tool: str,
        args: Mapping[str, Any] | None = None,
        now: datetime | None = None,
    ) -> None:
        # `caller` may be a CEL map already (cached per principal by the evaluator).
        self._caller = caller if isinstance(caller, celtypes.MapType) else to_cel(caller)
        self._tool = tool
        self._args = args
        self._now = now
        self._activation: Activation | None = None

    @property
    def has_call(self) -> bool:
        return self._args is not None

    def activation(self) -> Activation:
        if self._activation is None:
            _env()
            assert _base is not None
            values: dict[str, Any] = {
                "caller": self._caller,
                "tool": celtypes.StringType(self._tool),
            }
            if self._args is not None:
                values["args"] = to_cel(self._args)
                values["now"] = to_cel(self._now or datetime.now(UTC))
            self._activation = _base.nested_activation(vars=values)
        return self._activation


def is_true(value: Any) -> bool:
    """A real boolean true: Python's `True`, or exactly cel-python's BoolType holding 1."""
    return value is True or (type(value) is celtypes.BoolType and int(value) == 1)


def is_false(value: Any) -> bool:
    return value is False or (type(value) is celtypes.BoolType and int(value) == 0)


def evaluate(condition: Condition, bindings: Bindings) -> Outcome:
    """Evaluate fail-closed: TRUE or FALSE only for real booleans, ERROR for anything else."""
    if condition.needs_call and not bindings.has_call:
        return _error(condition, "needs the call's arguments or time, which are not known here")
    try:
        value = Evaluator(condition.ast, bindings.activation()).evaluate()
    except CELEvalError as exc:
        return _error(condition, str(exc.args[0]) if exc.args else "evaluation failed")
    except Exception as exc:  # a bug or limit inside cel-python must not let a call through
        return _error(condition, f"{type(exc).__name__}: {exc}")
    if is_true(value):
        return Outcome(Verdict.TRUE)
    if is_false(value):
        return Outcome(Verdict.FALSE)
    return _error(condition, f"returned {_describe(value)}, not a boolean")


def _error(condition: Condition, reason: str) -> Outcome:
    return Outcome(Verdict.ERROR, f"`{condition.source}`: {reason}")


def _describe(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
