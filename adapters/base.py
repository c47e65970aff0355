"""The contract between the gateway and a kind of tool.

Each kind (`python`, later `langgraph`, `crewai`, `mcp`, `a2a`, ...) is one module in this
package exposing `ADAPTER`, an object with a `kind` and a `prepare(config)` that loads the
target and returns a `PreparedTool`. The gateway only ever talks to `PreparedTool`s: it lists
their `spec`s and, inside a workflow activity, calls `invoke`.

A kind whose one config entry can make several tools (`mcp` importing a remote server's tools)
also defines `prepare_all(config)`, returning every tool the entry makes (`ToolSource`); the
registry then calls it instead of `prepare`. Each tool it returns has a name of its own, which
is what callers, policies, limits, the audit log and the workflow input see.

Failures, and what the dispatch path is expected to do with them:
- `ToolLoadError` at start-up (target missing, bad signature): the gateway refuses to start.
- `ToolError` from `invoke`: the tool decided the call failed (bad input it only detects
  itself, a refused operation). Reported to the caller as a tool error with its message.
- `InputRequired` from `invoke`: the tool needs a person's input to go on. The call waits,
  durably, showing `input_required` with the request; the value supplied later is handed to a
  new run of the tool as `ToolContext.supplied_input` (the tool resumes from its checkpoints).
- any other exception from `invoke`: unexpected, so it is retried per the tool's retry policy.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from adapters.checkpoints import CheckpointStore, key
from gateway.config import RetryConfig, TaskSupport, ToolConfig

# (progress, total or None, message or None), as in MCP's notifications/progress.
ProgressReporter = Callable[[float, float | None, str | None], None]


class ToolLoadError(Exception):
    """A tool cannot be prepared. The message says what to fix, naming the target.

    `at` is the key of the tool's config entry the problem is about (`("options", "tools", 2)`),
    so the error can name its line; by default the entry's `target`."""

    def __init__(self, message: str, *, at: tuple[str | int, ...] = ("target",)) -> None:
        super().__init__(message)
        self.at = at


class ToolError(Exception):
    """A failure inside a tool, to be reported to the caller as the tool's error.

    `data` (JSON-serialisable, optional) travels with the message as structured detail.
    """

    def __init__(self, message: str, data: Any = None) -> None:
        super().__init__(message)
        self.message = message
        self.data = data


class InputRequired(Exception):  # noqa: N818 - a request, not an error
    """Raised by a tool that cannot go on without a person's input.

    `message` says what is asked (shown as the task's status message); `payload`
    (JSON-serialisable) is the structured request. The call waits for the input; a later run
    of the tool gets it as `ToolContext.supplied_input`.
    """

    def __init__(self, message: str, payload: Any = None) -> None:
        super().__init__(message)
        self.message = message
        self.payload = payload


@dataclass(frozen=True)
class SuppliedInput:
    """The input a person supplied after the tool raised `InputRequired`. `round` counts the
    inputs of this call from 1."""

    value: Any
    by: str
    round: int


@dataclass(frozen=True)
class ToolSpec:
    """What the gateway knows about a tool once it is loaded: enough to list it over MCP/A2A
    and to schedule calls to it. Schemas are final (config overrides already applied)."""

    name: str
    description: str
    input_schema: dict[str, Any]
    output_schema: dict[str, Any] | None
    kind: str
    target: str
    timeout_seconds: float
    retry: RetryConfig
    task_support: TaskSupport
    # The Dapr app whose workers run the tool; None: the gateway runs it itself.
    app_id: str | None = None
    # For a tool that is one of several made by one config entry: what it is where it comes
    # from ("remote tool 'read' imported by tools entry 'files'"), for errors that name it.
    origin: str | None = None
    # The Dapr workflow (registered by the app `app_id`) that runs a call, as a child workflow
    # of the call's own, with the arguments as its input and its output as the result; None:
    # the `duragate.tool` activity runs the call through `invoke`. (A kind that sets it is
    # named in `gateway.config.WORKFLOW_KINDS`.)
    workflow: str | None = None

    @classmethod
    def from_config(
        cls,
        config: ToolConfig,
        *,
        description: str | None,
        input_schema: dict[str, Any],
        output_schema: dict[str, Any] | None,
    ) -> ToolSpec:
        """The spec for `config`, given what the adapter derived from the target. The config's
        `description`, `input_schema` and `output_schema`, when set, win over derived ones."""
        return cls(
            name=config.name,
            description=config.description or description or "",
            input_schema=input_schema if config.input_schema is None else config.input_schema,
            output_schema=output_schema if config.output_schema is None else config.output_schema,
            kind=config.kind,
            target=config.target,
            timeout_seconds=config.timeout_seconds,
            retry=config.retry,
            task_support=config.task_support,
            app_id=config.app_id,
        )


class GatewayTools(Protocol):
    """The gateway's other tools, for a tool that acts as an agent of its caller
    (`gateway.delegation`): it calls them as `spiffe://<trust domain>/agent/<agent>` in the
    caller's tenant, with the caller appended to the delegation chain, through the dispatch path
    (policy, limits, audit, a durable call of its own)."""

    async def visible(self, agent: str, names: Sequence[str]) -> list[ToolSpec]:
        """The specs of those of `names` the agent, acting for the caller, may see."""
        ...

    async def call(
        self, agent: str, tool: str, arguments: dict[str, Any], *, key: str, timeout: float
    ) -> dict[str, Any]:
        """`{"ok": true, "result", "usage"?}` or `{"ok": false, "error": {"type", "message"}}`;
        `key` is the call's idempotency key (the same key replays the call)."""
        ...


def _ignore_progress(progress: float, total: float | None, message: str | None) -> None:
    pass


@dataclass
class ToolContext:
    """What a running call knows about itself; handed to tools that ask for it.

    `task_execution_id` is stable across retries of the same activity: the key for checkpoints
    that let a retried call resume instead of starting over. `attempt` counts from 1.

    `report_progress` may be called from a worker thread (sync tools run in one), so the
    activity must provide a thread-safe callable.

    `checkpoints` is the sidecar's state store (None when the runtime has none, e.g. in unit
    tests): key values with `execution_key` (this activity, across its retries) or `call_key`
    (the whole call, across the tool's runs before and after an input). `supplied_input` is
    set when this run follows an `InputRequired`. What the tool reports with `report_usage`
    (token counts, ...) is returned with its result, for budgets.

    `principal` is the caller (`Principal.to_json()`), `context_id` the conversation the call
    belongs to (A2A contextId), and `tools` the gateway's other tools, called for that caller
    (None where the runtime offers none).
    """

    instance_id: str
    task_execution_id: str
    attempt: int = 1
    report_progress: ProgressReporter | None = field(default=_ignore_progress)
    checkpoints: CheckpointStore | None = None
    supplied_input: SuppliedInput | None = None
    usage: dict[str, float] = field(default_factory=dict)
    principal: dict[str, Any] | None = None
    context_id: str | None = None
    tools: GatewayTools | None = None

    def execution_key(self, *parts: str) -> str:
        """A checkpoint key private to this activity (stable across its retries)."""
        return key("exec", self.instance_id, self.task_execution_id, *parts)

    def call_key(self, *parts: str) -> str:
        """A checkpoint key private to this call (shared by all the tool's runs in it)."""
        return key("call", self.instance_id, *parts)

    def require_checkpoints(self) -> CheckpointStore:
        if self.checkpoints is None:
            raise RuntimeError("this call has no checkpoint store (no sidecar state API)")
        return self.checkpoints

    def report_usage(self, **counts: float) -> None:
        """Add to the call's usage counters (e.g. `total_tokens=123`)."""
        for name, value in counts.items():
            self.usage[name] = self.usage.get(name, 0) + value

    def progress(
        self, progress: float, total: float | None = None, message: str | None = None
    ) -> None:
        """Report progress; does nothing when no one listens."""
        if self.report_progress is not None:
            self.report_progress(progress, total, message)


class PreparedTool(Protocol):
    """A loaded tool, ready to be called."""

    @property
    def spec(self) -> ToolSpec: ...

    async def invoke(self, arguments: dict[str, Any], context: ToolContext) -> Any:
        """Run the tool once; return a JSON-serialisable value, or raise (see module doc).

        `arguments` have already been checked against `spec.input_schema`. Time limits and
        retries are the caller's business, not the tool's.
        """
        ...


class Adapter(Protocol):
    """One kind of tool."""

    @property
    def kind(self) -> str: ...

    def prepare(self, config: ToolConfig) -> PreparedTool:
        """Load `config.target` and derive its spec; raise `ToolLoadError` if it cannot be."""
        ...


@runtime_checkable
class ToolSource(Protocol):
    """A kind whose one config entry may make several tools (see the module doc)."""

    def prepare_all(self, config: ToolConfig) -> list[PreparedTool]:
        """Every tool `config` makes, in a stable order; raise `ToolLoadError` if any cannot
        be prepared (an entry loads whole or not at all)."""
        ...


def prepare_entry(adapter: Adapter, config: ToolConfig) -> list[PreparedTool]:
    """The tools one config entry makes: `prepare_all`'s when the kind has it, else the one
    tool `prepare` makes."""
    if isinstance(adapter, ToolSource):
        return list(adapter.prepare_all(config))
    return [adapter.prepare(config)]
