"""An example CrewAI crew, served by the `crewai` tool kind (see config/gateway.yaml).

`research_crew()` builds a two-task crew (research a topic, then write a brief about it for an
audience) on `ScriptedLLM`, a deterministic offline model: the demo and the tests need no
network and no API key. Its input schema is derived from the `{topic}` and `{audience}`
placeholders.

As in examples/graphs.py: with DURAGATE_EXAMPLE_TRACE set, each model call appends its task's
name to that file; while the file named by DURAGATE_EXAMPLE_HOLD exists, the model waits (up
to 10 minutes) before answering the `write` task, so the tests can kill the gateway there.

Import this module only from a gateway that loads the crewai kind: the adapter first sets
CrewAI's environment (telemetry, tracing and version check off, storage under the data dir).
"""

from __future__ import annotations

import os
import re
import time
from typing import Any

from crewai import Agent, BaseLLM, Crew, Process, Task

from examples.graphs import HOLD_ENV, TRACE_ENV


def _trace(name: str) -> None:
    path = os.environ.get(TRACE_ENV)
    if path:
        with open(path, "a", encoding="utf-8") as f:
            f.write(name + "\n")
            f.flush()
            os.fsync(f.fileno())


def _hold() -> None:
    path = os.environ.get(HOLD_ENV)
    deadline = time.monotonic() + 600
    while path and os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.05)


def prompt_text(messages: Any) -> str:
    """The text of a prompt CrewAI gives a model (a string, or chat messages)."""
    if isinstance(messages, str):
        return messages
    parts = []
    for message in messages or []:
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, str):
            parts.append(content)
    return "\n".join(parts)


class ScriptedLLM(BaseLLM):
    """A deterministic model: it answers each task with a fixed text built from the task's
    (interpolated) description, in the ReAct format CrewAI parses, and reports token counts
    (one token per word) so that usage can be accounted."""

    model: str = "scripted"

    def _answer(self, messages: Any, from_task: Any) -> str:
        name = getattr(from_task, "name", None) or "task"
        _trace(name)
        if name == "write":
            _hold()
        prompt = prompt_text(messages)
        description = getattr(from_task, "description", "") or ""
        subject = re.sub(r"\s+", " ", description).strip().rstrip(".")
        answer = f"[{name}] {subject}."
        self._track_token_usage_internal(
            {
                "prompt_tokens": len(prompt.split()),
                "completion_tokens": len(answer.split()),
                "total_tokens": len(prompt.split()) + len(answer.split()),
            }
        )
        return f"Thought: I now can give a great answer\nFinal Answer: {answer}"

    def call(
        self,
        messages: Any,
        tools: Any = None,
        callbacks: Any = None,
        available_functions: Any = None,
        from_task: Any = None,
        from_agent: Any = None,
        response_model: Any = None,
    ) -> str:
        return self._answer(messages, from_task)

    async def acall(
        self,
        messages: Any,
        tools: Any = None,
        callbacks: Any = None,
        available_functions: Any = None,
        from_task: Any = None,
        from_agent: Any = None,
        response_model: Any = None,
    ) -> str:
        return self._answer(messages, from_task)

    def get_input_tokens_count(
        self, messages: Any, tools: Any = None, response_model: Any = None
    ) -> int:
        return len(prompt_text(messages).split())

    def get_context_window_size(self) -> int:
        return 128_000


def research_crew() -> Crew:
    """A fresh two-task crew (a factory: each call gets its own agents and tasks)."""
    llm = ScriptedLLM(model="scripted")
    researcher = Agent(
        role="Researcher",
        goal="Collect the key facts about {topic}",
        backstory="A careful analyst.",
        llm=llm,
        allow_delegation=False,
        verbose=False,
    )
    writer = Agent(
        role="Writer",
        goal="Explain {topic} to {audience}",
        backstory="A clear, brief writer.",
        llm=llm,
        allow_delegation=False,
        verbose=False,
    )
    research = Task(
        name="research",
        description="List three facts about {topic}.",
        expected_output="Three facts.",
        agent=researcher,
    )
    write = Task(
        name="write",
        description="Write a brief about {topic} for {audience}, from the research.",
        expected_output="A short brief.",
        agent=writer,
        context=[research],
    )
    return Crew(
        agents=[researcher, writer],
        tasks=[research, write],
        process=Process.sequential,
        verbose=False,
    )
