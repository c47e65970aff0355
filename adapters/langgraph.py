"""The `langgraph` tool kind: a compiled LangGraph graph as a tool.

    - name: summarise
      kind: langgraph
      target: examples.graphs:summarise      # a compiled graph, or a function returning one
      options:
        recursion_limit: 50                  # optional: LangGraph's step limit per run

Schemas come from the graph (`get_input_jsonschema()`, `get_output_jsonschema()`); the result
is the graph's output (its output channels). On Python 3.11 a state `TypedDict` must come from
`typing_extensions` for pydantic to describe it.

Durability: the graph runs with a checkpoint saver of our own over the sidecar's state API
(`adapters.langgraph_saver`), one thread per call (thread id = the call's instance id) and
`durability="sync"`, so each finished node is saved before the next starts. A retried activity
(a node raised, or the gateway was killed inside a node) resumes the thread: only the node that
was running, and what follows, run again. A graph target's own checkpointer is replaced.

Human in the loop: `interrupt(value)` in a node ends the run with the call waiting for input
(`adapters.base.InputRequired`; the task shows `input_required` with `value` as its message:
the text itself for a string, JSON otherwise). The value a person supplies resumes the graph
with `Command(resume=value)`; the interrupted node runs again from its start. With several
interrupts pending at once, the value must map interrupt ids (in the request) to values.

Progress: each node that finishes, and each `get_stream_writer()` write (text, or JSON), is
reported as progress, numbered from 1 within a run.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from pydantic_core import to_jsonable_python

from adapters._targets import check_options, import_target, object_or_factory
from adapters.base import InputRequired, ToolContext, ToolError, ToolLoadError, ToolSpec
from gateway.config import ToolConfig

OPTIONS: dict[str, type | tuple[type, ...]] = {"recursion_limit": int}
MAX_PROGRESS_TEXT = 500


class LangGraphAdapter:
    kind = "langgraph"

    def prepare(self, config: ToolConfig) -> LangGraphTool:
        options = check_options(config.name, config.options, OPTIONS)
        limit = options.get("recursion_limit")
        if limit is not None and limit < 1:
            raise ToolLoadError(f"tool {config.name!r}: option 'recursion_limit' must be >= 1")
        try:
            from langgraph.pregel import Pregel
        except ImportError as exc:  # pragma: no cover - an installation without langgraph
            raise ToolLoadError(f"the langgraph tool kind needs langgraph: {exc}") from exc
        obj = import_target(config.target)
        factory, graph = object_or_factory(config.target, obj, Pregel, "compiled LangGraph graph")
        return LangGraphTool(config, factory, graph, options)


ADAPTER = LangGraphAdapter()


def _object_schema(target: str, which: str, schema: dict[str, Any]) -> dict[str, Any]:
    if schema.get("type") != "object":
        raise ToolLoadError(
            f"target {target!r}: the graph's {which} schema is not a JSON object "
            f"(got type {schema.get('type')!r}); give its state a TypedDict or pydantic model"
        )
    return schema


def _text(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(to_jsonable_python(value, fallback=str))
    return text if len(text) <= MAX_PROGRESS_TEXT else text[: MAX_PROGRESS_TEXT - 1] + "…"


class LangGraphTool:
    def __init__(
        self,
        config: ToolConfig,
        factory: Callable[[], Any],
        graph: Any,
        options: dict[str, Any],
    ) -> None:
        self._factory = factory
        self._options = options
        try:
            input_schema = graph.get_input_jsonschema()
            output_schema = graph.get_output_jsonschema()
        except Exception as exc:
            raise ToolLoadError(
                f"target {config.target!r}: its schemas cannot be derived: {exc}"
            ) from exc
        input_schema = _object_schema(config.target, "input", input_schema)
        # Keys the graph does not declare are refused rather than silently dropped.
        input_schema.setdefault("additionalProperties", False)
        output_schema = _object_schema(config.target, "output", output_schema)
        self._output_keys = list((output_schema.get("properties") or {}).keys())
        name = graph.get_name() if hasattr(graph, "get_name") else None
        self._spec = ToolSpec.from_config(
            config,
            description=f"LangGraph graph {name}" if name and name != "LangGraph" else None,
            input_schema=input_schema,
            output_schema=output_schema,
        )

    @property
    def spec(self) -> ToolSpec:
        return self._spec

    def _graph(self, context: ToolContext) -> Any:
        from adapters.langgraph_saver import StateApiSaver

        saver = StateApiSaver(context.require_checkpoints())
        return self._factory().copy(update={"checkpointer": saver})

    async def invoke(self, arguments: dict[str, Any], context: ToolContext) -> Any:
        from langgraph.types import Command

        graph = self._graph(context)
        config: dict[str, Any] = {"configurable": {"thread_id": context.instance_id}}
        if "recursion_limit" in self._options:
            config["recursion_limit"] = self._options["recursion_limit"]

        state = await graph.aget_state(config)
        started = state.config.get("configurable", {}).get("checkpoint_id") is not None
        payload: Any
        if context.supplied_input is not None and state.interrupts:
            payload = Command(resume=context.supplied_input.value)
        elif not started:
            payload = arguments
        elif state.interrupts:
            # A retry after the interrupt was saved: the call still waits for its input.
            raise self._input_required(state.interrupts)
        elif state.next or state.tasks:
            # Resume after a crash or a failed node: the saved nodes stay done. `next` leaves
            # out a node whose writes were saved when the checkpoint after it was not (a crash
            # between the two); it is still among `tasks`, and what follows it must run.
            payload = None
        else:
            return self._output(state.values)  # it had finished: its result is saved

        output: Any = None
        seen_values = False
        count = 0
        async for mode, chunk in graph.astream(
            payload,
            config,
            stream_mode=["updates", "custom", "values"],
            durability="sync",
        ):
            if mode == "values":
                output, seen_values = chunk, True
            elif mode == "custom":
                count += 1
                context.progress(count, None, _text(chunk))
            elif mode == "updates" and isinstance(chunk, dict):
                for node in chunk:
                    if node.startswith("__"):
                        continue
                    count += 1
                    context.progress(count, None, f"{node} done")

        state = await graph.aget_state(config)
        if state.interrupts:
            raise self._input_required(state.interrupts)
        return self._output(output if seen_values else state.values)

    def _input_required(self, interrupts: Any) -> InputRequired:
        pending = [
            {"id": i.id, "value": to_jsonable_python(i.value, fallback=str)} for i in interrupts
        ]
        if len(pending) == 1:
            return InputRequired(_text(pending[0]["value"]), pending[0]["value"])
        message = f"{self._spec.name} is waiting for {len(pending)} inputs: " + _text(pending)
        return InputRequired(message, {"interrupts": pending})

    def _output(self, values: Any) -> Any:
        if isinstance(values, dict) and self._output_keys:
            values = {k: v for k, v in values.items() if k in self._output_keys}
        try:
            return to_jsonable_python(values)
        except Exception as exc:
            raise ToolError(
                f"{self._spec.target} returned a value that is not JSON data: {exc}"
            ) from None
