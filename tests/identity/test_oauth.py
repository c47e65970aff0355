"""OAuth 2.1 access tokens (`identity.oauth`, through `Authenticator.authenticate`), against a
real authorization server on a loopback port (`tests.identity.oauth_server.AuthServer`): keys
found through RFC 8414 metadata or a configured JWKS URL or file, every refusal with its reason,
and the subject mapping."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from gateway.config import ConfigError, IdentityConfig, parse_config
from gateway.http_app import build_authenticator
from identity.authenticate import AuthenticationError, Authenticator
from identity.oauth import JwksError, parse_jwks, subject_segment
from tests.identity.keys import forge_jwt, public_pem, rsa_key
from tests.identity.oauth_server import AuthServer

RESOURCE = "https://gateway.test/mcp"


@pytest.fixture
def server() -> Iterator[AuthServer]:
    with AuthServer() as s:
        yield s


def make(server: AuthServer, **issuer: Any) -> Authenticator:
    identity: dict[str, Any] = {"trust_domain": "example.org", "resource": RESOURCE}
    identity.update(issuer.pop("identity", {}))
    config = IdentityConfig.model_validate(
        {**identity, "oauth": [{"issuer": server.issuer, **issuer}]}
    )
    return Authenticator(config)


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def refused(auth: Authenticator, token: str) -> str:
    with pytest.raises(AuthenticationError) as info:
        await auth.authenticate(bearer(token))
    assert info.value.status == 401 and info.value.error == "invalid_token"
    assert token not in info.value.reason  # never the token itself
    return info.value.reason


# -- the happy paths --------------------------------------------------------------------------


async def test_keys_from_the_issuer_metadata(server: AuthServer) -> None:
    auth = make(server)
    principal = await auth.authenticate(bearer(server.issue("alice", aud=RESOURCE)))
    assert (principal.id, principal.tenant, principal.via) == (
        "spiffe://example.org/user/alice",
        "example.org",
        "oauth",
    )
    assert (server.metadata_fetches, server.jwks_fetches) == (1, 1)
    # Cached keys: a second token does not fetch again.
    await auth.authenticate(bearer(server.issue("bob", aud=[RESOURCE, "other"])))
    assert server.jwks_fetches == 1


async def test_keys_from_a_configured_jwks_uri_and_issuer_tenant(server: AuthServer) -> None:
    auth = make(server, jwks_uri=server.jwks_uri, tenant="ide-users")
    principal = await auth.authenticate(bearer(server.issue("alice")))
    assert principal.tenant == "ide-users"
    assert server.metadata_fetches == 0


async def test_keys_from_a_file_reloaded_when_it_changes(
    server: AuthServer, tmp_path: Path
) -> None:
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps(server.jwks()))
    auth = make(server, jwks_file=str(path), jwks_min_refetch_seconds=0)
    assert (await auth.authenticate(bearer(server.issue("alice")))).id.endswith("/alice")
    server.add_key("k2")
    token = server.issue("alice", kid="k2")
    assert "no key 'k2'" in await refused(auth, token)
    path.write_text(json.dumps(server.jwks()))
    assert (await auth.authenticate(bearer(token))).id.endswith("/alice")
    assert server.jwks_fetches == 0


async def test_a_new_key_is_fetched_when_a_token_names_it(server: AuthServer) -> None:
    auth = make(server, jwks_uri=server.jwks_uri, jwks_min_refetch_seconds=0)
    await auth.authenticate(bearer(server.issue("alice")))
    server.add_key("k2", rsa_key())
    principal = await auth.authenticate(bearer(server.issue("alice", kid="k2")))
    assert principal.id == "spiffe://example.org/user/alice"
    assert server.jwks_fetches == 2


def test_subjects_map_injectively_to_path_segments() -> None:
    assert subject_segment("alice") == "alice"
    assert subject_segment("alice@example.com") == "alice_40example.com"
    # '_' is the escape character, so it is escaped too: these two stay apart.
    assert subject_segment("a_40b") == "a_5f40b"
    assert subject_segment("a@b") == "a_40b"
    assert subject_segment("..") == "_2e_2e"
    assert subject_segment("é/x") == "_c3_a9_2fx"


async def test_configured_subject_mapping_and_template(server: AuthServer) -> None:
    auth = make(
        server,
        jwks_uri=server.jwks_uri,
        subject_template="spiffe://{trust_domain}/ide/{sub}",
        subjects={"00u1": "spiffe://example.org/team-a/alice"},
    )
    mapped = await auth.authenticate(bearer(server.issue("00u1")))
    assert mapped.id == "spiffe://example.org/team-a/alice"
    templated = await auth.authenticate(bearer(server.issue("bob@corp")))
    assert templated.id == "spiffe://example.org/ide/bob_40corp"


# -- refusals ---------------------------------------------------------------------------------


async def test_wrong_issuer(server: AuthServer) -> None:
    with AuthServer() as other:
        auth = make(server, jwks_uri=server.jwks_uri)
        # An issuer we do not know: not an access token of ours, so it is taken for a
        # JWT-SVID, which it is not.
        reason = await refused(auth, other.issue("alice", aud=RESOURCE))
        assert f"iss '{other.issuer}' is not an OAuth issuer this gateway trusts" in reason
        # Claiming our issuer, signed by another server's key of the same kid.
        forged = other.issue("alice", aud=RESOURCE, iss=server.issuer)
        reason = await refused(auth, forged)
        assert f"access token of {server.issuer}: the signature does not verify" in reason


async def test_issuer_metadata_of_another_issuer_is_refused(server: AuthServer) -> None:
    server.metadata_issuer = "https://evil.example"
    auth = make(server)
    reason = await refused(auth, server.issue("alice"))
    assert "no key 'k1'" in reason
    assert server.jwks_fetches == 0  # the keys of a mismatching issuer were never fetched


async def test_wrong_or_missing_audience(server: AuthServer) -> None:
    auth = make(server, jwks_uri=server.jwks_uri)
    reason = await refused(auth, server.issue("alice", aud="https://other.test/mcp"))
    assert f"aud does not include '{RESOURCE}'" in reason
    assert "aud is required" in await refused(auth, server.issue("alice", aud=None))


async def test_expired_and_missing_exp(server: AuthServer) -> None:
    auth = make(server, jwks_uri=server.jwks_uri)
    assert "token expired at" in await refused(auth, server.issue("alice", ttl=-120))
    assert "exp is required" in await refused(auth, server.issue("alice", ttl=None))  # type: ignore[arg-type]


async def test_unknown_kid_is_refused_and_refetches_are_bounded(server: AuthServer) -> None:
    auth = make(server, jwks_uri=server.jwks_uri, jwks_min_refetch_seconds=60)
    await auth.authenticate(bearer(server.issue("alice")))
    server.add_key("k9", publish=False)
    for _ in range(5):
        reason = await refused(auth, server.issue("alice", kid="k9"))
        assert f"no key 'k9' in the JWK Set of {server.issuer}" in reason
    # No refetch within the minimum gap after the last fetch, however many made-up kids come.
    assert server.jwks_fetches == 1


async def test_alg_none_and_hs256_with_the_public_key(server: AuthServer) -> None:
    auth = make(server, jwks_uri=server.jwks_uri)
    await auth.authenticate(bearer(server.issue("alice")))
    claims = {"iss": server.issuer, "sub": "alice", "aud": RESOURCE, "exp": time.time() + 60}
    unsigned = forge_jwt({"alg": "none", "kid": "k1"}, claims)
    assert "alg 'none' is not allowed" in await refused(auth, unsigned)
    hs = forge_jwt({"alg": "HS256", "kid": "k1"}, claims, public_pem(server.keys["k1"]))
    reason = await refused(auth, hs)
    assert "alg 'HS256' is not allowed: access tokens must be signed with the issuer's" in reason


async def test_key_in_the_token_is_refused(server: AuthServer) -> None:
    auth = make(server, jwks_uri=server.jwks_uri)
    claims = {"iss": server.issuer, "sub": "alice", "aud": RESOURCE, "exp": time.time() + 60}
    token = forge_jwt({"alg": "ES256", "kid": "k1", "jku": "https://evil/jwks"}, claims)
    assert "header 'jku' is not allowed" in await refused(auth, token)


async def test_an_algorithm_not_allowed_for_the_issuer(server: AuthServer) -> None:
    auth = make(server, jwks_uri=server.jwks_uri, algorithms=["RS256"])
    assert "alg 'ES256' is not allowed for" in await refused(auth, server.issue("alice"))


async def test_unreachable_jwks_is_a_refusal_not_a_crash() -> None:
    with AuthServer() as gone:
        issuer, token = gone.issuer, gone.issue("alice")
    config = IdentityConfig.model_validate(
        {"trust_domain": "example.org", "resource": RESOURCE, "oauth": [{"issuer": issuer}]}
    )
    with pytest.raises(AuthenticationError) as info:
        await Authenticator(config).authenticate(bearer(token))
    assert "no key 'k1'" in info.value.reason


# -- configuration ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("issuer", "message"),
    [
        ({"issuer": "http://idp.example.com"}, "must use https"),
        ({"issuer": "https://idp", "algorithms": ["HS256"]}, "'HS256' is not allowed"),
        ({"issuer": "https://idp", "subject_template": "spiffe://x/u"}, "must contain {sub}"),
        ({"issuer": "https://idp", "subject_template": "spiffe://{td}/{sub}"}, "unknown field"),
        ({"issuer": "https://idp", "jwks_uri": "https://a", "jwks_file": "f"}, "not both"),
    ],
)
def test_bad_issuer_settings(issuer: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        IdentityConfig.model_validate(
            {"trust_domain": "example.org", "resource": RESOURCE, "oauth": [issuer]}
        )


def test_two_issuers_need_two_templates_and_an_audience_is_required() -> None:
    two = [{"issuer": "https://a.example"}, {"issuer": "https://b.example"}]
    with pytest.raises(ValidationError, match="same sub of two issuers one principal"):
        IdentityConfig.model_validate({"trust_domain": "t.org", "resource": RESOURCE, "oauth": two})
    with pytest.raises(ValidationError, match="no audience"):
        IdentityConfig.model_validate({"trust_domain": "t.org", "oauth": two[:1]})


def test_jwks_parsing_refuses_private_keys_and_skips_others(server: AuthServer) -> None:
    jwks = server.jwks()
    assert set(parse_jwks(jwks, "x")) == {"k1"}
    skipped = {
        "keys": [*jwks["keys"], {"kty": "oct", "k": "c2VjcmV0"}, {"kty": "EC", "use": "enc"}]
    }
    assert set(parse_jwks(skipped, "x")) == {"k1"}
    private = {"keys": [{**jwks["keys"][0], "d": "AAAA"}]}
    with pytest.raises(JwksError, match="private key"):
        parse_jwks(private, "x")


def test_a_broken_jwks_file_stops_the_start_with_its_place(tmp_path: Path) -> None:
    (tmp_path / "jwks.json").write_text("{not json")
    text = (
        "identity:\n  trust_domain: example.org\n  resource: https://gw.example/mcp\n"
        "  oauth:\n    - issuer: https://idp.example\n      jwks_file: jwks.json\n"
    )
    config = parse_config(text, "gateway.yaml", tmp_path)
    with pytest.raises(ConfigError) as info:
        build_authenticator(config)
    assert "gateway.yaml:4: identity.oauth:" in str(info.value)
    assert "jwks.json: not JSON" in str(info.value)
