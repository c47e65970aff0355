"""A Dapr Agents app: one `DurableAgent` with one tool, written with dapr-agents' public API only.

It runs in a Python environment of its own (dapr-agents needs dapr < 1.19), as its own Dapr
app, connected to its sidecar the way every Dapr app is, through the environment:

    DAPR_GRPC_ENDPOINT=127.0.0.1:PORT  DAPR_HTTP_ENDPOINT=http://127.0.0.1:PORT \\
    OPENAI_BASE_URL=http://127.0.0.1:PORT/v1  OPENAI_API_KEY=...  \\
        .../bin/python tests/adapters/dapr_agent_app.py

Its state is in the sidecar's state store components `agent-workflow` (workflow entries),
`agent-memory` (conversation memory) and `agent-registry` (the team registry), which Dapr Agents
looks up by name. Its LLM is any OpenAI-compatible endpoint (`OPENAI_BASE_URL`, model
`OPENAI_MODEL`). Its agent
`weather` registers the workflow `dapr.agents.weather.workflow`; the gateway's `dapr_agent` tool
schedules it. The tool `get_weather` says which process and environment ran it, so a test can
tell the answer came from this app. Prints `DAPR_AGENT_APP_READY` once the workflow worker runs.
Nothing here imports Duragate: that environment does not have it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys

from dapr_agents import AgentRunner, DurableAgent, OpenAIChatClient, tool
from dapr_agents.workflow.utils.core import wait_for_shutdown
from pydantic import BaseModel

READY_MARKER = "DAPR_AGENT_APP_READY"


class WeatherArgs(BaseModel):
    city: str


@tool(args_model=WeatherArgs)
def get_weather(city: str) -> str:
    """The weather in a city."""
    return f"sunny in {city} (pid {os.getpid()}, prefix {sys.prefix})"


async def main() -> None:
    logging.basicConfig(level=os.environ.get("LOG_LEVEL", "INFO"))
    agent = DurableAgent(
        name="weather",
        role="Weather assistant",
        goal="Tell people the weather.",
        llm=OpenAIChatClient(model=os.environ.get("OPENAI_MODEL", "scripted")),
        tools=[get_weather],
        # No `state`, `memory` or `registry`: Dapr Agents finds them among the sidecar's
        # components by name (`agent-workflow`, `agent-memory`, `agent-registry`).
    )
    runner = AgentRunner()
    try:
        runner.subscribe(agent)  # starts the agent's workflow runtime; no pub/sub configured
        print(READY_MARKER, os.getpid(), flush=True)
        await wait_for_shutdown()
    finally:
        runner.shutdown(agent)


if __name__ == "__main__":
    asyncio.run(main())
