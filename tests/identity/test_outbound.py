"""Outbound OAuth (`identity.outbound`, authlib) against a real token endpoint on a loopback port:
client credentials, RFC 8693 token exchange carrying the delegation chain (the gateway's
JWT-SVID as the actor token), caching until shortly before expiry, and the refusals."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Iterator
from datetime import timedelta

import pytest
from cryptography.hazmat.primitives import serialization

from gateway.config import IdentityConfig
from identity.authenticate import Authenticator
from identity.bundle import BundleSet
from identity.dev_ca import DevCA
from identity.jwt_svid import verify_jwt_svid
from identity.outbound import (
    JWT_TOKEN_TYPE,
    OutboundAuthError,
    OutboundOAuth,
    OutboundOAuthConfig,
)
from identity.own import DevCaIdentity
from identity.tls import TlsPeer
from tests.identity.oauth_server import AuthServer, _unverified

pytestmark = pytest.mark.timeout(60)

GATEWAY = "spiffe://example.org/duragate"
PLANNER = "spiffe://example.org/agents/planner"
REMOTE = "https://remote.example/mcp"
SECRET = {"GATEWAY_SECRET": "s3cret"}


class Clock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def idp() -> Iterator[AuthServer]:
    with AuthServer() as server:
        yield server


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> DevCA:
    return DevCA.create(tmp_path_factory.mktemp("ca"), "example.org")


def config(idp: AuthServer, **changes: object) -> OutboundOAuthConfig:
    settings = {
        "token_endpoint": idp.token_endpoint,
        "client_id": "gateway",
        "client_secret_env": "GATEWAY_SECRET",
        **changes,
    }
    return OutboundOAuthConfig.model_validate(settings)


@pytest.fixture
async def oauth(idp: AuthServer, ca: DevCA) -> AsyncIterator[OutboundOAuth]:
    client = OutboundOAuth(config(idp), own=DevCaIdentity(ca, GATEWAY), env=SECRET)
    yield client
    await client.aclose()


async def test_client_credentials_cached_per_resource(
    oauth: OutboundOAuth, idp: AuthServer
) -> None:
    token = await oauth.client_credentials(resource=REMOTE)
    assert await oauth.client_credentials(resource=REMOTE) == token
    assert _unverified(token)["sub"] == "gateway" and _unverified(token)["aud"] == REMOTE
    await oauth.client_credentials(resource="https://other.example/mcp")
    assert oauth.requests == 2
    first = idp.token_requests[0]
    assert first["grant_type"] == "client_credentials" and first["resource"] == REMOTE
    assert first["_client"] == "gateway" and "client_secret" not in first  # HTTP Basic


async def test_a_token_is_renewed_before_it_expires(idp: AuthServer, ca: DevCA) -> None:
    clock = Clock()
    idp.token_ttl = 120
    oauth = OutboundOAuth(config(idp), env=SECRET, clock=clock)
    try:
        first = await oauth.client_credentials()
        clock.now += 55
        assert await oauth.client_credentials() == first
        clock.now += 10  # past expires_in minus the margin (and half the lifetime)
        await oauth.client_credentials()
        assert oauth.requests == 2
    finally:
        await oauth.aclose()


async def test_concurrent_requests_share_one_fetch(oauth: OutboundOAuth) -> None:
    tokens = await asyncio.gather(*(oauth.client_credentials() for _ in range(5)))
    assert len(set(tokens)) == 1 and oauth.requests == 1


async def test_token_exchange_carries_the_delegation_chain(
    oauth: OutboundOAuth, idp: AuthServer, ca: DevCA
) -> None:
    # Alice's token, already used by the planner acting for her.
    alice = idp.issue("alice", aud="https://gateway.test/mcp", act={"sub": PLANNER})
    exchanged = await oauth.exchange(alice, resource=REMOTE)
    claims = _unverified(exchanged)
    assert claims["sub"] == "alice" and claims["aud"] == REMOTE
    # The gateway is the current actor; the planner acted before it.
    assert claims["act"] == {"sub": GATEWAY, "act": {"sub": PLANNER}}
    request = idp.token_requests[-1]
    assert request["grant_type"] == "urn:ietf:params:oauth:grant-type:token-exchange"
    assert request["subject_token"] == alice
    assert request["actor_token_type"] == JWT_TOKEN_TYPE
    # The actor token is the gateway's JWT-SVID, for the token endpoint.
    actor = verify_jwt_svid(
        request["actor_token"], BundleSet([ca.trust_bundle()]), idp.token_endpoint
    )
    assert str(actor.spiffe_id) == GATEWAY
    # Cached per subject token.
    assert await oauth.exchange(alice, resource=REMOTE) == exchanged
    await oauth.exchange(idp.issue("bob"), resource=REMOTE)
    assert oauth.requests == 2


async def test_an_exchanged_token_is_accepted_from_the_gateway_over_mtls(
    oauth: OutboundOAuth, idp: AuthServer, ca: DevCA
) -> None:
    """What a remote Duragate would do with it: the gateway's client certificate matches the
    token's act.sub, and the chain records Alice."""
    exchanged = await oauth.exchange(idp.issue("alice"), resource=REMOTE)
    remote = Authenticator(
        IdentityConfig.model_validate(
            {
                "trust_domain": "example.org",
                "bundles": {"example.org": str(ca.directory / "bundle.json")},
                "resource": REMOTE,
                "oauth": [{"issuer": idp.issuer}],
            }
        )
    )
    cert, _ = ca.issue_x509_svid(GATEWAY, timedelta(minutes=5))
    peer = TlsPeer(cert.public_bytes(serialization.Encoding.DER))
    principal = await remote.authenticate({"Authorization": f"Bearer {exchanged}"}, peer)
    assert (principal.id, principal.chain) == (GATEWAY, ("spiffe://example.org/user/alice",))


async def test_refusals_name_the_servers_error(idp: AuthServer) -> None:
    wrong = OutboundOAuth(config(idp), env={"GATEWAY_SECRET": "wrong"})
    try:
        with pytest.raises(OutboundAuthError) as info:
            await wrong.client_credentials()
        assert "refused the client credentials request (invalid_client)" in str(info.value)
        assert "wrong" not in str(info.value)
    finally:
        await wrong.aclose()
    with pytest.raises(OutboundAuthError, match="set the environment variable GATEWAY_SECRET"):
        OutboundOAuth(config(idp), env={})


async def test_an_unreachable_token_endpoint() -> None:
    with AuthServer() as gone:
        settings = config(gone)
    oauth = OutboundOAuth(settings, env=SECRET)
    try:
        with pytest.raises(OutboundAuthError, match="cannot be reached: ConnectError"):
            await oauth.client_credentials()
    finally:
        await oauth.aclose()


def test_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="must use https"):
        OutboundOAuthConfig(token_endpoint="http://idp.example/token", client_id="x")
    with pytest.raises(ValueError, match="not an environment variable name"):
        OutboundOAuthConfig(
            token_endpoint="https://idp.example/token", client_id="x", client_secret_env="a b"
        )
    assert json.loads(
        OutboundOAuthConfig(token_endpoint="https://i/t", client_id="x").model_dump_json()
    )
