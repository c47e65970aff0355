"""Checkpoints for adapters, kept in the sidecar's state API (state store `statestore`).

Activities run at least once: an adapter that saves its progress here can resume a retried
activity (same task execution id) or a later activity of the same call (same instance id)
instead of starting over. Only the plain state API is used (get, save, transactions), through
the Dapr SDK's `DaprClient`, so the same code works on the embedded sidecar and on daprd.

Values are JSON. Keys are namespaced `duragate/...` and never contain `||` (daprd's key prefix
separator). Every value is saved with a TTL (`ttl_seconds`, default 7 days): a checkpoint only
matters while its call can still run, and the store must not grow without bound.

The `DaprClient` is blocking (gRPC): the sync methods are for worker threads, the `a...`
methods run them in the loop's default executor. One client is opened on first use and shared;
its constructor waits for the sidecar's HTTP health endpoint, which is why the store is told
that endpoint's address. A process that knows only the sidecar's gRPC address (a worker of
another app, `duragate worker`) checks that address itself and opens the store with
`probe_http=False`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
from collections.abc import Iterable, Mapping
from typing import Any
from urllib.parse import quote

from gateway.state_client import without_http_probe

STATE_STORE = "statestore"
DEFAULT_TTL_SECONDS = 7 * 24 * 3600
KEY_PREFIX = "duragate"


def key(*parts: str) -> str:
    """A state key from parts, each quoted so that no part can forge another's key (or put
    `||` in it): `key("lg", thread, ns)` -> `duragate/lg/<thread>/<ns>`."""
    return "/".join([KEY_PREFIX, *(quote(p, safe="") for p in parts)])


class CheckpointStore:
    """JSON values by key in a Dapr state store."""

    def __init__(
        self,
        grpc_address: str,
        *,
        http_endpoint: str | None = None,
        probe_http: bool = True,
        store_name: str = STATE_STORE,
        ttl_seconds: int | None = DEFAULT_TTL_SECONDS,
    ) -> None:
        self.grpc_address = grpc_address
        self.http_endpoint = http_endpoint
        self.probe_http = probe_http
        self.store_name = store_name
        self.ttl_seconds = ttl_seconds
        self._client: Any = None
        self._lock = threading.Lock()

    # -- the client

    def _dapr(self) -> Any:
        with self._lock:
            if self._client is None:
                from dapr.clients import DaprClient
                from dapr.conf import settings

                # The client's constructor probes the sidecar's HTTP health endpoint, taken
                # from the SDK's global settings: point them at this sidecar for that probe.
                previous = getattr(settings, "DAPR_HTTP_ENDPOINT", None)
                if self.http_endpoint:
                    settings.DAPR_HTTP_ENDPOINT = self.http_endpoint  # type: ignore[attr-defined]
                probe = contextlib.nullcontext() if self.probe_http else without_http_probe()
                try:
                    with probe:
                        self._client = DaprClient(address=self.grpc_address)
                finally:
                    settings.DAPR_HTTP_ENDPOINT = previous  # type: ignore[attr-defined]
            return self._client

    def close(self) -> None:
        with self._lock:
            client, self._client = self._client, None
        if client is not None:
            client.close()

    def _metadata(self) -> dict[str, str]:
        return {"ttlInSeconds": str(self.ttl_seconds)} if self.ttl_seconds else {}

    # -- blocking API (worker threads)

    def get(self, name: str) -> Any | None:
        """The value under `name`, or None when there is none."""
        data = self._dapr().get_state(self.store_name, name).data
        return json.loads(data) if data else None

    def get_many(self, names: Iterable[str]) -> dict[str, Any]:
        """The values of those of `names` that exist."""
        names = list(names)
        if not names:
            return {}
        items = self._dapr().get_bulk_state(self.store_name, names).items
        return {item.key: json.loads(item.data) for item in items if item.data}

    def put(self, name: str, value: Any) -> None:
        data = json.dumps(value, separators=(",", ":"))
        self._dapr().save_state(self.store_name, name, data, state_metadata=self._metadata())

    def write(self, upserts: Mapping[str, Any], deletes: Iterable[str] = ()) -> None:
        """Save `upserts` and delete `deletes` in one transaction: all or nothing."""
        from dapr.clients.grpc._request import TransactionalStateOperation, TransactionOperationType

        metadata = self._metadata()
        operations = [
            TransactionalStateOperation(
                key=k, data=json.dumps(v, separators=(",", ":")), metadata=metadata
            )
            for k, v in upserts.items()
        ]
        operations += [
            TransactionalStateOperation(key=k, operation_type=TransactionOperationType.delete)
            for k in deletes
        ]
        if operations:
            self._dapr().execute_state_transaction(self.store_name, operations)

    def delete(self, *names: str) -> None:
        self.write({}, names)

    # -- async API (event loop)

    async def aget(self, name: str) -> Any | None:
        return await asyncio.to_thread(self.get, name)

    async def aget_many(self, names: Iterable[str]) -> dict[str, Any]:
        return await asyncio.to_thread(self.get_many, list(names))

    async def aput(self, name: str, value: Any) -> None:
        await asyncio.to_thread(self.put, name, value)

    async def awrite(self, upserts: Mapping[str, Any], deletes: Iterable[str] = ()) -> None:
        await asyncio.to_thread(self.write, dict(upserts), list(deletes))

    async def adelete(self, *names: str) -> None:
        await asyncio.to_thread(self.delete, *names)
