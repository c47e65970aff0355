"""OAuth 2.1 at the HTTP front door, end to end: a gateway process whose `identity.oauth` names a
real authorization server on a loopback port (keys found through its RFC 8414 metadata), the
real mcp client with an access token, RFC 9728 metadata, and the 401 challenges that point to it.
"""

from __future__ import annotations

import textwrap
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import httpx
import pytest
from mcp import ClientSession
from mcp.client.auth.utils import extract_resource_metadata_from_www_auth
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.auth import ProtectedResourceMetadata

from tests.gateway.conftest import INIT, MCP_HEADERS, TEST_CONFIG, GatewayFactory, GatewayProcess
from tests.identity.oauth_server import AuthServer

pytestmark = [
    pytest.mark.timeout(60),
    pytest.mark.filterwarnings("ignore:The experimental tasks API:DeprecationWarning"),
]

AUDIENCE = "duragate-mcp"


@dataclass
class Setup:
    gateway: GatewayProcess
    idp: AuthServer

    def scheduled(self) -> int:
        return self.gateway.log_path.read_text(errors="replace").count("audit scheduled")


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    tmp = tmp_path_factory.mktemp("oauth")
    with AuthServer() as idp:
        identity = textwrap.dedent(
            f"""\
            identity:
              trust_domain: example.org
              allow_anonymous: false
              oauth:
                - issuer: {idp.issuer}
                  audience: {AUDIENCE}
                  tenant: ide
            """
        )
        text = TEST_CONFIG.read_text()
        config = tmp / "gateway.yaml"
        config.write_text(text.replace("identity:\n  allow_anonymous: true\n", identity))
        factory = GatewayFactory(tmp)
        try:
            yield Setup(factory(config), idp)
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


async def test_an_ide_user_calls_a_tool_with_an_access_token(setup: Setup) -> None:
    token = setup.idp.issue("alice@corp", aud=AUDIENCE)
    async with session_as(setup.gateway.url, token) as session:
        tools = {t.name for t in (await session.list_tools()).tools}
        result = await session.call_tool("add", {"a": 2, "b": 3})
    assert "add" in tools
    assert not result.isError and result.structuredContent == {"result": 5}
    log = setup.gateway.log_path.read_text()
    assert "principal=spiffe://example.org/user/alice_40corp tenant=ide" in log
    assert token not in log


async def test_the_mcp_clients_discovery_reads_the_challenge_and_the_metadata(
    setup: Setup,
) -> None:
    """What the mcp SDK's OAuth client does on a 401 (RFC 9728 discovery), with its own
    parsers: the challenge names the metadata, the metadata names our authorization server."""
    async with httpx.AsyncClient(base_url=setup.gateway.base) as http:
        refused = await http.post("/mcp", json=INIT, headers=MCP_HEADERS)
        url = extract_resource_metadata_from_www_auth(refused)
        assert url is not None
        metadata = ProtectedResourceMetadata.model_validate((await http.get(url)).json())
    assert str(metadata.resource) == setup.gateway.url
    assert [str(a).rstrip("/") for a in metadata.authorization_servers] == [setup.idp.issuer]


async def test_protected_resource_metadata(setup: Setup) -> None:
    async with httpx.AsyncClient(base_url=setup.gateway.base) as http:
        for path in (
            "/.well-known/oauth-protected-resource/mcp",
            "/.well-known/oauth-protected-resource",
        ):
            response = await http.get(path)
            assert response.status_code == 200
            body = response.json()
            assert body["resource"] == setup.gateway.url
            assert body["authorization_servers"] == [setup.idp.issuer]
            assert body["bearer_methods_supported"] == ["header"]


async def test_401_names_the_metadata_and_nothing_is_scheduled(setup: Setup) -> None:
    metadata = f"{setup.gateway.base}/.well-known/oauth-protected-resource/mcp"
    before = setup.scheduled()
    async with httpx.AsyncClient(base_url=setup.gateway.base) as http:
        anonymous = await http.post("/mcp", json=INIT, headers=MCP_HEADERS)
        assert anonymous.status_code == 401
        assert anonymous.headers["www-authenticate"] == (
            f'Bearer realm="duragate", resource_metadata="{metadata}"'
        )
        cases = {
            "wrong audience": setup.idp.issue("alice", aud="someone-else"),
            "expired": setup.idp.issue("alice", aud=AUDIENCE, ttl=-120),
            "unknown kid": _with_unpublished_key(setup.idp),
        }
        expected = {
            "wrong audience": f"aud does not include '{AUDIENCE}'",
            "expired": "token expired at",
            "unknown kid": "no key 'k-unpublished'",
        }
        for name, token in cases.items():
            response = await http.post(
                "/mcp", json=INIT, headers={**MCP_HEADERS, "Authorization": f"Bearer {token}"}
            )
            assert response.status_code == 401, name
            challenge = response.headers["www-authenticate"]
            assert challenge.startswith(
                f'Bearer realm="duragate", resource_metadata="{metadata}", error="invalid_token"'
            ), name
            assert expected[name] in response.json()["message"], name
            assert expected[name] in challenge, name
    assert setup.scheduled() == before


def _with_unpublished_key(idp: AuthServer) -> str:
    if "k-unpublished" not in idp.keys:
        idp.add_key("k-unpublished", publish=False)
    return idp.issue("alice", aud=AUDIENCE, kid="k-unpublished")
