"""JWT-SVID bearer authentication at the HTTP front door, end to end: a gateway process whose
config trusts development CAs made in a temporary directory, the real mcp client sending
`Authorization: Bearer <JWT-SVID>`, and httpx for the raw 401/404 checks.

mcp 1.30's `streamable_http_client(url, *, http_client=None, terminate_on_close=True)` takes no
headers: they ride on the httpx client passed in.
"""

from __future__ import annotations

import re
import textwrap
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from mcp import ClientSession, McpError, types
from mcp.client.streamable_http import streamable_http_client
from starlette.testclient import TestClient

from gateway.config import ConfigError, GatewayConfig, parse_config
from gateway.http_app import build_app
from gateway.mcp_front import LiveSessions, McpFront
from identity.dev_ca import DevCA
from tests.gateway.conftest import INIT, MCP_HEADERS, TEST_CONFIG, GatewayFactory, GatewayProcess
from tests.identity.keys import forge_jwt, make_jwt, svid_claims

pytestmark = [
    pytest.mark.timeout(60),
    pytest.mark.filterwarnings("ignore:The experimental tasks API:DeprecationWarning"),
]

ALICE = "spiffe://example.org/team-a/alice"
BOB = "spiffe://example.org/team-a/bob"  # same tenant as Alice, another caller
CAROL = "spiffe://example.org/team-a/carol"
PARTNER_BOT = "spiffe://partner.org/bot"  # a federated trust domain: tenant partner.org
IDENTITY = """\
identity:
  trust_domain: example.org
  allow_anonymous: false
  audience: duragate
  bundles:
    example.org: ca-example/bundle.json
    partner.org: ca-partner/bundle.json
  tenants:
    - match: spiffe://example.org/team-a/**
      tenant: team-a
"""


@dataclass
class Setup:
    gateway: GatewayProcess
    ca: DevCA
    partner: DevCA
    rogue: DevCA  # a CA of a trust domain the gateway has no bundle for

    def token(self, spiffe_id: str, ca: DevCA | None = None, **kwargs: Any) -> str:
        ca = ca or (self.partner if spiffe_id.startswith("spiffe://partner.org") else self.ca)
        kwargs.setdefault("ttl", timedelta(minutes=5))
        return ca.issue_jwt_svid(spiffe_id, kwargs.pop("audience", "duragate"), **kwargs)

    def scheduled(self) -> int:
        return self.gateway.log_path.read_text(errors="replace").count("audit scheduled")


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    tmp = tmp_path_factory.mktemp("auth")
    ca = DevCA.create(tmp / "ca-example", "example.org")
    partner = DevCA.create(tmp / "ca-partner", "partner.org")
    rogue = DevCA.create(tmp / "ca-rogue", "rogue.org")
    text = TEST_CONFIG.read_text()
    assert "identity:\n  allow_anonymous: true\n" in text
    config = tmp / "gateway.yaml"
    config.write_text(text.replace("identity:\n  allow_anonymous: true\n", IDENTITY))
    factory = GatewayFactory(tmp)
    try:
        yield Setup(factory(config), ca, partner, rogue)
    finally:
        factory.stop_all()


@asynccontextmanager
async def session_as(url: str, token: str) -> AsyncIterator[ClientSession]:
    headers = {"Authorization": f"Bearer {token}"}
    async with httpx.AsyncClient(headers=headers, timeout=httpx.Timeout(30, read=300)) as http:
        async with streamable_http_client(url, http_client=http) as (read, write, _):
            async with ClientSession(read, write) as session:
                await session.initialize()
                yield session


def bearer(token: str) -> dict[str, str]:
    return {**MCP_HEADERS, "Authorization": f"Bearer {token}"}


# --- the happy path --------------------------------------------------------------------------


async def test_list_and_call_with_a_jwt_svid(setup: Setup) -> None:
    async with session_as(setup.gateway.url, setup.token(ALICE)) as session:
        tools = {t.name for t in (await session.list_tools()).tools}
        result = await session.call_tool("add", {"a": 2, "b": 3})
    assert "add" in tools
    assert not result.isError and result.structuredContent == {"result": 5}


async def test_federated_trust_domain_is_its_own_tenant(setup: Setup) -> None:
    async with session_as(setup.gateway.url, setup.token(PARTNER_BOT)) as session:
        result = await session.call_tool("add", {"a": 1, "b": 1})
    assert not result.isError
    assert (
        "principal=spiffe://partner.org/bot tenant=partner.org"
        in setup.gateway.log_path.read_text()
    )


# --- refusals --------------------------------------------------------------------------------


async def test_no_token_is_401_and_nothing_is_scheduled(setup: Setup) -> None:
    before = setup.scheduled()
    call = {
        "jsonrpc": "2.0",
        "id": 2,
        "method": "tools/call",
        "params": {"name": "slow_echo", "arguments": {"text": "x"}, "task": {"ttl": 60000}},
    }
    async with httpx.AsyncClient(base_url=setup.gateway.base) as client:
        opened = await client.post("/mcp", json=INIT, headers=bearer(setup.token(CAROL)))
        assert opened.status_code == 200
        session_id = opened.headers["mcp-session-id"]
        # Every request is authenticated, not just the one that opened the session.
        for headers in (MCP_HEADERS, {**MCP_HEADERS, "mcp-session-id": session_id}):
            response = await client.post("/mcp", json=call, headers=headers)
            assert response.status_code == 401
            # No credentials at all: a bare challenge (RFC 6750 3.1), the reason in the body.
            assert response.headers["www-authenticate"] == 'Bearer realm="duragate"'
            body = response.json()
            assert body["error"] == "unauthenticated"
            assert "no credentials" in body["message"]
        refused_init = await client.post("/mcp", json=INIT, headers=MCP_HEADERS)
        assert refused_init.status_code == 401
    async with session_as(setup.gateway.url, setup.token(CAROL)) as session:
        assert (await session.experimental.list_tasks()).tasks == []
    assert setup.scheduled() == before


def _partner_key_posing_as_example(setup: Setup) -> str:
    key = serialization.load_pem_private_key(
        (setup.partner.directory / "jwt.key").read_bytes(), password=None
    )
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    return make_jwt(key, svid_claims(ALICE), kid=setup.partner.jwt_kid)


REFUSALS: dict[str, tuple[Any, str]] = {
    "alg none": (
        lambda s: forge_jwt({"alg": "none", "kid": s.ca.jwt_kid, "typ": "JWT"}, svid_claims(ALICE)),
        "alg 'none' is not allowed",
    ),
    "expired": (
        lambda s: s.token(ALICE, now=datetime.now(UTC) - timedelta(hours=1)),
        "token expired at",
    ),
    "wrong audience": (lambda s: s.token(ALICE, audience="someone-else"), "aud does not include"),
    "unknown trust domain": (
        lambda s: s.token("spiffe://rogue.org/alice", ca=s.rogue),
        "no bundle for trust domain rogue.org",
    ),
    "another domain's key": (
        _partner_key_posing_as_example,
        "in the bundle of trust domain example.org",
    ),
}


@pytest.mark.parametrize("case", list(REFUSALS))
async def test_refused_tokens_get_401_with_the_reason(setup: Setup, case: str) -> None:
    make_token, reason = REFUSALS[case]
    token = make_token(setup)
    async with httpx.AsyncClient(base_url=setup.gateway.base) as client:
        response = await client.post("/mcp", json=INIT, headers=bearer(token))
    assert response.status_code == 401
    challenge = response.headers["www-authenticate"]
    assert challenge.startswith('Bearer realm="duragate", error="invalid_token", ')
    description = re.fullmatch(r'.*error_description="([^"]*)"', challenge)
    assert description is not None and reason in description.group(1)
    body = response.json()
    assert body["error"] == "invalid_token" and reason in body["message"]
    assert token not in response.text and token not in challenge
    assert f"reason={body['message']}" in setup.gateway.log_path.read_text()


async def test_malformed_header_is_401_invalid_request(setup: Setup) -> None:
    async with httpx.AsyncClient(base_url=setup.gateway.base) as client:
        response = await client.post(
            "/mcp", json=INIT, headers={**MCP_HEADERS, "Authorization": "Basic dTpw"}
        )
    assert response.status_code == 401
    assert 'error="invalid_request"' in response.headers["www-authenticate"]
    assert "Bearer scheme" in response.json()["message"]


# --- ownership -------------------------------------------------------------------------------


async def test_tasks_belong_to_their_principal(setup: Setup) -> None:
    url = setup.gateway.url
    async with session_as(url, setup.token(ALICE)) as alice:
        created = await alice.experimental.call_tool_as_task(
            "slow_echo", {"text": "mine", "seconds": 0.2}
        )
        task_id = created.task.taskId
    for other in (BOB, PARTNER_BOT):
        async with session_as(url, setup.token(other)) as session:
            with pytest.raises(McpError):
                await session.experimental.get_task(task_id)
            listed = await session.experimental.list_tasks()
            assert task_id not in {t.taskId for t in listed.tasks}
    # Alice again, with a new token in a new session.
    async with session_as(url, setup.token(ALICE)) as alice:
        result = await alice.experimental.get_task_result(task_id, types.CallToolResult)
        assert result.structuredContent == {"result": "mine"}
        assert (await alice.experimental.get_task(task_id)).status == "completed"


async def test_a_session_is_bound_to_the_principal_that_opened_it(setup: Setup) -> None:
    ping = {"jsonrpc": "2.0", "id": 3, "method": "ping"}
    async with httpx.AsyncClient(base_url=setup.gateway.base) as client:
        opened = await client.post("/mcp", json=INIT, headers=bearer(setup.token(ALICE)))
        session = {"mcp-session-id": opened.headers["mcp-session-id"]}
        notified = await client.post(
            "/mcp",
            json={"jsonrpc": "2.0", "method": "notifications/initialized"},
            headers={**bearer(setup.token(ALICE)), **session},
        )
        assert notified.status_code == 202
        # Bob holding Alice's session id: as if the session did not exist.
        hijack = await client.post(
            "/mcp", json=ping, headers={**bearer(setup.token(BOB)), **session}
        )
        assert hijack.status_code == 404
        # Alice, with a fresh token for the same identity, keeps her session.
        mine = await client.post(
            "/mcp", json=ping, headers={**bearer(setup.token(ALICE)), **session}
        )
        assert mine.status_code == 200


# --- in process: building the authenticator, and reloads ---------------------------------------


class _Host:
    def __init__(self, config: GatewayConfig) -> None:
        self.config = config
        self.runtime = self
        self.push = None  # no A2A push notifications without an engine

    async def ready(self) -> bool:
        return False

    @property
    def dispatcher(self) -> Any:
        raise AssertionError("no call may reach the dispatcher")


def _config(tmp_path: Path, identity: str) -> GatewayConfig:
    path = tmp_path / "gateway.yaml"
    return parse_config(textwrap.dedent(identity), str(path), tmp_path)


def test_a_bundle_that_does_not_load_stops_the_start(tmp_path: Path) -> None:
    config = _config(tmp_path, "identity:\n  bundles:\n    example.org: missing.json\n")
    host = _Host(config)
    with pytest.raises(ConfigError) as info:
        build_app(host, McpFront(host, LiveSessions(), front_door="mcp-http"), "127.0.0.1")
    assert f"{tmp_path / 'gateway.yaml'}:2: identity.bundles:" in str(info.value)
    assert "cannot read the bundle" in str(info.value)


def test_a_reloaded_identity_section_takes_effect(tmp_path: Path) -> None:
    DevCA.create(tmp_path / "ca", "example.org")
    host = _Host(_config(tmp_path, "identity:\n  bundles: {example.org: ca/bundle.json}\n"))
    app = build_app(host, McpFront(host, LiveSessions(), front_door="mcp-http"), "127.0.0.1")
    with TestClient(app, base_url="http://127.0.0.1") as client:
        assert client.post("/mcp", json=INIT, headers=MCP_HEADERS).status_code == 401
        # A reload whose bundle does not load keeps the running authentication...
        host.config = _config(
            tmp_path, "identity:\n  allow_anonymous: true\n  bundles: {example.org: gone.json}\n"
        )
        assert client.post("/mcp", json=INIT, headers=MCP_HEADERS).status_code == 401
        # ...and one that loads replaces it.
        host.config = _config(tmp_path, "identity:\n  allow_anonymous: true\n")
        assert client.post("/mcp", json=INIT, headers=MCP_HEADERS).status_code == 200
