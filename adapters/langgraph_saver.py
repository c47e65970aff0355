"""A LangGraph checkpoint saver over the sidecar's state API (`adapters.checkpoints`).

Layout, per thread and checkpoint namespace (the state API cannot list keys, so each thread
keeps its own indexes):

    lg/<thread>/namespaces              ["", "child:<id>", ...]
    lg/<thread>/<ns>/index              [checkpoint id, ...] (ids sort by time: uuid6)
    lg/<thread>/<ns>/cp/<id>            {"checkpoint": [type, b64], "metadata": [...], "parent": id}
    lg/<thread>/<ns>/w/<id>             [[task id, idx, channel, type, b64, task path], ...]

A checkpoint is stored whole, channel values included, so one read restores it. `put` saves
the checkpoint and its indexes in one transaction. `put_writes` follows `InMemorySaver`: a
write already stored for (task, index) is kept, except the special channels (errors,
interrupts, ...) whose negative index means "latest wins". Reads and writes of one thread's
indexes are serialised by a lock: parallel nodes of a graph save their writes concurrently.

Listing needs a thread (`list(None)` cannot enumerate threads over the state API).
"""

from __future__ import annotations

import asyncio
import base64
import threading
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any

from langchain_core.runnables import RunnableConfig
from langgraph.checkpoint.base import (
    WRITES_IDX_MAP,
    BaseCheckpointSaver,
    ChannelVersions,
    Checkpoint,
    CheckpointMetadata,
    CheckpointTuple,
    get_checkpoint_id,
    get_checkpoint_metadata,
    writes_sort_key,
)
from langgraph.checkpoint.serde.base import SerializerProtocol

from adapters.checkpoints import CheckpointStore, key


def _dump(serde: SerializerProtocol, value: Any) -> list[str]:
    kind, data = serde.dumps_typed(value)
    return [kind, base64.b64encode(data).decode()]


def _load(serde: SerializerProtocol, stored: list[str]) -> Any:
    return serde.loads_typed((stored[0], base64.b64decode(stored[1])))


class StateApiSaver(BaseCheckpointSaver[int]):
    """Checkpoints of LangGraph threads in a Dapr state store."""

    def __init__(self, store: CheckpointStore, *, serde: SerializerProtocol | None = None) -> None:
        super().__init__(serde=serde)
        self.store = store
        self._lock = threading.Lock()

    # -- keys

    @staticmethod
    def _namespaces_key(thread: str) -> str:
        return key("lg", thread, "namespaces")

    @staticmethod
    def _index_key(thread: str, ns: str) -> str:
        return key("lg", thread, ns, "index")

    @staticmethod
    def _checkpoint_key(thread: str, ns: str, checkpoint_id: str) -> str:
        return key("lg", thread, ns, "cp", checkpoint_id)

    @staticmethod
    def _writes_key(thread: str, ns: str, checkpoint_id: str) -> str:
        return key("lg", thread, ns, "w", checkpoint_id)

    # -- reading

    def _tuple(
        self, thread: str, ns: str, checkpoint_id: str, saved: Any, writes: Any
    ) -> CheckpointTuple:
        ordered = sorted(writes or [], key=lambda w: writes_sort_key(w[5], w[0], w[1]))
        parent = saved.get("parent")
        return CheckpointTuple(
            config={
                "configurable": {
                    "thread_id": thread,
                    "checkpoint_ns": ns,
                    "checkpoint_id": checkpoint_id,
                }
            },
            checkpoint=_load(self.serde, saved["checkpoint"]),
            metadata=_load(self.serde, saved["metadata"]),
            pending_writes=[(w[0], w[2], _load(self.serde, [w[3], w[4]])) for w in ordered],
            parent_config=(
                {
                    "configurable": {
                        "thread_id": thread,
                        "checkpoint_ns": ns,
                        "checkpoint_id": parent,
                    }
                }
                if parent
                else None
            ),
        )

    def get_tuple(self, config: RunnableConfig) -> CheckpointTuple | None:
        thread = str(config["configurable"]["thread_id"])
        ns = config["configurable"].get("checkpoint_ns", "")
        checkpoint_id = get_checkpoint_id(config)
        if not checkpoint_id:
            index = self.store.get(self._index_key(thread, ns)) or []
            if not index:
                return None
            checkpoint_id = max(index)
        cp_key = self._checkpoint_key(thread, ns, checkpoint_id)
        w_key = self._writes_key(thread, ns, checkpoint_id)
        found = self.store.get_many([cp_key, w_key])
        if cp_key not in found:
            return None
        return self._tuple(thread, ns, checkpoint_id, found[cp_key], found.get(w_key))

    def list(
        self,
        config: RunnableConfig | None,
        *,
        filter: dict[str, Any] | None = None,
        before: RunnableConfig | None = None,
        limit: int | None = None,
    ) -> Iterator[CheckpointTuple]:
        if config is None:
            raise ValueError(
                "listing checkpoints needs a thread_id: the state API cannot list keys"
            )
        thread = str(config["configurable"]["thread_id"])
        wanted_ns = config["configurable"].get("checkpoint_ns")
        wanted_id = get_checkpoint_id(config)
        before_id = get_checkpoint_id(before) if before else None
        if wanted_ns is not None:
            namespaces = [wanted_ns]
        else:
            namespaces = self.store.get(self._namespaces_key(thread)) or []
        remaining = limit
        for ns in namespaces:
            ids = sorted(self.store.get(self._index_key(thread, ns)) or [], reverse=True)
            for checkpoint_id in ids:
                if wanted_id and checkpoint_id != wanted_id:
                    continue
                if before_id and checkpoint_id >= before_id:
                    continue
                if remaining is not None and remaining <= 0:
                    return
                cp_key = self._checkpoint_key(thread, ns, checkpoint_id)
                w_key = self._writes_key(thread, ns, checkpoint_id)
                found = self.store.get_many([cp_key, w_key])
                if cp_key not in found:
                    continue
                found_tuple = self._tuple(
                    thread, ns, checkpoint_id, found[cp_key], found.get(w_key)
                )
                if filter and not all(found_tuple.metadata.get(k) == v for k, v in filter.items()):
                    continue
                if remaining is not None:
                    remaining -= 1
                yield found_tuple

    # -- writing

    def put(
        self,
        config: RunnableConfig,
        checkpoint: Checkpoint,
        metadata: CheckpointMetadata,
        new_versions: ChannelVersions,
    ) -> RunnableConfig:
        thread = str(config["configurable"]["thread_id"])
        ns = config["configurable"].get("checkpoint_ns", "")
        checkpoint_id = checkpoint["id"]
        saved = {
            "checkpoint": _dump(self.serde, checkpoint),
            "metadata": _dump(self.serde, get_checkpoint_metadata(config, metadata)),
            "parent": config["configurable"].get("checkpoint_id"),
        }
        with self._lock:
            index_key = self._index_key(thread, ns)
            ns_key = self._namespaces_key(thread)
            found = self.store.get_many([index_key, ns_key])
            upserts: dict[str, Any] = {self._checkpoint_key(thread, ns, checkpoint_id): saved}
            index = found.get(index_key) or []
            if checkpoint_id not in index:
                upserts[index_key] = [*index, checkpoint_id]
            namespaces = found.get(ns_key) or []
            if ns not in namespaces:
                upserts[ns_key] = [*namespaces, ns]
            self.store.write(upserts)
        return {
            "configurable": {
                "thread_id": thread,
                "checkpoint_ns": ns,
                "checkpoint_id": checkpoint_id,
            }
        }

    def put_writes(
        self,
        config: RunnableConfig,
        writes: Sequence[tuple[str, Any]],
        task_id: str,
        task_path: str = "",
    ) -> None:
        thread = str(config["configurable"]["thread_id"])
        ns = config["configurable"].get("checkpoint_ns", "")
        checkpoint_id = config["configurable"]["checkpoint_id"]
        w_key = self._writes_key(thread, ns, checkpoint_id)
        with self._lock:
            stored = {(w[0], w[1]): w for w in self.store.get(w_key) or []}
            changed = False
            for idx, (channel, value) in enumerate(writes):
                inner = (task_id, WRITES_IDX_MAP.get(channel, idx))
                if inner[1] >= 0 and inner in stored:
                    continue  # already saved by an earlier attempt of this task
                kind, data = _dump(self.serde, value)
                stored[inner] = [task_id, inner[1], channel, kind, data, task_path]
                changed = True
            if changed:
                self.store.put(w_key, list(stored.values()))

    def delete_thread(self, thread_id: str) -> None:
        thread = str(thread_id)
        with self._lock:
            ns_key = self._namespaces_key(thread)
            namespaces = self.store.get(ns_key) or []
            deletes = [ns_key]
            for ns in namespaces:
                index_key = self._index_key(thread, ns)
                for checkpoint_id in self.store.get(index_key) or []:
                    deletes.append(self._checkpoint_key(thread, ns, checkpoint_id))
                    deletes.append(self._writes_key(thread, ns, checkpoint_id))
                deletes.append(index_key)
            self.store.write({}, deletes)

    # -- async: the same, off the event loop

    async def aget_tuple(self, config: RunnableConfig) -> CheckpointTuple | None:
        return await asyncio.to_thread(self.get_tuple, config)

    async def alist(
        self,
        config: RunnableConfig | None,
        *,
        filter: dict[str, Any] | None = None,
        before: RunnableConfig | None = None,
        limit: int | None = None,
    ) -> AsyncIterator[CheckpointTuple]:
        found = await asyncio.to_thread(
            lambda: list(self.list(config, filter=filter, before=before, limit=limit))
        )
        for item in found:
            yield item

    async def aput(
        self,
        config: RunnableConfig,
        checkpoint: Checkpoint,
        metadata: CheckpointMetadata,
        new_versions: ChannelVersions,
    ) -> RunnableConfig:
        return await asyncio.to_thread(self.put, config, checkpoint, metadata, new_versions)

    async def aput_writes(
        self,
        config: RunnableConfig,
        writes: Sequence[tuple[str, Any]],
        task_id: str,
        task_path: str = "",
    ) -> None:
        await asyncio.to_thread(self.put_writes, config, writes, task_id, task_path)

    async def adelete_thread(self, thread_id: str) -> None:
        await asyncio.to_thread(self.delete_thread, thread_id)
