"""Loading `package.module:attr` targets and checking `options`, for the framework kinds."""

from __future__ import annotations

import importlib
import inspect
import re
from collections.abc import Callable, Mapping
from typing import Any

from adapters.base import ToolLoadError

_DOTTED = r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*"
TARGET_RE = re.compile(rf"(?P<module>{_DOTTED}):(?P<attr>{_DOTTED})")


def import_target(target: str) -> Any:
    """The object named by `package.module:attr[.attr...]`."""
    return import_target_and_owner(target, "'package.module:attribute'")[1]


def import_target_and_owner(target: str, form: str) -> tuple[Any, Any]:
    """(the object holding the last attribute, the object) named by `target`; `form` describes
    the expected shape in the error for a malformed target."""
    match = TARGET_RE.fullmatch(target)
    if match is None:
        raise ToolLoadError(f"target {target!r} is not of the form {form}")
    module_name, attr = match["module"], match["attr"]
    try:
        obj: Any = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        missing = exc.name or ""
        if module_name == missing or module_name.startswith(missing + "."):
            raise ToolLoadError(f"target {target!r}: no module named {missing!r}") from None
        raise ToolLoadError(f"target {target!r}: importing {module_name!r} failed: {exc}") from exc
    except Exception as exc:
        raise ToolLoadError(
            f"target {target!r}: importing {module_name!r} raised {type(exc).__name__}: {exc}"
        ) from exc
    owner: Any = None
    path = module_name
    for part in attr.split("."):
        try:
            owner, obj = obj, getattr(obj, part)
        except AttributeError:
            raise ToolLoadError(f"target {target!r}: {path!r} has no attribute {part!r}") from None
        path = f"{path}.{part}"
    return owner, obj


def object_or_factory(
    target: str, obj: Any, wanted: type | tuple[type, ...], what: str
) -> tuple[Callable[[], Any], Any]:
    """(factory, first object): `factory()` returns a fresh (or the same) `wanted` object, `obj`
    itself when it is one, else what `obj` returns when called; called once now to check it."""
    if isinstance(obj, wanted):
        return (lambda: obj), obj
    if not callable(obj) or inspect.isclass(obj):
        raise ToolLoadError(
            f"target {target!r} is a {type(obj).__name__}, not a {what} or a function returning one"
        )
    try:
        inspect.signature(obj).bind()
    except TypeError:
        raise ToolLoadError(
            f"target {target!r} must be a {what} or a function without arguments returning one"
        ) from None
    except ValueError:
        pass  # no signature to read (a builtin): try it

    def factory() -> Any:
        made = obj()
        if not isinstance(made, wanted):
            raise ToolLoadError(f"target {target!r} returned a {type(made).__name__}, not a {what}")
        return made

    try:
        first = factory()
    except ToolLoadError:
        raise
    except Exception as exc:
        raise ToolLoadError(
            f"target {target!r}: calling it raised {type(exc).__name__}: {exc}"
        ) from exc
    return factory, first


def check_options(
    tool: str, options: Mapping[str, Any], known: Mapping[str, type | tuple[type, ...]]
) -> dict[str, Any]:
    """`options` with each key known and of its type; errors name the tool and the key."""
    checked: dict[str, Any] = {}
    for name, value in options.items():
        if name not in known:
            allowed = ", ".join(sorted(known)) or "none"
            raise ToolLoadError(
                f"tool {tool!r}: unknown option {name!r} (this kind takes: {allowed})"
            )
        kinds = known[name]
        if isinstance(value, bool) and bool not in (
            kinds if isinstance(kinds, tuple) else (kinds,)
        ):
            ok = False
        else:
            ok = isinstance(value, kinds)
        if not ok:
            names = (
                kinds.__name__
                if isinstance(kinds, type)
                else " or ".join(k.__name__ for k in kinds)
            )
            raise ToolLoadError(
                f"tool {tool!r}: option {name!r} must be a {names}, not {type(value).__name__}"
            )
        checked[name] = value
    return checked
