"""The state and metadata API of the embedded sidecar, through the unmodified Dapr SDK."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from dapr.clients import DaprClient
from dapr.clients.exceptions import DaprGrpcError
from dapr.clients.grpc._request import TransactionalStateOperation, TransactionOperationType
from dapr.clients.grpc._state import Concurrency, StateItem, StateOptions

from gateway.sidecar.protos import common_pb, runtime_grpc, state_pb
from gateway.sidecar.server import SidecarThread

from .conftest import DaprEnv, SidecarFactory, SidecarProcess, sidecar_settings

STORE = "statestore"
FIRST_WRITE = StateOptions(concurrency=Concurrency.first_write)
LAST_WRITE = StateOptions(concurrency=Concurrency.last_write)


@pytest.fixture
def client(sidecar_env: SidecarThread) -> Iterator[DaprClient]:
    with DaprClient() as dapr:
        yield dapr


def raw_stub(address: str) -> tuple[grpc.Channel, runtime_grpc.DaprStub]:
    """For requests the SDK cannot express (unknown operation types, bulk delete)."""
    channel = grpc.insecure_channel(address)
    return channel, runtime_grpc.DaprStub(channel)


def expect_error(code: grpc.StatusCode, call: Callable[[], object]) -> DaprGrpcError:
    with pytest.raises(DaprGrpcError) as info:
        call()
    assert info.value.code() == code, info.value.details()
    return info.value


# -- basics ------------------------------------------------------------------------------------


def test_save_get_delete(client: DaprClient) -> None:
    client.save_state(STORE, "greeting", "hello")
    got = client.get_state(STORE, "greeting")
    assert got.data == b"hello"
    assert got.etag

    client.save_state(STORE, "greeting", b"\x00binary\xff")
    again = client.get_state(STORE, "greeting")
    assert again.data == b"\x00binary\xff"
    assert again.etag != got.etag, "every write gets a new etag"

    client.delete_state(STORE, "greeting")
    gone = client.get_state(STORE, "greeting")
    assert gone.data == b""
    assert gone.etag == ""


def test_missing_key_reads_empty_and_deletes_quietly(client: DaprClient) -> None:
    assert client.get_state(STORE, "never-written").data == b""
    client.delete_state(STORE, "never-written")  # no etag: unconditional, no error


def test_bulk_get(client: DaprClient) -> None:
    client.save_bulk_state(STORE, [StateItem("a", "1"), StateItem("b", "2")])
    items = client.get_bulk_state(STORE, ["b", "missing", "a"]).items
    assert [item.key for item in items] == ["b", "missing", "a"]
    assert [item.data for item in items] == [b"2", b"", b"1"]
    assert items[0].etag == client.get_state(STORE, "b").etag
    assert items[1].etag == ""
    assert all(item.error == "" for item in items)


def test_bulk_delete(sidecar_env: SidecarThread, client: DaprClient) -> None:
    client.save_bulk_state(STORE, [StateItem("x", "1"), StateItem("y", "2")])
    channel, stub = raw_stub(sidecar_env.grpc_address)
    with channel:
        stub.DeleteBulkState(
            state_pb.DeleteBulkStateRequest(
                store_name=STORE,
                states=[common_pb.StateItem(key="x"), common_pb.StateItem(key="y")],
            )
        )
    assert [item.data for item in client.get_bulk_state(STORE, ["x", "y"]).items] == [b"", b""]


# -- etags and concurrency ---------------------------------------------------------------------


@pytest.mark.parametrize("options", [FIRST_WRITE, LAST_WRITE, None], ids=["first", "last", "none"])
def test_etag_match_and_mismatch(client: DaprClient, options: StateOptions | None) -> None:
    client.save_state(STORE, "doc", "v1")
    etag = client.get_state(STORE, "doc").etag

    client.save_state(STORE, "doc", "v2", etag=etag, options=options)
    assert client.get_state(STORE, "doc").data == b"v2"

    # The etag of v1 is stale now.
    err = expect_error(
        grpc.StatusCode.ABORTED,
        lambda: client.save_state(STORE, "doc", "v3", etag=etag, options=options),
    )
    assert "etag mismatch" in err.details()
    assert f"state store {STORE}" in err.details()
    assert client.get_state(STORE, "doc").data == b"v2"


def test_etag_on_missing_key_is_a_mismatch(client: DaprClient) -> None:
    expect_error(grpc.StatusCode.ABORTED, lambda: client.save_state(STORE, "absent", "v", etag="1"))
    assert client.get_state(STORE, "absent").data == b""


def test_first_write_without_etag_is_insert_only(client: DaprClient) -> None:
    client.save_state(STORE, "once", "first", options=FIRST_WRITE)
    expect_error(
        grpc.StatusCode.ABORTED,
        lambda: client.save_state(STORE, "once", "second", options=FIRST_WRITE),
    )
    assert client.get_state(STORE, "once").data == b"first"
    # Last-write without an etag is an upsert.
    client.save_state(STORE, "once", "third", options=LAST_WRITE)
    assert client.get_state(STORE, "once").data == b"third"


def test_empty_etag_means_no_etag(client: DaprClient) -> None:
    client.save_state(STORE, "k", "v1")
    client.save_state(STORE, "k", "v2", etag="")
    assert client.get_state(STORE, "k").data == b"v2"


def test_delete_with_etag(client: DaprClient) -> None:
    client.save_state(STORE, "k", "v1")
    old = client.get_state(STORE, "k").etag
    client.save_state(STORE, "k", "v2")
    err = expect_error(grpc.StatusCode.ABORTED, lambda: client.delete_state(STORE, "k", etag=old))
    assert "failed deleting state with key k" in err.details()
    assert client.get_state(STORE, "k").data == b"v2"

    client.delete_state(STORE, "k", etag=client.get_state(STORE, "k").etag)
    assert client.get_state(STORE, "k").data == b""


def test_invalid_etag_is_invalid_argument(client: DaprClient) -> None:
    client.save_state(STORE, "k", "v1")
    err = expect_error(
        grpc.StatusCode.INVALID_ARGUMENT,
        lambda: client.save_state(STORE, "k", "v2", etag="not-an-etag"),
    )
    assert "invalid etag value" in err.details()
    expect_error(
        grpc.StatusCode.INVALID_ARGUMENT, lambda: client.delete_state(STORE, "k", etag="x")
    )


def test_concurrent_first_writes_have_one_winner(
    sidecar_env: SidecarThread, client: DaprClient
) -> None:
    outcomes: list[str] = []
    barrier = threading.Barrier(8)

    def contend(n: int) -> None:
        barrier.wait()
        try:
            client.save_state(STORE, "race", f"writer-{n}", options=FIRST_WRITE)
            outcomes.append("won")
        except DaprGrpcError as err:
            outcomes.append(err.code().name)

    threads = [threading.Thread(target=contend, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(outcomes) == ["ABORTED"] * 7 + ["won"]


def test_etags_are_never_reissued(client: DaprClient) -> None:
    client.save_state(STORE, "k", "v1")
    first = client.get_state(STORE, "k").etag
    client.delete_state(STORE, "k")
    client.save_state(STORE, "k", "v1")
    # A holder of the old etag must not be able to overwrite the new item.
    assert client.get_state(STORE, "k").etag != first
    expect_error(grpc.StatusCode.ABORTED, lambda: client.save_state(STORE, "k", "v", etag=first))


# -- transactions ------------------------------------------------------------------------------


def test_transaction_applies_all(client: DaprClient) -> None:
    client.save_state(STORE, "old", "x")
    client.execute_state_transaction(
        STORE,
        [
            TransactionalStateOperation("t1", "one"),
            TransactionalStateOperation("t2", "two"),
            TransactionalStateOperation("old", operation_type=TransactionOperationType.delete),
        ],
    )
    items = client.get_bulk_state(STORE, ["t1", "t2", "old"]).items
    assert [item.data for item in items] == [b"one", b"two", b""]


def test_transaction_is_all_or_nothing(client: DaprClient) -> None:
    client.save_state(STORE, "keep", "original")
    client.save_state(STORE, "guarded", "original")
    stale = client.get_state(STORE, "guarded").etag
    client.save_state(STORE, "guarded", "changed")  # makes `stale` stale

    err = expect_error(
        # daprd reports every failed transaction, etag mismatch included, as Internal.
        grpc.StatusCode.INTERNAL,
        lambda: client.execute_state_transaction(
            STORE,
            [
                TransactionalStateOperation("new", "written?"),
                TransactionalStateOperation("keep", operation_type=TransactionOperationType.delete),
                TransactionalStateOperation("guarded", "overwritten?", etag=stale),
            ],
        ),
    )
    assert "error while executing state transaction" in err.details()
    assert "etag mismatch" in err.details()
    items = client.get_bulk_state(STORE, ["new", "keep", "guarded"]).items
    assert [item.data for item in items] == [b"", b"original", b"changed"]


def test_transaction_with_etags_succeeds(client: DaprClient) -> None:
    client.save_state(STORE, "acct", "100")
    etag = client.get_state(STORE, "acct").etag
    client.execute_state_transaction(STORE, [TransactionalStateOperation("acct", "90", etag=etag)])
    assert client.get_state(STORE, "acct").data == b"90"


def test_transaction_unknown_operation_type(sidecar_env: SidecarThread, client: DaprClient) -> None:
    client.save_state(STORE, "k", "v")
    channel, stub = raw_stub(sidecar_env.grpc_address)
    request = state_pb.ExecuteStateTransactionRequest(
        storeName=STORE,
        operations=[
            state_pb.TransactionalStateOperation(
                operationType="upsert", request=common_pb.StateItem(key="other", value=b"1")
            ),
            state_pb.TransactionalStateOperation(
                operationType="merge", request=common_pb.StateItem(key="k", value=b"x")
            ),
        ],
    )
    with channel, pytest.raises(grpc.RpcError) as info:
        stub.ExecuteStateTransaction(request)
    # daprd: codes.Unimplemented, "operation type %s not supported".
    assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert info.value.details() == "operation type merge not supported"
    assert client.get_state(STORE, "other").data == b""


# -- TTL ---------------------------------------------------------------------------------------


def test_ttl_expiry(client: DaprClient) -> None:
    client.save_state(STORE, "short", "lived", state_metadata={"ttlInSeconds": "1"})
    client.save_state(STORE, "long", "lived", state_metadata={"ttlInSeconds": "3600"})
    assert client.get_state(STORE, "short").data == b"lived"
    time.sleep(1.3)
    assert client.get_state(STORE, "short").data == b""
    assert [i.data for i in client.get_bulk_state(STORE, ["short", "long"]).items] == [
        b"",
        b"lived",
    ]
    # An expired item counts as absent: first-write may insert it again.
    client.save_state(STORE, "short", "again", options=FIRST_WRITE)
    assert client.get_state(STORE, "short").data == b"again"


def test_ttl_is_cleared_by_a_write_without_ttl(client: DaprClient) -> None:
    client.save_state(STORE, "k", "v1", state_metadata={"ttlInSeconds": "1"})
    client.save_state(STORE, "k", "v2")
    time.sleep(1.3)
    assert client.get_state(STORE, "k").data == b"v2"


def test_invalid_ttl(client: DaprClient) -> None:
    err = expect_error(
        grpc.StatusCode.INVALID_ARGUMENT,
        lambda: client.save_state(STORE, "k", "v", state_metadata={"ttlInSeconds": "soon"}),
    )
    assert "ttlInSeconds" in err.details()


# -- errors ------------------------------------------------------------------------------------


def test_unknown_store(client: DaprClient) -> None:
    for call in (
        lambda: client.save_state("nope", "k", "v"),
        lambda: client.get_state("nope", "k"),
        lambda: client.get_bulk_state("nope", ["k"]),
        lambda: client.delete_state("nope", "k"),
        lambda: client.execute_state_transaction("nope", [TransactionalStateOperation("k", "v")]),
    ):
        err = expect_error(grpc.StatusCode.INVALID_ARGUMENT, call)
        assert err.details() == "state store nope is not found"
        assert err.error_code() == "DAPR_STATE_NOT_FOUND"
        assert err.status_details().error_info["domain"] == "dapr.io"


def test_invalid_keys(client: DaprClient) -> None:
    err = expect_error(grpc.StatusCode.INVALID_ARGUMENT, lambda: client.save_state(STORE, "", "v"))
    assert "empty" in err.details()
    expect_error(grpc.StatusCode.INVALID_ARGUMENT, lambda: client.get_state(STORE, ""))
    err = expect_error(
        grpc.StatusCode.INVALID_ARGUMENT, lambda: client.save_state(STORE, "a||b", "v")
    )
    assert err.details() == "input key/keyPrefix 'a||b' can't contain '||'"
    assert err.error_code() == "DAPR_STATE_ILLEGAL_KEY"
    assert err.status_details().resource_info["resource_name"] == STORE


def test_oversized_value_is_refused(sidecar_factory: SidecarFactory, dapr_env: DaprEnv) -> None:
    limit = 64 * 1024
    sidecar = sidecar_factory(max_payload_bytes=limit)
    dapr_env(sidecar.grpc_address, sidecar.http_address)
    with DaprClient() as client:
        client.save_state(STORE, "fits", b"x" * limit)
        assert len(client.get_state(STORE, "fits").data) == limit
        err = expect_error(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            lambda: client.save_state(STORE, "too-big", b"x" * (limit + 1)),
        )
        assert str(limit + 1) in err.details()
        assert str(limit) in err.details()
        expect_error(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            lambda: client.execute_state_transaction(
                STORE, [TransactionalStateOperation("too-big", b"x" * (limit + 1))]
            ),
        )
        assert client.get_state(STORE, "too-big").data == b""
        # A bulk read whose values together exceed the limit is refused as a whole.
        client.save_state(STORE, "fits-too", b"y" * limit)
        expect_error(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            lambda: client.get_bulk_state(STORE, ["fits", "fits-too"]),
        )


# -- metadata ----------------------------------------------------------------------------------


def test_get_metadata(client: DaprClient) -> None:
    metadata = client.get_metadata()
    assert metadata.application_id == "duragate"
    [component] = metadata.registered_components
    assert (component.name, component.type, component.version) == (STORE, "state.sqlite", "v1")
    assert {"ETAG", "TRANSACTIONAL", "TTL", "ACTOR"} <= set(component.capabilities)
    assert metadata.extended_metadata["daprRuntimeVersion"]


def test_metadata_follows_settings(sidecar_factory: SidecarFactory, dapr_env: DaprEnv) -> None:
    sidecar = sidecar_factory(app_id="billing", state_store_name="ledger")
    dapr_env(sidecar.grpc_address, sidecar.http_address)
    with DaprClient() as client:
        metadata = client.get_metadata()
        assert metadata.application_id == "billing"
        assert [c.name for c in metadata.registered_components] == ["ledger"]
        client.save_state("ledger", "k", "v")
        assert client.get_state("ledger", "k").data == b"v"
        expect_error(grpc.StatusCode.INVALID_ARGUMENT, lambda: client.get_state(STORE, "k"))


def test_extra_state_stores_are_listed_and_kept_apart(
    sidecar_factory: SidecarFactory, dapr_env: DaprEnv
) -> None:
    sidecar = sidecar_factory(state_stores=["agent-memory", "agent-registry"])
    dapr_env(sidecar.grpc_address, sidecar.http_address)
    with DaprClient() as client:
        components = {c.name: c for c in client.get_metadata().registered_components}
        assert list(components) == [STORE, "agent-memory", "agent-registry"]
        assert all(c.type == "state.sqlite" for c in components.values())
        # Only the first holds workflow (actor) state, as daprd has one actor state store.
        assert "ACTOR" in components[STORE].capabilities
        assert "ACTOR" not in components["agent-memory"].capabilities
        assert {"ETAG", "TRANSACTIONAL"} <= set(components["agent-memory"].capabilities)
        # One key, three stores, three values.
        client.save_state(STORE, "k", "main")
        client.save_state("agent-memory", "k", "memory")
        assert client.get_state("agent-registry", "k").data == b""
        client.save_state("agent-registry", "k", "registry")
        client.delete_state(STORE, "k")
        assert client.get_state("agent-memory", "k").data == b"memory"
        assert client.get_state("agent-registry", "k").data == b"registry"
        assert client.get_state(STORE, "k").data == b""
        expect_error(grpc.StatusCode.INVALID_ARGUMENT, lambda: client.get_state("other", "k"))


@pytest.mark.parametrize("names", [["statestore"], ["a", "a"], ["Not_A_Name"], [""]])
def test_extra_state_store_names_are_checked(tmp_path: Path, names: list[str]) -> None:
    with pytest.raises(ValueError, match="declared twice|not a Dapr component name"):
        sidecar_settings(tmp_path / "db", state_stores=names)


# -- durability --------------------------------------------------------------------------------


def test_data_survives_a_restart(sidecar_factory: SidecarFactory, dapr_env: DaprEnv) -> None:
    first = sidecar_factory()
    dapr_env(first.grpc_address, first.http_address)
    with DaprClient() as client:
        client.save_state(STORE, "durable", "yes")
        client.save_state(STORE, "deleted", "x")
        client.delete_state(STORE, "deleted")
        etag = client.get_state(STORE, "durable").etag
    first.stop()

    second = sidecar_factory()  # same database file
    dapr_env(second.grpc_address, second.http_address)
    with DaprClient() as client:
        got = client.get_state(STORE, "durable")
        assert (got.data, got.etag) == (b"yes", etag)
        assert client.get_state(STORE, "deleted").data == b""
        # The etag sequence goes on where it stopped.
        client.save_state(STORE, "durable", "again", etag=etag)
        assert int(client.get_state(STORE, "durable").etag) > int(etag)


@pytest.mark.crash
def test_data_survives_sigkill(
    tmp_path: Path, sidecar_process: Callable[..., SidecarProcess], dapr_env: DaprEnv
) -> None:
    db_path = tmp_path / "crash.db"
    process = sidecar_process(db_path)
    dapr_env(process.grpc_address, process.http_address)
    with DaprClient() as client:
        client.save_state(STORE, "acknowledged", "before the crash")
        client.execute_state_transaction(
            STORE,
            [
                TransactionalStateOperation("tx-a", "1"),
                TransactionalStateOperation("tx-b", "2"),
            ],
        )
        # Kill right after the calls returned: what was acknowledged must be on disk.
        process.kill()
    assert process.popen.returncode == -9

    restarted = sidecar_process(db_path)
    dapr_env(restarted.grpc_address, restarted.http_address)
    with DaprClient() as client:
        assert client.get_state(STORE, "acknowledged").data == b"before the crash"
        items = client.get_bulk_state(STORE, ["tx-a", "tx-b"]).items
        assert [item.data for item in items] == [b"1", b"2"]
    assert restarted.terminate() == 0
