"""The gateway's own identity (`identity.own`): the Workload API client against a fake agent
(a real gRPC server on a unix socket, SVIDs from a development CA), rotation through the
FetchX509SVID stream, JWT-SVIDs, and the files and dev CA sources; the SVID is then used for a
real mTLS handshake."""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

import identity.own as own_module
from gateway.config import GatewayConfig, OwnIdentityConfig
from identity.bundle import BundleSet
from identity.dev_ca import DevCA, write_certificates, write_x509_svid
from identity.jwt_svid import verify_jwt_svid
from identity.own import (
    DevCaIdentity,
    FileIdentity,
    OwnIdentityError,
    WorkloadApiIdentity,
    own_identity,
)
from identity.workload import workload_pb2 as pb
from identity.workload_api import (
    WorkloadApiClient,
    WorkloadApiError,
    grpc_target,
    split_der,
)
from identity.x509_svid import spiffe_id_of
from tests.identity.fake_workload_api import FakeWorkloadApi

pytestmark = pytest.mark.timeout(60)

GATEWAY = "spiffe://example.org/duragate"


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> DevCA:
    return DevCA.create(tmp_path_factory.mktemp("ca"), "example.org")


@pytest.fixture
async def agent(ca: DevCA, tmp_path: Path) -> AsyncIterator[FakeWorkloadApi]:
    async with FakeWorkloadApi(ca, tmp_path / "agent.sock", GATEWAY, hint="internal") as fake:
        yield fake


async def eventually(check: object, what: str, seconds: float = 20.0) -> None:
    deadline = time.monotonic() + seconds
    while not check():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {seconds} s: {what}")
        await asyncio.sleep(0.02)


# -- the Workload API client ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("address", "target"),
    [
        ("unix:///run/spire/agent.sock", "unix:///run/spire/agent.sock"),
        ("unix:/run/agent.sock", "unix:///run/agent.sock"),
        ("tcp://127.0.0.1:8081", "127.0.0.1:8081"),
    ],
)
def test_endpoint_addresses(address: str, target: str) -> None:
    assert grpc_target(address) == target


@pytest.mark.parametrize(
    ("address", "reason"),
    [
        ("unix://host/agent.sock", "no host part"),
        ("unix:agent.sock", "no host part"),
        ("tcp://localhost:8081", "no host name"),
        ("tcp://127.0.0.1", "tcp://<IP address>:<port>"),
        ("http://127.0.0.1:1", "unix:///path or tcp://IP:port"),
    ],
)
def test_bad_endpoint_addresses(address: str, reason: str) -> None:
    with pytest.raises(WorkloadApiError, match=reason):
        grpc_target(address)


def test_endpoint_from_the_environment() -> None:
    client = WorkloadApiClient.from_environment({"SPIFFE_ENDPOINT_SOCKET": "unix:///x.sock"})
    assert client.target == "unix:///x.sock"
    with pytest.raises(WorkloadApiError, match="SPIFFE_ENDPOINT_SOCKET is not set"):
        WorkloadApiClient.from_environment({})


def test_concatenated_der_certificates(ca: DevCA) -> None:
    cert, _ = ca.issue_x509_svid(GATEWAY, timedelta(minutes=5))
    ders = [c.public_bytes(serialization.Encoding.DER) for c in (cert, ca.ca_certificate)]
    assert split_der(b"".join(ders)) == ders
    with pytest.raises(WorkloadApiError, match="cut short"):
        split_der(ders[0][:-1])


async def test_fetch_x509_svid(agent: FakeWorkloadApi, ca: DevCA) -> None:
    async with WorkloadApiClient(agent.address) as client:
        context = await client.fetch_x509_svids()
    svid = context.default
    assert str(svid.spiffe_id) == GATEWAY and svid.hint == "internal"
    assert svid.leaf.serial_number == agent.serials[-1]
    assert [c.serial_number for c in svid.bundle] == [ca.ca_certificate.serial_number]
    assert "PRIVATE" not in repr(svid)


async def test_the_agent_refuses_calls_without_the_security_header(
    agent: FakeWorkloadApi,
) -> None:
    # What our client adds to every call; a bare call is refused, as the standard says.
    async with grpc.aio.insecure_channel(agent.address) as channel:
        call = channel.unary_unary(
            "/SpiffeWorkloadAPI/FetchJWTSVID",
            request_serializer=pb.JWTSVIDRequest.SerializeToString,
            response_deserializer=pb.JWTSVIDResponse.FromString,
        )
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await call(pb.JWTSVIDRequest(audience=["x"]), timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert agent.jwt_calls == 0


async def test_jwt_svids_verify_against_the_agents_bundles(agent: FakeWorkloadApi) -> None:
    async with WorkloadApiClient(agent.address) as client:
        tokens = await client.fetch_jwt_svids(["https://mcp.example"])
        bundles = await client.fetch_jwt_bundles()
    assert set(bundles) == {"example.org"}
    verified = verify_jwt_svid(tokens[0].token, BundleSet(bundles.values()), "https://mcp.example")
    assert str(verified.spiffe_id) == GATEWAY


async def test_an_unreachable_agent_is_a_clear_error(tmp_path: Path) -> None:
    client = WorkloadApiClient(f"unix://{tmp_path}/nobody.sock", timeout=3)
    identity = WorkloadApiIdentity(client)
    with pytest.raises(OwnIdentityError, match="no SVID from the Workload API"):
        await identity.start()


# -- the Workload API identity: rotation ------------------------------------------------------


async def test_rotation_through_the_stream(agent: FakeWorkloadApi) -> None:
    identity = WorkloadApiIdentity(WorkloadApiClient(agent.address), hint="internal")
    await identity.start()
    try:
        first = identity.credentials()
        assert str(first.spiffe_id) == GATEWAY
        context = identity.client_ssl_context()
        assert identity.client_ssl_context() is context  # the same SVID: the same context
        await agent.rotate()
        await eventually(lambda: identity.rotations == 1, "the rotated SVID arrives")
        second = identity.credentials()
        assert second.chain[0].serial_number == agent.serials[-1] != first.chain[0].serial_number
        assert identity.client_ssl_context() is not context
        assert agent.x509_calls == 1  # one stream carried both
    finally:
        await identity.stop()


async def test_a_broken_stream_is_reopened_and_the_svid_kept(
    agent: FakeWorkloadApi, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(own_module, "RETRY_FIRST_SECONDS", 0.05)
    identity = WorkloadApiIdentity(WorkloadApiClient(agent.address))
    await identity.start()
    try:
        first = identity.credentials()
        await agent.break_streams()
        await eventually(lambda: agent.x509_calls == 2, "the stream is opened again")
        # Reopened, the stream's first message is the same SVID.
        await eventually(lambda: identity.rotations == 1, "the SVID is sent again")
        assert identity.credentials().chain[0].serial_number == first.chain[0].serial_number
        await agent.rotate()
        await eventually(lambda: identity.rotations == 2, "a rotation after the reconnect")
        assert identity.credentials().chain[0].serial_number == agent.serials[-1]
    finally:
        await identity.stop()


async def test_jwt_svids_are_cached_per_audience(agent: FakeWorkloadApi) -> None:
    identity = WorkloadApiIdentity(WorkloadApiClient(agent.address))
    await identity.start()
    try:
        one = await identity.jwt_svid("https://a.example")
        assert await identity.jwt_svid("https://a.example") == one
        await identity.jwt_svid(["https://b.example"])
        assert agent.jwt_calls == 2
    finally:
        await identity.stop()


async def test_an_svid_the_agent_does_not_offer(agent: FakeWorkloadApi) -> None:
    identity = WorkloadApiIdentity(
        WorkloadApiClient(agent.address), spiffe_id="spiffe://example.org/other"
    )
    with pytest.raises(OwnIdentityError, match="offers no SVID matching"):
        await identity.start()


# -- files and the dev CA ---------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


def _write_svid(ca: DevCA, directory: Path) -> x509.Certificate:
    cert, key = ca.issue_x509_svid(GATEWAY, timedelta(minutes=30))
    write_x509_svid(directory / "svid.pem", directory / "svid.key", cert, key)
    return cert


def test_files_are_reloaded_when_they_change(ca: DevCA, tmp_path: Path) -> None:
    clock = Clock()
    first = _write_svid(ca, tmp_path)
    write_certificates(tmp_path / "bundle.pem", ca.x509_authorities)
    identity = FileIdentity(
        tmp_path / "svid.pem", tmp_path / "svid.key", tmp_path / "bundle.pem", clock=clock
    )
    assert identity.credentials().chain[0] == first
    second = _write_svid(ca, tmp_path)
    assert identity.credentials().chain[0] == first  # not before reload_seconds
    clock.now += 6
    assert identity.credentials().chain[0] == second
    # A broken rewrite is logged and the SVID in use kept.
    (tmp_path / "svid.key").write_text("not a key")
    clock.now += 6
    assert identity.credentials().chain[0] == second


async def test_files_without_a_jwt_file_say_so(ca: DevCA, tmp_path: Path) -> None:
    _write_svid(ca, tmp_path)
    write_certificates(tmp_path / "bundle.pem", ca.x509_authorities)
    identity = FileIdentity(tmp_path / "svid.pem", tmp_path / "svid.key", tmp_path / "bundle.pem")
    with pytest.raises(OwnIdentityError, match="jwt_svid_file is not set"):
        await identity.jwt_svid("x")


def test_a_key_of_another_certificate_is_refused(ca: DevCA, tmp_path: Path) -> None:
    _write_svid(ca, tmp_path)
    _, other = ca.issue_x509_svid(GATEWAY, timedelta(minutes=5))
    (tmp_path / "svid.key").write_bytes(
        other.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    write_certificates(tmp_path / "bundle.pem", ca.x509_authorities)
    with pytest.raises(OwnIdentityError, match="not the certificate's key"):
        FileIdentity(tmp_path / "svid.pem", tmp_path / "svid.key", tmp_path / "bundle.pem")


async def test_dev_ca_identity_renews_at_half_life(ca: DevCA) -> None:
    clock = Clock()
    identity = DevCaIdentity(ca, GATEWAY, ttl=timedelta(minutes=10), clock=clock)
    first = identity.credentials()
    clock.now += 4 * 60
    assert identity.credentials() is first
    clock.now += 2 * 60
    assert identity.credentials() is not first
    token = await identity.jwt_svid("https://mcp.example")
    bundles = BundleSet([ca.trust_bundle()])
    verified = verify_jwt_svid(token, bundles, "https://mcp.example", now=clock.now)
    assert str(verified.spiffe_id) == GATEWAY


def test_own_identity_from_the_config(ca: DevCA, tmp_path: Path) -> None:
    config = GatewayConfig.model_validate(
        {"identity": {"own": {"source": "dev_ca", "ca_dir": str(ca.directory)}}}
    )
    identity = own_identity(config, tmp_path)
    assert isinstance(identity, DevCaIdentity)
    assert str(identity.credentials().spiffe_id) == "spiffe://example.org/duragate"
    assert own_identity(GatewayConfig(), tmp_path) is None
    with pytest.raises(OwnIdentityError, match="run `duragate identity init`"):
        own_identity(
            GatewayConfig.model_validate({"identity": {"own": {"source": "dev_ca"}}}), tmp_path
        )
    with pytest.raises(ValueError, match="source files needs cert, key, bundle"):
        OwnIdentityConfig(source="files")


# -- the SVID on the wire ---------------------------------------------------------------------


async def test_the_own_svid_in_a_real_mtls_handshake(agent: FakeWorkloadApi, ca: DevCA) -> None:
    cert, key = ca.issue_x509_svid(
        "spiffe://example.org/upstream",
        timedelta(minutes=5),
        server_names=["127.0.0.1"],
        for_server=True,
    )
    directory = ca.directory.parent / "upstream"
    directory.mkdir(exist_ok=True)
    write_x509_svid(directory / "s.pem", directory / "s.key", cert, key)
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(directory / "s.pem", directory / "s.key")
    server_ctx.load_verify_locations(
        cadata=ca.ca_certificate.public_bytes(serialization.Encoding.PEM).decode()
    )
    server_ctx.verify_mode = ssl.CERT_REQUIRED
    seen: list[str] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
        seen.append(str(spiffe_id_of(x509.load_der_x509_certificate(peer))))
        writer.write(b"ok")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=server_ctx)
    port = server.sockets[0].getsockname()[1]
    identity = WorkloadApiIdentity(WorkloadApiClient(agent.address))
    await identity.start()
    try:
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=identity.client_ssl_context()
        )
        assert await reader.read() == b"ok"
        writer.close()
    finally:
        await identity.stop()
        server.close()
        await server.wait_closed()
    assert seen == [GATEWAY]
