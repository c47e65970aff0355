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

from crewai import Agent, Crew, Process, Task

from examples.crews import ScriptedLLM, prompt_text
from tests.crash_tools import CREW_STEPS, SEED_VALUE, begin, done, step_value

_TASK = re.compile(r"Step (\d+) of run ([A-Za-z0-9_-]+) at ([0-9.]+) s")


class SteppingLLM(ScriptedLLM):
    """The example crews' offline model, answering crash-matrix steps instead."""

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
            found = re.findall(rf"step {step - 1} value=([0-9a-f]+)", prompt_text(messages))
            previous = found[-1] if found else "missing-context"
        value = step_value(run, step, previous)
        done(run, step, attempt, value)
        return f"Thought: I now can give a great answer\nFinal Answer: step {step} value={value}"


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
