"""Targets that are not what their kind wants, for load-error tests."""

from __future__ import annotations

from typing import Any

from adapters.base import InputRequired, ToolContext


def not_a_graph() -> str:
    return "a string"


def needs_arguments(x: int) -> None:
    pass


def ask(question: str, context: ToolContext) -> dict[str, Any]:
    """Asks for input until it is given "done"; returns every answer it got."""
    answers: list[Any] = []
    if context.checkpoints is not None:
        answers = context.checkpoints.get(context.call_key("answers")) or []
    if context.supplied_input is not None:
        answers.append(context.supplied_input.value)
        context.require_checkpoints().put(context.call_key("answers"), answers)
    if not answers or answers[-1] != "done":
        raise InputRequired(f"{question} (answer {len(answers) + 1})", {"asked": len(answers) + 1})
    return {"answers": answers}


def flaky_graph() -> Any:
    """prepare -> unstable: `unstable` raises on its first run (counted in the trace file), so
    the retried activity must resume at it without running `prepare` again."""
    import os

    from langgraph.graph import END, START, StateGraph
    from typing_extensions import TypedDict

    class State(TypedDict, total=False):
        n: int
        doubled: int

    def counted(name: str) -> int:
        path = os.environ["DURAGATE_EXAMPLE_TRACE"]
        with open(path, "a", encoding="utf-8") as f:
            f.write(name + "\n")
        with open(path, encoding="utf-8") as f:
            return sum(1 for line in f if line.strip() == name)

    def prepare(state: State) -> State:
        counted("prepare")
        return {"n": state["n"] + 1}

    def unstable(state: State) -> State:
        if counted("unstable") == 1:
            raise RuntimeError("first run fails")
        return {"doubled": state["n"] * 2}

    graph = StateGraph(State)
    graph.add_node("prepare", prepare)
    graph.add_node("unstable", unstable)
    graph.add_edge(START, "prepare")
    graph.add_edge("prepare", "unstable")
    graph.add_edge("unstable", END)
    return graph.compile()


def refusing_script(request: dict[str, Any]) -> dict[str, Any]:
    """A scripted model that refuses every request for good."""
    from adapters.agent import ModelError

    raise ModelError(f"the script will not answer {request['model']!r}")


async def text_script(request: dict[str, Any]) -> Any:
    """A scripted model that answers something that is not a response body."""
    return "just text"


def structured_crew() -> Any:
    """The example crew, its last task declaring a pydantic output (so its result is that
    model's object, not `{"result": text}`)."""
    from pydantic import BaseModel

    from examples.crews import research_crew

    class Brief(BaseModel):
        title: str

    crew = research_crew()
    crew.tasks[-1].output_pydantic = Brief
    return crew
