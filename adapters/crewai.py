"""The `crewai` tool kind: a CrewAI crew as a tool.

    - name: research
      kind: crewai
      target: examples.crews:research_crew   # a Crew, or a function returning a fresh one
      input_schema: {...}                    # optional: replaces the derived schema
      options:
        lazy: true                           # optional: import CrewAI and the crew on the
                                             # first call, not at start-up (needs input_schema)

Input: CrewAI has no declared inputs; the crew's inputs are the `{placeholders}` in its
agents' role, goal and backstory and its tasks' description, expected output and output file.
The derived schema has one required string per placeholder and refuses other keys; a config
`input_schema` replaces it (the values are still interpolated as CrewAI does).

Result: the `CrewOutput` of the last task: its `json_dict`, or its `pydantic` model dumped,
when the task declares `output_json` / `output_pydantic` (the output schema is that model's);
otherwise `{"result": <raw text>}`. The crew's token usage (`CrewOutput.token_usage`: total,
prompt, completion, cached prompt tokens and successful requests) is reported through
`ToolContext.report_usage` and comes back with the call's result as `usage`, for budgets. After
a resume it counts the tasks run in that attempt only.

Durability (task level): each finished task's output is saved to the sidecar's state API as it
completes (a callback on each task), keyed by the activity's task execution id. A retried
activity (a task raised, or the gateway was killed mid-crew) builds a fresh crew (from the
factory, or a copy of the target crew), restores the saved outputs on the finished tasks, sets
`checkpoint_kickoff_event_id`, and `kickoff()` starts at the first unfinished task. A task
interrupted by the crash runs again from its start. Tasks with `async_execution` are saved as
they finish too, by their position in the crew.

Off the network: before CrewAI is first imported (when a crewai tool is loaded), telemetry,
tracing and the version check are switched off through CrewAI's environment variables, and its
storage (`CREWAI_STORAGE_DIR`) goes under the gateway's data directory (`<data dir>/crewai`)
unless already set. `OTEL_SDK_DISABLED` is not used: it would switch off the gateway's own
OpenTelemetry too. CrewAI still creates `~/.config/crewai` and a key file under
`~/.local/share/crewai` when imported; nothing leaves the machine.

`kickoff()` blocks: it runs in a worker thread, never on the event loop.

Lazy loading (`lazy: true`). Importing CrewAI costs about 2-3 s and 100-200 MiB; a gateway that
serves a crew among other tools need not pay that at start-up, nor at all if the crew is never
called. With `lazy`, the tool is listed from the config (its `input_schema` is required: the
placeholders cannot be read without importing the crew; `output_schema` defaults to the
`{"result": string}` a crew without `output_json`/`output_pydantic` returns), and CrewAI and
the target are imported on the first call, in a worker thread. At start-up only what costs
nothing is checked: that CrewAI is installed and the target's module exists. A target that
then fails to load, or a crew whose output does not fit the declared output schema, fails the
call with the reason (not retried).
"""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import os
import re
import threading
import uuid
from collections.abc import Callable
from typing import Any

from pydantic_core import to_jsonable_python

from adapters import data_dir
from adapters._targets import TARGET_RE, check_options, import_target, object_or_factory
from adapters.base import ToolContext, ToolError, ToolLoadError, ToolSpec
from gateway.config import ToolConfig

# CrewAI's own pattern for `{placeholder}` (crewai.utilities.string_utils).
PLACEHOLDER_RE = re.compile(r"\{([A-Za-z_][A-Za-z0-9_\-]*)}")
AGENT_TEXTS = ("role", "goal", "backstory")
TASK_TEXTS = ("description", "expected_output", "output_file")
OFF_THE_NETWORK = {
    "CREWAI_DISABLE_TELEMETRY": "true",
    "CREWAI_TRACING_ENABLED": "false",
    "CREWAI_DISABLE_VERSION_CHECK": "true",
}
OPTIONS: dict[str, type | tuple[type, ...]] = {"lazy": bool}
# The result of a crew whose last task declares no output model (also a lazy crew's default).
WRAPPED_OUTPUT: dict[str, Any] = {
    "type": "object",
    "properties": {"result": {"type": "string"}},
    "required": ["result"],
}
log = logging.getLogger(__name__)
USAGE_FIELDS = (
    "total_tokens",
    "prompt_tokens",
    "completion_tokens",
    "cached_prompt_tokens",
    "successful_requests",
)
# What is saved of a TaskOutput (its message log can be large and is not needed to resume).
SAVED_FIELDS = ("description", "name", "expected_output", "summary", "raw", "json_dict", "agent")


def quiet_environment() -> None:
    """CrewAI's settings that keep it off the network, set before it is first imported."""
    for name, value in OFF_THE_NETWORK.items():
        os.environ[name] = value
    if not os.environ.get("CREWAI_STORAGE_DIR"):
        # An absolute path: CrewAI joins it to the user data dir, which keeps it as it is.
        os.environ["CREWAI_STORAGE_DIR"] = str((data_dir() / "crewai").absolute())


class CrewAIAdapter:
    kind = "crewai"

    def prepare(self, config: ToolConfig) -> CrewTool | LazyCrewTool:
        options = check_options(config.name, config.options, OPTIONS)
        if options.get("lazy"):
            return LazyCrewTool(config)
        return self.load(config)

    def load(self, config: ToolConfig) -> CrewTool:
        """Import CrewAI and the target, and derive the tool from the crew."""
        quiet_environment()
        try:
            from crewai import Crew
        except ImportError as exc:  # pragma: no cover - an installation without crewai
            raise ToolLoadError(f"the crewai tool kind needs crewai: {exc}") from exc
        obj = import_target(config.target)
        factory, crew = object_or_factory(config.target, obj, Crew, "CrewAI Crew")
        if isinstance(obj, Crew):
            # One Crew object cannot run two calls at once: each call runs a deep copy.
            factory = obj.copy
        return CrewTool(config, factory, crew)


ADAPTER = CrewAIAdapter()


def placeholders(crew: Any) -> list[str]:
    """The `{placeholders}` of the crew's agents and tasks, in order of first appearance."""
    found: dict[str, None] = {}
    texts: list[Any] = []
    for agent in crew.agents:
        texts += [getattr(agent, f, None) for f in AGENT_TEXTS]
    for task in crew.tasks:
        texts += [getattr(task, f, None) for f in TASK_TEXTS]
        if task.agent is not None and task.agent not in crew.agents:
            texts += [getattr(task.agent, f, None) for f in AGENT_TEXTS]
    for text in texts:
        if isinstance(text, str):
            found.update(dict.fromkeys(PLACEHOLDER_RE.findall(text)))
    return list(found)


def _model_schema(model: Any) -> dict[str, Any] | None:
    try:
        schema = model.model_json_schema(mode="serialization")
    except Exception:  # noqa: BLE001 - not describable: no output schema, results still work
        return None
    return schema if schema.get("type") == "object" else None


class CrewTool:
    def __init__(self, config: ToolConfig, factory: Callable[[], Any], crew: Any) -> None:
        self._factory = factory
        if not crew.tasks:
            raise ToolLoadError(f"target {config.target!r}: the crew has no tasks")
        names = placeholders(crew)
        input_schema: dict[str, Any] = {
            "type": "object",
            "properties": {n: {"type": "string"} for n in names},
            "required": names,
            "additionalProperties": False,
        }
        last = crew.tasks[-1]
        output_schema: dict[str, Any] | None
        model = last.output_pydantic or last.output_json
        if model is not None:
            output_schema = _model_schema(model)
            self._wrapped = False
        else:
            output_schema = WRAPPED_OUTPUT
            self._wrapped = True
        description = f"CrewAI crew: {len(crew.tasks)} task(s), {len(crew.agents)} agent(s)"
        self._spec = ToolSpec.from_config(
            config, description=description, input_schema=input_schema, output_schema=output_schema
        )

    @property
    def spec(self) -> ToolSpec:
        return self._spec

    async def invoke(self, arguments: dict[str, Any], context: ToolContext) -> Any:
        store = context.require_checkpoints()
        key = context.execution_key("crew")
        saved = await store.aget(key) or {}
        output = await asyncio.to_thread(self._run, arguments, context, key, saved)
        usage = getattr(output, "token_usage", None)
        if usage is not None:
            context.report_usage(**{f: float(getattr(usage, f, 0) or 0) for f in USAGE_FIELDS})
        return self._result(output)

    def _run(self, arguments: dict[str, Any], context: ToolContext, key: str, saved: Any) -> Any:
        from crewai.tasks.task_output import TaskOutput

        store = context.require_checkpoints()
        crew = self._factory()
        tasks = list(crew.tasks)
        outputs: dict[str, Any] = dict(saved.get("outputs") or {})
        kickoff_id = saved.get("kickoff_id") or str(uuid.uuid4())
        restored = 0
        for index, task in enumerate(tasks):
            stored = outputs.get(str(index))
            if stored is None:
                continue
            fields = {f: stored.get(f) for f in SAVED_FIELDS if stored.get(f) is not None}
            if stored.get("pydantic") is not None and task.output_pydantic is not None:
                fields["pydantic"] = task.output_pydantic.model_validate(stored["pydantic"])
            task.output = TaskOutput(**fields)
            restored += 1
        if restored:
            crew.checkpoint_kickoff_event_id = kickoff_id
        lock = threading.Lock()

        def saver(index: int, previous: Callable[[Any], Any] | None) -> Callable[[Any], Any]:
            def on_task_done(output: Any) -> Any:
                record = {f: getattr(output, f, None) for f in SAVED_FIELDS}
                pydantic = getattr(output, "pydantic", None)
                record["pydantic"] = pydantic.model_dump(mode="json") if pydantic else None
                with lock:  # async tasks may finish together
                    outputs[str(index)] = to_jsonable_python(record, fallback=str)
                    store.put(key, {"kickoff_id": kickoff_id, "outputs": outputs})
                    done = len(outputs)
                name = getattr(tasks[index], "name", None) or f"task {index + 1}"
                context.progress(done, len(tasks), f"{name} done")
                return previous(output) if previous is not None else None

            return on_task_done

        for index, task in enumerate(tasks):
            task.callback = saver(index, task.callback)
        return crew.kickoff(inputs=dict(arguments))

    def _result(self, output: Any) -> Any:
        if not self._wrapped:
            if output.json_dict:
                return to_jsonable_python(output.json_dict)
            if output.pydantic is not None:
                return output.pydantic.model_dump(mode="json")
        try:
            return {"result": str(output.raw)}
        except Exception as exc:  # pragma: no cover - raw is a string in CrewAI
            raise ToolError(f"{self._spec.target}: the crew's output is not text: {exc}") from None


class LazyCrewTool:
    """A crew listed from its config, imported (CrewAI included) on its first call."""

    def __init__(self, config: ToolConfig) -> None:
        name = config.name
        if config.input_schema is None:
            raise ToolLoadError(
                f"tool {name!r}: option 'lazy' needs 'input_schema' in the config: the crew's "
                "{placeholders} cannot be read without importing it"
            )
        if importlib.util.find_spec("crewai") is None:
            raise ToolLoadError(
                "the crewai tool kind needs crewai (pip install 'duragate[crewai]')"
            )
        match = TARGET_RE.fullmatch(config.target)
        if match is None:
            raise ToolLoadError(
                f"target {config.target!r} is not of the form 'package.module:attribute'"
            )
        try:
            found = importlib.util.find_spec(match["module"])
        except ImportError as exc:  # a parent package that is missing or fails to import
            raise ToolLoadError(f"target {config.target!r}: {exc}") from None
        if found is None:
            raise ToolLoadError(f"target {config.target!r}: no module named {match['module']!r}")
        self._config = config
        self._tool: CrewTool | None = None
        self._lock = threading.Lock()
        self._spec = ToolSpec.from_config(
            config,
            description=f"CrewAI crew ({config.target})",
            input_schema=config.input_schema,
            output_schema=WRAPPED_OUTPUT,
        )

    @property
    def spec(self) -> ToolSpec:
        return self._spec

    def _load(self) -> CrewTool:
        with self._lock:  # the first calls may come together: one import
            if self._tool is None:
                log.info(
                    "tool %s: loading the crew %s on its first call",
                    self._spec.name,
                    self._config.target,
                )
                try:
                    tool = ADAPTER.load(self._config)
                except ToolLoadError as exc:
                    raise ToolError(f"tool {self._spec.name!r} cannot be loaded: {exc}") from None
                if tool.spec.output_schema != self._spec.output_schema:
                    raise ToolError(
                        f"tool {self._spec.name!r}: the crew's result does not fit the output "
                        "schema it is listed with; a lazy crew whose last task declares "
                        "output_json or output_pydantic needs 'output_schema' in the config"
                    )
                self._tool = tool
            return self._tool

    async def invoke(self, arguments: dict[str, Any], context: ToolContext) -> Any:
        tool = self._tool
        if tool is None:  # the import blocks for seconds: never on the event loop
            tool = await asyncio.to_thread(self._load)
        return await tool.invoke(arguments, context)
