"""Targets that are not what their kind wants, for load-error tests."""

from __future__ import annotations


def not_a_graph() -> str:
    return "a string"


def needs_arguments(x: int) -> None:
    pass
