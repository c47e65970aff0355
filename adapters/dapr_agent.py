"""The `dapr_agent` tool kind: a durable agent built with Dapr Agents, running in its own app.

    - name: weather
      kind: dapr_agent
      target: weather              # the agent's name, as in DurableAgent(name=...)
      app_id: weather-agent        # the Dapr app the agent's process is connected as
      timeout_seconds: 600
      options:
        workflow: dapr.agents.weather.workflow   # default: derived from the name, as Dapr Agents
                                                 # registers it (only for another naming)

A `DurableAgent` registers its loop as the Dapr workflow `dapr.agents.<name>.workflow` in the
app that hosts it (dapr-agents needs dapr < 1.19, so that app is a process of its own, in its
own Python environment). A call of this tool runs as that workflow, a child workflow of the
call's own routed to the agent's app (`call_child_workflow(..., app_id=...)`: the same on the
embedded sidecar, which must name the app under `engine.apps`, and on daprd). Its instance id is
derived from the call (`<task id>:<tool>`), so a gateway that crashes and replays the call waits
for the same agent run instead of starting another.

Input: `{"task": string}`, what the agent's workflow takes (Dapr Agents' `TriggerAction`).
Result: the agent's final message, `{"role": "assistant", "content": ..., "name": ...}`.
An agent run that fails is the tool's error, with the agent's message. An agent app that is not
connected is a durable wait, not an error: the sidecar keeps the run queued for the app, which
picks it up when it connects (a restart of the agent's process must not fail the calls in
flight); the call's `timeout_seconds` bounds the wait, and the timeout's message names the app.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

from adapters._targets import check_options
from adapters.base import ToolContext, ToolError, ToolLoadError, ToolSpec
from gateway.config import ToolConfig

KIND = "dapr_agent"
OPTIONS: dict[str, type | tuple[type, ...]] = {"workflow": str}
# What Dapr Agents keeps of an agent's name in its workflow name (sanitize_openai_tool_name:
# the characters OpenAI allows in a tool name, at most 64 of them).
_INVALID_NAME_CHARS = re.compile(r"[^a-zA-Z0-9_-]")
_MAX_NAME_LENGTH = 64
# A Dapr workflow name as the gateway will schedule it: printable, no spaces.
WORKFLOW_NAME_RE = re.compile(r"[A-Za-z0-9_.:-]{1,256}")

INPUT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "task": {"type": "string", "minLength": 1, "description": "What to ask the agent."}
    },
    "required": ["task"],
    "additionalProperties": False,
}
OUTPUT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "content": {"type": ["string", "null"], "description": "The agent's final answer."},
        "role": {"type": "string"},
        "name": {"type": ["string", "null"], "description": "The agent that answered."},
    },
    "required": ["content"],
}


def agent_workflow_name(agent: str) -> str:
    """The workflow a `DurableAgent` named `agent` registers (Dapr Agents 1.0:
    `dapr.agents.<sanitized name>.workflow`)."""
    sanitized = _INVALID_NAME_CHARS.sub("", agent)
    if not sanitized:
        raise ToolLoadError(f"agent name {agent!r} has no letter, digit, '_' or '-'")
    if len(sanitized) > _MAX_NAME_LENGTH:
        raise ToolLoadError(
            f"agent name {agent!r} is longer than Dapr Agents allows ({_MAX_NAME_LENGTH} "
            "characters)"
        )
    return f"dapr.agents.{sanitized}.workflow"


class DaprAgentTool:
    def __init__(self, spec: ToolSpec) -> None:
        self._spec = spec

    @property
    def spec(self) -> ToolSpec:
        return self._spec

    async def invoke(self, arguments: dict[str, Any], context: ToolContext) -> Any:
        # The call's workflow runs the agent's workflow itself (spec.workflow); an activity
        # reaches here only for a call recorded before the tool was of this kind.
        raise ToolError(
            f"tool {self._spec.name!r} runs as the workflow {self._spec.workflow} of app "
            f"{self._spec.app_id!r}, not as an activity: call it again"
        )


class DaprAgentAdapter:
    kind = KIND

    def prepare(self, config: ToolConfig) -> DaprAgentTool:
        options = check_options(config.name, config.options, OPTIONS)
        if config.app_id is None:
            raise ToolLoadError(
                f"tool {config.name!r}: a dapr_agent tool needs `app_id`, the Dapr app the "
                "agent's process runs as (Dapr Agents cannot run inside the gateway)"
            )
        workflow = options.get("workflow") or agent_workflow_name(config.target)
        if not WORKFLOW_NAME_RE.fullmatch(workflow):
            raise ToolLoadError(f"tool {config.name!r}: {workflow!r} is not a workflow name")
        default_output = OUTPUT_SCHEMA if "workflow" not in options else None
        spec = ToolSpec.from_config(
            config,
            description=f"Ask the Dapr agent {config.target!r} (app {config.app_id}).",
            input_schema=INPUT_SCHEMA,
            output_schema=default_output,
        )
        return DaprAgentTool(dataclasses.replace(spec, workflow=workflow))


ADAPTER = DaprAgentAdapter()
