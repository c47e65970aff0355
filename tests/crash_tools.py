"""Tools for the crash matrix (tests/test_crash_matrix.py): a `python` tool and a `langgraph`
graph that run a few steps over a couple of seconds, each step leaving an observable side
effect in a trace file. The `crewai` crew is in tests/crash_crew.py (CrewAI is imported only by
a gateway that loads that kind).

Every run of a call is named by its `run` argument; its trace is the file
`$DURAGATE_CRASH_TRACE_DIR/<run>.log`, one line per event, appended with O_APPEND and fsync
(so a SIGKILL loses nothing that was written):

    begin <step> <attempt>          the step started (attempt 1, 2, ... across restarts)
    done <step> <attempt> <value>   the step's side effect: it happened, with this value

A step's value chains the previous one (`step_value`), so the call's result is right only if
every resumed run saw the values of the steps before it. The test computes the expected result
with the same function.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

from pydantic import Field
from typing_extensions import TypedDict

# Imported at run time: the python adapter resolves the string annotation `ToolContext`.
from adapters.base import ToolContext

TRACE_DIR_ENV = "DURAGATE_CRASH_TRACE_DIR"
STEPS = 4  # steps of the python tool and the graph
CREW_STEPS = 3  # tasks of the crew
SEED_VALUE = "start"


def step_value(run: str, step: int, previous: str) -> str:
    """The value of step `step` of `run`, given the value of the step before it."""
    return hashlib.sha256(f"{run}/{step}/{previous}".encode()).hexdigest()[:12]


def expected_values(run: str, steps: int) -> list[str]:
    values: list[str] = []
    previous = SEED_VALUE
    for step in range(1, steps + 1):
        previous = step_value(run, step, previous)
        values.append(previous)
    return values


# --- the trace file -------------------------------------------------------------------------


def trace_path(run: str) -> Path:
    directory = os.environ.get(TRACE_DIR_ENV)
    if not directory:
        raise RuntimeError(f"{TRACE_DIR_ENV} is not set: the crash tools need a trace directory")
    if not run or not run.replace("-", "").replace("_", "").isalnum():
        raise ValueError(f"run name {run!r} must be letters, digits, '-' and '_'")
    return Path(directory) / f"{run}.log"


def _append(path: Path, line: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        os.write(fd, (line + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass
class Trace:
    """A trace file, parsed."""

    begins: Counter[int] = field(default_factory=Counter)
    dones: Counter[int] = field(default_factory=Counter)
    values: dict[int, str] = field(default_factory=dict)  # the first value each step recorded
    order: list[tuple[str, int]] = field(default_factory=list)

    @classmethod
    def parse(cls, text: str) -> Trace:
        trace = cls()
        for line in text.splitlines():
            parts = line.split()
            if len(parts) >= 3 and parts[0] == "begin":
                step = int(parts[1])
                trace.begins[step] += 1
                trace.order.append(("begin", step))
            elif len(parts) == 4 and parts[0] == "done":
                step = int(parts[1])
                trace.dones[step] += 1
                trace.values.setdefault(step, parts[3])
                trace.order.append(("done", step))
            elif line.strip():
                raise ValueError(f"unexpected trace line {line!r}")
        return trace

    @classmethod
    def read(cls, path: Path) -> Trace:
        return cls.parse(path.read_text() if path.exists() else "")

    def last_begun(self) -> int:
        return max(self.begins, default=0)


def begin(run: str, step: int) -> int:
    """Record that `step` starts; returns its attempt number (1 + earlier starts)."""
    path = trace_path(run)
    attempt = Trace.read(path).begins[step] + 1
    _append(path, f"begin {step} {attempt}")
    return attempt


def done(run: str, step: int, attempt: int, value: str) -> None:
    _append(trace_path(run), f"done {step} {attempt} {value}")


# --- the python tool ------------------------------------------------------------------------


async def steps(
    run: Annotated[str, Field(description="Names the trace file of this call.")],
    pace: Annotated[float, Field(ge=0, le=30, description="Seconds per step.")] = 0.5,
    *,
    context: ToolContext,
) -> dict[str, Any]:
    """Run STEPS steps, `pace` seconds each. Idempotent: a step whose side effect (its `done`
    line, written in one append) is already in the trace is not run again, so a run after a
    crash resumes at the first step without one, with the values recorded before."""
    values: list[str] = []
    previous = SEED_VALUE
    for step in range(1, STEPS + 1):
        recorded = await asyncio.to_thread(Trace.read, trace_path(run))
        if step in recorded.values:
            previous = recorded.values[step]
            values.append(previous)
            continue
        attempt = await asyncio.to_thread(begin, run, step)
        await asyncio.sleep(pace)
        previous = step_value(run, step, previous)
        await asyncio.to_thread(done, run, step, attempt, previous)
        values.append(previous)
        context.progress(step, STEPS, f"step {step} done")
    return {"run": run, "values": values}


# --- the langgraph graph ----------------------------------------------------------------------


class GraphInput(TypedDict):
    run: str
    pace: float


class GraphOutput(TypedDict):
    run: str
    values: list[str]


class GraphState(GraphInput, GraphOutput, total=False):
    pass


def _node(step: int) -> Any:
    async def node(state: GraphState) -> dict[str, Any]:
        run = state["run"]
        attempt = await asyncio.to_thread(begin, run, step)
        await asyncio.sleep(float(state["pace"]))
        values = list(state.get("values") or [])
        value = step_value(run, step, values[-1] if values else SEED_VALUE)
        await asyncio.to_thread(done, run, step, attempt, value)
        return {"values": [*values, value]}

    node.__name__ = f"step{step}"
    return node


def build_graph() -> Any:
    """step1 -> step2 -> ... -> stepN, each one a side effect and a value in the state.
    Async nodes: a dozen calls at once need no worker threads."""
    from langgraph.graph import END, START, StateGraph

    graph = StateGraph(GraphState, input_schema=GraphInput, output_schema=GraphOutput)
    previous = START
    for step in range(1, STEPS + 1):
        graph.add_node(f"step{step}", _node(step))
        graph.add_edge(previous, f"step{step}")
        previous = f"step{step}"
    graph.add_edge(previous, END)
    return graph.compile(name="crash_steps")
