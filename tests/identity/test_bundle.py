"""Trust bundles: SPIFFE bundle and PEM parsing, one bundle per trust domain, rotation."""

from __future__ import annotations

import json
import logging
import os
import ssl
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from joserfc.jwk import ECKey, RSAKey

from identity.bundle import BundleError, BundleSet, TrustBundle
from tests.identity.keys import ca_cert, ec_key, jwk_set, public_jwk, rsa_key, x509_entry

TD = "example.org"


@pytest.fixture(scope="module")
def rsa_private() -> rsa.RSAPrivateKey:
    return rsa_key()


@pytest.fixture(scope="module")
def ec_ca() -> x509.Certificate:
    return ca_cert(ec_key(), TD)


def write(path: Path, content: dict[str, Any] | str | bytes) -> Path:
    """Write and move the mtime forward, so a rewrite is seen even on coarse-mtime file systems."""
    if isinstance(content, dict):
        content = json.dumps(content)
    data = content.encode() if isinstance(content, str) else content
    previous = path.stat().st_mtime_ns if path.exists() else 0
    path.write_bytes(data)
    stamp = max(previous + 1_000_000_000, path.stat().st_mtime_ns)
    os.utime(path, ns=(stamp, stamp))
    return path


# -- SPIFFE bundle format --------------------------------------------------------------------


def test_spiffe_bundle_with_all_kinds_of_entries(
    rsa_private: rsa.RSAPrivateKey, ec_ca: x509.Certificate
) -> None:
    rsa_ca = ca_cert(rsa_private, TD)
    doc = jwk_set(
        {"ec": ec_key(), "rsa": rsa_private, "p384": ec_key("P-384")},
        [ec_ca, rsa_ca],
        sequence=42,
        refresh_hint=600,
        extra=[
            # Unknown `use` values (here a newer SVID type) and a missing `use` are skipped.
            {**public_jwk(ec_key(), kid="w1"), "use": "wit-svid"},
            public_jwk(ec_key(), kid="nouse"),
            {**public_jwk(ec_key(), kid="sig"), "use": "sig"},
        ],
    )
    bundle = TrustBundle.parse_spiffe(TD, json.dumps(doc))
    assert bundle.trust_domain == TD
    assert bundle.sequence == 42
    assert bundle.refresh_hint == 600
    assert bundle.refresh_interval == 600.0
    assert bundle.x509_authorities == (ec_ca, rsa_ca)
    assert sorted(bundle.jwt_authorities) == ["ec", "p384", "rsa"]
    assert isinstance(bundle.jwt_key("ec"), ECKey)
    assert isinstance(bundle.jwt_key("rsa"), RSAKey)
    assert bundle.jwt_key("w1") is None
    assert all(not k.is_private for k in bundle.jwt_authorities.values())
    with pytest.raises(TypeError):
        bundle.jwt_authorities["x"] = bundle.jwt_authorities["ec"]  # type: ignore[index]


def test_minimal_bundle_without_sequence_or_hint() -> None:
    bundle = TrustBundle.parse_spiffe(TD, b'{"keys": []}')
    assert (bundle.sequence, bundle.refresh_hint) == (None, None)
    assert bundle.x509_authorities == () and not bundle.jwt_authorities
    assert bundle.refresh_interval == 300.0


def test_x509_entry_rules_of_the_x509_svid_standard(ec_ca: x509.Certificate) -> None:
    other_domain_ca = ca_cert(ec_key(), "other.org")
    entry = x509_entry(ec_ca)
    doc = {
        "keys": [
            # Extra x5c values are ignored: only the first is the authority.
            {**entry, "x5c": entry["x5c"] + x509_entry(other_domain_ca)["x5c"]},
            # An x509-svid entry without x5c, or with an empty one, is ignored.
            {k: v for k, v in entry.items() if k != "x5c"},
            {**entry, "x5c": []},
            # Key types we do not know are ignored.
            {"kty": "NEW", "use": "x509-svid", "x5c": entry["x5c"]},
        ]
    }
    bundle = TrustBundle.parse_spiffe(TD, doc)
    assert bundle.x509_authorities == (ec_ca,)


def test_x509_entry_with_only_x5c_is_accepted(ec_ca: x509.Certificate) -> None:
    entry = {"kty": "EC", "use": "x509-svid", "x5c": x509_entry(ec_ca)["x5c"]}
    assert TrustBundle.parse_spiffe(TD, {"keys": [entry]}).x509_authorities == (ec_ca,)


def test_jwt_entries_with_unusable_key_types_are_ignored() -> None:
    okp = {"kty": "OKP", "crv": "Ed25519", "x": "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"}
    k256 = public_jwk(ec_key(), kid="k1", use="jwt-svid")
    doc = {
        "keys": [
            {**okp, "use": "jwt-svid", "kid": "ed"},
            {**k256, "kid": "k256", "crv": "secp256k1"},
            k256,
        ]
    }
    assert list(TrustBundle.parse_spiffe(TD, doc).jwt_authorities) == ["k1"]


def malformed_cases(ec_ca: x509.Certificate, rsa_private: rsa.RSAPrivateKey) -> list[Any]:
    good_jwt = public_jwk(ec_key(), use="jwt-svid", kid="k1")
    good_x509 = x509_entry(ec_ca)
    private_ec = ECKey.import_key(ec_key()).as_dict(private=True)
    leaf = ca_cert(ec_key(), TD, ca=False)
    return [
        ("[]", "a JSON object"),
        ("{not json", "not valid JSON"),
        ({}, "no 'keys' member"),
        ({"keys": {}}, "'keys' must be an array"),
        ({"keys": [good_jwt, "x"]}, "key #1 is not a JSON object"),
        ({"keys": [{**good_jwt, "kid": None}]}, "key #0: a jwt-svid entry must have a 'kid'"),
        ({"keys": [{**good_jwt, "kid": ""}]}, "key #0: a jwt-svid entry must have a 'kid'"),
        ({"keys": [good_jwt, good_jwt]}, "key #1: kid 'k1' appears twice"),
        ({"keys": [{**good_jwt, "kty": None}]}, "key #0 .'k1'. has no 'kty'"),
        ({"keys": [{**good_jwt, "x": "AAAA"}]}, "key #0 .'k1'. is not a valid EC public key"),
        ({"keys": [{**private_ec, "use": "jwt-svid", "kid": "p"}]}, "key #0 .'p'. holds private"),
        (
            {"keys": [{"kty": "oct", "k": "c2VjcmV0", "use": "jwt-svid", "kid": "s"}]},
            "key #0 .'s'. holds private or symmetric key material .k.",
        ),
        ({"keys": [good_x509, {**good_x509, "x5c": "abc"}]}, "key #1: x5c must be an array"),
        ({"keys": [{**good_x509, "x5c": ["%%%"]}]}, "key #0: x5c.0. is not a base64 DER"),
        ({"keys": [{**good_x509, "x5c": ["AAAA"]}]}, "key #0: x5c.0. is not a base64 DER"),
        ({"keys": [x509_entry(leaf)]}, "key #0 is not a CA certificate"),
        (
            {"keys": [{**good_x509, **public_jwk(ec_key())}]},
            "key #0: the JWK's public key does not match its x5c certificate",
        ),
        (
            {"keys": [{**good_x509, "x": public_jwk(ec_key())["x"]}]},
            "key #0: the JWK's public key members are invalid",
        ),
        ({"keys": [{**good_x509, "kty": "RSA"}]}, "key #0: kty 'RSA' does not match"),
        ({"keys": [{**good_x509, "d": private_ec["d"]}]}, "key #0 holds private"),
        ({"keys": [{**good_x509, "kty": 1}]}, "key #0 has no 'kty'"),
        ({"keys": [], "spiffe_sequence": "1"}, "'spiffe_sequence' must be a non-negative integer"),
        ({"keys": [], "spiffe_sequence": -1}, "'spiffe_sequence' must be a non-negative integer"),
        ({"keys": [], "spiffe_sequence": True}, "'spiffe_sequence' must be a non-negative"),
        ({"keys": [], "spiffe_refresh_hint": 1.5}, "'spiffe_refresh_hint' must be a non-negative"),
    ]


def test_malformed_bundles_are_refused_with_the_reason(
    ec_ca: x509.Certificate, rsa_private: rsa.RSAPrivateKey
) -> None:
    for doc, reason in malformed_cases(ec_ca, rsa_private):
        with pytest.raises(BundleError, match=reason):
            TrustBundle.parse_spiffe(TD, doc)


def test_a_ca_of_another_trust_domain_is_refused() -> None:
    other = ca_cert(ec_key(), "other.org")
    with pytest.raises(BundleError, match="key #0 is a CA of trust domain 'other.org'"):
        TrustBundle.parse_spiffe(TD, jwk_set(x509_cas=[other]))
    with pytest.raises(BundleError, match="certificate #0 is a CA of trust domain 'other.org'"):
        TrustBundle.parse_pem(TD, other.public_bytes(serialization.Encoding.PEM))
    # The trust domain's own ID with the trailing slash of the standard's example is fine.
    own = ca_cert(ec_key(), TD, uri=f"spiffe://{TD}/")
    assert TrustBundle.parse_spiffe(TD, jwk_set(x509_cas=[own])).x509_authorities == (own,)


def test_invalid_trust_domain() -> None:
    with pytest.raises(BundleError, match="must be lowercase"):
        TrustBundle.parse_spiffe("Example.org", {"keys": []})


def test_round_trip(rsa_private: rsa.RSAPrivateKey, ec_ca: x509.Certificate) -> None:
    doc = jwk_set({"a": ec_key(), "b": rsa_private}, [ec_ca], sequence=7, refresh_hint=60)
    bundle = TrustBundle.parse_spiffe(TD, doc)
    again = TrustBundle.parse_spiffe(TD, json.dumps(bundle.to_spiffe_bundle()))
    assert again.x509_authorities == bundle.x509_authorities
    assert {k: v.as_dict() for k, v in again.jwt_authorities.items()} == {
        k: v.as_dict() for k, v in bundle.jwt_authorities.items()
    }
    assert (again.sequence, again.refresh_hint) == (7, 60)


# -- PEM -------------------------------------------------------------------------------------


def test_pem_bundle(
    tmp_path: Path, rsa_private: rsa.RSAPrivateKey, ec_ca: x509.Certificate
) -> None:
    rsa_ca = ca_cert(rsa_private, TD)
    pem = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in (ec_ca, rsa_ca))
    bundle = TrustBundle.load(TD, write(tmp_path / "ca.pem", b"# comment\n" + pem))
    assert bundle.x509_authorities == (ec_ca, rsa_ca)
    assert not bundle.jwt_authorities
    assert bundle.sequence is None
    context = ssl.create_default_context(cadata=bundle.x509_pem())
    assert len(context.get_ca_certs()) == 2


def test_bad_pem_and_unknown_files(tmp_path: Path) -> None:
    leaf = ca_cert(ec_key(), TD, ca=False).public_bytes(serialization.Encoding.PEM)
    with pytest.raises(BundleError, match="certificate #0 is not a CA certificate"):
        TrustBundle.load(TD, write(tmp_path / "leaf.pem", leaf))
    with pytest.raises(BundleError, match="no usable PEM certificate"):
        TrustBundle.load(TD, write(tmp_path / "key.pem", b"-----BEGIN NOTHING-----\n"))
    with pytest.raises(BundleError, match="neither a SPIFFE bundle"):
        TrustBundle.load(TD, write(tmp_path / "x.bin", b"\x00\x01"))
    with pytest.raises(BundleError, match="cannot read the bundle"):
        TrustBundle.load(TD, tmp_path / "missing.json")


def test_load_names_the_file(tmp_path: Path) -> None:
    path = write(tmp_path / "b.json", {"keys": [{"use": "jwt-svid", "kty": "EC"}]})
    with pytest.raises(BundleError, match=r"b\.json: key #0: a jwt-svid entry must have a 'kid'"):
        TrustBundle.load(TD, path)


# -- BundleSet -------------------------------------------------------------------------------


def test_bundles_are_kept_per_trust_domain_and_never_merged() -> None:
    a = TrustBundle.parse_spiffe("a.org", jwk_set({"k1": ec_key()}))
    b = TrustBundle.parse_spiffe("b.org", jwk_set({"k2": ec_key()}))
    bundles = BundleSet([a, b])
    assert bundles.get("a.org") is a and bundles.get("b.org") is b
    assert bundles.get("c.org") is None
    assert "a.org" in bundles and len(bundles) == 2
    assert bundles.trust_domains == ("a.org", "b.org")
    with pytest.raises(BundleError, match="never merged"):
        BundleSet([a, TrustBundle.parse_spiffe("a.org", jwk_set({"k3": ec_key()}))])
    replacement = TrustBundle.parse_spiffe("a.org", jwk_set({"k3": ec_key()}))
    bundles.put(replacement)
    # Replaced, not merged: the old key is gone.
    assert bundles.get("a.org") is replacement
    assert bundles.get("a.org").jwt_key("k1") is None  # type: ignore[union-attr]


def test_from_config_and_refresh_interval(tmp_path: Path, ec_ca: x509.Certificate) -> None:
    bundles = BundleSet.from_config(
        {
            "a.org": write(tmp_path / "a.json", jwk_set({"k1": ec_key()}, refresh_hint=120)),
            "example.org": str(
                write(tmp_path / "e.pem", ec_ca.public_bytes(serialization.Encoding.PEM))
            ),
        }
    )
    assert bundles.trust_domains == ("a.org", "example.org")
    assert bundles.refresh_interval() == 120.0
    assert bundles.refresh() == []


def test_from_config_refuses_bad_input(tmp_path: Path) -> None:
    good = write(tmp_path / "a.json", jwk_set({"k1": ec_key()}))
    with pytest.raises(BundleError, match="must be lowercase"):
        BundleSet.from_config({"A.org": good})
    with pytest.raises(BundleError, match="cannot read the bundle"):
        BundleSet.from_config({"a.org": tmp_path / "nope.json"})
    broken = write(tmp_path / "broken.json", "{")
    with pytest.raises(BundleError, match="not valid JSON"):
        BundleSet.from_config({"a.org": broken})
    other = write(tmp_path / "other.json", jwk_set(x509_cas=[ca_cert(ec_key(), "b.org")]))
    with pytest.raises(BundleError, match="CA of trust domain 'b.org'"):
        BundleSet.from_config({"a.org": other})


def test_refresh_rotates_and_survives_broken_files(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = write(tmp_path / "a.json", jwk_set({"old": ec_key()}, sequence=1))
    other = write(tmp_path / "b.json", jwk_set({"b": ec_key()}))
    bundles = BundleSet.from_config({"a.org": path, "b.org": other})
    b_bundle = bundles.get("b.org")

    write(path, jwk_set({"old": ec_key(), "new": ec_key()}, sequence=2))
    assert bundles.refresh() == ["a.org"]
    assert bundles.get("a.org").jwt_key("new") is not None  # type: ignore[union-attr]
    assert bundles.get("b.org") is b_bundle  # untouched: its file did not change

    caplog.set_level(logging.ERROR, logger="identity.bundle")
    for broken in ("{", json.dumps(jwk_set(x509_cas=[ca_cert(ec_key(), "evil.org")]))):
        write(path, broken)
        assert bundles.refresh() == []
        assert bundles.get("a.org").jwt_key("new") is not None  # type: ignore[union-attr]
    assert "keeping the previous bundle of a.org" in caplog.text
    assert "CA of trust domain 'evil.org'" in caplog.text

    # A broken file is reported once, not at every refresh.
    caplog.clear()
    assert bundles.refresh() == []
    assert caplog.text == ""

    path.unlink()
    assert bundles.refresh() == []
    assert "unreadable" in caplog.text
    assert bundles.get("a.org").jwt_key("new") is not None  # type: ignore[union-attr]

    write(path, jwk_set({"newest": ec_key()}, sequence=3))
    assert bundles.refresh() == ["a.org"]
    assert bundles.get("a.org").jwt_key("new") is None  # type: ignore[union-attr]
    assert bundles.get("a.org").jwt_key("newest") is not None  # type: ignore[union-attr]


def test_a_lower_sequence_is_loaded_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = write(tmp_path / "a.json", jwk_set({"k1": ec_key()}, sequence=5))
    bundles = BundleSet.from_config({"a.org": path})
    write(path, jwk_set({"k2": ec_key()}, sequence=1))
    with caplog.at_level(logging.WARNING, logger="identity.bundle"):
        assert bundles.refresh() == ["a.org"]
    assert "went back from sequence 5 to 1" in caplog.text


def test_programmatic_bundles_are_checked() -> None:
    private = ECKey.import_key(ec_key())
    with pytest.raises(BundleError, match="must be a public EC or RSA key"):
        TrustBundle(TD, jwt_authorities={"k": private})
    with pytest.raises(BundleError, match="X.509 authority #0 is not a CA"):
        TrustBundle(TD, x509_authorities=(ca_cert(ec_key(), TD, ca=False),))
    assert isinstance(ec_key(), ec.EllipticCurvePrivateKey)
