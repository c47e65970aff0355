"""X509-SVIDs (the SPIFFE X509-SVID standard): prove a peer's SPIFFE ID from its certificate chain.

`verify_x509_svid` applies, in this order, and refuses with the rule named in the message:
- the leaf has exactly one URI SAN, and it is a valid SPIFFE ID (sections 2 and 5.2);
- that ID has a non-root path: a bare trust domain names no workload (3.1, 5.2);
- if the leaf's Subject is empty, the SAN extension is critical (3.1, RFC 5280 4.1.2.6);
- the leaf states basicConstraints cA=false (4.1, 5.2);
- key usage is present and critical, has digitalSignature, and neither keyCertSign nor cRLSign
  (4.3, 5.2);
- an extended key usage, when present, allows what the peer is doing: clientAuth for a client,
  serverAuth for a server (4.4, RFC 5280 4.2.1.12);
- the leaf is within its validity period (and path validation checks every other link);
- the chain verifies (RFC 5280 path validation, section 5.1) up to an X.509 authority of the
  SPIFFE ID's OWN trust domain, and no other: a federated domain's CA cannot vouch for an ID in
  the local trust domain (SPIFFE Trust Domain and Bundle, section 3).

Path validation itself is `cryptography.x509.verification`, with its web-PKI profile relaxed only
where the SPIFFE standard differs from the CA/Browser Forum rules (see `_extension_policies`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import cache
from typing import TYPE_CHECKING, Literal

from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID
from cryptography.x509.verification import (
    Criticality,
    ExtensionPolicy,
    Policy,
    PolicyBuilder,
    Store,
    VerificationError,
)

from identity.spiffe_id import SpiffeId, SpiffeIdError

if TYPE_CHECKING:
    from identity.bundle import BundleSet

Usage = Literal["client", "server"]
# A peer sends its leaf and a few intermediates; far longer chains only cost us path building.
MAX_CHAIN_LENGTH = 16
# trust domain -> the X.509 authorities of that trust domain only (empty, or LookupError, if none)
AuthoritiesFor = Callable[[str], Sequence[x509.Certificate]]

# What a peer does on a connection -> the extended key usage (and its RFC 5280 name) it needs.
_EKU_FOR: dict[str, tuple[x509.ObjectIdentifier, str]] = {
    "client": (ExtendedKeyUsageOID.CLIENT_AUTH, "clientAuth"),
    "server": (ExtendedKeyUsageOID.SERVER_AUTH, "serverAuth"),
}


class X509SvidError(ValueError):
    """Not an acceptable X509-SVID; the message names the rule that was broken."""


@dataclass(frozen=True)
class X509Svid:
    """A verified X509-SVID. `expires_at` is the earliest notAfter of the verified chain (leaf,
    intermediates and authority), so that whoever caches the result (a TLS connection, say) stops
    trusting it as soon as any link of the chain would."""

    spiffe_id: SpiffeId
    leaf: x509.Certificate
    expires_at: datetime


def spiffe_id_of(cert: x509.Certificate) -> SpiffeId:
    """The SPIFFE ID in `cert`'s one URI SAN. Refuses none or several URI SANs (X509-SVID 2):
    choosing one of several would let an issuer slip a second identity past the auditor."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        raise X509SvidError(
            "the certificate has no URI SAN; an X509-SVID has exactly one (X509-SVID 2)"
        ) from None
    except ValueError as e:  # a malformed extension: never guess what it meant
        raise X509SvidError(f"the certificate's extensions cannot be parsed: {e}") from None
    uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    if not uris:
        raise X509SvidError(
            "the certificate has no URI SAN; an X509-SVID has exactly one (X509-SVID 2)"
        )
    if len(uris) > 1:
        raise X509SvidError(
            f"the certificate has {len(uris)} URI SANs; an X509-SVID has exactly one and "
            "validators must reject more (X509-SVID 2, 5.2)"
        )
    try:
        return SpiffeId.parse(uris[0])
    except SpiffeIdError as e:
        raise X509SvidError(
            f"the URI SAN {uris[0]!r} is not a valid SPIFFE ID: {e} (X509-SVID 2)"
        ) from None


def verify_x509_svid(
    chain: Sequence[x509.Certificate],
    authorities_for: AuthoritiesFor,
    now: datetime | None = None,
    *,
    usage: Usage = "client",
) -> X509Svid:
    """Verify `chain` (leaf first, then any intermediates the peer sent) as an X509-SVID.

    `authorities_for(trust_domain)` returns the X.509 authorities of that one trust domain (its
    bundle's `x509-svid` certificates); it is only ever asked for the trust domain of the leaf's
    own SPIFFE ID. `usage` is what the peer does on this connection: "client" (a caller, the
    default) or "server" (a service we called)."""
    if not chain:
        raise X509SvidError("the certificate chain is empty")
    if len(chain) > MAX_CHAIN_LENGTH:
        raise X509SvidError(
            f"the certificate chain has {len(chain)} certificates, more than {MAX_CHAIN_LENGTH}"
        )
    when = _utc(now)
    leaf = chain[0]
    spiffe_id = spiffe_id_of(leaf)
    if not spiffe_id.path:
        raise X509SvidError(
            f"{spiffe_id} is a bare trust domain, not a workload: a leaf SVID's SPIFFE ID must "
            "have a non-root path (X509-SVID 3.1, 5.2)"
        )
    try:
        _check_leaf(leaf, usage)
    except X509SvidError:
        raise
    except ValueError as e:  # cryptography's parse error for a malformed extension
        raise X509SvidError(f"the leaf's extensions cannot be parsed: {e}") from None
    # Path validation checks validity too; checking the leaf first gives the precise reason.
    problem = _validity_problem(leaf, when)
    if problem:
        raise X509SvidError(f"the leaf {problem}")
    verified = _verify_path(list(chain), spiffe_id.trust_domain, authorities_for, when, usage)
    return X509Svid(
        spiffe_id=spiffe_id,
        leaf=leaf,
        expires_at=min(c.not_valid_after_utc for c in verified),
    )


def authorities_in(bundles: BundleSet) -> AuthoritiesFor:
    """`authorities_for` over a bundle set: each trust domain's own bundle, nothing else."""

    def authorities_for(trust_domain: str) -> Sequence[x509.Certificate]:
        bundle = bundles.get(trust_domain)
        return bundle.x509_authorities if bundle is not None else ()

    return authorities_for


def _utc(now: datetime | None) -> datetime:
    if now is None:
        return datetime.now(UTC)
    # A naive time is taken as UTC, as cryptography does, rather than as local time.
    return now if now.tzinfo is not None else now.replace(tzinfo=UTC)


def _check_leaf(leaf: x509.Certificate, usage: Usage) -> None:
    extensions = leaf.extensions
    san = extensions.get_extension_for_class(x509.SubjectAlternativeName)
    if len(leaf.subject) == 0 and not san.critical:
        raise X509SvidError(
            "the leaf has an empty Subject, so its SAN extension must be critical "
            "(X509-SVID 3.1, RFC 5280 4.1.2.6)"
        )

    try:
        basic = extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        raise X509SvidError(
            "the leaf has no basicConstraints extension; a leaf SVID must set cA to false "
            "(X509-SVID 4.1)"
        ) from None
    if basic.ca:
        raise X509SvidError(
            "the leaf is a CA certificate (basicConstraints cA=true); signing certificates "
            "must not be used for authentication (X509-SVID 3.2, 4.1, 5.2)"
        )

    try:
        key_usage_ext = extensions.get_extension_for_class(x509.KeyUsage)
    except x509.ExtensionNotFound:
        raise X509SvidError(
            "the leaf has no key usage extension; it must be set on every SVID (X509-SVID 4.3)"
        ) from None
    if not key_usage_ext.critical:
        raise X509SvidError("the leaf's key usage extension must be critical (X509-SVID 4.3)")
    key_usage = key_usage_ext.value
    if key_usage.key_cert_sign:
        raise X509SvidError("the leaf's key usage has keyCertSign (X509-SVID 4.3, 5.2)")
    if key_usage.crl_sign:
        raise X509SvidError("the leaf's key usage has cRLSign (X509-SVID 4.3, 5.2)")
    if not key_usage.digital_signature:
        raise X509SvidError(
            "the leaf's key usage lacks digitalSignature, which a leaf SVID must set "
            "(X509-SVID 4.3)"
        )

    try:
        eku = extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        return  # absent means any purpose (RFC 5280 4.2.1.12); X509-SVID 4.4 only says SHOULD
    wanted, name = _EKU_FOR[usage]
    if wanted not in eku:
        raise X509SvidError(
            f"the leaf's extended key usage does not allow {name}, which a {usage} needs "
            "(X509-SVID 4.4)"
        )


def _validity_problem(cert: x509.Certificate, when: datetime) -> str | None:
    if when < cert.not_valid_before_utc:
        return f"is not yet valid: valid from {cert.not_valid_before_utc.isoformat()}"
    if when > cert.not_valid_after_utc:
        return f"expired at {cert.not_valid_after_utc.isoformat()}"
    return None


def _validity_hints(
    intermediates: Sequence[x509.Certificate],
    authorities: Sequence[x509.Certificate],
    when: datetime,
) -> str:
    # Said only once path validation has failed: a peer may send certificates that the path
    # does not need, and a stale one of those is no reason to refuse it.
    hints = [
        f"; certificate {i} of the chain {problem}"
        for i, cert in enumerate(intermediates, start=1)
        if (problem := _validity_problem(cert, when))
    ]
    hints += [
        f"; an authority of the trust domain ({cert.subject.rfc4514_string()}) {problem}"
        for cert in authorities
        if (problem := _validity_problem(cert, when))
    ]
    return "".join(hints)


def _verify_path(
    chain: list[x509.Certificate],
    trust_domain: str,
    authorities_for: AuthoritiesFor,
    when: datetime,
    usage: Usage,
) -> list[x509.Certificate]:
    try:
        authorities = list(authorities_for(trust_domain))
    except LookupError:  # e.g. a bundle set without this trust domain
        authorities = []
    if not authorities:
        raise X509SvidError(
            f"no X.509 authorities are known for trust domain {trust_domain!r}; a peer is only "
            "checked against its own trust domain's bundle"
        )
    ca_policy, ee_policy = _extension_policies(usage)
    verifier = (
        PolicyBuilder()
        .store(Store(authorities))
        .time(when)
        .extension_policies(ca_policy=ca_policy, ee_policy=ee_policy)
        .build_client_verifier()
    )
    try:
        return list(verifier.verify(chain[0], chain[1:]).chain)
    except VerificationError as e:
        raise X509SvidError(
            f"the chain does not verify up to an X.509 authority of trust domain "
            f"{trust_domain!r} (X509-SVID 5.1): {e}"
            f"{_validity_hints(chain[1:], authorities, when)}"
        ) from None


@cache  # two usages, two pairs of immutable policies: build them once
def _extension_policies(usage: Usage) -> tuple[ExtensionPolicy, ExtensionPolicy]:
    """The web-PKI profile, relaxed where SPIFFE departs from the CA/Browser Forum:
    - a leaf's EKU MAY be critical (X509-SVID 4.4) and is checked by `_check_leaf` for the
      usage asked for, where cryptography's client verifier would always want clientAuth;
    - a leaf without an authorityKeyIdentifier is still a valid RFC 5280 path (the identifier
      only helps path building);
    - a CA's EKU, when present, must allow the usage asked for (or anyExtendedKeyUsage): the
      conservative reading of X509-SVID 4.4, which notes that implementations differ here.
    Everything else (basicConstraints, pathLenConstraint, keyCertSign on CAs, name constraints,
    unknown critical extensions, signature algorithms) stays as cryptography checks it."""
    wanted, name = _EKU_FOR[usage]
    allowed = {wanted, ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE}

    def ca_eku(_policy: Policy, _cert: x509.Certificate, ext: x509.ExtendedKeyUsage | None) -> None:
        if ext is not None and not allowed.intersection(ext):
            raise ValueError(f"a CA's extended key usage does not allow {name}")

    ca_policy = ExtensionPolicy.webpki_defaults_ca().may_be_present(
        x509.ExtendedKeyUsage, Criticality.AGNOSTIC, ca_eku
    )
    ee_policy = (
        ExtensionPolicy.webpki_defaults_ee()
        .may_be_present(x509.ExtendedKeyUsage, Criticality.AGNOSTIC, None)
        .may_be_present(x509.AuthorityKeyIdentifier, Criticality.NON_CRITICAL, None)
    )
    return ca_policy, ee_policy
