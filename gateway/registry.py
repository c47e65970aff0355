"""The tool registry: every configured tool, loaded, with a cached argument validator.

A registry is built whole from a config and never changed: a config reload builds a new one
and swaps it in, so a call sees one consistent set of tools. Building it loads every target;
if any tool cannot be loaded the whole build fails (the gateway must not half-start).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from jsonschema.exceptions import ValidationError

from adapters import adapter_for
from adapters.base import PreparedTool, ToolLoadError, ToolSpec
from gateway.config import ConfigError, GatewayConfig, format_location, schema_validator_class


@dataclass(frozen=True)
class ArgumentProblem:
    """One reason the arguments do not fit the schema. `path` is like `items[0].name`, or
    `(root)` for the arguments object itself."""

    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}"


class ArgumentsError(ValueError):
    """Arguments that do not validate against the tool's input schema (MCP: invalid params)."""

    def __init__(self, errors: list[ArgumentProblem]) -> None:
        self.errors = errors
        super().__init__("invalid arguments: " + "; ".join(str(e) for e in errors))


class UnknownToolError(LookupError):
    def __init__(self, name: str) -> None:
        self.name = name
        super().__init__(f"unknown tool {name!r}")


def _problem(error: ValidationError) -> ArgumentProblem:
    return ArgumentProblem(format_location(tuple(error.absolute_path)) or "(root)", error.message)


class Registry:
    """Loaded tools by name, in config order."""

    def __init__(self, tools: list[PreparedTool]) -> None:
        self._tools: dict[str, PreparedTool] = {}
        self._validators: dict[str, Any] = {}
        for tool in tools:
            spec = tool.spec
            if spec.name in self._tools:
                raise ValueError(f"tool {spec.name!r} is defined twice")
            cls = schema_validator_class(spec.input_schema)
            cls.check_schema(spec.input_schema)
            # Built once per tool: compiling a validator costs far more than running it.
            self._validators[spec.name] = cls(spec.input_schema, format_checker=cls.FORMAT_CHECKER)
            self._tools[spec.name] = tool

    @classmethod
    def from_config(cls, config: GatewayConfig) -> Registry:
        """Load every tool of `config`. Raises `ConfigError` naming each tool that cannot be
        loaded, with its line in the config file when the config came from one."""
        tools: list[PreparedTool] = []
        problems = []
        for index, tool_config in enumerate(config.tools):
            try:
                adapter = adapter_for(tool_config.kind)
            except ToolLoadError as exc:
                message = f"tool {tool_config.name!r}: {exc}"
                problems.append(config.problem(("tools", index, "kind"), message))
                continue
            try:
                tools.append(adapter.prepare(tool_config))
            except ToolLoadError as exc:
                message = f"tool {tool_config.name!r} cannot be loaded: {exc}"
                problems.append(config.problem(("tools", index, "target"), message))
        if problems:
            raise ConfigError(problems)
        try:
            return cls(tools)
        except Exception as exc:  # an adapter derived a schema jsonschema refuses
            raise ConfigError([config.problem(("tools",), str(exc))]) from exc

    def get(self, name: str) -> PreparedTool | None:
        return self._tools.get(name)

    def specs(self) -> list[ToolSpec]:
        return [tool.spec for tool in self._tools.values()]

    def validate_arguments(self, name: str, arguments: Any) -> None:
        """Raise `ArgumentsError` listing every way `arguments` miss the tool's input schema
        (`UnknownToolError` if there is no such tool)."""
        validator = self._validators.get(name)
        if validator is None:
            raise UnknownToolError(name)
        errors = sorted(
            validator.iter_errors(arguments),
            key=lambda e: ([str(p) for p in e.absolute_path], e.message),
        )
        if errors:
            raise ArgumentsError([_problem(e) for e in errors])

    def __contains__(self, name: object) -> bool:
        return name in self._tools

    def __len__(self) -> int:
        return len(self._tools)

    def __iter__(self) -> Iterator[str]:
        return iter(self._tools)
