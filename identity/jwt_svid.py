"""JWT-SVID verification (the SPIFFE JWT-SVID standard), with joserfc doing the cryptography.

Order of the checks, and why:
1. the header, before anything else: `alg` must be one of the standard's asymmetric
   algorithms (so `none` and HS* never reach a key), `typ` if present is `JWT` or `JOSE`, no
   header beyond `alg`, `kid` and `typ` (the standard forbids others, and `jku`, `jwk`, `x5u`
   or `crit` would let the token pick its own key or rules), and `kid` is required;
2. `sub`, unverified, only to choose the bundle: the key is looked up by `kid` in the bundle of
   the subject's trust domain and nowhere else, so one domain's key never vouches for another's
   IDs;
3. the signature, with that key and the header's algorithm only;
4. the claims of the now verified payload: `sub`, `aud` (required, must name us), `exp`
   (required), `nbf` and `iat`.
Every refusal is a `JwtSvidError` whose message names the rule; it never quotes the token.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from joserfc import jws
from joserfc.errors import JoseError
from joserfc.jws import CompactSignature, JWSRegistry

from identity.bundle import BundleSet, JwtKey
from identity.spiffe_id import SpiffeId, SpiffeIdError

# JWT-SVID section 2.1: RFC 7518 sections 3.3, 3.4 and 3.5, nothing else.
ALGORITHMS = (
    "RS256", "RS384", "RS512", "ES256", "ES384", "ES512", "PS256", "PS384", "PS512",
)  # fmt: skip
TYPES = frozenset({"JWT", "JOSE"})
HEADERS = frozenset({"alg", "kid", "typ"})
DEFAULT_LEEWAY = 30.0
# Far above any real JWT-SVID; it bounds the work an unauthenticated caller can cause.
MAX_TOKEN_BYTES = 16 * 1024

# One registry per algorithm: joserfc then accepts exactly the algorithm we already checked.
_REGISTRIES = {alg: JWSRegistry(algorithms=[alg]) for alg in ALGORITHMS}


class JwtSvidError(ValueError):
    """A JWT-SVID was refused; the message says exactly why."""


@dataclass(frozen=True)
class JwtSvid:
    spiffe_id: SpiffeId
    audience: list[str]
    expiry: datetime
    claims: dict[str, Any]
    key_id: str = ""


def verify_jwt_svid(
    token: str,
    bundles: BundleSet,
    audience: str | Collection[str],
    now: float | None = None,
    *,
    leeway: float = DEFAULT_LEEWAY,
) -> JwtSvid:
    """Verify `token` against the bundle of its subject's trust domain, for one of the
    `audience` values we answer to."""
    expected = {audience} if isinstance(audience, str) else set(audience)
    if not expected or not all(isinstance(a, str) and a for a in expected):
        raise ValueError("at least one non-empty expected audience is required")
    if leeway < 0:
        raise ValueError("leeway must not be negative")
    obj = _extract(token)
    alg, kid = _check_header(obj.headers())
    claims = _claims(obj)
    trust_domain = _subject(claims).trust_domain
    bundle = bundles.get(trust_domain)
    if bundle is None:
        raise JwtSvidError(f"no bundle for trust domain {trust_domain}")
    if not bundle.jwt_authorities:
        raise JwtSvidError(
            f"the bundle of trust domain {trust_domain} has no JWT-SVID keys: "
            "it does not issue JWT-SVIDs"
        )
    key = bundle.jwt_key(kid)
    if key is None:
        raise JwtSvidError(f"no key {_show(kid)} in the bundle of trust domain {trust_domain}")
    _check_signature(obj, key, alg, kid, trust_domain)
    # From here the payload is known to come from the trust domain's authority; the claims are
    # checked on it again in full.
    spiffe_id = _subject(claims)
    audiences = _check_audience(claims, expected)
    expiry = _check_times(claims, time.time() if now is None else now, leeway)
    return JwtSvid(spiffe_id, audiences, expiry, claims, kid)


def peek_subject(token: str) -> SpiffeId:
    """The `sub` of a token, NOT verified: for routing (which tenant, which bundle) before
    `verify_jwt_svid`, never for a decision."""
    return _subject(_claims(_extract(token)))


def _extract(token: str) -> CompactSignature:
    if not isinstance(token, str) or not token:
        raise JwtSvidError("no token")
    if len(token) > MAX_TOKEN_BYTES:
        raise JwtSvidError(f"the token is longer than {MAX_TOKEN_BYTES} bytes")
    if token.count(".") != 2:
        raise JwtSvidError("not a JWS in compact serialization (header.payload.signature)")
    try:
        obj = jws.extract_compact(token.encode("ascii"))
    except UnicodeEncodeError as exc:
        raise JwtSvidError("the token has non-ASCII characters") from exc
    except JoseError as exc:
        raise JwtSvidError(f"the token cannot be decoded: {_describe(exc)}") from exc
    except (AttributeError, TypeError) as exc:
        # joserfc assumes the header is a JSON object; a header such as `"alg"` (a JSON string)
        # gets past its check and fails later inside the library.
        raise JwtSvidError("the header is not a JSON object") from exc
    if not isinstance(obj.protected, dict):
        raise JwtSvidError("the header is not a JSON object")
    return obj


def _claims(obj: CompactSignature) -> dict[str, Any]:
    try:
        claims = json.loads(obj.payload)
    except (ValueError, UnicodeDecodeError) as exc:
        raise JwtSvidError("the payload is not JSON") from exc
    if not isinstance(claims, dict):
        raise JwtSvidError("the payload is not a JSON object")
    return claims


def _check_header(header: Mapping[str, Any]) -> tuple[str, str]:
    alg = header.get("alg")
    if not isinstance(alg, str):
        raise JwtSvidError("alg is missing or not a string")
    if alg not in ALGORITHMS:
        if alg.lower() == "none" or alg.upper().startswith("HS"):
            raise JwtSvidError(
                f"alg {_show(alg)} is not allowed: JWT-SVIDs are signed with an asymmetric key"
            )
        raise JwtSvidError(
            f"alg {_show(alg)} is not allowed: a JWT-SVID uses one of {', '.join(ALGORITHMS)}"
        )
    typ = header.get("typ")
    if typ is not None and not (isinstance(typ, str) and typ in TYPES):
        raise JwtSvidError(f"typ {_show(typ)} is not allowed: it must be 'JWT' or 'JOSE'")
    extra = sorted(str(name) for name in header if name not in HEADERS)
    if extra:
        raise JwtSvidError(
            f"header {', '.join(map(_show, extra))} is not allowed in a JWT-SVID "
            "(only alg, kid and typ)"
        )
    kid = header.get("kid")
    if kid is None:
        raise JwtSvidError("kid is required: the key is chosen by kid from the bundle")
    if not isinstance(kid, str) or not kid:
        raise JwtSvidError("kid must be a non-empty string")
    return alg, kid


def _subject(claims: Mapping[str, Any]) -> SpiffeId:
    sub = claims.get("sub")
    if sub is None:
        raise JwtSvidError("sub is required: it is the SPIFFE ID of the caller")
    if not isinstance(sub, str):
        raise JwtSvidError("sub must be a string")
    try:
        return SpiffeId.parse(sub)
    except SpiffeIdError as exc:
        raise JwtSvidError(f"sub {_show(sub)} is not a SPIFFE ID: {exc}") from exc


def _check_signature(
    obj: CompactSignature, key: JwtKey, alg: str, kid: str, trust_domain: str
) -> None:
    try:
        valid = jws.validate_compact(obj, key, registry=_REGISTRIES[alg])
    except JoseError as exc:
        # e.g. an ES384 token naming a P-256 key, or an RSA key for an ES algorithm.
        raise JwtSvidError(
            f"key {_show(kid)} of trust domain {trust_domain} cannot verify {alg}: {_describe(exc)}"
        ) from exc
    if not valid:
        raise JwtSvidError(
            f"the signature does not verify with key {_show(kid)} of trust domain {trust_domain}"
        )


def _check_audience(claims: Mapping[str, Any], expected: set[str]) -> list[str]:
    aud = claims.get("aud")
    if aud is None:
        raise JwtSvidError("aud is required")
    if isinstance(aud, str):
        values = [aud]
    elif isinstance(aud, list) and all(isinstance(a, str) for a in aud):
        if not aud:
            raise JwtSvidError("aud is empty: it must name at least one audience")
        values = list(aud)
    else:
        raise JwtSvidError("aud must be a string or a list of strings")
    if expected.isdisjoint(values):
        wanted = ", ".join(_show(a) for a in sorted(expected))
        if len(expected) == 1:
            raise JwtSvidError(f"aud does not include {wanted}")
        raise JwtSvidError(f"aud does not include any of {wanted}")
    return values


def _check_times(claims: Mapping[str, Any], now: float, leeway: float) -> datetime:
    exp = claims.get("exp")
    if exp is None:
        raise JwtSvidError("exp is required")
    # The JWT-SVID schema types exp as an integer.
    if isinstance(exp, bool) or not isinstance(exp, int):
        raise JwtSvidError("exp must be an integer (seconds since the epoch)")
    try:
        expiry = datetime.fromtimestamp(exp, tz=UTC)
    except (OverflowError, OSError, ValueError) as exc:
        raise JwtSvidError("exp is out of range") from exc
    # RFC 7519 4.1.4: the current time must be before exp.
    if now >= exp + leeway:
        raise JwtSvidError(f"token expired at {_iso(exp)}")
    nbf = _optional_time(claims, "nbf")
    if nbf is not None and nbf > now + leeway:
        raise JwtSvidError(f"token not valid before {_iso(nbf)} (nbf)")
    iat = _optional_time(claims, "iat")
    if iat is not None and iat > now + leeway:
        raise JwtSvidError(f"token issued in the future, at {_iso(iat)} (iat)")
    return expiry


def _optional_time(claims: Mapping[str, Any], name: str) -> float | None:
    value = claims.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise JwtSvidError(f"{name} must be a number (seconds since the epoch)")
    return float(value)


def _iso(seconds: float) -> str:
    try:
        return datetime.fromtimestamp(seconds, tz=UTC).isoformat().replace("+00:00", "Z")
    except (OverflowError, OSError, ValueError):
        return f"{seconds} (out of range)"


def _show(value: object, limit: int = 80) -> str:
    # Values come from the caller: quoted, and cut short so an error line stays readable.
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 4] + "...'"


def _describe(exc: JoseError) -> str:
    return str(getattr(exc, "description", None) or exc)
