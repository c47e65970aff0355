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
from datetime import UTC, datetime

from cryptography import x509

from gateway.config import IdentityConfig
from identity.bundle import BundleSet
from identity.jwt_svid import JwtSvid, JwtSvidError, verify_jwt_svid
from identity.principal import Principal
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


class AuthenticationError(Exception):
    """The caller is refused. `status` is 401 (who are you?) or 403 (known, but not let in);
    `error` is the RFC 6750 error code for the `WWW-Authenticate` challenge (None when the
    request carried no credentials at all, as RFC 6750 3.1 asks); `reason` is for people."""

    def __init__(self, status: int, reason: str, error: str | None = "invalid_token") -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.error = error


class TokenCache:
    """Principals of verified tokens by token hash, bounded, each entry dropped at the earlier
    of its time to live and the token's `exp`."""

    def __init__(self, ttl: float, max_entries: int = MAX_CACHED_TOKENS) -> None:
        self.ttl = ttl
        self.max_entries = max_entries
        self._entries: OrderedDict[bytes, tuple[Principal, float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: bytes, now: float) -> Principal | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        principal, deadline = entry
        if now >= deadline:
            del self._entries[key]
            return None
        self._entries.move_to_end(key)
        return principal

    def put(self, key: bytes, principal: Principal, expires_at: float, now: float) -> None:
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
            "'Authorization: Bearer <JWT-SVID>'",
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

    # -- the entry points --------------------------------------------------------------------

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
            if token is not None:
                # The certificate identifies the peer. A token for someone else would be an
                # agent acting for that someone: delegation, checked through the token's `act`
                # claim, is a later step; until then such a request is refused, not guessed at.
                claimed = self.authenticate_jwt_svid(token, now)
                if claimed.id != principal.id:
                    raise AuthenticationError(
                        401,
                        f"the bearer token's subject ({claimed.id}) is not the client "
                        f"certificate's SPIFFE ID ({principal.id}); acting for another caller "
                        "(delegation) is not supported yet",
                    )
            return principal
        if token is None:
            return self.anonymous()
        return self.authenticate_jwt_svid(token, now)

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
        """The principal a JWT-SVID proves, from the cache when it was verified lately."""
        now = self._clock() if now is None else now
        # A hash, not the token: bearer tokens are not kept around longer than a request.
        key = hashlib.sha256(token.encode("ascii", "replace")).digest()
        principal = self._cache.get(key, now)
        if principal is not None:
            return principal
        svid = self._verify(token, now)
        try:
            tenant = self._tenants.tenant_of(svid.spiffe_id)
        except NoTenantError as exc:
            raise AuthenticationError(403, str(exc), error=None) from None
        principal = Principal(id=str(svid.spiffe_id), tenant=tenant, via=VIA_JWT_SVID)
        self._cache.put(key, principal, float(svid.claims["exp"]), now)
        return principal

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
