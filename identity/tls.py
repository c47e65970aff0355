"""TLS on the HTTP front door: the server's SSL context (rotated without a restart) and the peer
certificate each connection carries into the app.

    tls = ServerTls.from_config(config)       # or ConfigError placed on listen.tls
    uvicorn.Config(app, ssl_context_factory=lambda *_: tls.context, http=<peer protocol>)
    peer = peer_of(scope)                     # in the app: the connection's TlsPeer, or None

Two layers check a client certificate, on purpose:
- the TLS layer verifies the chain against the X.509 authorities of ONE trust domain, the local
  one (`listen.tls.ca_bundle_domain`), so that nothing but the local PKI can complete a
  handshake with a certificate; federated callers authenticate with JWT-SVIDs instead;
- the app re-checks the leaf with `verify_x509_svid` against the bundle of the SPIFFE ID's OWN
  trust domain (`Authenticator`), because the TLS layer knows nothing of SPIFFE IDs: a local CA
  that signed a certificate claiming another trust domain must not vouch for it.
Python 3.11 hands the app the peer's leaf only, never the verified chain: for now a leaf issued
under an intermediate CA cannot be re-checked in the app and is refused there (401); such PKIs
need the chain (Python 3.13's `get_verified_chain`) or JWT-SVIDs.

The server certificate rotates without a restart: every new handshake runs `sni_callback`, which
(at most every `reload_seconds`) stats the certificate, key and bundle files and, when one
changed, builds a new context and switches the handshake to it. A pair that does not load (a
certificate written before its key, say) keeps the previous context and is retried next time.
"""

from __future__ import annotations

import logging
import os
import ssl
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gateway.config import ConfigError, GatewayConfig
from identity.bundle import BundleError, TrustBundle

log = logging.getLogger(__name__)

# The key of the ASGI TLS extension (`scope["extensions"]["tls"]`) and our entry in it.
TLS_EXTENSION = "tls"
PEER_KEY = "duragate.peer"

_VERIFY_MODES = {
    "none": ssl.CERT_NONE,
    "optional": ssl.CERT_OPTIONAL,
    "required": ssl.CERT_REQUIRED,
}


class TlsPeer:
    """What one TLS connection knows of its client: the leaf certificate (DER; None when the
    client sent none) and the result of checking it, which the Authenticator keeps here so that
    later requests on the same connection cost nothing."""

    __slots__ = ("der", "checked_by", "generation", "expires_at", "result")

    def __init__(self, der: bytes | None) -> None:
        self.der = der
        # Set by the Authenticator: who checked, against which bundles, until when, and what
        # came out (a Principal or the refusal).
        self.checked_by: object | None = None
        self.generation = -1
        self.expires_at = 0.0
        self.result: Any = None


def peer_from_transport(transport: Any) -> TlsPeer | None:
    """The TlsPeer of a connection (None over plain TCP). Asyncio completes the handshake before
    the protocol's `connection_made`, so the certificate is there to read, once."""
    ssl_object = transport.get_extra_info("ssl_object")
    if ssl_object is None:
        return None
    return TlsPeer(ssl_object.getpeercert(binary_form=True))


def peer_of(scope: Mapping[str, Any]) -> TlsPeer | None:
    extensions = scope.get("extensions") or {}
    tls = extensions.get(TLS_EXTENSION) or {}
    peer = tls.get(PEER_KEY)
    return peer if isinstance(peer, TlsPeer) else None


def _stamp(path: Path) -> tuple[int, int, int] | None:
    # Size and inode as well as mtime: a rename or a rewrite within one mtime tick still shows.
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino)


@dataclass(frozen=True)
class TlsFiles:
    cert: Path
    key: Path
    client_certs: str  # none | optional | required
    # (trust domain, bundle file) whose X.509 authorities verify client chains; None for `none`.
    ca_bundle: tuple[str, Path] | None


class ServerTls:
    """The gateway's server-side TLS: `context` goes to uvicorn once; rotation swaps the context
    a new handshake uses (existing connections keep theirs)."""

    def __init__(
        self,
        files: TlsFiles,
        *,
        reload_seconds: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """Raises `ssl.SSLError`, `OSError` or `BundleError` when the files do not load: at
        start there is no previous context to fall back on."""
        self.files = files
        self.reload_seconds = reload_seconds
        self._clock = clock
        self._stamps = self._current_stamps()
        self.context = self._build()
        self.context.sni_callback = self._on_hello
        self._current = self.context
        self._next_check = clock() + reload_seconds

    @classmethod
    def from_config(cls, config: GatewayConfig) -> ServerTls | None:
        """None without `listen.tls`; a ConfigError placed on `listen.tls` when it cannot be
        used (the check needs the identity section, so it lives here and not in the model)."""
        tls = config.listen.tls
        if tls is None:
            return None
        ca_bundle = None
        if tls.client_certs != "none":
            domain = tls.ca_bundle_domain or config.identity.trust_domain
            loc: tuple[str, ...] = ("listen", "tls", "ca_bundle_domain")
            if domain is None:
                raise ConfigError(
                    [
                        config.problem(
                            ("listen", "tls", "client_certs"),
                            "client certificates need a local trust domain: set "
                            "identity.trust_domain or listen.tls.ca_bundle_domain",
                        )
                    ]
                )
            path = config.identity.bundles.get(domain)
            if path is None:
                if tls.ca_bundle_domain is None:
                    loc = ("identity", "trust_domain")
                raise ConfigError(
                    [
                        config.problem(
                            loc,
                            f"no bundle for trust domain {domain!r} in identity.bundles: client "
                            "certificates are verified with that domain's X.509 authorities",
                        )
                    ]
                )
            ca_bundle = (domain, Path(path))
        files = TlsFiles(Path(tls.cert), Path(tls.key), tls.client_certs, ca_bundle)
        try:
            return cls(files, reload_seconds=tls.reload_seconds)
        except (OSError, ssl.SSLError, BundleError) as exc:
            reason = getattr(exc, "strerror", None) or str(exc)
            raise ConfigError(
                [config.problem(("listen", "tls"), f"the TLS settings do not load: {reason}")]
            ) from None

    # -- building ----------------------------------------------------------------------------

    def _current_stamps(self) -> tuple[object, ...]:
        paths = [self.files.cert, self.files.key]
        if self.files.ca_bundle is not None:
            paths.append(self.files.ca_bundle[1])
        return tuple(_stamp(p) for p in paths)

    def _build(self) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(self.files.cert, self.files.key)
        ctx.set_alpn_protocols(["http/1.1"])
        if self.files.ca_bundle is not None:
            domain, path = self.files.ca_bundle
            bundle = TrustBundle.load(domain, path)
            if not bundle.x509_authorities:
                raise BundleError(f"{path}: the bundle of {domain} has no X.509 authorities")
            # The local trust domain's authorities only, never a merged file: a CA of another
            # domain must not be able to complete a handshake (library notes, DESIGN Identity).
            ctx.load_verify_locations(cadata=bundle.x509_pem())
        ctx.verify_mode = _VERIFY_MODES[self.files.client_certs]
        return ctx

    # -- rotation ----------------------------------------------------------------------------

    def maybe_reload(self, now: float | None = None) -> bool:
        """Build a new context if a file changed since the last load; True if one was built.
        Checked at most every `reload_seconds`, so a busy server does not stat per handshake."""
        now = self._clock() if now is None else now
        if now < self._next_check:
            return False
        self._next_check = now + self.reload_seconds
        stamps = self._current_stamps()
        if stamps == self._stamps or None in stamps:
            return False
        try:
            context = self._build()
        except (OSError, ssl.SSLError, BundleError) as exc:
            # Probably mid-rotation (a new certificate next to the old key): try again later.
            log.error("TLS files changed but do not load; keeping the current ones: %s", exc)
            return False
        self._current, self._stamps = context, stamps
        log.info("TLS certificate/bundle reloaded from %s", self.files.cert)
        return True

    @property
    def current(self) -> ssl.SSLContext:
        return self._current

    def _on_hello(
        self, ssl_object: ssl.SSLObject | ssl.SSLSocket, server_name: str | None, _: ssl.SSLContext
    ) -> None:
        # Called for every ClientHello, with or without SNI. An exception here would abort the
        # handshake with an alert nobody can read: log it and serve with what we have.
        try:
            self.maybe_reload()
            if self._current is not ssl_object.context:
                ssl_object.context = self._current
        except Exception:  # noqa: BLE001
            log.exception("TLS context rotation failed")
