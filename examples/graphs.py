"""Example LangGraph graphs, served by the `langgraph` tool kind (see config/gateway.yaml).

- `pipeline`: outline -> draft -> finish over a text; `draft` can be slowed down
  (`delay_seconds`) to watch progress or to kill the gateway in the middle of it.
- `review`: summarises a text, then asks a person to approve the summary (`interrupt`), and
  publishes or discards it depending on the answer.

When the environment variable DURAGATE_EXAMPLE_TRACE names a file, every node appends its name
to it as it starts: the crash tests count how often each node ran. While the file named by
DURAGATE_EXAMPLE_HOLD exists, `draft` waits (up to 10 minutes): the tests kill the gateway there.
"""

from __future__ import annotations

import os
import time
from typing import Any, NotRequired

from langgraph.config import get_stream_writer
from langgraph.graph import END, START, StateGraph
from langgraph.types import interrupt
from typing_extensions import TypedDict

TRACE_ENV = "DURAGATE_EXAMPLE_TRACE"
HOLD_ENV = "DURAGATE_EXAMPLE_HOLD"


def hold() -> None:
    """Wait while the hold file exists (bounded)."""
    path = os.environ.get(HOLD_ENV)
    deadline = time.monotonic() + 600
    while path and os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.05)


def _trace(node: str) -> None:
    path = os.environ.get(TRACE_ENV)
    if path:
        with open(path, "a", encoding="utf-8") as f:
            f.write(node + "\n")
            f.flush()
            os.fsync(f.fileno())


# --- pipeline ---------------------------------------------------------------------------------


class PipelineInput(TypedDict):
    text: str
    delay_seconds: NotRequired[float]


class PipelineOutput(TypedDict):
    outline: list[str]
    draft: str
    words: int


class PipelineState(PipelineInput, PipelineOutput, total=False):
    pass


def outline(state: PipelineState) -> dict[str, Any]:
    _trace("outline")
    points = [s.strip() for s in state["text"].split(".") if s.strip()]
    get_stream_writer()(f"outlined {len(points)} point(s)")
    return {"outline": points}


def draft(state: PipelineState) -> dict[str, Any]:
    _trace("draft")
    hold()
    delay = float(state.get("delay_seconds") or 0)
    if delay > 0:
        time.sleep(min(delay, 600))
    return {"draft": " / ".join(p.capitalize() for p in state["outline"])}


def finish(state: PipelineState) -> dict[str, Any]:
    _trace("finish")
    return {"words": len(state["draft"].split())}


def build_pipeline() -> Any:
    graph = StateGraph(PipelineState, input_schema=PipelineInput, output_schema=PipelineOutput)
    graph.add_node("outline", outline)
    graph.add_node("draft", draft)
    graph.add_node("finish", finish)
    graph.add_edge(START, "outline")
    graph.add_edge("outline", "draft")
    graph.add_edge("draft", "finish")
    graph.add_edge("finish", END)
    return graph.compile(name="pipeline")


pipeline = build_pipeline()


# --- review (human in the loop) -------------------------------------------------------------


class ReviewInput(TypedDict):
    text: str


class ReviewOutput(TypedDict):
    summary: str
    status: str
    reviewer_note: str


class ReviewState(ReviewInput, ReviewOutput, total=False):
    pass


def summarise(state: ReviewState) -> dict[str, Any]:
    _trace("summarise")
    first = state["text"].split(".")[0].strip()
    return {"summary": first + "." if first else ""}


def approve(state: ReviewState) -> dict[str, Any]:
    _trace("approve")
    answer = interrupt({"question": "Publish this summary?", "summary": state["summary"]})
    if isinstance(answer, dict):
        approved, note = bool(answer.get("approve")), str(answer.get("note", ""))
    else:
        approved, note = answer is True or str(answer).lower() in ("yes", "approve"), ""
    return {"status": "approved" if approved else "rejected", "reviewer_note": note}


def publish(state: ReviewState) -> dict[str, Any]:
    _trace("publish")
    if state["status"] != "approved":
        return {"summary": ""}
    return {"summary": state["summary"]}


def build_review() -> Any:
    graph = StateGraph(ReviewState, input_schema=ReviewInput, output_schema=ReviewOutput)
    graph.add_node("summarise", summarise)
    graph.add_node("approve", approve)
    graph.add_node("publish", publish)
    graph.add_edge(START, "summarise")
    graph.add_edge("summarise", "approve")
    graph.add_edge("approve", "publish")
    graph.add_edge("publish", END)
    return graph.compile(name="review")
