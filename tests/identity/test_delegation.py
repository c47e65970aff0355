"""Delegation (`act`, RFC 8693 4.1) in `identity.authenticate`: the chain read from verified
claims, checked against the client certificate of the connection, for JWT-SVIDs and OAuth
access tokens alike."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization

from gateway.config import IdentityConfig
from identity.authenticate import (
    MAX_ACT_DEPTH,
    AuthenticationError,
    Authenticator,
    actors_of,
)
from identity.dev_ca import DevCA
from identity.jwt_svid import JwtSvidError
from identity.tls import TlsPeer
from tests.identity.oauth_server import AuthServer

ALICE = "spiffe://example.org/team-a/alice"
AGENT = "spiffe://example.org/agents/a"
OTHER = "spiffe://example.org/agents/b"


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> DevCA:
    return DevCA.create(tmp_path_factory.mktemp("ca"), "example.org")


@pytest.fixture
def idp() -> Iterator[AuthServer]:
    with AuthServer() as server:
        yield server


def auth(ca: DevCA, idp: AuthServer | None = None) -> Authenticator:
    settings: dict[str, Any] = {
        "trust_domain": "example.org",
        "bundles": {"example.org": str(ca.directory / "bundle.json")},
        "tenants": [{"match": "spiffe://example.org/team-a/**", "tenant": "team-a"}],
    }
    if idp is not None:
        settings["oauth"] = [{"issuer": idp.issuer, "audience": "duragate", "tenant": "ide"}]
    return Authenticator(IdentityConfig.model_validate(settings))


def peer(ca: DevCA, spiffe_id: str) -> TlsPeer:
    cert, _ = ca.issue_x509_svid(spiffe_id, timedelta(minutes=5))
    return TlsPeer(cert.public_bytes(serialization.Encoding.DER))


def token(ca: DevCA, act: Any) -> dict[str, str]:
    jwt = ca.issue_jwt_svid(ALICE, "duragate", timedelta(minutes=5), extra_claims={"act": act})
    return {"Authorization": f"Bearer {jwt}"}


def test_actors_earliest_first() -> None:
    assert actors_of({}) == ()
    nested = {"act": {"sub": AGENT, "act": {"sub": OTHER}}}
    # OTHER acted first and asked AGENT, which presents the token.
    assert actors_of(nested) == (OTHER, AGENT)


@pytest.mark.parametrize(
    ("act", "reason"),
    [
        ("spiffe://example.org/x", "act must be a JSON object"),
        ({"client_id": "x"}, "act.sub is required"),
        ({"sub": "agent-a"}, "act.sub 'agent-a' is not a SPIFFE ID"),
    ],
)
def test_malformed_act(act: Any, reason: str) -> None:
    with pytest.raises(JwtSvidError, match=reason):
        actors_of({"act": act})


def test_act_chain_depth_is_bounded() -> None:
    act: dict[str, Any] = {"sub": AGENT}
    for i in range(MAX_ACT_DEPTH):
        act = {"sub": f"spiffe://example.org/agents/{i}", "act": act}
    with pytest.raises(JwtSvidError, match=f"deeper than {MAX_ACT_DEPTH}"):
        actors_of({"act": act})


def test_the_agent_named_by_act_is_accepted(ca: DevCA) -> None:
    principal = auth(ca).authenticate_http(token(ca, {"sub": AGENT}), peer(ca, AGENT))
    assert (principal.id, principal.tenant, principal.via, principal.chain) == (
        AGENT,
        "team-a",  # the user's tenant: the agent works for her
        "x509-svid",
        (ALICE,),
    )


def test_another_agent_is_refused(ca: DevCA) -> None:
    with pytest.raises(AuthenticationError) as info:
        auth(ca).authenticate_http(token(ca, {"sub": AGENT}), peer(ca, OTHER))
    assert info.value.status == 401
    assert f"act.sub ({AGENT}) is not the client certificate's SPIFFE ID ({OTHER})" in (
        info.value.reason
    )


def test_act_without_a_certificate_is_refused(ca: DevCA) -> None:
    with pytest.raises(AuthenticationError, match="only accepted over mTLS"):
        auth(ca).authenticate_http(token(ca, {"sub": AGENT}))


async def test_an_oauth_token_with_act(ca: DevCA, idp: AuthServer) -> None:
    authenticator = auth(ca, idp)
    access = idp.issue("alice", aud="duragate", act={"sub": AGENT})
    headers = {"Authorization": f"Bearer {access}"}
    principal = await authenticator.authenticate(headers, peer(ca, AGENT))
    assert (principal.id, principal.tenant, principal.chain) == (
        AGENT,
        "ide",
        ("spiffe://example.org/user/alice",),
    )
    with pytest.raises(AuthenticationError, match="is not the client certificate's"):
        await authenticator.authenticate(headers, peer(ca, OTHER))
