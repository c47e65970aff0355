"""A development CA for one trust domain: `duragate identity init` and `duragate identity issue`.

It is meant for a laptop and for tests, so that mTLS and JWT-SVIDs work out of the box. The keys
are unencrypted PEM files protected by their mode (0600) and the directory's (0700); a real
deployment gets its SVIDs from a SPIFFE Workload API or its own PKI instead.

Files in the CA directory:
- `ca.pem`, `ca.key`: the X.509 authority, EC P-256, self-signed, pathLenConstraint 0;
- `jwt.key`: the JWT-SVID signing key, EC P-256 (a separate key: the SPIFFE Trust Domain and
  Bundle standard, section 2, advises one key per SVID type);
- `bundle.json`: the trust domain's SPIFFE bundle (a JWK Set with an `x509-svid` entry carrying
  the CA in `x5c` and a `jwt-svid` entry with its `kid`, plus `spiffe_sequence`);
- `bundle.pem`: the same X.509 authorities as PEM, for `ssl` and tools that want a CA file.
"""

from __future__ import annotations

import base64
import ipaddress
import json
import os
import tempfile
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from joserfc import jwt
from joserfc.jwk import ECKey

from identity.bundle import TrustBundle
from identity.spiffe_id import SpiffeId, parse_trust_domain
from identity.x509_svid import spiffe_id_of

CA_CERT_FILE = "ca.pem"
CA_KEY_FILE = "ca.key"
JWT_KEY_FILE = "jwt.key"
BUNDLE_JSON_FILE = "bundle.json"
BUNDLE_PEM_FILE = "bundle.pem"

DEFAULT_CA_TTL = timedelta(days=365)
# How often a consumer of bundle.json should look for a new one (SPIFFE bundle 4.1.2).
BUNDLE_REFRESH_HINT_SECONDS = 3600
# Issued certificates start a little in the past so that a peer whose clock is slightly behind
# does not refuse a certificate issued a moment ago.
_BACKDATE = timedelta(seconds=30)


class DevCAError(ValueError):
    """The development CA cannot do what was asked; the message says why."""


class DevCA:
    """The development CA of one trust domain, loaded from (or created in) a directory."""

    __slots__ = ("directory", "trust_domain", "ca_certificate", "sequence", "_ca_key", "_jwt_key")

    def __init__(
        self,
        directory: Path,
        ca_certificate: x509.Certificate,
        ca_key: ec.EllipticCurvePrivateKey,
        jwt_key: ec.EllipticCurvePrivateKey,
        sequence: int,
    ) -> None:
        self.directory = directory
        self.ca_certificate = ca_certificate
        self.trust_domain = spiffe_id_of(ca_certificate).trust_domain
        self.sequence = sequence
        self._ca_key = ca_key
        self._jwt_key = jwt_key

    def __repr__(self) -> str:  # never the keys
        return f"DevCA(trust_domain={self.trust_domain!r}, directory={str(self.directory)!r})"

    # -- creating and loading -------------------------------------------------------------

    @classmethod
    def create(
        cls,
        directory: Path,
        trust_domain: str,
        *,
        ttl: timedelta = DEFAULT_CA_TTL,
        now: datetime | None = None,
    ) -> DevCA:
        """Make a new CA in `directory` (created 0700 if missing). Refuses to replace an existing
        CA there: losing its key would orphan every SVID it issued."""
        parse_trust_domain(trust_domain)
        directory = Path(directory)
        if (directory / CA_KEY_FILE).exists():
            raise FileExistsError(f"{directory / CA_KEY_FILE} exists: a CA is already there")
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        ca_key = ec.generate_private_key(ec.SECP256R1())
        jwt_key = ec.generate_private_key(ec.SECP256R1())
        ca_cert = _ca_certificate(trust_domain, ca_key, _utc(now), ttl)
        ca = cls(directory, ca_cert, ca_key, jwt_key, sequence=1)
        write_certificates(directory / CA_CERT_FILE, [ca_cert])
        ca.write_bundles()
        write_private_key(directory / JWT_KEY_FILE, jwt_key)
        # The CA key last: it marks a complete CA, so a create that failed half-way can be rerun.
        write_private_key(directory / CA_KEY_FILE, ca_key)
        return ca

    @classmethod
    def load(cls, directory: Path) -> DevCA:
        directory = Path(directory)
        ca_cert = x509.load_pem_x509_certificate((directory / CA_CERT_FILE).read_bytes())
        ca_key = _load_ec_key(directory / CA_KEY_FILE)
        jwt_key = _load_ec_key(directory / JWT_KEY_FILE)
        if ca_key.public_key() != ca_cert.public_key():
            raise DevCAError(f"{CA_KEY_FILE} is not the key of {CA_CERT_FILE} in {directory}")
        bundle = json.loads((directory / BUNDLE_JSON_FILE).read_text())
        sequence = bundle.get("spiffe_sequence") if isinstance(bundle, dict) else None
        if not isinstance(sequence, int) or isinstance(sequence, bool):
            raise DevCAError(f"{BUNDLE_JSON_FILE} in {directory} has no integer spiffe_sequence")
        return cls(directory, ca_cert, ca_key, jwt_key, sequence)

    # -- the trust bundle ------------------------------------------------------------------

    @property
    def x509_authorities(self) -> list[x509.Certificate]:
        return [self.ca_certificate]

    def authorities_for(self, trust_domain: str) -> list[x509.Certificate]:
        """This CA's authorities for its own trust domain, none for any other: the shape
        `verify_x509_svid` expects, so a dev CA can stand in for a bundle set."""
        return self.x509_authorities if trust_domain == self.trust_domain else []

    @property
    def jwt_public_key(self) -> ec.EllipticCurvePublicKey:
        return self._jwt_key.public_key()

    @property
    def jwt_kid(self) -> str:
        # The RFC 7638 thumbprint: stable for the key, so nothing else has to be stored.
        return ECKey.import_key(self._jwt_key.public_key()).thumbprint()

    def bundle(self) -> dict[str, Any]:
        """The SPIFFE bundle (a JWK Set) of this trust domain."""
        ca_der = self.ca_certificate.public_bytes(serialization.Encoding.DER)
        x509_entry = {
            **_public_jwk(self.ca_certificate.public_key()),
            "use": "x509-svid",
            # Standard base64, not base64url (RFC 7517 4.7); exactly one certificate, no `kid`
            # (X509-SVID 6.1).
            "x5c": [base64.b64encode(ca_der).decode("ascii")],
        }
        jwt_entry = {**_public_jwk(self.jwt_public_key), "use": "jwt-svid", "kid": self.jwt_kid}
        return {
            "spiffe_sequence": self.sequence,
            "spiffe_refresh_hint": BUNDLE_REFRESH_HINT_SECONDS,
            "keys": [x509_entry, jwt_entry],
        }

    def trust_bundle(self) -> TrustBundle:
        """The same bundle, as the verifiers take it (read back through the bundle parser, so
        what the CA publishes and what a peer loads cannot drift apart)."""
        return TrustBundle.parse_spiffe(self.trust_domain, self.bundle())

    def write_bundles(self) -> None:
        _write_atomically(
            self.directory / BUNDLE_JSON_FILE,
            (json.dumps(self.bundle(), indent=2) + "\n").encode(),
            mode=0o644,
        )
        write_certificates(self.directory / BUNDLE_PEM_FILE, self.x509_authorities)

    # -- issuing ---------------------------------------------------------------------------

    def issue_x509_svid(
        self,
        spiffe_id: str | SpiffeId,
        ttl: timedelta,
        *,
        server_names: Sequence[str] = (),
        for_server: bool = False,
        now: datetime | None = None,
    ) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        """A leaf X509-SVID and its new key. Every leaf carries both clientAuth and serverAuth,
        since X509-SVID 4.4 requires both whenever the extension is present. `server_names` (DNS
        names or IP addresses) become extra SANs for TLS clients that check host names;
        `for_server=True` insists on at least one, as such clients refuse a server without."""
        sid = self._own_workload_id(spiffe_id)
        if for_server and not server_names:
            raise DevCAError("a server certificate needs at least one DNS name or IP address")
        issued_at = _utc(now)
        not_before, not_after = self._validity(issued_at, ttl)
        key = ec.generate_private_key(ec.SECP256R1())
        names: list[x509.GeneralName] = [x509.UniformResourceIdentifier(str(sid))]
        names.extend(_server_name(n) for n in server_names)
        cert = (
            x509.CertificateBuilder()
            # An empty Subject, as X509-SVID 3.1 allows; the identity is the URI SAN alone,
            # which is therefore critical (RFC 5280 4.1.2.6).
            .subject_name(x509.Name([]))
            .issuer_name(self.ca_certificate.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before)
            .not_valid_after(not_after)
            .add_extension(x509.SubjectAlternativeName(names), critical=True)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_key_usage(leaf=True), critical=True)
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self._ca_key.public_key()),
                critical=False,
            )
            .sign(self._ca_key, hashes.SHA256())
        )
        return cert, key

    def issue_jwt_svid(
        self,
        spiffe_id: str | SpiffeId,
        audience: str | Sequence[str],
        ttl: timedelta,
        *,
        now: datetime | None = None,
        extra_claims: Mapping[str, Any] | None = None,
    ) -> str:
        """A JWT-SVID (ES256) signed with the trust domain's JWT key. Only `alg`, `kid` and
        `typ` go in the header: JWT-SVID 2 forbids any other header. `extra_claims` (such as a
        delegation's `act`) are added, but never replace `sub`, `aud`, `exp` or `iat`."""
        sid = self._own_workload_id(spiffe_id)
        audiences = [audience] if isinstance(audience, str) else list(audience)
        if not audiences or not all(isinstance(a, str) and a for a in audiences):
            raise DevCAError("a JWT-SVID needs at least one non-empty audience (JWT-SVID 3.2)")
        if ttl <= timedelta(0):
            raise DevCAError("the time to live must be positive")
        issued_at = int(_utc(now).timestamp())
        claims = {
            **(extra_claims or {}),
            "sub": str(sid),
            "aud": audiences,
            "exp": issued_at + max(1, int(ttl.total_seconds())),
            "iat": issued_at,
        }
        header = {"alg": "ES256", "kid": self.jwt_kid, "typ": "JWT"}
        return jwt.encode(header, claims, ECKey.import_key(self._jwt_key), algorithms=["ES256"])

    def _own_workload_id(self, spiffe_id: str | SpiffeId) -> SpiffeId:
        sid = spiffe_id if isinstance(spiffe_id, SpiffeId) else SpiffeId.parse(spiffe_id)
        if sid.trust_domain != self.trust_domain:
            raise DevCAError(
                f"this CA issues only for trust domain {self.trust_domain!r}, not for {sid}"
            )
        if not sid.path:
            raise DevCAError(f"{sid} is a bare trust domain, not a workload (X509-SVID 3.1)")
        return sid

    def _validity(self, issued_at: datetime, ttl: timedelta) -> tuple[datetime, datetime]:
        if ttl <= timedelta(0):
            raise DevCAError("the time to live must be positive")
        ca_expiry = self.ca_certificate.not_valid_after_utc
        if issued_at >= ca_expiry:
            raise DevCAError(f"the CA expired at {ca_expiry.isoformat()}")
        # An SVID outliving its CA would be refused anyway; say so in the certificate.
        not_before = max(issued_at - _BACKDATE, self.ca_certificate.not_valid_before_utc)
        return not_before, min(issued_at + ttl, ca_expiry)


# -- writing PEM files -----------------------------------------------------------------------


def write_x509_svid(
    cert_path: Path,
    key_path: Path,
    cert: x509.Certificate,
    key: ec.EllipticCurvePrivateKey,
    *,
    intermediates: Sequence[x509.Certificate] = (),
) -> None:
    """The SVID's certificate (then any intermediates, as TLS sends them) and its key (0600)."""
    write_private_key(key_path, key)
    write_certificates(cert_path, [cert, *intermediates])


def write_certificates(path: Path, certs: Sequence[x509.Certificate]) -> None:
    pem = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)
    _write_atomically(Path(path), pem, mode=0o644)


def write_private_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),  # protected by the file mode; see the module docstring
    )
    _write_atomically(Path(path), pem, mode=0o600)


def _write_atomically(path: Path, data: bytes, *, mode: int) -> None:
    # A temporary file in the same directory, renamed over the target: a server reloading its
    # certificate never reads half a file, and mkstemp creates it 0600, so a key is never
    # readable by others, not even for a moment.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            os.fchmod(f.fileno(), mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# -- helpers ---------------------------------------------------------------------------------


def _utc(now: datetime | None) -> datetime:
    if now is None:
        return datetime.now(UTC)
    return now if now.tzinfo is not None else now.replace(tzinfo=UTC)


def _load_ec_key(path: Path) -> ec.EllipticCurvePrivateKey:
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise DevCAError(f"{path} is not an EC private key")
    return key


def _public_jwk(key: object) -> dict[str, Any]:
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise DevCAError("the development CA only uses EC keys")
    return {"kty": "EC", **ECKey.import_key(key).as_dict(private=False)}


def _key_usage(*, leaf: bool) -> x509.KeyUsage:
    # Leaf: digitalSignature only (X509-SVID 4.3; keyEncipherment/keyAgreement are for RSA and
    # not needed with ECDHE). CA: keyCertSign and cRLSign.
    return x509.KeyUsage(
        digital_signature=leaf,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=not leaf,
        crl_sign=not leaf,
        encipher_only=False,
        decipher_only=False,
    )


def _server_name(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


def _ca_certificate(
    trust_domain: str, key: ec.EllipticCurvePrivateKey, now: datetime, ttl: timedelta
) -> x509.Certificate:
    if ttl <= timedelta(0):
        raise DevCAError("the time to live must be positive")
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, trust_domain[:64]),
            x509.NameAttribute(NameOID.COMMON_NAME, "Duragate development CA"),
        ]
    )
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(now + ttl)
        # pathLenConstraint 0: this CA signs leaves only, never another CA.
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(leaf=False), critical=True)
        # The CA is itself an SVID of the bare trust domain (X509-SVID 3.2). No URI name
        # constraint: cryptography's path validation (and other libraries, as X509-SVID 4.2
        # warns) refuses certificates under one as unsupported.
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.UniformResourceIdentifier(f"spiffe://{trust_domain}")]
            ),
            critical=False,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        .sign(key, hashes.SHA256())
    )
