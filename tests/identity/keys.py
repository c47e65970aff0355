"""Test helpers: keys, CA certificates, SPIFFE bundle documents and JWTs (good and forged).

Built directly with cryptography and joserfc, not with `identity.*`, so the tests of the parsers
do not depend on the code under test.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import hmac
import json
import time
from collections.abc import Mapping, Sequence
from typing import Any, TypeAlias

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID
from joserfc import jwt
from joserfc.jwk import ECKey, RSAKey

PrivateKey: TypeAlias = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey

_CURVES: dict[str, ec.EllipticCurve] = {
    "P-256": ec.SECP256R1(),
    "P-384": ec.SECP384R1(),
    "P-521": ec.SECP521R1(),
}
_EC_ALG = {"P-256": "ES256", "P-384": "ES384", "P-521": "ES512"}


def ec_key(curve: str = "P-256") -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(_CURVES[curve])


def rsa_key(bits: int = 2048) -> rsa.RSAPrivateKey:
    # RSA generation costs tens of milliseconds: share one key per module in tests.
    return rsa.generate_private_key(public_exponent=65537, key_size=bits)


def jose_key(key: PrivateKey) -> ECKey | RSAKey:
    """The joserfc key (private) for a cryptography private key."""
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return ECKey.import_key(key)
    return RSAKey.import_key(key)


def jose_public_key(key: PrivateKey) -> ECKey | RSAKey:
    """The joserfc public key for a cryptography private key."""
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return ECKey.import_key(key.public_key())
    return RSAKey.import_key(key.public_key())


def public_jwk(key: PrivateKey, **members: Any) -> dict[str, Any]:
    """The public JWK of `key`, plus `members` (e.g. `use=`, `kid=`)."""
    return {**jose_key(key).as_dict(private=False), **members}


def public_pem(key: PrivateKey) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def ca_cert(
    key: PrivateKey,
    trust_domain: str = "example.org",
    *,
    ca: bool = True,
    uri: str | None = None,
    days: int = 1,
) -> x509.Certificate:
    """A self-signed certificate; a CA with URI SAN `spiffe://<trust_domain>` by default."""
    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, trust_domain)])
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.UniformResourceIdentifier(uri or f"spiffe://{trust_domain}")]
            ),
            critical=False,
        )
    )
    return builder.sign(key, hashes.SHA256())


def x509_entry(cert: x509.Certificate, **members: Any) -> dict[str, Any]:
    """A SPIFFE bundle entry for a CA certificate (`use: x509-svid`, `x5c`, key members)."""
    public = cert.public_key()
    if isinstance(public, ec.EllipticCurvePublicKey):
        jose: ECKey | RSAKey = ECKey.import_key(public)
    elif isinstance(public, rsa.RSAPublicKey):
        jose = RSAKey.import_key(public)
    else:
        raise TypeError(f"no JWK for a {type(public).__name__}")
    der = cert.public_bytes(serialization.Encoding.DER)
    entry = {**jose.as_dict(private=False), "use": "x509-svid"}
    entry["x5c"] = [base64.b64encode(der).decode()]
    return {**entry, **members}


def jwk_set(
    jwt_keys: Mapping[str, PrivateKey] | None = None,
    x509_cas: Sequence[x509.Certificate] = (),
    *,
    sequence: int | None = 1,
    refresh_hint: int | None = 300,
    extra: Sequence[Mapping[str, Any]] = (),
) -> dict[str, Any]:
    """A SPIFFE bundle document: `jwt-svid` entries for `jwt_keys` (kid -> private key, only
    the public part is written), `x509-svid` entries for `x509_cas`, then `extra` entries."""
    keys: list[dict[str, Any]] = [x509_entry(c) for c in x509_cas]
    keys += [public_jwk(k, use="jwt-svid", kid=kid) for kid, k in (jwt_keys or {}).items()]
    keys += [dict(e) for e in extra]
    doc: dict[str, Any] = {"keys": keys}
    if sequence is not None:
        doc["spiffe_sequence"] = sequence
    if refresh_hint is not None:
        doc["spiffe_refresh_hint"] = refresh_hint
    return doc


def svid_claims(
    sub: str = "spiffe://example.org/workload",
    aud: str | list[str] = "duragate",
    ttl: float = 300,
    **extra: Any,
) -> dict[str, Any]:
    now = int(time.time())
    return {"sub": sub, "aud": aud, "exp": int(now + ttl), "iat": now, **extra}


def default_alg(key: PrivateKey) -> str:
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return _EC_ALG[ECKey.import_key(key).curve_name]
    return "RS256"


def make_jwt(
    key: PrivateKey,
    claims: Mapping[str, Any],
    *,
    kid: str | None = "k1",
    alg: str | None = None,
    typ: str | None = "JWT",
    header: Mapping[str, Any] | None = None,
) -> str:
    """A JWT signed with `key` (ES256/384/512 by curve or RS256 unless `alg` says otherwise)."""
    alg = alg or default_alg(key)
    full: dict[str, Any] = {"alg": alg}
    if kid is not None:
        full["kid"] = kid
    full.update(header or {})
    return jwt.encode(full, dict(claims), jose_key(key), algorithms=[alg], default_type=typ)


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def forge_jwt(
    header: Mapping[str, Any], claims: Mapping[str, Any], secret: bytes | None = None
) -> str:
    """A hand-made token for attacks: unsigned (`secret=None`, empty signature) or HMAC-SHA256
    signed with `secret` (e.g. the public key's PEM bytes)."""
    signing_input = (
        f"{b64url(json.dumps(dict(header)).encode())}.{b64url(json.dumps(dict(claims)).encode())}"
    )
    if secret is None:
        return signing_input + "."
    mac = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64url(mac)}"
