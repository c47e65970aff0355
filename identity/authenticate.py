"""Who is calling, from an HTTP request: an X.509-SVID client certificate (mTLS), a JWT-SVID
bearer token, or the anonymous principal.

    authenticator = Authenticator(config.identity)             # loads the trust bundles
    principal = authenticator.authenticate_http(headers, peer)  # or AuthenticationError

- A client certificate (`peer`, the connection's `identity.tls.TlsPeer`): the leaf is checked
  with `verify_x509_svid` against the bundle of its SPIFFE ID's own trust domain (the TLS layer
  has already checked the chain against the local trust domain's); the caller is
  `Principal(id, tenant, via="x509-svid")`. The result is kept on the connection, so only its
  first request pays for it, until the certificate expires or a bundle changes.

- `Authorization: Bearer <JWT-SVID>`: verified against the bundle of the token's own trust
  domain (`verify_jwt_svid`), for the configured audience; the caller is
  `Principal(id=<SPIFFE ID>, tenant=<tenant rules>, via="jwt-svid")`.
- `Authorization: Bearer <OAuth access token>`: a JWT whose `iss` is one of `identity.oauth`
  (`identity.oauth`): verified against that issuer's JWK Set, `aud` naming our resource; the
  caller is `Principal(id=<mapped sub>, tenant=<issuer's or rules>, via="oauth")`. `iss` alone
  tells the two kinds of token apart; a JWT-SVID never reaches an issuer's keys and the other way
  round.
- Delegation (RFC 8693 `act`): an agent acting for someone presents its X.509-SVID (mTLS) AND
  that someone's token (JWT-SVID or access token) whose `act.sub` is the agent's SPIFFE ID;
  nested `act` claims name earlier agents. `act.sub` must equal the client certificate's SPIFFE
  ID, else 401. The caller is then the agent, in the subject's tenant, with
  `chain = (subject, earlier agents..., )` outermost first (`Principal.chain`). A token with
  `act` but no client certificate is refused: nothing proves the agent is the one it names.
- No `Authorization` header: the anonymous principal if `allow_anonymous`, else 401. A caller
  that sends credentials we cannot use is refused even then: it meant to be someone.
- A header we cannot read, or a refused token: 401 with the exact reason (never the token).
- An authenticated caller that belongs to no tenant: 403.

Bundles are re-read without a restart: every `bundle_refresh_seconds` (capped by the bundles'
own refresh hint) the files are stat'ed and a changed one is loaded; a token that fails to
verify also triggers a check (at most once a second), so a token signed with a key that was
just added to a bundle is not refused for a whole interval.

Verified tokens are remembered for `token_cache_seconds` (never past their `exp`), keyed by the
SHA-256 of the token, in a bounded LRU: a client sends the same token with every request, and
a signature check costs far more than a hash (see `bench/auth_bench.py`). Any bundle change
empties the cache, so a key removed from a bundle stops working at the next check.

One Authenticator serves one event loop: it is not meant to be shared between threads.
"""

from __future__ import annotations

import hashlib
import logging
import math
import re
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from cryptography import x509

from gateway.config import IdentityConfig
from identity.bundle import BundleSet
from identity.jwt_svid import JwtSvid, JwtSvidError, verify_jwt_svid
from identity.oauth import VIA_OAUTH, OAuthIssuer, OAuthVerifier
from identity.principal import Principal
from identity.spiffe_id import SpiffeId, SpiffeIdError
from identity.tenants import NoTenantError, TenantRules
from identity.tls import TlsPeer
from identity.x509_svid import X509Svid, X509SvidError, authorities_in, verify_x509_svid

log = logging.getLogger(__name__)

VIA_JWT_SVID = "jwt-svid"
VIA_X509_SVID = "x509-svid"
VIA_ANONYMOUS = "anonymous"
# Enough for every workload of a busy gateway; only verified tokens get in, so a caller without
# a valid token cannot fill it.
MAX_CACHED_TOKENS = 4096
# A failed verification may re-check the bundle files, but not more often than this: a flood of
# bad tokens must not turn into a flood of file reads.
FORCED_REFRESH_GAP_SECONDS = 1.0
# RFC 6750 2.1: b64token = 1*( ALPHA / DIGIT / "-" / "." / "_" / "~" / "+" / "/" ) *"="
_B64TOKEN = re.compile(r"[A-Za-z0-9\-._~+/]+=*")
# Nested `act` claims beyond this are refused: a longer chain is an attack, not a workflow.
MAX_ACT_DEPTH = 8


class AuthenticationError(Exception):
    """The caller is refused. `status` is 401 (who are you?) or 403 (known, but not let in);
    `error` is the RFC 6750 error code for the `WWW-Authenticate` challenge (None when the
    request carried no credentials at all, as RFC 6750 3.1 asks); `reason` is for people."""

    def __init__(self, status: int, reason: str, error: str | None = "invalid_token") -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.error = error


@dataclass(frozen=True)
class BearerResult:
    """What a verified bearer token proves: its subject, and the agents acting for it (the
    `act` claims, earliest first, the one presenting the token last)."""

    principal: Principal
    actors: tuple[str, ...] = ()


def actors_of(claims: Mapping[str, Any]) -> tuple[str, ...]:
    """The SPIFFE IDs of the `act` chain of verified claims (RFC 8693 4.1), earliest actor
    first, the current actor last; () without `act`. `JwtSvidError` for a malformed one."""
    nested: list[str] = []
    act: Any = claims.get("act")
    while act is not None:
        if len(nested) >= MAX_ACT_DEPTH:
            raise JwtSvidError(f"the act chain is deeper than {MAX_ACT_DEPTH}")
        if not isinstance(act, dict):
            raise JwtSvidError("act must be a JSON object (RFC 8693 4.1)")
        sub = act.get("sub")
        if not isinstance(sub, str):
            raise JwtSvidError("act.sub is required: it names the agent acting for the subject")
        try:
            nested.append(str(SpiffeId.parse(sub)))
        except SpiffeIdError as exc:
            raise JwtSvidError(f"act.sub {sub[:80]!r} is not a SPIFFE ID: {exc}") from None
        act = act.get("act")
    # The outermost `act` is the current actor; nested ones are earlier (RFC 8693 4.1).
    return tuple(reversed(nested))


class TokenCache:
    """Verified tokens by token hash, bounded, each entry dropped at the earlier of its time to
    live and the token's `exp`."""

    def __init__(self, ttl: float, max_entries: int = MAX_CACHED_TOKENS) -> None:
        self.ttl = ttl
        self.max_entries = max_entries
        self._entries: OrderedDict[bytes, tuple[BearerResult, float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: bytes, now: float) -> BearerResult | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        principal, deadline = entry
        if now >= deadline:
            del self._entries[key]
            return None
        self._entries.move_to_end(key)
        return principal

    def put(self, key: bytes, principal: BearerResult, expires_at: float, now: float) -> None:
        # Never past exp, even though verification grants a leeway after it: the leeway is for
        # clock skew at the moment of the check, not a licence to keep using the token.
        deadline = min(now + self.ttl, expires_at)
        if deadline <= now:
            return
        self._entries[key] = (principal, deadline)
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    def clear(self) -> None:
        self._entries.clear()


def bearer_token(headers: Mapping[str, str]) -> str | None:
    """The bearer token of a request, None without an `Authorization` header, or
    `AuthenticationError` for a header we cannot use. Messages never quote the header: it may
    be a token sent without a scheme."""
    getlist = getattr(headers, "getlist", None)  # starlette Headers: repeated headers
    if callable(getlist):
        values = list(getlist("authorization"))
    else:
        values = [v for k, v in headers.items() if k.lower() == "authorization"]
    if not values:
        return None
    if len(values) > 1:
        raise AuthenticationError(401, "more than one Authorization header", "invalid_request")
    scheme, _, rest = values[0].strip().partition(" ")
    if scheme.lower() != "bearer":
        raise AuthenticationError(
            401,
            "the Authorization header does not use the Bearer scheme: send "
            "'Authorization: Bearer <token>' (a JWT-SVID or an OAuth access token)",
            "invalid_request",
        )
    token = rest.lstrip(" ")
    if not token:
        raise AuthenticationError(401, "the Bearer token is missing", "invalid_request")
    if not _B64TOKEN.fullmatch(token):
        raise AuthenticationError(
            401,
            "the Bearer token has characters a token cannot have (RFC 6750 b64token)",
            "invalid_request",
        )
    return token


class Authenticator:
    """The gateway's authentication, built from `identity` settings (one per config load)."""

    def __init__(
        self,
        config: IdentityConfig,
        *,
        bundles: BundleSet | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """Loads the bundle files of `config` (raising `BundleError` for one that does not
        load: at start there is no previous bundle to fall back on) unless `bundles` is given."""
        self._clock = clock
        self._bundles = bundles if bundles is not None else BundleSet.from_config(config.bundles)
        self._audiences = set(config.audiences)
        self._tenants = TenantRules.from_config(
            config.tenants, require_rule=config.require_tenant_rule
        )
        self._anonymous = (
            Principal(config.anonymous_principal, config.anonymous_tenant, VIA_ANONYMOUS)
            if config.allow_anonymous
            else None
        )
        self._refresh_seconds = config.bundle_refresh_seconds
        self._cache = TokenCache(config.token_cache_seconds)
        self._oauth = OAuthVerifier.from_config(config, clock=clock)
        self._authorities_for = authorities_in(self._bundles)
        # Bumped whenever a bundle changes: a certificate checked under older bundles (kept on
        # its connection) is checked again.
        self._generation = 0
        now = clock()
        self._next_check = now + self._check_interval()
        self._last_forced = -math.inf

    @property
    def bundles(self) -> BundleSet:
        return self._bundles

    @property
    def cache(self) -> TokenCache:
        return self._cache

    @property
    def oauth(self) -> OAuthVerifier:
        return self._oauth

    # -- the entry points --------------------------------------------------------------------

    async def authenticate(
        self, headers: Mapping[str, str], peer: TlsPeer | None = None
    ) -> Principal:
        """`authenticate_http`, after fetching an OAuth issuer's keys when a token needs keys
        not loaded yet (the only network I/O, hence async; verification itself is not)."""
        token = bearer_token(headers)
        # A cached token needs no keys: the hot path stays a hash and a lookup.
        if (
            token is not None
            and self._oauth
            and self._cache.get(_token_key(token), self._clock()) is None
        ):
            issuer = self._oauth.issuer_of(token)
            if issuer is not None:
                await issuer.prepare(token)
        return self.authenticate_http(headers, peer)

    def authenticate_http(
        self, headers: Mapping[str, str], peer: TlsPeer | None = None
    ) -> Principal:
        """The principal of an HTTP request (its headers, and the TLS peer of its connection),
        or `AuthenticationError`."""
        now = self._clock()
        if now >= self._next_check:
            self.refresh(now)
        token = bearer_token(headers)
        if peer is not None and peer.der is not None:
            principal = self.authenticate_x509_svid(peer, now)
            if token is None:
                return principal
            return delegated(principal, self.authenticate_bearer(token, now))
        if token is None:
            return self.anonymous()
        bearer = self.authenticate_bearer(token, now)
        if bearer.actors:
            raise AuthenticationError(
                401,
                f"the token names an agent acting for its subject (act.sub {bearer.actors[-1]}): "
                "a delegation token is only accepted over mTLS, from the agent's own X.509-SVID",
            )
        return bearer.principal

    def anonymous(self) -> Principal:
        if self._anonymous is not None:
            return self._anonymous
        if not len(self._bundles):
            reason = (
                "authentication is not configured on this gateway (no identity.bundles) and "
                "anonymous callers are refused (identity.allow_anonymous is false)"
            )
        else:
            reason = (
                "no credentials: present an X.509-SVID client certificate or send "
                "'Authorization: Bearer <JWT-SVID>' (anonymous callers are refused: "
                "identity.allow_anonymous is false)"
            )
        raise AuthenticationError(401, reason, error=None)

    def authenticate_jwt_svid(self, token: str, now: float | None = None) -> Principal:
        """The principal a bearer token (JWT-SVID or OAuth access token) proves, ignoring any
        delegation it carries (see `authenticate_bearer`)."""
        return self.authenticate_bearer(token, now).principal

    def authenticate_bearer(self, token: str, now: float | None = None) -> BearerResult:
        """What a bearer token proves (its subject and `act` chain), from the cache when it was
        verified lately. An OAuth access token if its `iss` is a configured issuer, else a
        JWT-SVID."""
        now = self._clock() if now is None else now
        key = _token_key(token)
        result = self._cache.get(key, now)
        if result is not None:
            return result
        issuer = self._oauth.issuer_of(token)
        if issuer is not None:
            spiffe_id, tenant, via, claims = self._verify_oauth(issuer, token, now)
        else:
            try:
                svid = self._verify(token, now)
            except AuthenticationError as exc:
                iss = self._oauth.unknown_issuer(token)
                if iss is None:
                    raise
                # Most likely an access token of an issuer we do not trust: say so, rather
                # than only why it is not a JWT-SVID.
                raise AuthenticationError(
                    401,
                    f"iss {iss[:120]!r} is not an OAuth issuer this gateway trusts "
                    f"(identity.oauth), and the token is not a JWT-SVID either: {exc.reason}",
                ) from None
            spiffe_id, tenant, via, claims = svid.spiffe_id, None, VIA_JWT_SVID, svid.claims
        try:
            actors = actors_of(claims)
        except JwtSvidError as exc:
            raise AuthenticationError(401, str(exc)) from None
        if tenant is None:
            try:
                tenant = self._tenants.tenant_of(spiffe_id)
            except NoTenantError as exc:
                raise AuthenticationError(403, str(exc), error=None) from None
        result = BearerResult(Principal(id=str(spiffe_id), tenant=tenant, via=via), actors)
        self._cache.put(key, result, float(claims["exp"]), now)
        return result

    def _verify_oauth(
        self, issuer: OAuthIssuer, token: str, now: float
    ) -> tuple[SpiffeId, str | None, str, dict[str, Any]]:
        try:
            verified = issuer.verify(token, now)
        except JwtSvidError as exc:
            raise AuthenticationError(401, f"access token of {issuer.issuer}: {exc}") from None
        return verified.spiffe_id, verified.tenant, VIA_OAUTH, verified.claims

    def authenticate_x509_svid(self, peer: TlsPeer, now: float | None = None) -> Principal:
        """The principal a connection's client certificate proves. Kept on the connection
        (`peer`), refusals too, so a request after the first costs a few attribute reads."""
        now = self._clock() if now is None else now
        fresh = peer.checked_by is self and peer.generation == self._generation
        if not (fresh and now < peer.expires_at):
            result, expires_at = self._check_peer(peer, now)
            peer.checked_by, peer.generation = self, self._generation
            peer.result, peer.expires_at = result, expires_at
        result = peer.result
        if isinstance(result, AuthenticationError):
            # A new exception each time: re-raising one instance would grow its traceback.
            raise AuthenticationError(result.status, result.reason, result.error)
        assert isinstance(result, Principal)
        return result

    def _check_peer(
        self, peer: TlsPeer, now: float
    ) -> tuple[Principal | AuthenticationError, float]:
        """(principal or refusal, until when to keep it)."""
        # A refusal is kept briefly only: the bundle may be about to change.
        retry_at = now + FORCED_REFRESH_GAP_SECONDS
        try:
            svid = self._verify_certificate(peer.der or b"", now)
        except AuthenticationError as exc:
            return exc, retry_at
        try:
            tenant = self._tenants.tenant_of(svid.spiffe_id)
        except NoTenantError as exc:
            return AuthenticationError(403, str(exc), error=None), retry_at
        principal = Principal(id=str(svid.spiffe_id), tenant=tenant, via=VIA_X509_SVID)
        # Never past the earliest notAfter of the chain.
        return principal, svid.expires_at.timestamp()

    def _verify_certificate(self, der: bytes, now: float) -> X509Svid:
        try:
            leaf = x509.load_der_x509_certificate(der)
        except ValueError as exc:
            raise AuthenticationError(
                401, f"the client certificate cannot be parsed: {exc}"
            ) from None
        when = datetime.fromtimestamp(now, UTC)
        # The leaf alone: Python 3.11 does not expose the chain the TLS layer verified. It is
        # checked against the bundle of its own SPIFFE ID's trust domain, never a merged one.
        try:
            return verify_x509_svid([leaf], self._authorities_for, when, usage="client")
        except X509SvidError as exc:
            first = exc
        if now - self._last_forced >= FORCED_REFRESH_GAP_SECONDS:
            self._last_forced = now
            if self.refresh(now):
                try:
                    return verify_x509_svid([leaf], self._authorities_for, when, usage="client")
                except X509SvidError as exc:
                    first = exc
        raise AuthenticationError(401, f"the client certificate is refused: {first}")

    # -- bundles -----------------------------------------------------------------------------

    def refresh(self, now: float | None = None) -> list[str]:
        """Re-read changed bundle files now; returns the trust domains whose bundle changed."""
        now = self._clock() if now is None else now
        changed = self._bundles.refresh()
        if changed:
            # Tokens verified with a key that may just have been withdrawn must be checked again.
            self._cache.clear()
            self._generation += 1
            log.info("trust bundle(s) reloaded: %s", ", ".join(changed))
        self._next_check = now + self._check_interval()
        return changed

    def _check_interval(self) -> float:
        return min(self._refresh_seconds, self._bundles.refresh_interval())

    def _verify(self, token: str, now: float) -> JwtSvid:
        try:
            return verify_jwt_svid(token, self._bundles, self._audiences, now)
        except JwtSvidError as exc:
            first = exc
        # The token may be signed by a key added to a bundle since the last check.
        if now - self._last_forced >= FORCED_REFRESH_GAP_SECONDS:
            self._last_forced = now
            if self.refresh(now):
                try:
                    return verify_jwt_svid(token, self._bundles, self._audiences, now)
                except JwtSvidError as exc:
                    first = exc
        raise AuthenticationError(401, str(first)) from None


def _token_key(token: str) -> bytes:
    # A hash, not the token: bearer tokens are not kept around longer than a request.
    return hashlib.sha256(token.encode("ascii", "replace")).digest()


def delegated(peer: Principal, bearer: BearerResult) -> Principal:
    """The caller of a request proved by a client certificate (`peer`) that also carries a
    bearer token. The token's subject is the peer itself, or someone the peer acts for, named
    by the token's `act.sub`; anything else is refused."""
    subject = bearer.principal
    if not bearer.actors:
        if subject.id != peer.id:
            raise AuthenticationError(
                401,
                f"the bearer token's subject ({subject.id}) is not the client certificate's "
                f"SPIFFE ID ({peer.id}) and the token has no act claim naming it: an agent "
                "acting for someone presents a token whose act.sub is its own SPIFFE ID",
            )
        return peer
    if bearer.actors[-1] != peer.id:
        raise AuthenticationError(
            401,
            f"delegation refused: the token's act.sub ({bearer.actors[-1]}) is not the client "
            f"certificate's SPIFFE ID ({peer.id}); only the agent the token names may use it",
        )
    # The agent calls, for the subject, in the subject's tenant; the chain says on whose behalf.
    return Principal(
        id=peer.id, tenant=subject.tenant, via=peer.via, chain=(subject.id, *bearer.actors[:-1])
    )
