"""The `python` tool kind: a plain Python function as a tool.

    - name: add
      kind: python
      target: examples.tools:add          # package.module:function, or module:Class.staticmethod

Schemas come from the signature, through pydantic:
- input: one property per parameter; parameters without a default are required; a description
  given as `Annotated[int, Field(description=...)]` is kept; unknown arguments are refused
  (`additionalProperties: false`). `*args`, `**kwargs` and positional-only parameters are
  refused at load time: arguments arrive by name, as a JSON object.
- a parameter annotated `ToolContext` (by convention `context`) is not an argument: the call's
  context is passed in, so the tool can report progress or key checkpoints on the execution id.
- output: from the return annotation. MCP requires `outputSchema` to describe an object, so a
  return type that is not an object (`float`, `list[str]`, `X | None`, ...) is wrapped:
  the schema becomes `{"type": "object", "properties": {"result": <schema>}, "required":
  ["result"]}` and the tool returns `{"result": value}`. Models, TypedDicts and dicts are
  returned as they are. No return annotation, or `-> None`: no output schema.

Sync functions run in a worker thread (`asyncio.to_thread`, the loop's default executor) so a
slow one does not stall the gateway; async functions are awaited on the loop and must not block.
String annotations (`from __future__ import annotations`) are resolved in the function's module,
so `ToolContext` must be imported there at run time, not only under `TYPE_CHECKING`.
"""

from __future__ import annotations

import asyncio
import inspect
import types
import typing
import warnings
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, create_model
from pydantic.json_schema import PydanticJsonSchemaWarning
from pydantic_core import PydanticSerializationError, to_jsonable_python

from adapters._targets import import_target_and_owner
from adapters.base import ToolContext, ToolError, ToolLoadError, ToolSpec
from gateway.config import ToolConfig

_EMPTY = inspect.Parameter.empty


class PythonAdapter:
    kind = "python"

    def prepare(self, config: ToolConfig) -> PythonTool:
        return PythonTool(config, resolve_target(config.target))


ADAPTER = PythonAdapter()


def resolve_target(target: str) -> typing.Callable[..., Any]:
    """Import `package.module:function` (or `:Class.method`) and return the callable."""
    owner, obj = import_target_and_owner(
        target, "'package.module:function' (or 'package.module:Class.staticmethod')"
    )
    if inspect.isclass(obj):
        raise ToolLoadError(f"target {target!r} is a class; point it at a function")
    if not callable(obj):
        raise ToolLoadError(f"target {target!r} is not callable (it is a {type(obj).__name__})")
    if inspect.isclass(owner):
        # On a class, only static and class methods can be called without an instance.
        raw = inspect.getattr_static(owner, target.rpartition(":")[2].rsplit(".", 1)[-1])
        if not isinstance(raw, staticmethod | classmethod):
            raise ToolLoadError(
                f"target {target!r} is an instance method; make it a @staticmethod or a "
                "module-level function"
            )
    if inspect.isgeneratorfunction(obj) or inspect.isasyncgenfunction(obj):
        raise ToolLoadError(f"target {target!r} is a generator; a tool returns one value")
    return typing.cast(typing.Callable[..., Any], obj)


def _is_context(annotation: Any) -> bool:
    """`ToolContext`, possibly `Annotated` or `| None`."""
    while typing.get_origin(annotation) is Annotated:
        annotation = typing.get_args(annotation)[0]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        members = [a for a in typing.get_args(annotation) if a is not type(None)]
        return members == [ToolContext]
    return annotation is ToolContext


def _wrap_result_schema(schema: dict[str, Any]) -> dict[str, Any]:
    defs = schema.pop("$defs", None)  # references stay "#/$defs/...": keep them at the root
    wrapped: dict[str, Any] = {
        "type": "object",
        "properties": {"result": schema},
        "required": ["result"],
    }
    if defs:
        wrapped["$defs"] = defs
    return wrapped


class PythonTool:
    """A loaded Python function with its argument model and result serialiser."""

    def __init__(self, config: ToolConfig, func: typing.Callable[..., Any]) -> None:
        target = config.target
        self._func = func
        self._is_async = inspect.iscoroutinefunction(func) or inspect.iscoroutinefunction(
            type(func).__call__  # an object with `async def __call__`
        )
        try:
            # eval_str: resolve `from __future__ import annotations` strings in the target's module.
            signature = inspect.signature(func, eval_str=True)
        except (NameError, TypeError, ValueError, SyntaxError) as exc:
            raise ToolLoadError(f"target {target!r}: cannot read its signature: {exc}") from exc

        # Fields get neutral names (p0, p1, ...) with the parameter's name as alias, so any
        # parameter name works, even `_x` or `model_config`, which pydantic reserves.
        fields: dict[str, Any] = {}
        self._arguments: list[tuple[str, str]] = []  # (field name, parameter name)
        self._context_params: list[str] = []
        for index, param in enumerate(signature.parameters.values()):
            if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
                star = "*" if param.kind is param.VAR_POSITIONAL else "**"
                raise ToolLoadError(
                    f"target {target!r}: {star}{param.name} cannot be described by a JSON "
                    "Schema; give each argument its own named parameter"
                )
            if param.kind is param.POSITIONAL_ONLY:
                raise ToolLoadError(
                    f"target {target!r}: parameter {param.name!r} is positional-only; tool "
                    "arguments are passed by name"
                )
            if _is_context(param.annotation):
                self._context_params.append(param.name)
                continue
            annotation = Any if param.annotation is _EMPTY else param.annotation
            default = ... if param.default is _EMPTY else param.default
            field = f"p{index}"
            fields[field] = (annotation, Field(default, alias=param.name))
            self._arguments.append((field, param.name))

        try:
            self._model: type[BaseModel] = create_model(
                f"{config.name}_arguments", __config__=ConfigDict(extra="forbid"), **fields
            )
            with warnings.catch_warnings():
                # A default that is not JSON (a sentinel object) is left out of the schema, which
                # is right: the function's own default applies. No need to warn at every start.
                warnings.simplefilter("ignore", PydanticJsonSchemaWarning)
                input_schema = self._model.model_json_schema()
        except Exception as exc:  # pydantic cannot describe one of the parameter types
            raise ToolLoadError(
                f"target {target!r}: its parameters cannot be described as JSON Schema: {exc}"
            ) from exc

        returns = signature.return_annotation
        self._result: TypeAdapter[Any] | None = None
        self._wrapped = False
        output_schema: dict[str, Any] | None = None
        if returns is not _EMPTY and returns is not None and returns is not type(None):
            try:
                self._result = TypeAdapter(returns)
                output_schema = self._result.json_schema(mode="serialization")
            except Exception as exc:
                raise ToolLoadError(
                    f"target {target!r}: its return type cannot be described as JSON Schema: {exc}"
                ) from exc
            if output_schema.get("type") != "object":
                output_schema = _wrap_result_schema(output_schema)
                self._wrapped = True

        self._spec = ToolSpec.from_config(
            config,
            description=inspect.getdoc(func),
            input_schema=input_schema,
            output_schema=output_schema,
        )

    @property
    def spec(self) -> ToolSpec:
        return self._spec

    async def invoke(self, arguments: dict[str, Any], context: ToolContext) -> Any:
        try:
            parsed = self._model.model_validate(arguments)
        except ValidationError as exc:
            problems = [
                {"path": ".".join(str(p) for p in e["loc"]) or "(root)", "message": e["msg"]}
                for e in exc.errors()
            ]
            text = "; ".join(f"{p['path']}: {p['message']}" for p in problems)
            raise ToolError(f"invalid arguments: {text}", data=problems) from None

        # Pass only what the caller sent, so the function's own defaults apply to the rest.
        given = parsed.model_fields_set
        kwargs = {name: getattr(parsed, field) for field, name in self._arguments if field in given}
        for name in self._context_params:
            kwargs[name] = context

        if self._is_async:
            result = await self._func(**kwargs)
        else:
            result = await asyncio.to_thread(self._func, **kwargs)
            if inspect.isawaitable(result):
                result = await result
        return self._serialise(result)

    def _serialise(self, result: Any) -> Any:
        target = self._spec.target
        if self._result is None:
            try:
                return to_jsonable_python(result)
            except PydanticSerializationError as exc:
                raise ToolError(f"{target} returned a value that is not JSON data: {exc}") from None
        try:
            value = self._result.dump_python(self._result.validate_python(result), mode="json")
        except ValidationError as exc:
            raise ToolError(
                f"{target} returned a value that does not match its return annotation: {exc}"
            ) from None
        except PydanticSerializationError as exc:
            raise ToolError(f"{target} returned a value that is not JSON data: {exc}") from None
        return {"result": value} if self._wrapped else value
