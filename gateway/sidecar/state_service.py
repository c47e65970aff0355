"""The state and metadata part of daprd's `dapr.proto.runtime.v1.Dapr` service.

Implemented: GetState, GetBulkState, SaveState, DeleteState, DeleteBulkState,
ExecuteStateTransaction and GetMetadata, with daprd's status codes and messages (pkg/api/grpc
in dapr/dapr, pkg/api/errors, components-contrib's ETagError). Every other method of the
service keeps the generated base class's UNIMPLEMENTED answer.

Like daprd (with its default key prefix strategy "appid"), a key is stored as
`<app id>||<key>`, so a key may not contain `||`.
"""

from __future__ import annotations

import functools
import logging
import sqlite3
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from typing import Any, TypeVar

import grpc
from google.protobuf import any_pb2, empty_pb2
from google.rpc import error_details_pb2, status_pb2

from gateway import __version__

from .protos import common_pb, metadata_pb, runtime_grpc, state_pb
from .settings import SidecarSettings
from .state_store import (
    Delete,
    EtagInvalidError,
    EtagMismatchError,
    Operation,
    StateStore,
    StateStoreError,
    StoredItem,
    Upsert,
)

logger = logging.getLogger(__name__)

RUNTIME_VERSION = f"duragate-{__version__}"
STORE_TYPE = "state.sqlite"
STORE_VERSION = "v1"
# What components-contrib's SQLite store declares (ETAG, TRANSACTIONAL, TTL), plus ACTOR, which
# daprd adds for the store that holds actor (and so workflow) state.
STORE_CAPABILITIES = ("ETAG", "TRANSACTIONAL", "TTL", "ACTOR")

# Items in one bulk request or transaction. The message size bounds requests already; this also
# bounds the work of one call (and of one SQLite transaction).
MAX_BULK_ITEMS = 10_000

KEY_SEPARATOR = "||"
TTL_METADATA_KEY = "ttlInSeconds"
TTL_EXPIRE_TIME_KEY = "ttlExpireTime"  # what daprd returns in GetState metadata
_MAX_TTL_SECONDS = 2**31 - 1  # components-contrib caps TTLs at int32
_ERROR_DOMAIN = "dapr.io"
_FIRST_WRITE = common_pb.StateOptions.StateConcurrency.CONCURRENCY_FIRST_WRITE
_UPSERT, _DELETE = "upsert", "delete"


class ApiError(Exception):
    """An error answered with a gRPC status, optionally with daprd's rich error details."""

    def __init__(
        self,
        code: grpc.StatusCode,
        message: str,
        *,
        reason: str | None = None,
        metadata: dict[str, str] | None = None,
        store: str | None = None,
        field: str | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.reason = reason
        self.metadata = metadata
        self.store = store
        self.field = field

    def trailing_metadata(self) -> tuple[tuple[str, bytes], ...]:
        """`grpc-status-details-bin`, as daprd's kit errors send it (ErrorInfo, ResourceInfo,
        BadRequest); the SDK's DaprGrpcError parses it."""
        if self.reason is None:
            return ()
        details = [
            error_details_pb2.ErrorInfo(
                reason=self.reason, domain=_ERROR_DOMAIN, metadata=self.metadata or {}
            )
        ]
        if self.store is not None:
            details.append(
                error_details_pb2.ResourceInfo(resource_type="state", resource_name=self.store)
            )
        if self.field is not None:
            violation = error_details_pb2.BadRequest.FieldViolation(
                field=self.field, description=self.message
            )
            details.append(error_details_pb2.BadRequest(field_violations=[violation]))
        packed = []
        for detail in details:
            any_detail = any_pb2.Any()
            any_detail.Pack(detail)
            packed.append(any_detail)
        # Code and message must equal the call's: grpc_status.from_call() checks them.
        status = status_pb2.Status(code=self.code.value[0], message=self.message, details=packed)
        return (("grpc-status-details-bin", status.SerializeToString()),)


Req = TypeVar("Req")
Resp = TypeVar("Resp")
Handler = Callable[[Any, Req, grpc.aio.ServicerContext[Any, Any]], Awaitable[Resp]]


def _rpc(method: Handler[Req, Resp]) -> Handler[Req, Resp]:
    """Turn ApiError (and anything unexpected) into a gRPC status."""

    @functools.wraps(method)
    async def wrapper(self: Any, request: Req, context: grpc.aio.ServicerContext[Any, Any]) -> Resp:
        try:
            return await method(self, request, context)
        except ApiError as err:
            await context.abort(err.code, err.message, trailing_metadata=err.trailing_metadata())
        except Exception:
            logger.exception("state API %s failed", method.__name__)
            await context.abort(grpc.StatusCode.INTERNAL, f"internal error in {method.__name__}")
        raise AssertionError("unreachable: context.abort() raises")

    return wrapper


def _etag_of(item: Any) -> str | None:
    """The etag of a StateItem or DeleteStateRequest; an empty one is no etag (as in daprd)."""
    if item.HasField("etag") and item.etag.value:
        return str(item.etag.value)
    return None


def _is_first_write(item: Any) -> bool:
    return bool(item.HasField("options") and item.options.concurrency == _FIRST_WRITE)


class StateServicer(runtime_grpc.DaprServicer):
    """State API on a StateStore, for the state stores this sidecar registers (each its own
    key space in the StateStore)."""

    def __init__(self, store: StateStore, settings: SidecarSettings) -> None:
        self._store = store
        self._settings = settings
        self._prefix = settings.app_id + KEY_SEPARATOR
        self._stores = frozenset([settings.state_store_name, *settings.state_stores])

    # -- validation ----------------------------------------------------------------------------

    def _check_store(self, name: str) -> str:
        if name not in self._stores:
            raise ApiError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"state store {name} is not found",
                reason="DAPR_STATE_NOT_FOUND",
            )
        return name

    def _stored_key(self, store: str, key: str) -> str:
        if not key:
            raise ApiError(grpc.StatusCode.INVALID_ARGUMENT, "state key cannot be empty")
        if KEY_SEPARATOR in key:
            raise ApiError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"input key/keyPrefix '{key}' can't contain '{KEY_SEPARATOR}'",
                reason="DAPR_STATE_ILLEGAL_KEY",
                store=store,
                field=key,
            )
        return self._prefix + key

    def _original_key(self, stored: str) -> str:
        return stored[len(self._prefix) :]

    def _check_count(self, count: int) -> None:
        if count > MAX_BULK_ITEMS:
            raise ApiError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"the request has {count} items, more than the limit of {MAX_BULK_ITEMS}",
            )

    def _check_size(self, key: str, value: bytes) -> None:
        limit = self._settings.max_payload_bytes
        if len(value) > limit:
            raise ApiError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"the value of key '{key}' is {len(value)} bytes, more than the limit of"
                f" {limit} bytes (max_payload_bytes)",
            )

    @staticmethod
    def _ttl(store: str, metadata: Any) -> int | None:
        raw = metadata.get(TTL_METADATA_KEY, "")
        if not raw:
            return None
        try:
            ttl = int(raw)
        except ValueError:
            ttl = -2
        if ttl < -1:
            raise ApiError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"failed saving state in state store {store}: error parsing TTL: incorrect"
                f" value for metadata '{TTL_METADATA_KEY}': {raw!r} (an integer >= -1)",
            )
        return min(ttl, _MAX_TTL_SECONDS)

    def _upsert(self, store: str, item: Any) -> Upsert:
        key = self._stored_key(store, item.key)
        self._check_size(item.key, item.value)
        return Upsert(
            key=key,
            value=bytes(item.value),
            etag=_etag_of(item),
            first_write=_is_first_write(item),
            ttl_seconds=self._ttl(store, item.metadata),
        )

    def _delete(self, store: str, item: Any) -> Delete:
        return Delete(key=self._stored_key(store, item.key), etag=_etag_of(item))

    def _item_metadata(self, item: StoredItem) -> dict[str, str]:
        if item.expires_at is None:
            return {}
        return {TTL_EXPIRE_TIME_KEY: _rfc3339(item.expires_at)}

    async def _apply(self, store: str, ops: Sequence[Operation], message: str) -> None:
        """Apply with daprd's mapping of store errors: Aborted for an etag mismatch,
        InvalidArgument for an invalid etag, Internal otherwise. `message` takes the error."""
        try:
            await self._store.apply(store, ops)
        except EtagMismatchError as exc:
            raise ApiError(grpc.StatusCode.ABORTED, message.format(exc)) from exc
        except EtagInvalidError as exc:
            raise ApiError(grpc.StatusCode.INVALID_ARGUMENT, message.format(exc)) from exc
        except (StateStoreError, sqlite3.Error) as exc:
            raise ApiError(grpc.StatusCode.INTERNAL, message.format(exc)) from exc

    # -- RPCs ----------------------------------------------------------------------------------

    @_rpc
    async def GetState(
        self, request: state_pb.GetStateRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> state_pb.GetStateResponse:
        store = self._check_store(request.store_name)
        key = self._stored_key(store, request.key)
        try:
            item = await self._store.get(store, key)
        except (StateStoreError, sqlite3.Error) as exc:
            raise ApiError(
                grpc.StatusCode.INTERNAL,
                f"fail to get {request.key} from state store {store}: {exc}",
            ) from exc
        if item is None:
            return state_pb.GetStateResponse()
        return state_pb.GetStateResponse(
            data=item.value, etag=item.etag, metadata=self._item_metadata(item)
        )

    @_rpc
    async def GetBulkState(
        self, request: state_pb.GetBulkStateRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> state_pb.GetBulkStateResponse:
        store = self._check_store(request.store_name)
        keys = list(request.keys)
        self._check_count(len(keys))
        stored = [self._stored_key(store, key) for key in keys]
        try:
            items = await self._store.get_many(store, stored)
        except (StateStoreError, sqlite3.Error) as exc:
            raise ApiError(
                grpc.StatusCode.INTERNAL, f"failed getting state in state store {store}: {exc}"
            ) from exc
        # The whole answer must fit in one gRPC message: refuse clearly rather than let the
        # transport fail with a less helpful error.
        total = sum(len(item.value) for item in items.values())
        limit = self._settings.max_payload_bytes
        if total > limit:
            raise ApiError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"the values of the {len(keys)} keys total {total} bytes, more than the limit of"
                f" {limit} bytes (max_payload_bytes); ask for fewer keys at a time",
            )
        response = state_pb.GetBulkStateResponse()
        for key, stored_key in zip(keys, stored, strict=True):
            found = items.get(stored_key)
            if found is None:
                response.items.add(key=key)
            else:
                response.items.add(
                    key=key,
                    data=found.value,
                    etag=found.etag,
                    metadata=self._item_metadata(found),
                )
        return response

    @_rpc
    async def SaveState(
        self, request: state_pb.SaveStateRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> empty_pb2.Empty:
        store = self._check_store(request.store_name)
        self._check_count(len(request.states))
        ops = [self._upsert(store, item) for item in request.states]
        await self._apply(store, ops, f"failed saving state in state store {store}: {{}}")
        return empty_pb2.Empty()

    @_rpc
    async def DeleteState(
        self, request: state_pb.DeleteStateRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> empty_pb2.Empty:
        store = self._check_store(request.store_name)
        op = self._delete(store, request)
        await self._apply(store, [op], f"failed deleting state with key {request.key}: {{}}")
        return empty_pb2.Empty()

    @_rpc
    async def DeleteBulkState(
        self,
        request: state_pb.DeleteBulkStateRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> empty_pb2.Empty:
        store = self._check_store(request.store_name)
        self._check_count(len(request.states))
        ops = [self._delete(store, item) for item in request.states]
        await self._apply(store, ops, f"failed deleting state in state store {store}: {{}}")
        return empty_pb2.Empty()

    @_rpc
    async def ExecuteStateTransaction(
        self,
        request: state_pb.ExecuteStateTransactionRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> empty_pb2.Empty:
        store = self._check_store(request.storeName)
        count = len(request.operations)
        if count > MAX_BULK_ITEMS:
            raise ApiError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"the transaction contains {count} operations, which is more than what the"
                f" state store supports: {MAX_BULK_ITEMS}",
                reason="DAPR_STATE_TOO_MANY_TRANSACTIONS",
                metadata={
                    "currentOpsTransaction": str(count),
                    "maxOpsPerTransaction": str(MAX_BULK_ITEMS),
                },
                store=store,
            )
        ops: list[Operation] = []
        for op in request.operations:
            if op.operationType == _UPSERT:
                ops.append(self._upsert(store, op.request))
            elif op.operationType == _DELETE:
                ops.append(self._delete(store, op.request))
            else:
                # daprd answers Unimplemented here (messages.ErrNotSupportedStateOperation).
                raise ApiError(
                    grpc.StatusCode.UNIMPLEMENTED,
                    f"operation type {op.operationType} not supported",
                )
        try:
            await self._store.apply(store, ops)
        except (StateStoreError, sqlite3.Error) as exc:
            # daprd reports every failure of a transaction, an etag mismatch included, as
            # Internal with this message (it does not map ETagError here as for SaveState).
            raise ApiError(
                grpc.StatusCode.INTERNAL, f"error while executing state transaction: {exc}"
            ) from exc
        return empty_pb2.Empty()

    @_rpc
    async def GetMetadata(
        self, request: metadata_pb.GetMetadataRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> metadata_pb.GetMetadataResponse:
        components = [
            metadata_pb.RegisteredComponents(
                name=self._settings.state_store_name,
                type=STORE_TYPE,
                version=STORE_VERSION,
                capabilities=list(STORE_CAPABILITIES),
            )
        ]
        components += [
            metadata_pb.RegisteredComponents(
                name=name,
                type=STORE_TYPE,
                version=STORE_VERSION,
                capabilities=[c for c in STORE_CAPABILITIES if c != "ACTOR"],
            )
            for name in self._settings.state_stores
        ]
        return metadata_pb.GetMetadataResponse(
            id=self._settings.app_id,
            registered_components=components,
            extended_metadata={"daprRuntimeVersion": RUNTIME_VERSION},
            runtime_version=RUNTIME_VERSION,
        )


def _rfc3339(unix_seconds: float) -> str:
    return datetime.fromtimestamp(int(unix_seconds), UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
