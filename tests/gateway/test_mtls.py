"""Mutual TLS with X.509-SVIDs at the HTTP front door, over real TLS: gateway processes whose
config (`listen.tls`) serves a development CA's SVID, httpx clients presenting client SVIDs and
trusting that CA, and the mcp client over https riding on such an httpx client.

- `optional` gateway: a client certificate or a bearer token;
- `required` gateway: no certificate, no handshake.
A federated domain's CA (partner.org, whose bundle the gateway holds for JWT-SVIDs) and a rogue
CA claiming the local trust domain are not trusted by the TLS layer, which holds the local trust
domain's authorities only.
"""

from __future__ import annotations

import shutil
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import anyio
import httpx
import pytest
import yaml
from cryptography import x509
from mcp import ClientSession
from mcp.client.streamable_http import streamable_http_client

from identity.dev_ca import DevCA, write_x509_svid
from tests.gateway.conftest import (
    INIT,
    MCP_HEADERS,
    REPO_ROOT,
    TEST_CONFIG,
    GatewayFactory,
    GatewayProcess,
    child_env,
)

pytestmark = [
    pytest.mark.timeout(60),
    pytest.mark.filterwarnings("ignore:The experimental tasks API:DeprecationWarning"),
]

ALICE = "spiffe://example.org/team-a/alice"
IDENTITY = """\
identity:
  trust_domain: example.org
  allow_anonymous: false
  bundles:
    example.org: ca-example/bundle.json
    partner.org: ca-partner/bundle.json
  tenants:
    - match: spiffe://example.org/team-a/**
      tenant: team-a
"""
LISTEN = """\
listen:
  host: 127.0.0.1
  port: 0
  tls:
    cert: {name}.pem
    key: {name}.key
    client_certs: {mode}
    reload_seconds: 0.5
"""
Files = tuple[Path, Path]


@dataclass
class Setup:
    tmp: Path
    ca: DevCA
    partner: DevCA
    rogue: DevCA  # claims example.org, but is not in its bundle
    optional: GatewayProcess
    required: GatewayProcess

    def svid(
        self,
        spiffe_id: str,
        ca: DevCA | None = None,
        *,
        ttl: timedelta = timedelta(minutes=10),
        now: datetime | None = None,
    ) -> Files:
        cert, key = (ca or self.ca).issue_x509_svid(spiffe_id, ttl, now=now)
        name = f"client-{cert.serial_number}"
        files = (self.tmp / f"{name}.pem", self.tmp / f"{name}.key")
        write_x509_svid(*files, cert, key)
        return files

    def context(self, client: Files | None) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.ca.directory / "bundle.pem"))
        if client is not None:
            ctx.load_cert_chain(*client)
        return ctx


def _server_svid(ca: DevCA, directory: Path, name: str) -> None:
    cert, key = ca.issue_x509_svid(
        "spiffe://example.org/duragate",
        timedelta(hours=1),
        server_names=["127.0.0.1", "localhost"],
        for_server=True,
    )
    write_x509_svid(directory / f"{name}.pem", directory / f"{name}.key", cert, key)


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    tmp = tmp_path_factory.mktemp("mtls")
    # Made a day ago, so that it can issue an SVID that has already expired.
    ca = DevCA.create(tmp / "ca-example", "example.org", now=datetime.now(UTC) - timedelta(days=1))
    partner = DevCA.create(tmp / "ca-partner", "partner.org")
    rogue = DevCA.create(tmp / "ca-rogue", "example.org")
    text = TEST_CONFIG.read_text()
    base = text.replace("identity:\n  allow_anonymous: true\n", IDENTITY)
    base = base.replace("listen:\n  host: 127.0.0.1\n  port: 0\n", "")
    assert "identity:\n  trust_domain" in base and "listen:" not in base
    factory = GatewayFactory(tmp)
    gateways = {}
    try:
        for mode in ("optional", "required"):
            _server_svid(ca, tmp, f"server-{mode}")
            config = tmp / f"gateway-{mode}.yaml"
            config.write_text(LISTEN.format(name=f"server-{mode}", mode=mode) + base)
            gateways[mode] = factory(config, data_dir=tmp / f"data-{mode}")
        yield Setup(tmp, ca, partner, rogue, gateways["optional"], gateways["required"])
    finally:
        factory.stop_all()


@asynccontextmanager
async def session_with(url: str, verify: ssl.SSLContext) -> AsyncIterator[ClientSession]:
    # mcp 1.30's streamable_http_client takes no TLS settings: they ride on the httpx client.
    async with httpx.AsyncClient(verify=verify, timeout=httpx.Timeout(30, read=300)) as http:
        async with streamable_http_client(url, http_client=http) as (read, write, _):
            async with ClientSession(read, write) as session:
                await session.initialize()
                yield session


# --- the happy paths ---------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["optional", "required"])
async def test_list_and_call_with_a_client_svid(setup: Setup, mode: str) -> None:
    gateway = setup.optional if mode == "optional" else setup.required
    assert gateway.url.startswith("https://")
    async with session_with(gateway.url, setup.context(setup.svid(ALICE))) as session:
        tools = {t.name for t in (await session.list_tools()).tools}
        result = await session.call_tool("add", {"a": 2, "b": 3})
    assert "add" in tools
    assert not result.isError and result.structuredContent == {"result": 5}
    log = gateway.log_path.read_text()
    assert f"principal={ALICE} tenant=team-a" in log


async def test_optional_accepts_a_bearer_token_instead(setup: Setup) -> None:
    token = setup.ca.issue_jwt_svid(ALICE, "duragate", timedelta(minutes=5))
    async with httpx.AsyncClient(base_url=setup.optional.base, verify=setup.context(None)) as http:
        with_token = await http.post(
            "/mcp", json=INIT, headers={**MCP_HEADERS, "Authorization": f"Bearer {token}"}
        )
        without = await http.post("/mcp", json=INIT, headers=MCP_HEADERS)
    assert with_token.status_code == 200
    assert without.status_code == 401
    assert "present an X.509-SVID client certificate" in without.json()["message"]


async def test_a_token_for_someone_else_is_refused(setup: Setup) -> None:
    token = setup.ca.issue_jwt_svid(
        "spiffe://example.org/team-a/bob", "duragate", timedelta(minutes=5)
    )
    ctx = setup.context(setup.svid(ALICE))
    async with httpx.AsyncClient(base_url=setup.optional.base, verify=ctx) as http:
        response = await http.post(
            "/mcp", json=INIT, headers={**MCP_HEADERS, "Authorization": f"Bearer {token}"}
        )
    assert response.status_code == 401
    assert "no act claim naming it" in response.json()["message"]


# --- refusals in the TLS layer ----------------------------------------------------------------


def _raw_request(gateway: GatewayProcess, ctx: ssl.SSLContext) -> bytes | None:
    """An HTTP response over a fresh TLS connection, or None when the server refused the
    handshake. With TLS 1.3 the client finishes its side first and only then reads the refusal;
    asyncio drops a refused connection without a readable alert, so there is no reason to read,
    only the difference from a valid certificate (`test_a_valid_certificate_gets_a_response`)."""
    port = int(gateway.base.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        try:
            with ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
                tls.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
                return tls.recv(1024) or None
        except (ssl.SSLError, ConnectionError):
            return None


async def _refused_handshake(gateway: GatewayProcess, ctx: ssl.SSLContext) -> None:
    assert _raw_request(gateway, ctx) is None
    # httpx sees only a dropped connection (connect, read or protocol error), no HTTP response.
    async with httpx.AsyncClient(base_url=gateway.base, verify=ctx) as http:
        with pytest.raises(httpx.TransportError):
            await http.post("/mcp", json=INIT, headers=MCP_HEADERS)


@pytest.mark.parametrize("mode", ["optional", "required"])
def test_a_valid_certificate_gets_a_response(setup: Setup, mode: str) -> None:
    gateway = setup.optional if mode == "optional" else setup.required
    response = _raw_request(gateway, setup.context(setup.svid(ALICE)))
    assert response is not None and response.startswith(b"HTTP/1.1 200")


async def test_no_client_certificate_when_required(setup: Setup) -> None:
    await _refused_handshake(setup.required, setup.context(None))


@pytest.mark.parametrize("gateway", ["optional", "required"])
@pytest.mark.parametrize("case", ["federated CA", "foreign CA claiming example.org", "expired"])
async def test_refused_client_certificates(setup: Setup, gateway: str, case: str) -> None:
    if case == "federated CA":
        files = setup.svid("spiffe://partner.org/bot", setup.partner)
    elif case == "foreign CA claiming example.org":
        files = setup.svid(ALICE, setup.rogue)
    else:
        files = setup.svid(
            ALICE, ttl=timedelta(hours=1), now=datetime.now(UTC) - timedelta(hours=3)
        )
    target = setup.optional if gateway == "optional" else setup.required
    await _refused_handshake(target, setup.context(files))


# --- rotation ----------------------------------------------------------------------------------


def _served_certificate(gateway: GatewayProcess, ctx: ssl.SSLContext) -> x509.Certificate:
    port = int(gateway.base.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der)


def test_server_certificate_rotates_without_a_restart(setup: Setup) -> None:
    ctx = setup.context(setup.svid(ALICE))
    before = _served_certificate(setup.required, ctx)
    _server_svid(setup.ca, setup.tmp, "server-required")
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        served = _served_certificate(setup.required, ctx)
        if served.serial_number != before.serial_number:
            break
        time.sleep(0.2)
    else:
        pytest.fail("the rotated server certificate was not served")
    assert setup.required.proc.poll() is None  # the same process
    assert "TLS certificate/bundle reloaded" in setup.required.log_path.read_text()


# --- the mTLS demo ------------------------------------------------------------------------------


def test_the_mtls_demo_works_out_of_the_box(tmp_path: Path) -> None:
    """What `make demo-mtls` does, in a copy of the repository's layout: make the CA and the
    gateway's SVID with the CLI, serve config/gateway-mtls.yaml, call it with a client SVID."""
    (tmp_path / "config").mkdir()
    config = tmp_path / "config" / "gateway-mtls.yaml"
    shutil.copy(REPO_ROOT / "config" / "gateway-mtls.yaml", config)
    demo = yaml.safe_load((REPO_ROOT / "config" / "gateway.yaml").read_text())
    assert yaml.safe_load(config.read_text())["tools"] == demo["tools"]  # the same tools

    def duragate(*args: str) -> None:
        argv = [sys.executable, "-m", "gateway", "--data-dir", ".duragate", "identity", *args]
        done = subprocess.run(
            argv, cwd=tmp_path, env=child_env(), capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 0, done.stderr

    duragate("init", "--trust-domain", "example.org")
    duragate(
        "issue", "spiffe://example.org/duragate", "--server-name", "127.0.0.1",
        "--server-name", "localhost", "--ttl", "30d", "--out", ".duragate/identity",
    )  # fmt: skip
    duragate("issue", ALICE, "--out", ".")
    factory = GatewayFactory(tmp_path)
    try:
        gateway = factory(config, data_dir=tmp_path / ".duragate")
        assert gateway.url.startswith("https://127.0.0.1:")
        ctx = ssl.create_default_context(cafile=str(tmp_path / ".duragate/identity/ca/bundle.pem"))
        ctx.load_cert_chain(tmp_path / "team-a-alice.pem", tmp_path / "team-a-alice.key")
        anonymous = ssl.create_default_context(
            cafile=str(tmp_path / ".duragate/identity/ca/bundle.pem")
        )

        async def calls() -> None:
            async with session_with(gateway.url, ctx) as session:
                result = await session.call_tool("add", {"a": 2, "b": 3})
            assert not result.isError and result.structuredContent == {"result": 5}
            async with httpx.AsyncClient(base_url=gateway.base, verify=anonymous) as http:
                refused = await http.post("/mcp", json=INIT, headers=MCP_HEADERS)
            assert refused.status_code == 401

        anyio.run(calls)
        assert f"principal={ALICE} tenant=team-a" in gateway.log_path.read_text()
    finally:
        factory.stop_all()
