"""OAuth 2.1 resource server: JWT access tokens of configured issuers (people behind IDE
clients), verified with joserfc against each issuer's JWK Set.

    verifier = OAuthVerifier.from_config(identity)      # identity.oauth issuers
    issuer = verifier.issuer_of(token)                  # None: not one of ours (a JWT-SVID?)
    await issuer.prepare(token)                         # fetch keys if the kid is not known yet
    token = issuer.verify(token, now)                   # OAuthToken or JwtSvidError

A token belongs to an issuer when its (unverified) `iss` is exactly a configured issuer: that
is how an access token is told apart from a JWT-SVID (which is verified against trust bundles
instead). The `iss` only chooses where the key comes from; the signature, made with that
issuer's key, then vouches for every claim, and they are all checked again.

Checks, in order: the header (`alg` among the issuer's asymmetric algorithms, so `none` and
HS* never reach a key; no `jku`/`jwk`/`x5u`/`x5c`/`crit`, which would let the token choose its
own key; `typ` absent, `JWT` or `at+jwt`), the key by `kid` from the issuer's JWK Set, the
signature, then `iss`, `exp` (required), `nbf`, `iat`, `aud` (RFC 8707: must name our resource)
and `sub` (required; mapped to a SPIFFE ID).

Keys: from `jwks_file` (re-read when it changes) or `jwks_uri` (fetched with httpx; when not
configured, found in the issuer's RFC 8414 or OpenID metadata). A fetched set is used for
`jwks_refresh_seconds`; a token with an unknown `kid` fetches it again, at most once per
`jwks_min_refetch_seconds`, so a flood of made-up kids cannot turn into a flood of fetches.
Fetches are bounded in time and size, and only ever happen in `prepare` (async), never in the
synchronous verification of a request.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
from joserfc import jws
from joserfc.errors import JoseError
from joserfc.jwk import ECKey, RSAKey
from joserfc.jws import JWSRegistry

from gateway.config import OAUTH_ALGORITHMS, IdentityConfig, OAuthIssuerConfig
from identity.bundle import JwtKey
from identity.jwt_svid import (
    JwtSvidError,
    _check_audience,
    _check_times,
    _claims,
    _extract,
    _show,
)
from identity.spiffe_id import SpiffeId, SpiffeIdError

log = logging.getLogger(__name__)

VIA_OAUTH = "oauth"
# Headers that would let a token pick its own key or processing rules.
FORBIDDEN_HEADERS = frozenset({"jku", "jwk", "x5u", "x5c", "crit"})
TYPES = frozenset({"jwt", "at+jwt", "application/at+jwt"})
FETCH_TIMEOUT_SECONDS = 5.0
MAX_DOCUMENT_BYTES = 256 * 1024
MAX_KEYS = 100
_REGISTRIES = {alg: JWSRegistry(algorithms=[alg]) for alg in OAUTH_ALGORITHMS}
_KEY_TYPES = {"RS": "RSA", "PS": "RSA", "ES": "EC"}
_CURVES = {"ES256": "P-256", "ES384": "P-384", "ES512": "P-521"}
# Characters kept as they are when a `sub` becomes a SPIFFE path segment; everything else
# (including '_', the escape character) is written `_HH` per UTF-8 byte, so two different subs
# never become the same principal.
_SEGMENT_SAFE = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.-")


class JwksError(ValueError):
    """A JWK Set (or the issuer metadata that names it) cannot be used."""


@dataclass(frozen=True)
class OAuthToken:
    """A verified access token: who it maps to, and its claims."""

    issuer: str
    subject: str  # the token's `sub`
    spiffe_id: SpiffeId
    tenant: str | None  # the issuer's configured tenant, if any
    claims: dict[str, Any]


def subject_segment(sub: str) -> str:
    """`sub` as one SPIFFE path segment, injectively (see `_SEGMENT_SAFE`)."""
    out = []
    for char in sub:
        if char in _SEGMENT_SAFE:
            out.append(char)
        else:
            out.extend(f"_{byte:02x}" for byte in char.encode("utf-8"))
    segment = "".join(out)
    # "." and ".." are not allowed as segments.
    if segment in (".", ".."):
        segment = segment.replace(".", "_2e")
    return segment


def parse_jwks(document: bytes | str | Mapping[str, Any], where: str) -> dict[str, JwtKey]:
    """The signing keys of a JWK Set by `kid` (public EC and RSA keys; others are skipped)."""
    if isinstance(document, Mapping):
        doc: Any = document
    else:
        try:
            doc = json.loads(document)
        except (ValueError, UnicodeDecodeError) as exc:
            raise JwksError(f"{where}: not JSON: {exc}") from None
    if not isinstance(doc, Mapping) or not isinstance(doc.get("keys"), list):
        raise JwksError(f"{where}: not a JWK Set (an object with a 'keys' array)")
    entries = doc["keys"]
    if len(entries) > MAX_KEYS:
        raise JwksError(f"{where}: {len(entries)} keys, more than the {MAX_KEYS} accepted")
    keys: dict[str, JwtKey] = {}
    for index, entry in enumerate(entries):
        if not isinstance(entry, Mapping):
            raise JwksError(f"{where}: key #{index} is not an object")
        if entry.get("use") not in (None, "sig") or entry.get("kty") not in ("EC", "RSA"):
            continue  # encryption keys, symmetric keys and unknown types are not ours to use
        if any(m in entry for m in ("d", "p", "q", "k")):
            raise JwksError(f"{where}: key #{index} is a private key: a JWK Set must be public")
        kid = entry.get("kid")
        kid = kid if isinstance(kid, str) and kid else ""
        try:
            key: JwtKey = (
                ECKey.import_key(dict(entry))
                if entry["kty"] == "EC"
                else RSAKey.import_key(dict(entry))
            )
        except (JoseError, ValueError, TypeError) as exc:
            raise JwksError(f"{where}: key #{index} ({kid!r}) is not a valid key: {exc}") from None
        if kid in keys:
            raise JwksError(f"{where}: two keys with kid {kid!r}")
        keys[kid] = key
    return keys


class OAuthIssuer:
    """One configured issuer: its keys (kept fresh) and the checks of its tokens."""

    def __init__(
        self,
        config: OAuthIssuerConfig,
        *,
        trust_domain: str | None,
        resource: str | None,
        clock: Callable[[], float] = time.time,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.config = config
        self.issuer = config.issuer
        audience = config.audience if config.audience is not None else resource
        assert audience is not None  # the config model requires one
        self.audiences = {audience} if isinstance(audience, str) else set(audience)
        self.algorithms = frozenset(config.algorithms)
        self._trust_domain = trust_domain or ""
        self._clock = clock
        self._transport = transport
        self._keys: dict[str, JwtKey] = {}
        self._jwks_uri = config.jwks_uri
        self._fetched_at = -float("inf")
        self._last_attempt = -float("inf")
        self._file_stamp: tuple[int, int, int] | None = None
        self._lock = asyncio.Lock()
        if config.jwks_file is not None:
            self._load_file(config.jwks_file)

    @property
    def keys(self) -> Mapping[str, JwtKey]:
        return self._keys

    # -- keys --------------------------------------------------------------------------------

    def _load_file(self, path: Path) -> bool:
        try:
            st = os.stat(path)
            stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
            self._fetched_at = self._clock()  # checked now, changed or not
            if stamp == self._file_stamp:
                return False
            keys = parse_jwks(path.read_bytes(), str(path))
        except OSError as exc:
            raise JwksError(f"{path}: cannot read the JWK Set: {exc.strerror or exc}") from None
        self._keys, self._file_stamp = keys, stamp
        return True

    def _needs_fetch(self, kid: str, now: float) -> bool:
        stale = now - self._fetched_at >= self.config.jwks_refresh_seconds
        unknown = kid not in self._keys
        if not (stale or unknown):
            return False
        # Bounded: an unknown kid (or an issuer that is down) refetches, but never more often
        # than the minimum gap, so a flood of tokens is not a flood of fetches.
        return now - self._last_attempt >= self.config.jwks_min_refetch_seconds

    async def prepare(self, token: str) -> None:
        """Make sure the key `token` names is loaded if it can be: refetch the JWK Set when it
        is stale or the `kid` is unknown. Failures are logged; `verify` gives the reason."""
        try:
            header = _extract(token).headers()
        except JwtSvidError:
            return
        kid = header.get("kid")
        kid = kid if isinstance(kid, str) else ""
        now = self._clock()
        if self.config.jwks_file is not None:
            # A file costs a stat to check: looked at every few seconds, and at once (within
            # the minimum gap) for an unknown kid.
            if now - self._fetched_at >= min(self.config.jwks_refresh_seconds, 5.0) or (
                kid not in self._keys
                and now - self._last_attempt >= self.config.jwks_min_refetch_seconds
            ):
                self._last_attempt = now
                try:
                    # A stat and, when it changed, a small read: off the event loop all the same.
                    await asyncio.to_thread(self._load_file, self.config.jwks_file)
                except JwksError as exc:
                    log.error(
                        "OAuth issuer %s: %s (keeping the keys loaded before)", self.issuer, exc
                    )
            return
        if not self._needs_fetch(kid, now):
            return
        async with self._lock:
            if not self._needs_fetch(kid, self._clock()):
                return  # another request fetched while this one waited
            self._last_attempt = self._clock()
            try:
                await self.fetch()
            except (JwksError, httpx.HTTPError) as exc:
                log.error(
                    "OAuth issuer %s: the JWK Set cannot be fetched: %s (keeping the keys "
                    "fetched before)",
                    self.issuer,
                    exc,
                )

    async def fetch(self) -> None:
        """Fetch the JWK Set now (after the issuer metadata, if its URL is not configured)."""
        async with httpx.AsyncClient(
            timeout=FETCH_TIMEOUT_SECONDS, transport=self._transport, follow_redirects=False
        ) as client:
            if self._jwks_uri is None:
                self._jwks_uri = await self._discover(client)
            document = await _get_json(client, self._jwks_uri)
        self._keys = parse_jwks(document, self._jwks_uri)
        self._fetched_at = self._clock()
        log.info("OAuth issuer %s: %d key(s) from %s", self.issuer, len(self._keys), self._jwks_uri)

    async def _discover(self, client: httpx.AsyncClient) -> str:
        """`jwks_uri` from the issuer's metadata: RFC 8414 first, then OpenID Connect."""
        parts = urlsplit(self.issuer)
        path = parts.path.rstrip("/")
        origin = f"{parts.scheme}://{parts.netloc}"
        candidates = [
            f"{origin}/.well-known/oauth-authorization-server{path}",
            f"{origin}{path}/.well-known/openid-configuration",
        ]
        problems = []
        for url in candidates:
            try:
                metadata = await _get_json(client, url)
            except (JwksError, httpx.HTTPError) as exc:
                problems.append(str(exc))
                continue
            # RFC 8414 3.3: the metadata must be of the issuer we asked about.
            if metadata.get("issuer") != self.issuer:
                raise JwksError(
                    f"{url}: the metadata is of issuer {_show(metadata.get('issuer'))}, "
                    f"not {self.issuer!r}"
                )
            jwks_uri = metadata.get("jwks_uri")
            if not isinstance(jwks_uri, str):
                raise JwksError(f"{url}: the metadata has no jwks_uri")
            try:
                OAuthIssuerConfig._jwks_uri(jwks_uri)
            except ValueError as exc:
                raise JwksError(f"{url}: {exc}") from None
            return jwks_uri
        raise JwksError("no issuer metadata: " + "; ".join(problems))

    # -- tokens ------------------------------------------------------------------------------

    def verify(self, token: str, now: float | None = None) -> OAuthToken:
        """Verify an access token of this issuer, or `JwtSvidError` with the reason."""
        now = self._clock() if now is None else now
        obj = _extract(token)
        alg, kid = self._check_header(obj.headers())
        key = self._key(kid, alg)
        claims = _claims(obj)
        try:
            valid = jws.validate_compact(obj, key, registry=_REGISTRIES[alg])
        except JoseError as exc:
            raise JwtSvidError(
                f"key {_show(kid)} of {self.issuer} cannot verify {alg}: {exc}"
            ) from None
        if not valid:
            raise JwtSvidError(
                f"the signature does not verify with key {_show(kid)} of {self.issuer}"
            )
        if claims.get("iss") != self.issuer:
            raise JwtSvidError(f"iss {_show(claims.get('iss'))} is not {self.issuer!r}")
        _check_times(claims, now, self.config.leeway_seconds)
        _check_audience(claims, self.audiences)
        sub = claims.get("sub")
        if not isinstance(sub, str) or not sub:
            raise JwtSvidError("sub is required: it names the user")
        return OAuthToken(self.issuer, sub, self.map_subject(sub), self.config.tenant, claims)

    def map_subject(self, sub: str) -> SpiffeId:
        mapped = self.config.subjects.get(sub)
        text = mapped or self.config.subject_template.format(
            sub=subject_segment(sub), trust_domain=self._trust_domain
        )
        try:
            return SpiffeId.parse(text)
        except SpiffeIdError as exc:
            raise JwtSvidError(f"sub {_show(sub)} does not map to a SPIFFE ID: {exc}") from None

    def _check_header(self, header: Mapping[str, Any]) -> tuple[str, str]:
        alg = header.get("alg")
        if not isinstance(alg, str):
            raise JwtSvidError("alg is missing or not a string")
        if alg not in self.algorithms:
            if alg.lower() == "none" or alg.upper().startswith("HS"):
                raise JwtSvidError(
                    f"alg {_show(alg)} is not allowed: access tokens must be signed with the "
                    "issuer's asymmetric key"
                )
            raise JwtSvidError(
                f"alg {_show(alg)} is not allowed for {self.issuer} "
                f"(allowed: {', '.join(sorted(self.algorithms))})"
            )
        bad = sorted(str(h) for h in header if h in FORBIDDEN_HEADERS)
        if bad:
            raise JwtSvidError(
                f"header {', '.join(map(_show, bad))} is not allowed: the key comes from the "
                "issuer's JWK Set, never from the token"
            )
        typ = header.get("typ")
        if typ is not None and not (isinstance(typ, str) and typ.lower() in TYPES):
            raise JwtSvidError(f"typ {_show(typ)} is not allowed (JWT or at+jwt)")
        kid = header.get("kid")
        if kid is not None and (not isinstance(kid, str) or not kid):
            raise JwtSvidError("kid must be a non-empty string")
        return alg, kid or ""

    def _key(self, kid: str, alg: str) -> JwtKey:
        if kid:
            key = self._keys.get(kid)
            if key is None:
                raise JwtSvidError(f"no key {_show(kid)} in the JWK Set of {self.issuer}")
        else:
            # No kid: acceptable only when the set leaves no choice.
            if len(self._keys) != 1:
                raise JwtSvidError(
                    f"the token names no kid and the JWK Set of {self.issuer} has "
                    f"{len(self._keys)} keys"
                )
            key = next(iter(self._keys.values()))
        kty = _KEY_TYPES[alg[:2]]
        if key.key_type != kty or (isinstance(key, ECKey) and key.curve_name != _CURVES[alg]):
            raise JwtSvidError(f"key {_show(kid)} of {self.issuer} is not a key for {alg}")
        return key


class OAuthVerifier:
    """The configured issuers, by `iss`."""

    def __init__(self, issuers: Sequence[OAuthIssuer] = ()) -> None:
        self._issuers = {i.issuer: i for i in issuers}

    @classmethod
    def from_config(
        cls,
        config: IdentityConfig,
        *,
        clock: Callable[[], float] = time.time,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> OAuthVerifier:
        return cls(
            [
                OAuthIssuer(
                    c,
                    trust_domain=config.trust_domain,
                    resource=config.resource,
                    clock=clock,
                    transport=transport,
                )
                for c in config.oauth
            ]
        )

    def __bool__(self) -> bool:
        return bool(self._issuers)

    @property
    def issuers(self) -> list[str]:
        return list(self._issuers)

    def unknown_issuer(self, token: str) -> str | None:
        """The (unverified) `iss` of a token when it names no configured issuer; for errors."""
        try:
            iss = _claims(_extract(token)).get("iss")
        except JwtSvidError:
            return None
        return iss if isinstance(iss, str) and iss not in self._issuers else None

    def issuer_of(self, token: str) -> OAuthIssuer | None:
        """The issuer whose token this claims to be (unverified `iss`), or None."""
        if not self._issuers:
            return None
        try:
            iss = _claims(_extract(token)).get("iss")
        except JwtSvidError:
            return None
        return self._issuers.get(iss) if isinstance(iss, str) else None


async def _get_json(client: httpx.AsyncClient, url: str) -> dict[str, Any]:
    async with client.stream("GET", url, headers={"Accept": "application/json"}) as response:
        if response.status_code != 200:
            raise JwksError(f"{url}: HTTP {response.status_code}")
        body = bytearray()
        async for chunk in response.aiter_bytes():
            body.extend(chunk)
            if len(body) > MAX_DOCUMENT_BYTES:
                raise JwksError(f"{url}: larger than {MAX_DOCUMENT_BYTES} bytes")
    try:
        document = json.loads(bytes(body))
    except (ValueError, UnicodeDecodeError) as exc:
        raise JwksError(f"{url}: not JSON: {exc}") from None
    if not isinstance(document, dict):
        raise JwksError(f"{url}: not a JSON object")
    return document


__all__ = [
    "JwksError",
    "OAuthIssuer",
    "OAuthToken",
    "OAuthVerifier",
    "VIA_OAUTH",
    "parse_jwks",
    "subject_segment",
]
