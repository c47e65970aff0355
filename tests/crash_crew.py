"""The crew of the crash matrix (tests/test_crash_matrix.py): CREW_STEPS tasks in sequence on a
deterministic offline model that records each task in the run's trace file (the format of
tests/crash_tools.py) and takes `pace` seconds per task.

Each task's answer is `step <k> value=<v>`, where v chains the value of the task before it as
the model reads it in its prompt (CrewAI passes the previous task's output as context): so the
final answer is right only if a resumed crew got back the outputs saved before a crash.

Import this module only from a gateway that loads the crewai kind (the adapter sets CrewAI's
environment before CrewAI is imported).
"""

from __future__ import annotations

import re
import time
from typing import Any

from crewai import Agent, BaseLLM, Crew, Process, Task

from tests.crash_tools import CREW_STEPS, SEED_VALUE, begin, done, step_value

_TASK = re.compile(r"Step (\d+) of run ([A-Za-z0-9_-]+) at ([0-9.]+) s")


def _text(messages: Any) -> str:
    if isinstance(messages, str):
        return messages
    return "\n".join(
        m["content"]
        for m in messages or []
        if isinstance(m, dict) and isinstance(m.get("content"), str)
    )


class SteppingLLM(BaseLLM):
    model: str = "stepping"

    def _answer(self, messages: Any, from_task: Any) -> str:
        description = getattr(from_task, "description", "") or ""
        match = _TASK.search(description)
        if match is None:
            raise ValueError(f"not a crash-matrix task: {description!r}")
        step, run, pace = int(match[1]), match[2], float(match[3])
        attempt = begin(run, step)
        time.sleep(pace)
        previous = SEED_VALUE
        if step > 1:
            found = re.findall(rf"step {step - 1} value=([0-9a-f]+)", _text(messages))
            previous = found[-1] if found else "missing-context"
        value = step_value(run, step, previous)
        done(run, step, attempt, value)
        return f"Thought: I now can give a great answer\nFinal Answer: step {step} value={value}"

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
        return len(_text(messages).split())

    def get_context_window_size(self) -> int:
        return 128_000


def step_crew() -> Crew:
    """A fresh crew of CREW_STEPS tasks, each taking the one before it as context."""
    llm = SteppingLLM(model="stepping")
    agent = Agent(
        role="Stepper",
        goal="Take each step of run {run}",
        backstory="Counts carefully.",
        llm=llm,
        allow_delegation=False,
        verbose=False,
    )
    tasks: list[Task] = []
    for step in range(1, CREW_STEPS + 1):
        tasks.append(
            Task(
                name=f"step{step}",
                description=f"Step {step} of run {{run}} at {{pace}} s a step.",
                expected_output="The step's value.",
                agent=agent,
                context=tasks[-1:],
            )
        )
    return Crew(agents=[agent], tasks=tasks, process=Process.sequential, verbose=False)
