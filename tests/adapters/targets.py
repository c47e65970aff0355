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
