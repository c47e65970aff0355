"""JWT-SVID verification: the happy paths, and every attack refused with its reason."""

from __future__ import annotations

import base64
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from joserfc import jwt
from joserfc.errors import JoseError
from joserfc.jwk import OctKey

from identity.bundle import BundleSet, TrustBundle
from identity.jwt_svid import (
    _REGISTRIES,
    ALGORITHMS,
    JwtSvid,
    JwtSvidError,
    peek_subject,
    verify_jwt_svid,
)
from identity.spiffe_id import SpiffeId
from tests.identity.keys import (
    PrivateKey,
    b64url,
    ca_cert,
    ec_key,
    forge_jwt,
    jose_public_key,
    jwk_set,
    make_jwt,
    public_pem,
    rsa_key,
    svid_claims,
)

SUB = "spiffe://a.org/agents/planner"
AUD = "duragate"


@pytest.fixture(scope="module")
def a_ec() -> ec.EllipticCurvePrivateKey:
    return ec_key()


@pytest.fixture(scope="module")
def a_rsa() -> rsa.RSAPrivateKey:
    return rsa_key()


@pytest.fixture(scope="module")
def b_ec() -> ec.EllipticCurvePrivateKey:
    return ec_key()


@pytest.fixture(scope="module")
def a_p521() -> ec.EllipticCurvePrivateKey:
    return ec_key("P-521")


@pytest.fixture(scope="module")
def bundles(
    a_ec: ec.EllipticCurvePrivateKey,
    a_rsa: rsa.RSAPrivateKey,
    a_p521: ec.EllipticCurvePrivateKey,
    b_ec: ec.EllipticCurvePrivateKey,
) -> BundleSet:
    return BundleSet(
        [
            TrustBundle.parse_spiffe("a.org", jwk_set({"k1": a_ec, "rsa1": a_rsa, "p521": a_p521})),
            # b.org's key is only in b.org's bundle, under a kid a.org does not use.
            TrustBundle.parse_spiffe("b.org", jwk_set({"b1": b_ec})),
            # x.org publishes X.509 authorities only: it does not issue JWT-SVIDs.
            TrustBundle.parse_spiffe("x.org", jwk_set(x509_cas=[ca_cert(ec_key(), "x.org")])),
        ]
    )


def refused(token: str, bundles: BundleSet, reason: str, **kwargs: Any) -> JwtSvidError:
    with pytest.raises(JwtSvidError) as info:
        verify_jwt_svid(token, bundles, kwargs.pop("audience", AUD), **kwargs)
    message = str(info.value)
    assert reason in message
    # The token itself never appears in an error (it is a bearer credential).
    for part in token.split("."):
        if len(part) > 8:
            assert part not in message
    return info.value


# -- happy paths -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key_name", "kid", "alg"),
    [
        ("a_ec", "k1", "ES256"),
        ("a_p521", "p521", "ES512"),
        ("a_rsa", "rsa1", "RS256"),
        ("a_rsa", "rsa1", "RS512"),
        ("a_rsa", "rsa1", "PS256"),
        ("a_rsa", "rsa1", "PS384"),
    ],
)
def test_valid_tokens(
    request: pytest.FixtureRequest, bundles: BundleSet, key_name: str, kid: str, alg: str
) -> None:
    key: PrivateKey = request.getfixturevalue(key_name)
    claims = svid_claims(SUB, AUD, custom="x")
    svid = verify_jwt_svid(make_jwt(key, claims, kid=kid, alg=alg), bundles, AUD)
    assert isinstance(svid, JwtSvid)
    assert svid.spiffe_id == SpiffeId.parse(SUB)
    assert svid.audience == [AUD]
    assert svid.expiry.timestamp() == claims["exp"]
    assert svid.claims["custom"] == "x"
    assert svid.key_id == kid


def test_typ_jose_or_absent_is_accepted(
    bundles: BundleSet, a_ec: ec.EllipticCurvePrivateKey
) -> None:
    for typ in ("JOSE", None):
        assert verify_jwt_svid(make_jwt(a_ec, svid_claims(SUB), typ=typ), bundles, AUD)


def test_list_audiences(bundles: BundleSet, a_ec: ec.EllipticCurvePrivateKey) -> None:
    token = make_jwt(a_ec, svid_claims(SUB, ["reports", AUD]))
    assert verify_jwt_svid(token, bundles, AUD).audience == ["reports", AUD]
    assert verify_jwt_svid(token, bundles, {"other", "reports"}).audience == ["reports", AUD]
    refused(token, bundles, "aud does not include any of 'x', 'y'", audience={"x", "y"})


def test_leeway(bundles: BundleSet, a_ec: ec.EllipticCurvePrivateKey) -> None:
    now = time.time()
    token = make_jwt(a_ec, {"sub": SUB, "aud": AUD, "exp": int(now) - 10, "nbf": int(now) + 10})
    assert verify_jwt_svid(token, bundles, AUD, now=now)  # within the default 30 s
    refused(token, bundles, "token expired at", now=now, leeway=0)
    refused(token, bundles, "token not valid before", now=now - 50)


def test_peek_subject(a_ec: ec.EllipticCurvePrivateKey, b_ec: ec.EllipticCurvePrivateKey) -> None:
    # Routing only: the signature is not looked at.
    assert peek_subject(make_jwt(b_ec, svid_claims(SUB))) == SpiffeId.parse(SUB)
    with pytest.raises(JwtSvidError, match="sub 'user:1' is not a SPIFFE ID"):
        peek_subject(make_jwt(a_ec, svid_claims("user:1")))


# -- attacks ---------------------------------------------------------------------------------


def test_alg_none_is_refused(bundles: BundleSet) -> None:
    for alg in ("none", "None", "NONE"):
        token = forge_jwt({"alg": alg, "kid": "k1", "typ": "JWT"}, svid_claims(SUB))
        refused(token, bundles, "is not allowed: JWT-SVIDs are signed with an asymmetric key")
    refused(
        forge_jwt({"alg": "none", "kid": "k1"}, svid_claims(SUB)),
        bundles,
        "alg 'none' is not allowed: JWT-SVIDs are signed with an asymmetric key",
    )


def test_hs256_signed_with_the_public_key_is_refused(
    bundles: BundleSet, a_ec: ec.EllipticCurvePrivateKey, a_rsa: rsa.RSAPrivateKey
) -> None:
    for key, kid in ((a_ec, "k1"), (a_rsa, "rsa1")):
        for alg in ("HS256", "HS512"):
            token = forge_jwt({"alg": alg, "kid": kid}, svid_claims(SUB), secret=public_pem(key))
            refused(token, bundles, f"alg '{alg}' is not allowed: JWT-SVIDs are signed with an")


def test_other_algorithms_are_refused(bundles: BundleSet) -> None:
    for alg in ("EdDSA", "ES256K", "RSA-OAEP", ""):
        token = forge_jwt({"alg": alg, "kid": "k1"}, svid_claims(SUB))
        refused(token, bundles, f"alg {alg!r} is not allowed: a JWT-SVID uses one of RS256")
    refused(forge_jwt({"kid": "k1"}, svid_claims(SUB)), bundles, "cannot be decoded")
    refused(forge_jwt({"alg": 1, "kid": "k1"}, svid_claims(SUB)), bundles, "alg is missing or not")


def test_joserfc_itself_refuses_none_and_hmac_with_a_public_key(
    a_ec: ec.EllipticCurvePrivateKey, a_rsa: rsa.RSAPrivateKey
) -> None:
    """Defence in depth: even without our header check, joserfc must not accept these with the
    algorithms we give it (its defaults, or the JWT-SVID list)."""
    for private in (a_ec, a_rsa):
        public = jose_public_key(private)
        none = forge_jwt({"alg": "none"}, svid_claims(SUB))
        hs = forge_jwt({"alg": "HS256"}, svid_claims(SUB), secret=public_pem(private))
        for token in (none, hs):
            for algorithms in (None, list(ALGORITHMS)):
                with pytest.raises((JoseError, ValueError)):
                    jwt.decode(token, public, algorithms=algorithms)
            # The classic confusion: the public key's bytes handed over as an HMAC secret.
            with pytest.raises((JoseError, ValueError)):
                jwt.decode(token, public_pem(private), algorithms=["HS256"])  # type: ignore[arg-type]
            # Even with HS256 allowed, joserfc will not run HMAC with an RSA/EC key object.
            if token is hs:
                with pytest.raises(JoseError, match="requires 'oct' key"):
                    jwt.decode(token, public, algorithms=["HS256"])
        # joserfc will not even make an HMAC key out of a public key.
        with pytest.raises(ValueError):
            OctKey.import_key(public_pem(private))


def test_our_joserfc_registries_never_allow_none() -> None:
    """joserfc 1.8 verifies an unsigned token as valid, whatever key it is given, once "none" is
    among the allowed algorithms (it only warns). So each of our registries allows exactly one
    JWT-SVID algorithm, the one the header check already accepted."""
    assert "none" not in ALGORITHMS
    assert all(r.allowed == [alg] for alg, r in _REGISTRIES.items())
    assert set(_REGISTRIES) == set(ALGORITHMS)


def test_unknown_kid_is_refused(bundles: BundleSet, a_ec: ec.EllipticCurvePrivateKey) -> None:
    token = make_jwt(a_ec, svid_claims(SUB), kid="abc")
    refused(token, bundles, "no key 'abc' in the bundle of trust domain a.org")


def test_missing_kid_is_refused(bundles: BundleSet, a_ec: ec.EllipticCurvePrivateKey) -> None:
    refused(make_jwt(a_ec, svid_claims(SUB), kid=None), bundles, "kid is required")


def test_key_of_another_trust_domain_is_refused(
    bundles: BundleSet, b_ec: ec.EllipticCurvePrivateKey
) -> None:
    # Signed by b.org's authority with b.org's kid, claiming an a.org identity.
    token = make_jwt(b_ec, svid_claims(SUB), kid="b1")
    refused(token, bundles, "no key 'b1' in the bundle of trust domain a.org")
    # The same key is fine for b.org's own identities.
    assert verify_jwt_svid(make_jwt(b_ec, svid_claims("spiffe://b.org/w"), kid="b1"), bundles, AUD)


def test_kid_of_the_right_domain_with_a_foreign_key_is_refused(
    bundles: BundleSet, b_ec: ec.EllipticCurvePrivateKey
) -> None:
    token = make_jwt(b_ec, svid_claims(SUB), kid="k1")
    refused(token, bundles, "the signature does not verify with key 'k1' of trust domain a.org")


def test_tampered_payload_is_refused(bundles: BundleSet, a_ec: ec.EllipticCurvePrivateKey) -> None:
    header, _, signature = make_jwt(a_ec, svid_claims("spiffe://a.org/low")).split(".")
    payload = b64url(json.dumps(svid_claims("spiffe://a.org/admin")).encode())
    refused(f"{header}.{payload}.{signature}", bundles, "the signature does not verify")


def test_key_and_alg_mismatch_is_refused(
    bundles: BundleSet, a_ec: ec.EllipticCurvePrivateKey, a_rsa: rsa.RSAPrivateKey
) -> None:
    # An RS256 token naming the EC key, and an ES384 token naming a P-256 key.
    token = make_jwt(a_rsa, svid_claims(SUB), kid="k1")
    refused(token, bundles, "key 'k1' of trust domain a.org cannot verify RS256")
    header = b64url(json.dumps({"alg": "ES384", "kid": "k1"}).encode())
    _, payload, signature = make_jwt(a_ec, svid_claims(SUB)).split(".")
    refused(f"{header}.{payload}.{signature}", bundles, "cannot verify ES384")


def test_no_bundle_and_bundle_without_jwt_keys(
    bundles: BundleSet, a_ec: ec.EllipticCurvePrivateKey
) -> None:
    refused(
        make_jwt(a_ec, svid_claims("spiffe://c.org/w")), bundles, "no bundle for trust domain c.org"
    )
    refused(
        make_jwt(a_ec, svid_claims("spiffe://x.org/w")),
        bundles,
        "the bundle of trust domain x.org has no JWT-SVID keys",
    )
    empty = BundleSet([TrustBundle.parse_spiffe("a.org", {"keys": []})])
    refused(make_jwt(a_ec, svid_claims(SUB)), empty, "trust domain a.org has no JWT-SVID keys")


def test_expired_token_is_refused(bundles: BundleSet, a_ec: ec.EllipticCurvePrivateKey) -> None:
    token = make_jwt(a_ec, svid_claims(SUB, ttl=-3600))
    error = refused(token, bundles, "token expired at ")
    assert str(error).endswith("Z")


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        (lambda c: c.pop("exp"), "exp is required"),
        (lambda c: c.update(exp=str(c["exp"])), "exp must be an integer"),
        (lambda c: c.update(exp=float(c["exp"])), "exp must be an integer"),
        (lambda c: c.update(exp=True), "exp must be an integer"),
        (lambda c: c.update(exp=10**30), "exp is out of range"),
        (lambda c: c.pop("aud"), "aud is required"),
        (lambda c: c.update(aud="reports"), "aud does not include 'duragate'"),
        (lambda c: c.update(aud=["reports", "billing"]), "aud does not include 'duragate'"),
        (lambda c: c.update(aud=[]), "aud is empty"),
        (lambda c: c.update(aud=["duragate", 1]), "aud must be a string or a list of strings"),
        (lambda c: c.update(aud={"duragate": 1}), "aud must be a string or a list of strings"),
        (lambda c: c.update(sub="user:1"), "sub 'user:1' is not a SPIFFE ID: "),
        (lambda c: c.update(sub="spiffe://A.org/x"), "sub 'spiffe://A.org/x' is not a SPIFFE ID"),
        (lambda c: c.update(sub="spiffe://a.org/x/"), "must not end with '/'"),
        (lambda c: c.pop("sub"), "sub is required"),
        (lambda c: c.update(sub=["spiffe://a.org/x"]), "sub must be a string"),
        (lambda c: c.update(nbf=time.time() + 3600), "token not valid before "),
        (lambda c: c.update(iat=int(time.time()) + 3600), "token issued in the future"),
        (lambda c: c.update(iat="yesterday"), "iat must be a number"),
    ],
)
def test_bad_claims_are_refused(
    bundles: BundleSet,
    a_ec: ec.EllipticCurvePrivateKey,
    change: Callable[[dict[str, Any]], object],
    reason: str,
) -> None:
    claims = svid_claims(SUB)
    change(claims)
    refused(make_jwt(a_ec, claims), bundles, reason)


@pytest.mark.parametrize("typ", ["JWS", "jwt", "at+jwt", ""])
def test_bad_typ_is_refused(bundles: BundleSet, a_ec: ec.EllipticCurvePrivateKey, typ: str) -> None:
    token = make_jwt(a_ec, svid_claims(SUB), typ=typ)
    refused(token, bundles, f"typ {typ!r} is not allowed: it must be 'JWT' or 'JOSE'")


@pytest.mark.parametrize("name", ["jku", "jwk", "x5u", "crit", "cty", "x-private"])
def test_other_headers_are_refused(bundles: BundleSet, name: str) -> None:
    header = {"alg": "ES256", "kid": "k1", name: "https://evil.example/keys"}
    token = forge_jwt(header, svid_claims(SUB))
    refused(token, bundles, f"header {name!r} is not allowed in a JWT-SVID")


def test_malformed_tokens_are_refused(bundles: BundleSet, a_ec: ec.EllipticCurvePrivateKey) -> None:
    good = make_jwt(a_ec, svid_claims(SUB))
    refused("", bundles, "no token")
    refused("abc", bundles, "not a JWS in compact serialization")
    refused(good + ".x.y", bundles, "not a JWS in compact serialization")  # a JWE has 5 parts
    refused("a" * 20000, bundles, "longer than")
    refused("é.é.é", bundles, "non-ASCII")
    header = good.split(".")[0]
    refused(f"{header}.!!!.sig", bundles, "cannot be decoded")
    refused(f"{header}.{b64url(b'[1]')}.sig", bundles, "not a JSON object")
    refused(f"{header}.{b64url(b'nope')}.sig", bundles, "not JSON")
    _, payload, signature = good.split(".")
    refused(f"{b64url(b'[1]')}.{payload}.{signature}", bundles, "Missing 'alg'")
    for odd in ('"alg"', '["alg"]'):  # these get past joserfc's own check for "alg"
        refused(f"{b64url(odd.encode())}.{payload}.{signature}", bundles, "header is not a JSON")
    typ_list = b64url(json.dumps({"alg": "ES256", "kid": "k1", "typ": ["JWT"]}).encode())
    refused(f"{typ_list}.{payload}.{signature}", bundles, "typ ['JWT'] is not allowed")
    with pytest.raises(JwtSvidError, match="no token"):
        verify_jwt_svid(None, bundles, AUD)  # type: ignore[arg-type]


def test_bad_expected_audience_is_a_programming_error(bundles: BundleSet) -> None:
    with pytest.raises(ValueError, match="expected audience"):
        verify_jwt_svid("x.y.z", bundles, set())
    with pytest.raises(ValueError, match="leeway"):
        verify_jwt_svid("x.y.z", bundles, AUD, leeway=-1)


# -- rotation --------------------------------------------------------------------------------


def test_rotation_through_the_bundle_file(tmp_path: Path, a_ec: ec.EllipticCurvePrivateKey) -> None:
    path = tmp_path / "a.json"
    path.write_text(json.dumps(jwk_set({"k1": a_ec}, sequence=1)))
    bundles = BundleSet.from_config({"a.org": path})
    new_key = ec_key("P-384")
    token = make_jwt(new_key, svid_claims(SUB), kid="k2")
    refused(token, bundles, "no key 'k2' in the bundle of trust domain a.org")

    path.write_text(json.dumps(jwk_set({"k1": a_ec, "k2": new_key}, sequence=2)))
    stamp = path.stat().st_mtime_ns + 1_000_000_000
    os.utime(path, ns=(stamp, stamp))
    assert bundles.refresh() == ["a.org"]
    assert verify_jwt_svid(token, bundles, AUD).key_id == "k2"

    path.write_text("{ broken")
    os.utime(path, ns=(stamp + 1_000_000_000,) * 2)
    assert bundles.refresh() == []
    assert verify_jwt_svid(token, bundles, AUD).key_id == "k2"  # the old bundle still serves


def test_token_from_raw_base64_with_padding_is_refused(
    bundles: BundleSet, a_ec: ec.EllipticCurvePrivateKey
) -> None:
    header, payload, signature = make_jwt(a_ec, svid_claims(SUB)).split(".")
    padded = base64.urlsafe_b64encode(base64.urlsafe_b64decode(payload + "==")).decode()
    if padded != payload:  # only meaningful when the payload length needs padding
        with pytest.raises(JwtSvidError):
            verify_jwt_svid(f"{header}.{padded}.{signature}", bundles, AUD)
