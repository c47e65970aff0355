"""CEL conditions of policy files, behind one fail-closed wrapper over two CEL libraries.

    condition = compile_condition("args.amount <= 100 && 'ops' in caller.groups")  # at load
    bindings = Bindings(caller={...}, tool="pay", args={...}, now=datetime.now(UTC))
    outcome = evaluate(condition, bindings)     # Outcome(verdict=TRUE | FALSE | ERROR, detail)
    outcome.holds                               # True only for a real boolean `true`

Two backends evaluate the same conditions (`policies.cel_expr`, `policies.cel_python`):
- `cel-expr-python` (the default): Google's C++ CEL runtime. About 25 µs for a decision of
  six conditions, and its type checker refuses at load what can never evaluate (`1 + 's'`,
  `bool(5)`, an unknown function). It returns runtime errors as *values* (truthy to Python).
- `cel-python`: a pure-Python interpreter, about 1 ms for the same decision. It returns its own
  `BoolType` (an `int` subclass) for booleans, and refuses to compare an int with a double.
Pick one with `policy.cel` in gateway.yaml or the `DURAGATE_CEL_BACKEND` environment variable
(the setting wins); `default_backend()` says which is in force.

Whatever the backend, the wrapper holds the same line: only a real boolean `true` holds, only
a real `false` is clear, and everything else (an error value, an exception, a crash inside the
library, an int, a string, a list, a missing field, a value beyond int64) is an ERROR, which
callers turn into a denial with `detail` (the expression and what went wrong) as the reason.

Variables a condition sees:
    caller  {id, trust_domain, path, via, groups: [names], chain: [ids, outermost first]}
    tool    the tool's name
    args    the call's arguments (JSON types)
    now     the decision time (a CEL timestamp)

Numbers: a JSON number with an integral value (5, or 5.0 as A2A delivers integers) is a CEL
int, any other a CEL double, so one policy means the same through every front door. Where the
backends differ: `cel-expr-python` follows today's CEL spec and compares int with double by
value (`args.n > 4.5` works for n = 5); `cel-python` refuses the mix (an error, hence a
denial). Write `double(args.x) > 9.5` and a policy means the same under both.
"""

from __future__ import annotations

import difflib
import math
import os
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import Enum
from typing import Any, Protocol

# Conditions that mention these can only be evaluated with a call in hand (not at list time).
CALL_VARIABLES = frozenset({"args", "now"})
VARIABLES = frozenset({"caller", "tool"}) | CALL_VARIABLES

BACKEND_ENV = "DURAGATE_CEL_BACKEND"
CEL_EXPR_PYTHON = "cel-expr-python"
CEL_PYTHON = "cel-python"
BACKENDS = (CEL_EXPR_PYTHON, CEL_PYTHON)
# The C++ runtime passes every table of tests/policies (both backends run them) and is about
# forty times faster: the default.
DEFAULT_BACKEND = CEL_EXPR_PYTHON


class CelCompileError(ValueError):
    """The text is not a usable CEL condition; `line` and `column` are within the expression."""

    def __init__(self, message: str, line: int | None = None, column: int | None = None) -> None:
        super().__init__(message)
        self.line = line
        self.column = column


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


@dataclass(frozen=True)
class Result:
    """What a backend made of one evaluation: `detail` says why when `verdict` is ERROR."""

    verdict: Verdict
    detail: str = ""


class CelBackend(Protocol):
    """One CEL library. `compile` raises CelCompileError; `run` may raise anything (the
    wrapper turns it into an ERROR) and must return TRUE/FALSE only for real booleans."""

    name: str

    def compile(self, source: str) -> tuple[Any, bool]:
        """(program, needs_call): `needs_call` when the expression reads `args` or `now`."""

    def prepare_caller(self, caller: Mapping[str, Any]) -> Any:
        """The `caller` variable in the backend's own form (kept per principal by callers)."""

    def activation(
        self, caller: Any, tool: str, args: Mapping[str, Any] | None, now: datetime | None
    ) -> Any:
        """The variables of one decision, shared by all of its conditions."""

    def run(self, program: Any, activation: Any) -> Result: ...


@dataclass(frozen=True, eq=False)
class Condition:
    """A compiled expression. `needs_call`: it mentions `args` or `now`."""

    source: str
    program: Any
    needs_call: bool
    backend: CelBackend = field(repr=False)


_backends: dict[str, CelBackend] = {}
_backends_lock = threading.Lock()


def default_backend() -> str:
    """The backend named by DURAGATE_CEL_BACKEND, or DEFAULT_BACKEND."""
    name = os.environ.get(BACKEND_ENV)
    if not name:
        return DEFAULT_BACKEND
    try:
        return check_backend_name(name)
    except ValueError as exc:
        raise ValueError(f"{BACKEND_ENV}: {exc}") from None


def check_backend_name(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"{name!r} is not a CEL backend; use one of: {', '.join(BACKENDS)}")
    return name


def get_backend(backend: CelBackend | str | None = None) -> CelBackend:
    """A backend by name (None: `default_backend()`); one instance per name and process."""
    if backend is not None and not isinstance(backend, str):
        return backend
    name = check_backend_name(backend) if backend else default_backend()
    with _backends_lock:
        found = _backends.get(name)
        if found is None:
            # Imported on first use: each library costs tens of milliseconds to load.
            if name == CEL_EXPR_PYTHON:
                from policies.cel_expr import CelExprBackend

                found = CelExprBackend()
            else:
                from policies.cel_python import CelPythonBackend

                found = CelPythonBackend()
            _backends[name] = found
        return found


def compile_condition(source: str, backend: CelBackend | str | None = None) -> Condition:
    """Compile `source`; raise CelCompileError with a one-line reason if it is not usable."""
    chosen = get_backend(backend)
    program, needs_call = chosen.compile(source)
    return Condition(source, program, needs_call, chosen)


def unknown_variable(name: str) -> CelCompileError:
    """The error both backends give for a name that is not a variable (typos included)."""
    close = difflib.get_close_matches(name, sorted(VARIABLES), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return CelCompileError(
        f"unknown variable {name!r}{hint}; a condition sees " + ", ".join(sorted(VARIABLES))
    )


@dataclass(frozen=True)
class PreparedCaller:
    """The `caller` variable converted once by one backend (the evaluator keeps these per
    principal); `facts` is the plain form, for any other backend."""

    backend: str
    facts: Mapping[str, Any]
    value: Any


def prepare_caller(backend: CelBackend, facts: Mapping[str, Any]) -> PreparedCaller:
    return PreparedCaller(backend.name, facts, backend.prepare_caller(facts))


class Bindings:
    """The variables of one decision, converted once per backend and shared by all of its
    conditions.

    `args` and `now` may be None (list time): then only conditions without `needs_call` may be
    evaluated, and any other is an ERROR."""

    __slots__ = ("_activations", "_caller", "_tool", "_args", "_now")

    def __init__(
        self,
        caller: Mapping[str, Any] | PreparedCaller,
        tool: str,
        args: Mapping[str, Any] | None = None,
        now: datetime | None = None,
    ) -> None:
        self._caller = caller
        self._tool = tool
        self._args = args
        self._now = (now or datetime.now(UTC)) if args is not None else None
        self._activations: dict[str, Any] = {}

    @property
    def has_call(self) -> bool:
        return self._args is not None

    def activation(self, backend: CelBackend) -> Any:
        found = self._activations.get(backend.name)
        if found is None:
            caller = self._caller
            if isinstance(caller, PreparedCaller):
                value = (
                    caller.value
                    if caller.backend == backend.name
                    else backend.prepare_caller(caller.facts)
                )
            else:
                value = backend.prepare_caller(caller)
            found = backend.activation(value, self._tool, self._args, self._now)
            self._activations[backend.name] = found
        return found


def evaluate(condition: Condition, bindings: Bindings) -> Outcome:
    """Evaluate fail-closed: TRUE or FALSE only for real booleans, ERROR for anything else."""
    if condition.needs_call and not bindings.has_call:
        return _error(condition, "needs the call's arguments or time, which are not known here")
    try:
        result = condition.backend.run(condition.program, bindings.activation(condition.backend))
    except Exception as exc:  # a bug or limit inside the library must not let a call through
        return _error(condition, f"{type(exc).__name__}: {exc}")
    if type(result) is not Result:  # a backend bug is no permission either
        return _error(condition, f"the CEL backend returned {type(result).__name__}")
    if result.verdict is Verdict.TRUE:
        return _TRUE
    if result.verdict is Verdict.FALSE:
        return _FALSE
    return _error(condition, result.detail or "evaluation failed")


_TRUE = Outcome(Verdict.TRUE)
_FALSE = Outcome(Verdict.FALSE)


def _error(condition: Condition, reason: str) -> Outcome:
    return Outcome(Verdict.ERROR, f"`{condition.source}`: {reason}")


def plain_json(value: Any) -> Any:
    """JSON-typed Python data with the numbers of the module docstring: an integral float
    within int64 becomes an int. Raises TypeError for anything that is not JSON (or a
    datetime, for `now`)."""
    if value is None or isinstance(value, bool | str):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        if math.isfinite(value) and value.is_integer() and abs(value) < 2**63:
            return int(value)
        return value
    if isinstance(value, Mapping):
        return {str(k): plain_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain_json(v) for v in value]
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    raise TypeError(f"{type(value).__name__} is not a JSON type")


def not_boolean(type_name: str, text: str) -> Result:
    """The ERROR for a value that is not a boolean, worded the same by both backends."""
    shown = text if len(text) <= 80 else text[:77] + "..."
    what = f"{type_name} {shown}" if shown else type_name
    return Result(Verdict.ERROR, f"returned {what}, not a boolean")
