"""`identity.authenticate`: bearer headers, JWT-SVIDs to principals, tenant rules, anonymous
callers, bundle rotation without a restart, and the token cache (never past `exp`)."""

from __future__ import annotations

import json
import os
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from starlette.datastructures import Headers

import identity.authenticate as authenticate
from gateway.config import ConfigError, IdentityConfig, parse_config
from identity.authenticate import (
    AuthenticationError,
    Authenticator,
    BearerResult,
    TokenCache,
    bearer_token,
)
from identity.principal import Principal
from identity.spiffe_id import SpiffeId
from identity.tenants import NoTenantError, TenantRules
from tests.identity.keys import PrivateKey, ec_key, forge_jwt, jwk_set, make_jwt, svid_claims

A = "a.org"
B = "b.org"
ALICE = "spiffe://a.org/team-x/alice"


class Clock:
    """Wall-clock time plus an offset the test moves forward (tokens carry real `exp`s)."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset


def write_bundle(path: Path, keys: dict[str, PrivateKey], sequence: int = 1) -> None:
    # Through a rename, as a bundle publisher would: a reader never sees half a file.
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(jwk_set(keys, sequence=sequence, refresh_hint=3600)))
    os.replace(tmp, path)


@pytest.fixture(scope="module")
def keys() -> dict[str, PrivateKey]:
    return {"a1": ec_key(), "a2": ec_key(), "b1": ec_key()}


@pytest.fixture
def bundles(tmp_path: Path, keys: dict[str, PrivateKey]) -> dict[str, Path]:
    paths = {A: tmp_path / "a.json", B: tmp_path / "b.json"}
    write_bundle(paths[A], {"a1": keys["a1"]})
    write_bundle(paths[B], {"b1": keys["b1"]})
    return paths


def make(
    bundles: dict[str, Path], clock: Callable[[], float] = time.time, **identity: Any
) -> Authenticator:
    config = IdentityConfig.model_validate({"bundles": bundles, **identity})
    return Authenticator(config, clock=clock)


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def refused(auth: Authenticator, headers: Any) -> AuthenticationError:
    with pytest.raises(AuthenticationError) as info:
        auth.authenticate_http(headers)
    return info.value


# --- JWT-SVIDs -------------------------------------------------------------------------------


def test_valid_token_is_a_principal(bundles: dict[str, Path], keys: dict[str, Any]) -> None:
    auth = make(bundles)
    token = make_jwt(keys["a1"], svid_claims(ALICE), kid="a1")
    principal = auth.authenticate_http(bearer(token))
    assert principal == Principal(ALICE, "a.org", "jwt-svid")
    # Scheme case-insensitive (RFC 7235), extra spaces tolerated, starlette headers too.
    same = auth.authenticate_http(Headers({"authorization": f"bearer   {token}"}))
    assert same == principal


@pytest.mark.parametrize(
    ("claims", "reason"),
    [
        (svid_claims(ALICE, aud="other"), "aud does not include 'duragate'"),
        (svid_claims(ALICE, ttl=-120), "token expired at"),
        (svid_claims("spiffe://c.org/x"), "no bundle for trust domain c.org"),
        (svid_claims("not-spiffe"), "is not a SPIFFE ID"),
    ],
)
def test_refused_tokens_say_why(
    bundles: dict[str, Path], keys: dict[str, Any], claims: dict[str, Any], reason: str
) -> None:
    token = make_jwt(keys["a1"], claims, kid="a1")
    error = refused(make(bundles), bearer(token))
    assert (error.status, error.error) == (401, "invalid_token")
    assert reason in error.reason
    assert token not in error.reason


def test_alg_none_refused(bundles: dict[str, Path]) -> None:
    token = forge_jwt({"alg": "none", "kid": "a1", "typ": "JWT"}, svid_claims(ALICE))
    error = refused(make(bundles), bearer(token))
    assert error.status == 401 and "alg 'none' is not allowed" in error.reason


def test_domain_a_token_signed_with_b_key_refused(
    bundles: dict[str, Path], keys: dict[str, Any]
) -> None:
    auth = make(bundles)
    # B's key under B's kid: the kid is looked up in A's bundle only, never in B's.
    by_b = make_jwt(keys["b1"], svid_claims(ALICE), kid="b1")
    error = refused(auth, bearer(by_b))
    assert error.reason == "no key 'b1' in the bundle of trust domain a.org"
    # B's key claiming A's kid: the signature does not verify with A's key.
    posing = make_jwt(keys["b1"], svid_claims(ALICE), kid="a1")
    error = refused(auth, bearer(posing))
    assert "signature does not verify with key 'a1' of trust domain a.org" in error.reason
    # B's own workloads are fine (federation), in B's tenant.
    bob = make_jwt(keys["b1"], svid_claims("spiffe://b.org/bob"), kid="b1")
    assert auth.authenticate_http(bearer(bob)).tenant == "b.org"


@pytest.mark.parametrize(
    ("headers", "reason"),
    [
        ({"Authorization": "Basic dXNlcjpwdw=="}, "does not use the Bearer scheme"),
        ({"Authorization": "Bearer"}, "the Bearer token is missing"),
        ({"Authorization": "Bearer   "}, "the Bearer token is missing"),
        ({"Authorization": "Bearer a.b.c d"}, "characters a token cannot have"),
        (Headers(raw=[(b"authorization", b"Bearer x"), (b"authorization", b"Bearer y")]), "more"),
    ],
)
def test_malformed_headers(bundles: dict[str, Path], headers: Any, reason: str) -> None:
    # Even with anonymous callers allowed: a caller that sent credentials meant to be someone.
    error = refused(make(bundles, allow_anonymous=True), headers)
    assert (error.status, error.error) == (401, "invalid_request")
    assert reason in error.reason


def test_token_without_scheme_is_never_quoted(
    bundles: dict[str, Path], keys: dict[str, Any]
) -> None:
    token = make_jwt(keys["a1"], svid_claims(ALICE), kid="a1")
    error = refused(make(bundles), {"Authorization": token})
    assert token not in error.reason and token[:20] not in error.reason


def test_bearer_token_parsing() -> None:
    assert bearer_token({}) is None
    assert bearer_token({"AUTHORIZATION": "Bearer abc.def-_~+/=="}) == "abc.def-_~+/=="


# --- anonymous callers -----------------------------------------------------------------------


def test_anonymous_refused_by_default(bundles: dict[str, Path]) -> None:
    error = refused(make(bundles), {})
    assert (error.status, error.error) == (401, None)
    assert "no credentials" in error.reason and "allow_anonymous is false" in error.reason
    unconfigured = refused(Authenticator(IdentityConfig()), {})
    assert "authentication is not configured" in unconfigured.reason


def test_anonymous_allowed_with_overrides(bundles: dict[str, Path]) -> None:
    plain = make(bundles, allow_anonymous=True).authenticate_http({})
    assert plain == Principal("spiffe://duragate.local/anonymous", "default", "anonymous")
    custom = make(
        bundles,
        allow_anonymous=True,
        anonymous_principal="spiffe://a.org/guest",
        anonymous_tenant="guests",
    ).authenticate_http({})
    assert custom == Principal("spiffe://a.org/guest", "guests", "anonymous")


# --- tenants ---------------------------------------------------------------------------------


def test_tenant_rules_first_match_wins_then_trust_domain() -> None:
    rules = TenantRules.of(
        [
            ("spiffe://a.org/team-x/admin", "ops"),
            ("spiffe://a.org/team-x/**", "team-x"),
            ("spiffe://a.org/*/alice", "never-reached-for-team-x"),
        ]
    )
    assert rules.tenant_of(SpiffeId.parse("spiffe://a.org/team-x/admin")) == "ops"
    assert rules.tenant_of(SpiffeId.parse(ALICE)) == "team-x"
    assert rules.tenant_of(SpiffeId.parse("spiffe://a.org/y/alice")) == "never-reached-for-team-x"
    assert rules.tenant_of(SpiffeId.parse("spiffe://a.org/other")) == "a.org"
    assert rules.tenant_of(SpiffeId.parse("spiffe://b.org/x")) == "b.org"
    with pytest.raises(NoTenantError, match="cannot serve as a tenant name"):
        rules.tenant_of(SpiffeId.parse("spiffe://-odd/x"))


def test_require_tenant_rule_gives_403(bundles: dict[str, Path], keys: dict[str, Any]) -> None:
    auth = make(
        bundles,
        require_tenant_rule=True,
        tenants=[{"match": "spiffe://a.org/team-x/**", "tenant": "team-x"}],
    )
    alice = make_jwt(keys["a1"], svid_claims(ALICE), kid="a1")
    assert auth.authenticate_http(bearer(alice)).tenant == "team-x"
    stranger = make_jwt(keys["a1"], svid_claims("spiffe://a.org/elsewhere/eve"), kid="a1")
    error = refused(auth, bearer(stranger))
    assert (error.status, error.error) == (403, None)
    assert "belongs to no tenant" in error.reason and "require_tenant_rule" in error.reason


# --- bundle rotation -------------------------------------------------------------------------


def test_rotated_bundle_is_used_without_restart(
    bundles: dict[str, Path], keys: dict[str, Any]
) -> None:
    clock = Clock()
    auth = make(bundles, clock, bundle_refresh_seconds=5)
    old = make_jwt(keys["a1"], svid_claims(ALICE), kid="a1")
    new = make_jwt(keys["a2"], svid_claims(ALICE), kid="a2")
    assert auth.authenticate_http(bearer(old)).id == ALICE
    assert len(auth.cache) == 1

    # Rotation: a2 added, a1 withdrawn. A token under the new key is accepted at once (a
    # failed verification looks at the files), and that check empties the cache.
    write_bundle(bundles[A], {"a2": keys["a2"]}, sequence=2)
    assert auth.authenticate_http(bearer(new)).id == ALICE
    error = refused(auth, bearer(old))
    assert "no key 'a1'" in error.reason


def test_withdrawn_key_stops_working_at_the_next_check(
    bundles: dict[str, Path], keys: dict[str, Any]
) -> None:
    clock = Clock()
    auth = make(bundles, clock, bundle_refresh_seconds=5)
    old = make_jwt(keys["a1"], svid_claims(ALICE), kid="a1")
    assert auth.authenticate_http(bearer(old)).id == ALICE
    write_bundle(bundles[A], {"a2": keys["a2"]}, sequence=2)
    # Until the next check the cached verification stands (bounded by bundle_refresh_seconds)...
    clock.offset = 2
    assert auth.authenticate_http(bearer(old)).id == ALICE
    # ...after it, the withdrawn key is gone and the cache with it.
    clock.offset = 6
    assert "no key 'a1'" in refused(auth, bearer(old)).reason


def test_broken_bundle_keeps_the_previous_one(
    bundles: dict[str, Path], keys: dict[str, Any]
) -> None:
    clock = Clock()
    auth = make(bundles, clock, bundle_refresh_seconds=1)
    bundles[A].write_text("{not json")
    clock.offset = 2
    token = make_jwt(keys["a1"], svid_claims(ALICE), kid="a1")
    assert auth.authenticate_http(bearer(token)).id == ALICE


# --- the token cache -------------------------------------------------------------------------


def count_verifications(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    calls: list[str] = []
    real = authenticate.verify_jwt_svid

    def counting(token: str, *args: Any, **kwargs: Any) -> Any:
        calls.append(token)
        return real(token, *args, **kwargs)

    monkeypatch.setattr(authenticate, "verify_jwt_svid", counting)
    return calls


def test_cache_never_serves_an_expired_token(
    bundles: dict[str, Path], keys: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = count_verifications(monkeypatch)
    clock = Clock()
    auth = make(bundles, clock, token_cache_seconds=60, bundle_refresh_seconds=3600)
    token = make_jwt(keys["a1"], svid_claims(ALICE, ttl=10), kid="a1")
    auth.authenticate_http(bearer(token))
    clock.offset = 5
    auth.authenticate_http(bearer(token))
    assert len(calls) == 1  # served from the cache
    # At exp the entry is gone, even though the TTL (60 s) is not over: verified again (the
    # verifier's clock-skew leeway still admits it, but it is not cached past exp).
    clock.offset = 11
    auth.authenticate_http(bearer(token))
    auth.authenticate_http(bearer(token))
    assert len(calls) == 3
    clock.offset = 45  # past exp and the leeway
    assert "token expired" in refused(auth, bearer(token)).reason


def test_cache_off_verifies_every_time(
    bundles: dict[str, Path], keys: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = count_verifications(monkeypatch)
    auth = make(bundles, token_cache_seconds=0)
    token = make_jwt(keys["a1"], svid_claims(ALICE), kid="a1")
    for _ in range(3):
        auth.authenticate_http(bearer(token))
    assert len(calls) == 3 and len(auth.cache) == 0


def test_cache_is_a_bounded_lru() -> None:
    cache = TokenCache(ttl=60, max_entries=2)
    p = [BearerResult(Principal(f"spiffe://a.org/{i}", "a.org", "jwt-svid")) for i in range(3)]
    cache.put(b"0", p[0], expires_at=1000, now=0)
    cache.put(b"1", p[1], expires_at=1000, now=0)
    assert cache.get(b"0", now=1) == p[0]  # 0 is now the most recent
    cache.put(b"2", p[2], expires_at=1000, now=1)
    assert cache.get(b"1", now=1) is None and cache.get(b"0", now=1) == p[0]
    cache.put(b"3", p[2], expires_at=1, now=1)  # already at exp: not kept
    assert cache.get(b"3", now=1) is None and len(cache) == 2


# --- configuration ---------------------------------------------------------------------------


def parse(text: str) -> IdentityConfig:
    return parse_config(textwrap.dedent(text), "gateway.yaml", Path("/srv")).identity


def test_identity_config_keys() -> None:
    identity = parse(
        """\
        identity:
          trust_domain: a.org
          bundles: {a.org: a.json, b.org: /etc/b.pem}
          audience: [duragate, https://gw.example]
          tenants:
            - {match: "spiffe://a.org/team-x/**", tenant: team-x}
          require_tenant_rule: true
        """
    )
    assert identity.bundles == {"a.org": Path("/srv/a.json"), "b.org": Path("/etc/b.pem")}
    assert identity.audiences == {"duragate", "https://gw.example"}
    assert identity.tenants[0].tenant == "team-x" and identity.require_tenant_rule


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("identity:\n  bundle: {}\n", "gateway.yaml:2: identity.bundle: unknown key"),
        ("identity:\n  config: x.yaml\n", "gateway.yaml:2: identity.config: unknown key"),
        ("identity:\n  bundles: {A.org: a.json}\n", "must be lowercase"),
        ("identity:\n  tenants:\n    - {match: 'spiffe://a.org/**', tenant: x}\n", "can never"),
        ("identity:\n  tenants:\n    - {match: 'spiffe://a.org/**/x', tenant: x}\n", "last"),
        ("identity:\n  anonymous_tenant: '..'\n", "is not a tenant name"),
        ("identity:\n  anonymous_principal: nobody\n", "does not start with 'spiffe://'"),
        ("identity:\n  audience: []\n", "non-empty"),
    ],
)
def test_identity_config_refusals(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse(text)
    assert message in str(info.value)
