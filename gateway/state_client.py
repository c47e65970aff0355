"""Small async access to the Dapr state API of the gateway's sidecar (embedded or daprd).

Dapr's own aio `DaprClient` first polls the sidecar's HTTP health endpoint, which the embedded
sidecar of `duragate serve` does not open; this speaks the same gRPC state API directly, with
etags for optimistic concurrency, so it behaves the same on daprd.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import grpc
from dapr.proto.common.v1 import common_pb2 as common_pb
from dapr.proto.runtime.v1 import dapr_pb2_grpc as runtime_grpc
from dapr.proto.runtime.v1 import state_pb2 as state_pb

STATE_STORE = "statestore"


_probe_lock = threading.Lock()


@contextlib.contextmanager
def without_http_probe() -> Iterator[None]:
    """Build a `dapr.clients.DaprClient` inside this to skip its wait on the sidecar's HTTP
    health endpoint (the SDK has no switch for it): for callers that have seen the sidecar
    answer on gRPC, which is all the embedded sidecar is sure to serve. One lock for every
    caller, so two threads never patch over each other's saved probe."""
    from dapr.clients.health import DaprHealth

    with _probe_lock:
        probe = DaprHealth.__dict__["wait_for_sidecar"]
        DaprHealth.wait_for_sidecar = staticmethod(lambda: None)  # type: ignore[method-assign]
        try:
            yield
        finally:
            DaprHealth.wait_for_sidecar = probe  # type: ignore[method-assign]


class EtagMismatch(Exception):
    """Someone else changed (or created) the key since it was read."""


@dataclass(frozen=True)
class Entry:
    value: bytes | None
    etag: str | None


class StateClient:
    def __init__(
        self,
        address: str,
        metadata: tuple[tuple[str, str], ...] = (),
        store: str = STATE_STORE,
        timeout: float = 10.0,
    ) -> None:
        self._channel = grpc.aio.insecure_channel(address)
        self._stub = runtime_grpc.DaprStub(self._channel)
        self._metadata = metadata
        self._store = store
        self._timeout = timeout

    async def get(self, key: str) -> Entry:
        response = await self._stub.GetState(
            state_pb.GetStateRequest(store_name=self._store, key=key),
            metadata=self._metadata,
            timeout=self._timeout,
        )
        if not response.data and not response.etag:
            return Entry(None, None)
        return Entry(bytes(response.data), response.etag or None)

    async def save(self, key: str, value: bytes, etag: str | None = None) -> None:
        """Write `value`. With `etag`, only over that version; with None, only if the key does
        not exist yet (first-write-wins). Raises EtagMismatch otherwise."""
        item = common_pb.StateItem(
            key=key,
            value=value,
            options=common_pb.StateOptions(
                concurrency=common_pb.StateOptions.StateConcurrency.CONCURRENCY_FIRST_WRITE
            ),
        )
        if etag is not None:
            item.etag.CopyFrom(common_pb.Etag(value=etag))
        else:
            item.etag.CopyFrom(common_pb.Etag(value=""))
        try:
            await self._stub.SaveState(
                state_pb.SaveStateRequest(store_name=self._store, states=[item]),
                metadata=self._metadata,
                timeout=self._timeout,
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() in (grpc.StatusCode.ABORTED, grpc.StatusCode.FAILED_PRECONDITION):
                raise EtagMismatch(key) from None
            raise

    async def delete(self, key: str) -> None:
        await self._stub.DeleteState(
            state_pb.DeleteStateRequest(store_name=self._store, key=key),
            metadata=self._metadata,
            timeout=self._timeout,
        )

    async def close(self) -> None:
        await self._channel.close()
