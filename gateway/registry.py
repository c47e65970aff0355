"""The tool registry: every configured tool, loaded, with a cached argument validator.

A registry is built whole from a config and never changed: a config reload builds a new one
and swaps it in, so a call sees one consistent set of tools. Building it loads every target;
if any tool cannot be loaded the whole build fails (the gateway must not half-start).

One config entry usually makes one tool of its name; an entry whose kind is a `ToolSource`
(`adapters.base`) may make several, each under a name of its own (an `mcp` entry importing a
remote server's tools, `prefix` + remote name). Tool names are unique across all entries: a
clash is a config error naming both entries.

A tool with an `app_id` runs in the workers of that Dapr app (`duragate worker`), not in the
gateway: the gateway's registry holds only its spec, taken from the config (`WorkerTool`), and
never imports its target; a worker's registry loads just the tools of its own app.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from jsonschema.exceptions import ValidationError

from adapters import adapter_for
from adapters.base import (
    PreparedTool,
    ToolContext,
    ToolError,
    ToolLoadError,
    ToolSpec,
    prepare_entry,
)
from gateway.config import (
    WORKFLOW_KINDS,
    ConfigError,
    GatewayConfig,
    ToolConfig,
    format_location,
    schema_validator_class,
)


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


def _twice(
    config: GatewayConfig, tool: PreparedTool, index: int, first: int, other: PreparedTool
) -> str:
    """Why `tool`, made by entry `index`, cannot be added: entry `first` already made `other`,
    of the same name."""

    def what(made: PreparedTool, entry: int) -> str:
        return made.spec.origin or f"tools entry {config.tools[entry].name!r}"

    name = tool.spec.name
    if first == index:
        return f"tool {name!r} ({what(tool, index)}) is made twice by the same entry"
    return (
        f"tool {name!r} ({what(tool, index)}) is already defined by tools[{first}] "
        f"({what(other, first)}): tool names must be unique; rename one, or give the import "
        "another prefix (options.prefix)"
    )


class WorkerTool:
    """A tool that runs in a worker app: its spec, from the config, and nothing to run here.

    The workflow sends its calls to the worker's app (`call_activity(..., app_id=...)`), so
    `invoke` is reached only by a call scheduled on the gateway's own app before the tool was
    moved to a worker: it fails with a message saying so rather than loading the target."""

    def __init__(self, config: ToolConfig) -> None:
        assert config.app_id is not None
        self._spec = ToolSpec.from_config(
            config,
            description=config.description,
            input_schema=config.input_schema or {"type": "object"},
            output_schema=config.output_schema,
        )

    @property
    def spec(self) -> ToolSpec:
        return self._spec

    async def invoke(self, arguments: dict[str, Any], context: ToolContext) -> Any:
        raise ToolError(
            f"tool {self._spec.name!r} runs in worker app {self._spec.app_id!r}; this call "
            "was scheduled on the gateway before the tool moved there: call it again"
        )


class Registry:
    """Loaded tools by name, in config order (an entry's tools in the order it made them)."""

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
    def from_config(cls, config: GatewayConfig, *, app_id: str | None = None) -> Registry:
        """Load the tools of `config` that run here. Raises `ConfigError` naming each tool
        that cannot be loaded, with its line in the config file when the config came from one.

        `app_id` None: the gateway's registry, every tool (worker tools as `WorkerTool`s, their
        targets not loaded). Otherwise a worker's: only the tools whose `app_id` it is."""
        tools: list[PreparedTool] = []
        problems = [] if app_id is not None else config.tool_app_problems()
        # Which entry made each tool name: one entry may make several tools (an `mcp` entry
        # importing a remote server's tools), and their names may meet another entry's.
        made_by: dict[str, tuple[int, PreparedTool]] = {}
        for index, tool_config in enumerate(config.tools):
            runs_here = tool_config.app_id == app_id
            if tool_config.kind in WORKFLOW_KINDS:
                runs_here = app_id is None  # the gateway schedules its workflow; no worker runs it
            if not runs_here:
                if app_id is None:
                    tools.append(WorkerTool(tool_config))
                    made_by[tool_config.name] = (index, tools[-1])
                continue
            try:
                adapter = adapter_for(tool_config.kind)
            except ToolLoadError as exc:
                message = f"tool {tool_config.name!r}: {exc}"
                problems.append(config.problem(("tools", index, "kind"), message))
                continue
            try:
                made = prepare_entry(adapter, tool_config)
            except ToolLoadError as exc:
                message = f"tool {tool_config.name!r} cannot be loaded: {exc}"
                problems.append(config.problem(("tools", index, *exc.at), message))
                continue
            for tool in made:
                first = made_by.setdefault(tool.spec.name, (index, tool))
                if first[1] is not tool:
                    message = _twice(config, tool, index, *first)
                    problems.append(config.problem(("tools", index, "name"), message))
                    continue
                tools.append(tool)
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
