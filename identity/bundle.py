"""SPIFFE trust bundles: the authorities of one trust domain, and the set of bundles we trust.

Standards followed ("SPIFFE Trust Domain and Bundle", X509-SVID section 6, JWT-SVID section 6):
- a bundle is a JWK Set; `keys` is required, `spiffe_sequence` and `spiffe_refresh_hint` are
  optional integers;
- an entry whose `use` (or `kty`) we do not know is ignored, as the standard requires, so that
  bundles carrying newer SVID types still load;
- `x509-svid` entries: the first `x5c` value is the CA certificate; an entry without `x5c` is
  ignored and any further `x5c` values are ignored (X509-SVID 6.2);
- `jwt-svid` entries must have a `kid`;
- a bundle belongs to exactly one trust domain, recorded next to it, and bundles of different
  trust domains are never merged: an SVID is only ever checked against its own domain's bundle.
A PEM file of CA certificates is accepted too (X.509 authorities only).
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import os
import threading
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, TypeAlias

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from joserfc.errors import JoseError
from joserfc.jwk import ECKey, OKPKey, RSAKey

from identity.spiffe_id import SpiffeIdError, parse_trust_domain

log = logging.getLogger(__name__)

USE_X509_SVID = "x509-svid"
USE_JWT_SVID = "jwt-svid"
# The standard suggests a short default when a bundle gives no refresh hint (section 6.2).
DEFAULT_REFRESH_SECONDS = 300.0

JwtKey: TypeAlias = ECKey | RSAKey

# Only these curves serve a JWT-SVID algorithm (ES256, ES384, ES512).
_JWT_CURVES = frozenset({"P-256", "P-384", "P-521"})
# Members that only a private or symmetric key has: a bundle must never carry them.
_SECRET_MEMBERS = frozenset({"d", "p", "q", "dp", "dq", "qi", "oth", "k"})
_PUBLIC_MEMBERS = {"RSA": ("n", "e"), "EC": ("crv", "x", "y"), "OKP": ("crv", "x")}
_MAX_UINT64 = 2**64 - 1


class BundleError(ValueError):
    """A bundle that cannot be used; the message says which entry and why."""


@dataclass(frozen=True, eq=False)
class TrustBundle:
    """The authorities of ONE trust domain: CA certificates for X.509-SVIDs, and public keys by
    `kid` for JWT-SVIDs."""

    trust_domain: str
    x509_authorities: tuple[x509.Certificate, ...] = ()
    jwt_authorities: Mapping[str, JwtKey] = field(default_factory=dict)
    sequence: int | None = None
    refresh_hint: int | None = None

    def __post_init__(self) -> None:
        try:
            parse_trust_domain(self.trust_domain)
        except SpiffeIdError as exc:
            raise BundleError(str(exc)) from exc
        for index, cert in enumerate(self.x509_authorities):
            _check_authority(cert, self.trust_domain, f"X.509 authority #{index}")
        for kid, key in self.jwt_authorities.items():
            if not isinstance(key, ECKey | RSAKey) or key.is_private:
                raise BundleError(f"JWT authority {kid!r} must be a public EC or RSA key")
        # Read-only, so a bundle shared between threads cannot change under a verifier.
        object.__setattr__(self, "jwt_authorities", MappingProxyType(dict(self.jwt_authorities)))

    # -- loading ---------------------------------------------------------------------------

    @classmethod
    def load(cls, trust_domain: str, path: str | os.PathLike[str]) -> TrustBundle:
        """A SPIFFE bundle (JSON) or PEM CA certificates, told apart by the content."""
        try:
            data = Path(path).read_bytes()
        except OSError as exc:
            raise BundleError(f"{path}: cannot read the bundle: {exc.strerror or exc}") from exc
        try:
            if data.lstrip().startswith(b"{"):
                return cls.parse_spiffe(trust_domain, data)
            if b"-----BEGIN" in data:
                return cls.parse_pem(trust_domain, data)
            raise BundleError("neither a SPIFFE bundle (JSON) nor PEM certificates")
        except BundleError as exc:
            raise BundleError(f"{path}: {exc}") from exc

    @classmethod
    def parse_spiffe(cls, trust_domain: str, data: bytes | str | Mapping[str, Any]) -> TrustBundle:
        if isinstance(data, Mapping):
            doc: Any = data
        else:
            try:
                doc = json.loads(data)
            except (ValueError, UnicodeDecodeError) as exc:
                raise BundleError(f"the SPIFFE bundle is not valid JSON: {exc}") from exc
        if not isinstance(doc, Mapping):
            raise BundleError("a SPIFFE bundle is a JSON object (a JWK Set)")
        if "keys" not in doc:
            raise BundleError("the SPIFFE bundle has no 'keys' member")
        entries = doc["keys"]
        if not isinstance(entries, list):
            raise BundleError("'keys' must be an array of JWKs")
        authorities: list[x509.Certificate] = []
        jwt_keys: dict[str, JwtKey] = {}
        for index, entry in enumerate(entries):
            where = f"key #{index}"
            if not isinstance(entry, Mapping):
                raise BundleError(f"{where} is not a JSON object")
            use = entry.get("use")
            if use == USE_X509_SVID:
                cert = _x509_entry(entry, where)
                if cert is not None:
                    _check_authority(cert, trust_domain, where)
                    authorities.append(cert)
            elif use == USE_JWT_SVID:
                parsed = _jwt_entry(entry, where)
                if parsed is not None:
                    kid, key = parsed
                    if kid in jwt_keys:
                        raise BundleError(f"{where}: kid {kid!r} appears twice")
                    jwt_keys[kid] = key
            else:
                # Required by the standard, and how bundles with newer SVID types stay loadable.
                log.debug("bundle of %s: ignoring %s with use %r", trust_domain, where, use)
        return cls(
            trust_domain=trust_domain,
            x509_authorities=tuple(authorities),
            jwt_authorities=jwt_keys,
            sequence=_optional_uint(doc, "spiffe_sequence"),
            refresh_hint=_optional_uint(doc, "spiffe_refresh_hint"),
        )

    @classmethod
    def parse_pem(cls, trust_domain: str, data: bytes | str) -> TrustBundle:
        raw = data.encode() if isinstance(data, str) else data
        try:
            certs = x509.load_pem_x509_certificates(raw)
        except ValueError as exc:
            raise BundleError(f"no usable PEM certificate: {exc}") from exc
        for index, cert in enumerate(certs):
            _check_authority(cert, trust_domain, f"certificate #{index}")
        return cls(trust_domain=trust_domain, x509_authorities=tuple(certs))

    # -- use -------------------------------------------------------------------------------

    def jwt_key(self, kid: str) -> JwtKey | None:
        return self.jwt_authorities.get(kid)

    def x509_pem(self) -> str:
        """The CA certificates as PEM, as `ssl.SSLContext.load_verify_locations(cadata=...)`
        takes them."""
        return "".join(
            c.public_bytes(serialization.Encoding.PEM).decode() for c in self.x509_authorities
        )

    @property
    def refresh_interval(self) -> float:
        return float(self.refresh_hint) if self.refresh_hint else DEFAULT_REFRESH_SECONDS

    def to_spiffe_bundle(self) -> dict[str, Any]:
        """The bundle as a SPIFFE bundle document (the inverse of `parse_spiffe`)."""
        keys: list[dict[str, Any]] = []
        for cert in self.x509_authorities:
            entry = dict(_jwk_of(cert.public_key()).as_dict(private=False))
            der = cert.public_bytes(serialization.Encoding.DER)
            entry.update(use=USE_X509_SVID, x5c=[base64.b64encode(der).decode()])
            keys.append(entry)
        for kid, key in self.jwt_authorities.items():
            entry = dict(key.as_dict(private=False))
            entry.update(use=USE_JWT_SVID, kid=kid)
            keys.append(entry)
        doc: dict[str, Any] = {"keys": keys}
        if self.sequence is not None:
            doc["spiffe_sequence"] = self.sequence
        if self.refresh_hint is not None:
            doc["spiffe_refresh_hint"] = self.refresh_hint
        return doc


def _optional_uint(doc: Mapping[str, Any], name: str) -> int | None:
    value = doc.get(name)
    if value is None:
        return None
    # bool is an int in Python; JSON `true` is not a sequence number.
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= _MAX_UINT64:
        raise BundleError(f"{name!r} must be a non-negative integer, not {value!r}")
    return value


def _check_secrets(entry: Mapping[str, Any], where: str) -> None:
    leaked = sorted(_SECRET_MEMBERS.intersection(entry))
    if leaked:
        raise BundleError(
            f"{where} holds private or symmetric key material ({', '.join(leaked)}): "
            "a bundle only holds public keys"
        )


def _x509_entry(entry: Mapping[str, Any], where: str) -> x509.Certificate | None:
    kty = entry.get("kty")
    if not isinstance(kty, str):
        raise BundleError(f"{where} has no 'kty'")
    if kty not in _PUBLIC_MEMBERS:
        log.warning("ignoring bundle %s: key type %r is not supported", where, kty)
        return None
    _check_secrets(entry, where)
    chain = entry.get("x5c")
    if chain is None or chain == []:
        # X509-SVID 6.2: an x509-svid entry without x5c MUST be ignored.
        log.warning("ignoring bundle %s: x509-svid entry without x5c", where)
        return None
    if not isinstance(chain, list) or not isinstance(chain[0], str):
        raise BundleError(f"{where}: x5c must be an array of base64 DER certificates")
    # Only the first value is the authority; the standard says to ignore the rest.
    try:
        der = base64.b64decode(chain[0], validate=True)
        cert = x509.load_der_x509_certificate(der)
    except (binascii.Error, ValueError) as exc:
        raise BundleError(f"{where}: x5c[0] is not a base64 DER certificate: {exc}") from exc
    _check_jwk_matches_certificate(entry, kty, cert, where)
    return cert


def _check_jwk_matches_certificate(
    entry: Mapping[str, Any], kty: str, cert: x509.Certificate, where: str
) -> None:
    # The JWK members and x5c describe the same key; if they disagree, one of them is wrong and
    # we cannot tell which, so the entry is refused rather than half-trusted.
    try:
        cert_jwk = _jwk_of(cert.public_key())
    except BundleError as exc:
        raise BundleError(f"{where}: {exc}") from exc
    if cert_jwk.key_type != kty:
        raise BundleError(
            f"{where}: kty {kty!r} does not match its certificate's {cert_jwk.key_type} key"
        )
    members = {m: entry[m] for m in _PUBLIC_MEMBERS[kty] if m in entry}
    if not members:
        return
    # Compared as keys, not as strings: base64url encodings of one key may differ (e.g. a
    # leading zero octet in `n`).
    try:
        declared = type(cert_jwk).import_key({"kty": kty, **members})
    except (JoseError, ValueError, TypeError) as exc:
        raise BundleError(f"{where}: the JWK's public key members are invalid: {exc}") from exc
    if _spki(declared.public_key) != _spki(cert.public_key()):
        raise BundleError(f"{where}: the JWK's public key does not match its x5c certificate")


def _spki(public_key: Any) -> bytes:
    return bytes(
        public_key.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )


def _jwk_of(public_key: Any) -> ECKey | RSAKey | OKPKey:
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        return ECKey.import_key(public_key)
    if isinstance(public_key, rsa.RSAPublicKey):
        return RSAKey.import_key(public_key)
    if isinstance(public_key, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey):
        return OKPKey.import_key(public_key)
    raise BundleError(f"unsupported certificate key type {type(public_key).__name__}")


def _jwt_entry(entry: Mapping[str, Any], where: str) -> tuple[str, JwtKey] | None:
    kid = entry.get("kid")
    if not isinstance(kid, str) or not kid:
        raise BundleError(f"{where}: a jwt-svid entry must have a 'kid' (JWT-SVID 6.1)")
    kty = entry.get("kty")
    if not isinstance(kty, str):
        raise BundleError(f"{where} ({kid!r}) has no 'kty'")
    _check_secrets(entry, f"{where} ({kid!r})")
    if kty not in ("EC", "RSA"):
        log.warning("ignoring bundle %s (%r): key type %r cannot sign JWT-SVIDs", where, kid, kty)
        return None
    if kty == "EC" and entry.get("crv") not in _JWT_CURVES:
        log.warning(
            "ignoring bundle %s (%r): curve %r is not a JWT-SVID curve",
            where,
            kid,
            entry.get("crv"),
        )
        return None
    # joserfc refuses `use: jwt-svid` (it only knows sig/enc), so the member is dropped here;
    # the entry was already selected by its use.
    members = {k: v for k, v in entry.items() if k != "use"}
    try:
        key: JwtKey = ECKey.import_key(members) if kty == "EC" else RSAKey.import_key(members)
    except (JoseError, ValueError, TypeError) as exc:
        raise BundleError(f"{where} ({kid!r}) is not a valid {kty} public key: {exc}") from exc
    return kid, key


def _check_authority(cert: x509.Certificate, trust_domain: str, where: str) -> None:
    try:
        constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
        is_ca = constraints.ca
    except x509.ExtensionNotFound:
        is_ca = False
    if not is_ca:
        raise BundleError(f"{where} is not a CA certificate (basic constraints CA is not set)")
    # A CA that carries a SPIFFE ID says which trust domain it signs for: a CA of another
    # domain in this bundle would let that domain mint IDs in ours.
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        uris = sans.get_values_for_type(x509.UniformResourceIdentifier)
    except x509.ExtensionNotFound:
        uris = []
    for uri in uris:
        if uri.lower().startswith("spiffe://"):
            domain = uri[len("spiffe://") :].split("/", 1)[0]
            if domain.lower() != trust_domain:
                raise BundleError(
                    f"{where} is a CA of trust domain {domain!r} (URI SAN {uri!r}), "
                    f"not of {trust_domain}"
                )


# -- the set of bundles ----------------------------------------------------------------------


@dataclass
class _Source:
    path: Path
    stamp: tuple[int, int, int] | None


def _stamp(path: Path) -> tuple[int, int, int]:
    # Size and inode as well as mtime: an atomic rename or a rewrite within one mtime tick on a
    # coarse file system still counts as a change.
    st = os.stat(path)
    return (st.st_mtime_ns, st.st_size, st.st_ino)


class BundleSet:
    """Bundles keyed by trust domain. A lookup for a trust domain only ever returns that
    domain's own bundle: bundles are replaced, never merged."""

    def __init__(self, bundles: Iterable[TrustBundle] = ()) -> None:
        self._bundles: dict[str, TrustBundle] = {}
        self._sources: dict[str, _Source] = {}
        self._lock = threading.Lock()
        for bundle in bundles:
            if bundle.trust_domain in self._bundles:
                raise BundleError(
                    f"two bundles for trust domain {bundle.trust_domain}: bundles are never merged"
                )
            self._bundles[bundle.trust_domain] = bundle

    @classmethod
    def from_config(cls, config: Mapping[str, str | os.PathLike[str]]) -> BundleSet:
        """`{trust domain: bundle file}`. A broken file is an error here: at startup there is no
        previous bundle to fall back on."""
        result = cls()
        for trust_domain, path in config.items():
            try:
                parse_trust_domain(trust_domain)
            except SpiffeIdError as exc:
                raise BundleError(f"bundle for {trust_domain!r}: {exc}") from exc
            source = _Source(Path(path), None)
            try:
                source.stamp = _stamp(source.path)
            except OSError as exc:
                raise BundleError(f"{path}: cannot read the bundle: {exc.strerror}") from exc
            result._bundles[trust_domain] = TrustBundle.load(trust_domain, source.path)
            result._sources[trust_domain] = source
        return result

    def get(self, trust_domain: str) -> TrustBundle | None:
        return self._bundles.get(trust_domain)

    def __contains__(self, trust_domain: object) -> bool:
        return trust_domain in self._bundles

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._bundles))

    def __len__(self) -> int:
        return len(self._bundles)

    @property
    def trust_domains(self) -> tuple[str, ...]:
        return tuple(sorted(self._bundles))

    def put(self, bundle: TrustBundle) -> None:
        """Replace the bundle of `bundle.trust_domain` (for example from the Workload API)."""
        with self._lock:
            self._replace(bundle)

    def refresh_interval(self) -> float:
        """How often `refresh()` is worth calling: the shortest refresh hint."""
        bundles = self._bundles.values()
        return min((b.refresh_interval for b in bundles), default=DEFAULT_REFRESH_SECONDS)

    def refresh(self) -> list[str]:
        """Re-read the bundle files that changed; returns the trust domains whose bundle was
        replaced. A file that is missing or broken is logged once per change and the bundle
        loaded before stays in use, so a bad write never leaves a trust domain without keys."""
        changed: list[str] = []
        with self._lock:
            for trust_domain, source in self._sources.items():
                try:
                    stamp = _stamp(source.path)
                except OSError as exc:
                    if source.stamp is not None:
                        log.error(
                            "bundle file %s of %s is unreadable (%s); keeping the previous bundle",
                            source.path,
                            trust_domain,
                            exc.strerror,
                        )
                        source.stamp = None
                    continue
                if stamp == source.stamp:
                    continue
                # Remember the stamp taken before reading: if the file changes again while it is
                # read, the next refresh sees a new stamp and reads it again.
                source.stamp = stamp
                try:
                    bundle = TrustBundle.load(trust_domain, source.path)
                except BundleError as exc:
                    log.error("keeping the previous bundle of %s: %s", trust_domain, exc)
                    continue
                self._warn_on_sequence(self._bundles.get(trust_domain), bundle)
                self._replace(bundle)
                changed.append(trust_domain)
        return changed

    def _replace(self, bundle: TrustBundle) -> None:
        # Copy on write: readers use the dict without the lock and never see a half update.
        bundles = dict(self._bundles)
        bundles[bundle.trust_domain] = bundle
        self._bundles = bundles

    @staticmethod
    def _warn_on_sequence(old: TrustBundle | None, new: TrustBundle) -> None:
        if old is None or old.sequence is None or new.sequence is None:
            return
        # The sequence must increase with every change. A lower one is still loaded (a local file
        # is the operator's choice, e.g. a re-initialised CA) but it is worth a look.
        if new.sequence < old.sequence:
            log.warning(
                "bundle of %s went back from sequence %d to %d",
                new.trust_domain,
                old.sequence,
                new.sequence,
            )
