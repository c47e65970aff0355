"""adapters.python: schemas from signatures, invocation, and load errors."""

from __future__ import annotations

import asyncio
import sys
import threading
import uuid
from pathlib import Path
from typing import Annotated, Any

import pytest
from pydantic import BaseModel, Field

from adapters import adapter_for, known_kinds
from adapters.base import ToolContext, ToolError, ToolLoadError
from adapters.python import ADAPTER, PythonTool
from gateway.config import ToolConfig

# ---------------------------------------------------------------------------------------------
# targets (this module, whatever name pytest imported it under)


class Point(BaseModel):
    x: int
    y: int


def documented(
    count: Annotated[int, Field(description="How many.")],
    label: str = "none",
    *,
    scale: float = 1.0,
    context: ToolContext,
) -> list[Point]:
    """Make points.

    More text.
    """
    context.progress(1, 1, "done")
    return [Point(x=i, y=int(i * scale)) for i in range(count)]


def untyped(value, other=3):  # deliberately without annotations
    return {"value": value, "other": other}


def returns_none(text: str) -> None:
    pass


def returns_dict(text: str) -> dict[str, int]:
    return {text: len(text)}


def returns_model(x: int) -> Point:
    return Point(x=x, y=-x)


def lies(x: int) -> int:
    return "not a number"  # type: ignore[return-value]


def unserialisable() -> Any:
    return object()


_UNSET: Any = object()


def sentinel_default(value: Any = _UNSET) -> bool:
    return value is _UNSET


def odd_names(_private: int, model_config: str = "x") -> str:
    return f"{_private}{model_config}"


def which_thread() -> int:
    return threading.get_ident()


async def async_which_thread() -> int:
    await asyncio.sleep(0)
    return threading.get_ident()


def boom(x: int) -> int:
    raise RuntimeError("boom")


def star_args(*values: int) -> int:
    return sum(values)


def star_kwargs(**values: int) -> int:
    return sum(values.values())


def positional_only(a: int, /) -> int:
    return a


def generator() -> Any:
    yield 1


NOT_CALLABLE = 42


class AsyncCallable:
    """An object with `async def __call__`."""

    async def __call__(self, x: int) -> int:
        return x + 1


ASYNC_CALLABLE = AsyncCallable()


class Holder:
    @staticmethod
    def double(x: int) -> int:
        """Double it."""
        return 2 * x

    @classmethod
    def name(cls) -> str:
        return cls.__name__

    def instance(self) -> int:
        return 1


def config(func: str, **extra: Any) -> ToolConfig:
    return ToolConfig(
        name=func.replace(".", "_"), kind="python", target=f"{__name__}:{func}", **extra
    )


def prepare(func: str, **extra: Any) -> PythonTool:
    return ADAPTER.prepare(config(func, **extra))


def context() -> ToolContext:
    return ToolContext(instance_id="i-1", task_execution_id="t-1", attempt=1)


# ---------------------------------------------------------------------------------------------
# schemas


def test_input_schema_from_signature() -> None:
    spec = prepare("documented").spec
    schema = spec.input_schema
    assert schema["type"] == "object"
    assert schema["additionalProperties"] is False
    assert schema["required"] == ["count"]
    assert schema["properties"]["count"] == {
        "description": "How many.",
        "title": "Count",
        "type": "integer",
    }
    assert schema["properties"]["label"]["default"] == "none"
    assert schema["properties"]["scale"]["type"] == "number"
    assert "context" not in schema["properties"]  # injected, not an argument
    assert spec.description == "Make points.\n\nMore text."
    assert spec.kind == "python" and spec.target.endswith(":documented")


def test_non_object_result_is_wrapped() -> None:
    schema = prepare("documented").spec.output_schema
    assert schema == {
        "type": "object",
        "properties": {"result": {"type": "array", "items": {"$ref": "#/$defs/Point"}}},
        "required": ["result"],
        # Kept at the root, where "#/$defs/..." points.
        "$defs": {
            "Point": {
                "type": "object",
                "title": "Point",
                "properties": {
                    "x": {"title": "X", "type": "integer"},
                    "y": {"title": "Y", "type": "integer"},
                },
                "required": ["x", "y"],
            }
        },
    }


def test_object_results_are_not_wrapped() -> None:
    assert prepare("returns_model").spec.output_schema == Point.model_json_schema(
        mode="serialization"
    )
    assert prepare("returns_dict").spec.output_schema == {
        "type": "object",
        "additionalProperties": {"type": "integer"},
    }


def test_no_output_schema_without_a_return_type() -> None:
    assert prepare("untyped").spec.output_schema is None
    assert prepare("returns_none").spec.output_schema is None
    schema = prepare("untyped").spec.input_schema
    assert schema["required"] == ["value"]
    assert schema["properties"]["other"]["default"] == 3


def test_config_overrides_win() -> None:
    override = {"type": "object", "properties": {"count": {"type": "integer", "minimum": 1}}}
    spec = prepare("documented", description="Mine.", input_schema=override).spec
    assert spec.description == "Mine."
    assert spec.input_schema == override
    assert spec.output_schema is not None  # still derived
    assert spec.timeout_seconds == 60 and spec.task_support == "optional"


def test_any_parameter_name_works() -> None:
    schema = prepare("odd_names").spec.input_schema
    assert list(schema["properties"]) == ["_private", "model_config"]


# ---------------------------------------------------------------------------------------------
# invoke


async def test_sync_call_runs_in_a_worker_thread() -> None:
    result = await prepare("which_thread").invoke({}, context())
    assert result["result"] != threading.get_ident()


async def test_async_call_runs_on_the_loop() -> None:
    result = await prepare("async_which_thread").invoke({}, context())
    assert result == {"result": threading.get_ident()}


async def test_arguments_are_coerced_and_results_serialised() -> None:
    progress: list[tuple[float, float | None, str | None]] = []
    ctx = ToolContext("i-1", "t-1", 2, lambda p, t, m: progress.append((p, t, m)))
    result = await prepare("documented").invoke({"count": "2", "scale": 3}, ctx)
    assert result == {"result": [{"x": 0, "y": 0}, {"x": 1, "y": 3}]}
    assert progress == [(1, 1, "done")]
    assert await prepare("returns_model").invoke({"x": 4}, ctx) == {"x": 4, "y": -4}
    assert await prepare("returns_none").invoke({"text": "t"}, ctx) is None


async def test_function_defaults_apply_to_missing_arguments() -> None:
    tool = prepare("sentinel_default")
    assert await tool.invoke({}, context()) == {"result": True}
    assert await tool.invoke({"value": 1}, context()) == {"result": False}
    assert await prepare("odd_names").invoke({"_private": 1}, context()) == {"result": "1x"}


async def test_invalid_arguments_are_a_tool_error() -> None:
    with pytest.raises(ToolError) as info:
        await prepare("documented").invoke({"count": "many", "colour": 1}, context())
    assert info.value.message == (
        "invalid arguments: count: Input should be a valid integer, unable to parse string as "
        "an integer; colour: Extra inputs are not permitted"
    )
    assert info.value.data == [
        {
            "path": "count",
            "message": "Input should be a valid integer, unable to parse string as an integer",
        },
        {"path": "colour", "message": "Extra inputs are not permitted"},
    ]


async def test_bad_results_are_a_tool_error() -> None:
    with pytest.raises(ToolError, match="does not match its return annotation"):
        await prepare("lies").invoke({"x": 1}, context())
    with pytest.raises(ToolError, match="not JSON data"):
        await prepare("unserialisable").invoke({}, context())


async def test_exceptions_propagate() -> None:
    with pytest.raises(RuntimeError, match="boom"):
        await prepare("boom").invoke({"x": 1}, context())


async def test_static_and_class_methods() -> None:
    tool = prepare("Holder.double")
    assert tool.spec.description == "Double it."
    assert await tool.invoke({"x": 4}, context()) == {"result": 8}
    assert await prepare("Holder.name").invoke({}, context()) == {"result": "Holder"}


async def test_callable_objects() -> None:
    tool = prepare("ASYNC_CALLABLE")
    assert tool.spec.input_schema["required"] == ["x"]
    assert await tool.invoke({"x": 1}, context()) == {"result": 2}


# ---------------------------------------------------------------------------------------------
# load errors


def load_error(target: str) -> str:
    with pytest.raises(ToolLoadError) as info:
        ADAPTER.prepare(ToolConfig(name="t", kind="python", target=target))
    return str(info.value)


def test_load_errors_name_the_target() -> None:
    me = __name__
    assert load_error("no_colon") == (
        "target 'no_colon' is not of the form 'package.module:function' "
        "(or 'package.module:Class.staticmethod')"
    )
    assert load_error("no_such_pkg.mod:f") == (
        "target 'no_such_pkg.mod:f': no module named 'no_such_pkg'"
    )
    assert load_error(f"{me}:nope") == f"target '{me}:nope': '{me}' has no attribute 'nope'"
    assert load_error(f"{me}:Holder.nope") == (
        f"target '{me}:Holder.nope': '{me}.Holder' has no attribute 'nope'"
    )
    assert load_error(f"{me}:NOT_CALLABLE") == (
        f"target '{me}:NOT_CALLABLE' is not callable (it is a int)"
    )
    assert load_error(f"{me}:Holder") == f"target '{me}:Holder' is a class; point it at a function"
    assert "is an instance method" in load_error(f"{me}:Holder.instance")
    assert "is a generator" in load_error(f"{me}:generator")


def test_signatures_that_cannot_be_tools() -> None:
    me = __name__
    assert load_error(f"{me}:star_args") == (
        f"target '{me}:star_args': *values cannot be described by a JSON Schema; give each "
        "argument its own named parameter"
    )
    assert "**values cannot be described" in load_error(f"{me}:star_kwargs")
    assert load_error(f"{me}:positional_only") == (
        f"target '{me}:positional_only': parameter 'a' is positional-only; tool arguments are "
        "passed by name"
    )


def test_broken_modules(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    package = f"broken_{uuid.uuid4().hex[:8]}"
    (tmp_path / package).mkdir()
    (tmp_path / package / "__init__.py").write_text("")
    (tmp_path / package / "needs.py").write_text("import not_installed_xyz\n")
    (tmp_path / package / "raises.py").write_text("raise ValueError('bad setting')\n")
    (tmp_path / package / "hints.py").write_text(
        "from __future__ import annotations\ndef f(x: Missing) -> int:\n    return 1\n"
    )
    (tmp_path / package / "types.py").write_text(
        "import threading\ndef f(lock: threading.Lock) -> int:\n    return 1\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        assert load_error(f"{package}.needs:f") == (
            f"target '{package}.needs:f': importing '{package}.needs' failed: "
            "No module named 'not_installed_xyz'"
        )
        assert load_error(f"{package}.raises:f") == (
            f"target '{package}.raises:f': importing '{package}.raises' raised ValueError: "
            "bad setting"
        )
        assert load_error(f"{package}.hints:f") == (
            f"target '{package}.hints:f': cannot read its signature: name 'Missing' is not defined"
        )
        assert load_error(f"{package}.types:f").startswith(
            f"target '{package}.types:f': its parameters cannot be described as JSON Schema"
        )
    finally:
        for name in [m for m in sys.modules if m == package or m.startswith(package + ".")]:
            del sys.modules[name]


# ---------------------------------------------------------------------------------------------
# kinds


def test_kinds() -> None:
    assert "python" in known_kinds() and "base" not in known_kinds()
    assert adapter_for("python") is ADAPTER
    with pytest.raises(ToolLoadError) as info:
        adapter_for("cobol")
    assert str(info.value) == f"unknown tool kind 'cobol'; known kinds: {', '.join(known_kinds())}"


async def test_example_tools() -> None:
    slow = adapter_for("python").prepare(
        ToolConfig(name="slow_echo", kind="python", target="examples.tools:slow_echo")
    )
    seen: list[float] = []
    ctx = ToolContext("i-1", "t-1", 1, lambda p, t, m: seen.append(p))
    assert await slow.invoke({"text": "hi", "seconds": 0.25}, ctx) == {"result": "hi"}
    assert seen == [pytest.approx(0.1), pytest.approx(0.2), 0.25]
    # Without a listener, progress goes nowhere.
    assert await slow.invoke({"text": "x", "seconds": 0}, ToolContext("i", "t")) == {"result": "x"}

    fail = adapter_for("python").prepare(
        ToolConfig(name="fail", kind="python", target="examples.tools:fail")
    )
    with pytest.raises(ToolError) as info:
        await fail.invoke({"message": "no"}, ctx)
    assert info.value.message == "no" and info.value.data == {"tool": "fail"}
