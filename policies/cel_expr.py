"""The `cel-expr-python` backend of `policies.cel`: Google's C++ CEL runtime.

Why the wrapper's strictness matters here: this library does not raise on a runtime error, it
returns a value of type ERROR (a missing key, a division by zero, no matching overload, an
integer beyond int64 in the arguments), and that value is truthy to Python like any object.
Only a result whose CEL type is BOOL and whose value is Python's `True` holds; an ERROR (or
UNKNOWN) result is reported with the library's message, anything else as "not a boolean".

Compiling type-checks against the declared variables (`caller`, `args` dynamic; `tool` a
string; `now` a timestamp), so more mistakes are refused at load than with cel-python: an
unknown variable or function, `1 + 's'`, `bool(5)`. Whether a condition needs the call (reads
`args` or `now`) is decided by compiling it once more where only `caller` and `tool` exist.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Mapping
from datetime import datetime
from typing import Any

from cel_expr_python import cel

from policies.cel import (
    CEL_EXPR_PYTHON,
    VARIABLES,
    CelCompileError,
    Result,
    Verdict,
    not_boolean,
    plain_json,
    unknown_variable,
)

# "INVALID_ARGUMENT: ERROR: <input>:1:9: Syntax error: mismatched input ..." (first of several)
_ERROR_RE = re.compile(r"ERROR: <input>:(\d+):(\d+): ([^\n]*)")
_UNDECLARED_RE = re.compile(r"undeclared reference to '([^']*)'")
_STATUS_RE = re.compile(r"^[A-Z][A-Z_]+: ")


class CelExprBackend:
    name = CEL_EXPR_PYTHON

    def __init__(self) -> None:
        self._env = cel.NewEnv(
            variables={
                "caller": cel.Type.DYN,
                "tool": cel.Type.STRING,
                "args": cel.Type.DYN,
                "now": cel.Type.TIMESTAMP,
            }
        )
        # What exists at list time: a condition that compiles here does not need the call.
        self._caller_only = cel.NewEnv(variables={"caller": cel.Type.DYN, "tool": cel.Type.STRING})
        self._lock = threading.Lock()  # compiling is rare (loads); keep it single-file

    def compile(self, source: str) -> tuple[Any, bool]:
        with self._lock:
            try:
                program = self._env.compile(source)
            except Exception as exc:  # the library raises RuntimeError with its status text
                raise _compile_error(source, str(exc)) from None
            try:
                self._caller_only.compile(source)
                needs_call = False
            except Exception:  # `args` or `now` is undeclared there
                needs_call = True
        return program, needs_call

    def prepare_caller(self, caller: Mapping[str, Any]) -> Any:
        # The library converts Python data when the activation is built (about 2 µs).
        return plain_json(caller)

    def activation(
        self, caller: Any, tool: str, args: Mapping[str, Any] | None, now: datetime | None
    ) -> Any:
        data: dict[str, Any] = {"caller": caller, "tool": tool}
        if args is not None:
            data["args"] = plain_json(args)
            if now is not None:
                data["now"] = plain_json(now)
        return self._env.Activation(data)

    def run(self, program: Any, activation: Any) -> Result:
        value = program.eval(activation)
        kind = value.type()
        if kind == cel.Type.BOOL:
            raw = value.value()
            if raw is True:
                return Result(Verdict.TRUE)
            if raw is False:
                return Result(Verdict.FALSE)
            return not_boolean("bool", repr(raw))
        if kind == cel.Type.ERROR:
            # An error is a value here, not an exception: the heart of the fail-closed rule.
            return Result(Verdict.ERROR, _strip_status(str(value.value())))
        if kind == cel.Type.UNKNOWN:
            return Result(Verdict.ERROR, "depends on a value that is not known here")
        return not_boolean(_type_name(kind), _text(value))


def _compile_error(source: str, message: str) -> CelCompileError:
    found = _ERROR_RE.search(message)
    if found is None:
        return CelCompileError(f"not a CEL expression ({_strip_status(message)})")
    line, column, text = int(found[1]), int(found[2]), found[3].strip()
    where = f"at line {line}, column {column}"
    if text.startswith("Syntax error: "):
        return CelCompileError(f"not valid CEL {where}: {_syntax(text)}", line, column)
    undeclared = _UNDECLARED_RE.search(text)
    if undeclared:
        name = undeclared[1].split(".")[0]
        # The library points at the call's "(" for an unknown function or method.
        offset = _offset(source, line, column)
        if offset is not None and source[offset : offset + 1] == "(":
            return CelCompileError(f"unknown function {name!r} {where}", line, column)
        if name not in VARIABLES:
            error = unknown_variable(name)
            error.line, error.column = line, column
            return error
    return CelCompileError(f"does not type-check {where}: {text}", line, column)


def _syntax(text: str) -> str:
    text = text.removeprefix("Syntax error: ")
    if text.startswith("mismatched input '<EOF>'"):
        return "unexpected end"
    for prefix in ("mismatched input ", "extraneous input "):
        if text.startswith(prefix):
            return "unexpected " + text[len(prefix) :].split(" expecting", 1)[0]
    if text.startswith("token recognition error at: "):
        found = text[len("token recognition error at: ") :].strip("'")
        return f"unexpected character {found[:1]!r}"
    return text


def _offset(source: str, line: int, column: int) -> int | None:
    lines = source.split("\n")
    if not 1 <= line <= len(lines):
        return None
    return sum(len(x) + 1 for x in lines[: line - 1]) + column - 1


def _strip_status(message: str) -> str:
    # "INVALID_ARGUMENT: divide by zero" -> "divide by zero"; the code adds nothing for a reader.
    return _STATUS_RE.sub("", message, count=1)


def _type_name(kind: Any) -> str:
    name = str(kind.name())
    return name.split("<", 1)[0].lower()


def _text(value: Any) -> str:
    try:
        plain = value.plain_value()
    except Exception:  # an exotic value: its type is enough for the report
        return ""
    if plain is None:
        return ""
    return repr(plain) if not isinstance(plain, bool) else str(plain).lower()
