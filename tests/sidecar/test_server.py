"""The sidecar server: health endpoints, API token, listeners, locking, limits, lifecycle."""

from __future__ import annotations

import asyncio
import os
import socket
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from dapr.clients import DaprClient
from dapr.clients.exceptions import DaprGrpcError
from dapr.proto.runtime.v1 import secret_pb2
from google.protobuf import empty_pb2
from pydantic import SecretStr

from gateway.sidecar.health import HealthServer
from gateway.sidecar.protos import common_pb, pb, runtime_grpc, state_pb, workflow_grpc
from gateway.sidecar.server import Sidecar, SidecarError, SidecarThread, run_sidecar
from gateway.sidecar.settings import SidecarSettings

from .conftest import DaprEnv, SidecarFactory, sidecar_settings

STORE = "statestore"
TOKEN = "s3cret-token-value"


def http_get(address: str, path: str) -> int:
    try:
        with urllib.request.urlopen(f"http://{address}{path}", timeout=5) as response:
            return int(response.status)
    except urllib.error.HTTPError as err:
        return err.code


# -- health ------------------------------------------------------------------------------------


def test_health_endpoints_answer_204(sidecar: SidecarThread) -> None:
    assert sidecar.http_address is not None
    assert http_get(sidecar.http_address, "/v1.0/healthz") == 204
    assert http_get(sidecar.http_address, "/v1.0/healthz/outbound") == 204
    assert http_get(sidecar.http_address, "/v1.0/state/statestore/k") == 404


def test_health_needs_no_token(sidecar_factory: SidecarFactory) -> None:
    sidecar = sidecar_factory(api_token=SecretStr(TOKEN))
    assert sidecar.http_address is not None
    assert http_get(sidecar.http_address, "/v1.0/healthz/outbound") == 204


async def test_health_answers_500_when_not_ready() -> None:
    ready = False
    server = HealthServer("127.0.0.1:0", lambda: ready)
    await server.start()
    try:
        assert server.address is not None
        assert await asyncio.to_thread(http_get, server.address, "/v1.0/healthz") == 500
        ready = True
        assert await asyncio.to_thread(http_get, server.address, "/v1.0/healthz") == 204
    finally:
        await server.stop()


def test_http_listener_is_optional(sidecar_factory: SidecarFactory) -> None:
    sidecar = sidecar_factory(http_listen=None)
    assert sidecar.http_address is None
    with grpc.insecure_channel(sidecar.grpc_address) as channel:
        stub = runtime_grpc.DaprStub(channel)
        stub.SaveState(state_pb.SaveStateRequest(store_name=STORE, states=[]))


def test_stopped_sidecar_stops_answering(sidecar_factory: SidecarFactory) -> None:
    sidecar = sidecar_factory()
    http = sidecar.http_address
    assert http is not None
    sidecar.stop()
    with pytest.raises(urllib.error.URLError):
        http_get(http, "/v1.0/healthz")


# -- API token ---------------------------------------------------------------------------------


@pytest.fixture
def token_sidecar(sidecar_factory: SidecarFactory) -> SidecarThread:
    return sidecar_factory(api_token=SecretStr(TOKEN))


@pytest.mark.parametrize("presented", [None, "wrong-token", TOKEN + "x", ""])
def test_api_token_refused(
    token_sidecar: SidecarThread, dapr_env: DaprEnv, presented: str | None
) -> None:
    dapr_env(token_sidecar.grpc_address, token_sidecar.http_address, token=presented)
    with DaprClient() as client, pytest.raises(DaprGrpcError) as info:
        client.save_state(STORE, "k", "v")
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "api token" in info.value.details()
    assert TOKEN not in info.value.details()


def test_api_token_accepted(token_sidecar: SidecarThread, dapr_env: DaprEnv) -> None:
    dapr_env(token_sidecar.grpc_address, token_sidecar.http_address, token=TOKEN)
    with DaprClient() as client:
        client.save_state(STORE, "k", "v")
        assert client.get_state(STORE, "k").data == b"v"
        assert client.get_metadata().application_id == "duragate"


def test_api_token_guards_the_workflow_service(token_sidecar: SidecarThread) -> None:
    with grpc.insecure_channel(token_sidecar.grpc_address) as channel:
        stub = workflow_grpc.TaskHubSidecarServiceStub(channel)
        with pytest.raises(grpc.RpcError) as unary:
            stub.Hello(empty_pb2.Empty(), timeout=5)
        assert unary.value.code() == grpc.StatusCode.UNAUTHENTICATED
        # A server stream (the worker's GetWorkItems) is refused the same way.
        stream = stub.GetWorkItems(pb.GetWorkItemsRequest(), timeout=5)
        with pytest.raises(grpc.RpcError) as streamed:
            next(iter(stream))
        assert streamed.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_token_required_off_loopback(tmp_path: Path) -> None:
    settings = sidecar_settings(tmp_path / "open.db", grpc_listen="0.0.0.0:0")
    assert settings.require_token()
    sidecar = Sidecar(settings)
    with pytest.raises(ValueError, match="API token") as info:
        await sidecar.start()
    assert "0.0.0.0:0" in str(info.value)
    # Nothing was left behind: with a token, the same settings start.
    guarded = Sidecar(settings.model_copy(update={"api_token": SecretStr(TOKEN)}))
    await guarded.start()
    try:
        assert guarded.grpc_address.startswith("0.0.0.0:")
    finally:
        await guarded.stop()


# -- exclusive database, listeners ---------------------------------------------------------------


def test_second_sidecar_on_the_same_db_fails_fast(
    sidecar_factory: SidecarFactory, tmp_path: Path
) -> None:
    first = sidecar_factory()
    db_path = tmp_path / "sidecar.db"
    started = time.monotonic()
    with pytest.raises(SidecarError) as info:
        SidecarThread(sidecar_settings(db_path)).start()
    assert time.monotonic() - started < 5
    assert str(db_path) in str(info.value)
    assert f"pid {os.getpid()}" in str(info.value)
    # The first one is unharmed.
    assert first.http_address is not None
    assert http_get(first.http_address, "/v1.0/healthz") == 204


def test_taken_port_is_refused(sidecar_factory: SidecarFactory, tmp_path: Path) -> None:
    first = sidecar_factory()
    with pytest.raises(SidecarError, match="cannot listen on") as info:
        sidecar_factory(db_path=tmp_path / "other.db", grpc_listen=first.grpc_address)
    assert first.grpc_address in str(info.value)
    # The failed start released its database lock.
    sidecar_factory(db_path=tmp_path / "other.db")


def test_taken_http_port_is_refused(sidecar_factory: SidecarFactory, tmp_path: Path) -> None:
    first = sidecar_factory()
    assert first.http_address is not None
    with pytest.raises(SidecarError, match="cannot listen on"):
        sidecar_factory(db_path=tmp_path / "other.db", http_listen=first.http_address)
    sidecar_factory(db_path=tmp_path / "other.db")


@pytest.fixture
def socket_dir() -> Iterator[Path]:
    # A short path: a unix socket path must fit in 108 bytes.
    with tempfile.TemporaryDirectory(prefix="dg-", dir="/tmp") as name:
        yield Path(name)


def test_unix_socket_listener(
    sidecar_factory: SidecarFactory, dapr_env: DaprEnv, socket_dir: Path
) -> None:
    path = socket_dir / "sidecar.sock"
    # A socket file left behind by a sidecar that died is replaced.
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))
    stale.close()

    sidecar = sidecar_factory(grpc_listen=f"unix://{path}")
    assert sidecar.grpc_address == f"unix://{path}"
    dapr_env(sidecar.grpc_address, sidecar.http_address)
    with DaprClient() as client:
        client.save_state(STORE, "over", "unix")
        assert client.get_state(STORE, "over").data == b"unix"

    # A socket that is being served is not taken over.
    with pytest.raises(SidecarError, match="another process"):
        sidecar_factory(db_path=socket_dir / "other.db", grpc_listen=f"unix://{path}")


def test_unix_socket_needs_no_token(tmp_path: Path, socket_dir: Path) -> None:
    settings = sidecar_settings(
        tmp_path / "x.db", grpc_listen=f"unix://{socket_dir}/s.sock", http_listen=None
    )
    assert not settings.require_token()


# -- limits ------------------------------------------------------------------------------------


def test_oversized_grpc_message_is_refused(
    sidecar_factory: SidecarFactory, dapr_env: DaprEnv
) -> None:
    limit = 64 * 1024
    sidecar = sidecar_factory(max_payload_bytes=limit)
    dapr_env(sidecar.grpc_address, sidecar.http_address)
    with DaprClient() as client:
        # Far beyond the payload limit plus headroom: refused by gRPC before any handler runs.
        with pytest.raises(DaprGrpcError) as info:
            client.save_state(STORE, "huge", b"x" * (3 * 1024 * 1024))
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        # The connection is still usable.
        client.save_state(STORE, "small", "ok")
        assert client.get_state(STORE, "small").data == b"ok"


def test_other_methods_stay_unimplemented(sidecar: SidecarThread) -> None:
    with grpc.insecure_channel(sidecar.grpc_address) as channel:
        stub = runtime_grpc.DaprStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            stub.GetSecret(secret_pb2.GetSecretRequest(store_name="s", key="k"), timeout=5)
    assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED


# -- lifecycle ---------------------------------------------------------------------------------


async def test_run_sidecar_until_cancelled(tmp_path: Path, socket_dir: Path) -> None:
    address = f"unix://{socket_dir}/run.sock"
    settings = sidecar_settings(tmp_path / "run.db", grpc_listen=address, http_listen=None)
    task = asyncio.create_task(run_sidecar(settings))
    async with grpc.aio.insecure_channel(address) as channel:
        stub = runtime_grpc.DaprStub(channel)
        # wait_for_ready: the call waits until run_sidecar serves.
        await stub.SaveState(
            state_pb.SaveStateRequest(store_name=STORE, states=[]),
            wait_for_ready=True,
            timeout=10,
        )
    assert not task.done()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    # Stopped cleanly: the database lock is free and the socket file is gone.
    assert not (socket_dir / "run.sock").exists()
    again = Sidecar(settings)
    await again.start()
    await again.stop()


async def test_sidecar_in_the_running_loop(tmp_path: Path) -> None:
    sidecar = Sidecar(sidecar_settings(tmp_path / "loop.db"))
    await sidecar.start()
    try:
        assert sidecar.ready
        async with grpc.aio.insecure_channel(sidecar.grpc_address) as channel:
            stub = runtime_grpc.DaprStub(channel)
            item = common_pb.StateItem(key="k", value=b"v")
            await stub.SaveState(state_pb.SaveStateRequest(store_name=STORE, states=[item]))
            got = await stub.GetState(state_pb.GetStateRequest(store_name=STORE, key="k"))
            assert got.data == b"v"
    finally:
        await sidecar.stop()
    assert not sidecar.ready


def test_sidecar_settings_in_thread_are_validated(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        SidecarSettings(db_path=tmp_path / "x.db", grpc_listen="nonsense")
