"""The LangGraph saver over a real sidecar's state API: a fan-out graph with a reducer, history
and `list` filters, `put_writes` semantics, deleting a thread, and the sync/async pairs."""

from __future__ import annotations

import operator
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Annotated, Any

import pytest
from langgraph.checkpoint.base import ERROR, empty_checkpoint
from langgraph.graph import END, START, StateGraph
from typing_extensions import TypedDict

from adapters.checkpoints import CheckpointStore
from adapters.langgraph_saver import StateApiSaver
from gateway.config import EmbeddedEngineConfig
from gateway.runtime import DurableRuntime

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[CheckpointStore]:
    runtime = DurableRuntime(
        EmbeddedEngineConfig(sidecar="thread"), tmp_path / "engine.db", lambda name: None
    )
    await runtime.start()
    try:
        assert runtime.checkpoints is not None
        yield runtime.checkpoints
    finally:
        await runtime.stop()


class FanState(TypedDict):
    items: Annotated[list[str], operator.add]


def fan_graph(saver: StateApiSaver) -> Any:
    graph = StateGraph(FanState)
    for name in ("left", "right", "middle"):
        graph.add_node(name, lambda s, n=name: {"items": [n]})
        graph.add_edge(START, name)
    graph.add_node("join", lambda s: {"items": ["join:" + ",".join(sorted(s["items"]))]})
    graph.add_edge(["left", "right", "middle"], "join")
    graph.add_edge("join", END)
    return graph.compile(checkpointer=saver)


async def test_fan_out_graph_history_and_list_filters(store: CheckpointStore) -> None:
    saver = StateApiSaver(store)
    graph = fan_graph(saver)
    config: Any = {"configurable": {"thread_id": "fan"}}
    out = await graph.ainvoke({"items": []}, config, durability="sync")
    # Parallel writes all arrive through the reducer, in LangGraph's deterministic order.
    assert sorted(out["items"][:3]) == ["left", "middle", "right"]
    assert out["items"][3] == "join:left,middle,right"

    history = [s async for s in graph.aget_state_history(config)]
    steps = [s.metadata["step"] for s in history]
    assert steps == sorted(steps, reverse=True) and steps[-1] == -1  # newest first
    assert history[0].values == out

    everything = list(saver.list(config))
    assert len(everything) == len(history)
    two = list(saver.list(config, limit=2))
    assert [t.config for t in two] == [t.config for t in everything[:2]]
    before = list(saver.list(config, before=everything[1].config))
    assert [t.config for t in before] == [t.config for t in everything[2:]]
    step1 = list(saver.list(config, filter={"step": 1}))
    assert [t.metadata["step"] for t in step1] == [1]
    assert [t.config async for t in saver.alist(config)] == [t.config for t in everything]
    with pytest.raises(ValueError, match="thread_id"):
        list(saver.list(None))

    saver.delete_thread("fan")
    assert saver.get_tuple(config) is None
    assert list(saver.list(config)) == []


async def test_put_writes_keeps_the_first_write_of_a_task_but_the_latest_error(
    store: CheckpointStore,
) -> None:
    saver = StateApiSaver(store)
    base: Any = {"configurable": {"thread_id": "w", "checkpoint_ns": ""}}
    checkpoint = empty_checkpoint()
    saved = await saver.aput(base, checkpoint, {"source": "input", "step": -1}, {})
    assert saved["configurable"]["checkpoint_id"] == checkpoint["id"]

    saver.put_writes(saved, [("a", 1), ("b", 2)], task_id="t1", task_path="~0")
    saver.put_writes(saved, [("a", 100)], task_id="t1", task_path="~0")  # a retried task
    await saver.aput_writes(saved, [(ERROR, "first")], task_id="t2", task_path="~1")
    await saver.aput_writes(saved, [(ERROR, "second")], task_id="t2", task_path="~1")
    found = await saver.aget_tuple(base)
    assert found is not None
    assert found.checkpoint["id"] == checkpoint["id"]
    assert found.metadata == {"source": "input", "step": -1}
    assert found.pending_writes == [("t1", "a", 1), ("t1", "b", 2), ("t2", ERROR, "second")]

    await saver.adelete_thread("w")
    assert await saver.aget_tuple(base) is None
