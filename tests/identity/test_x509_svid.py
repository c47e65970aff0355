"""X509-SVID verification: each attack from the issue is tried and refused for the right reason."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from identity.spiffe_id import SpiffeId
from identity.x509_svid import Usage, X509SvidError, spiffe_id_of, verify_x509_svid

NOW = datetime(2030, 1, 1, tzinfo=UTC)
CLIENT = ExtendedKeyUsageOID.CLIENT_AUTH
SERVER = ExtendedKeyUsageOID.SERVER_AUTH


@dataclass(frozen=True)
class Issuer:
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey


def _key_usage(
    *, digital_signature: bool = False, cert_sign: bool = False, crl_sign: bool = False
) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=digital_signature,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=cert_sign,
        crl_sign=crl_sign,
        encipher_only=False,
        decipher_only=False,
    )


def make_ca(
    trust_domain: str,
    *,
    parent: Issuer | None = None,
    path_length: int | None = 0,
    not_after: datetime = NOW + timedelta(days=30),
    eku: Sequence[x509.ObjectIdentifier] | None = None,
) -> Issuer:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, trust_domain),
            x509.NameAttribute(NameOID.COMMON_NAME, "intermediate" if parent else "root"),
        ]
    )
    signer = parent.key if parent else key
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(parent.cert.subject if parent else name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - timedelta(days=1))
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
        .add_extension(_key_usage(cert_sign=True, crl_sign=True), critical=True)
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.UniformResourceIdentifier(f"spiffe://{trust_domain}")]
            ),
            critical=False,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
    )
    if parent:
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(parent.key.public_key()), False
        )
    if eku is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage(list(eku)), critical=False)
    return Issuer(builder.sign(signer, hashes.SHA256()), key)


def make_leaf(
    issuer: Issuer,
    uris: Sequence[str] = ("spiffe://local.org/workload",),
    *,
    dns: Sequence[str] = (),
    ca: bool | None = False,
    key_usage: x509.KeyUsage | None = None,
    key_usage_critical: bool = True,
    eku: Sequence[x509.ObjectIdentifier] | None = (CLIENT, SERVER),
    not_before: datetime = NOW - timedelta(minutes=5),
    not_after: datetime = NOW + timedelta(hours=1),
    empty_subject: bool = False,
    san_critical: bool | None = None,
) -> x509.Certificate:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = [] if empty_subject else [x509.NameAttribute(NameOID.COMMON_NAME, "workload")]
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name(subject))
        .issuer_name(issuer.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.key.public_key()), False
        )
    )
    names: list[x509.GeneralName] = [x509.UniformResourceIdentifier(u) for u in uris]
    names += [x509.DNSName(d) for d in dns]
    if names:
        critical = empty_subject if san_critical is None else san_critical
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=critical)
    if ca is not None:
        builder = builder.add_extension(
            x509.BasicConstraints(ca=ca, path_length=None), critical=True
        )
    usage = key_usage if key_usage is not None else _key_usage(digital_signature=True)
    builder = builder.add_extension(usage, critical=key_usage_critical)
    if eku is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage(list(eku)), critical=False)
    return builder.sign(issuer.key, hashes.SHA256())


@pytest.fixture(scope="module")
def local() -> Issuer:
    return make_ca("local.org")


@pytest.fixture(scope="module")
def federated() -> Issuer:
    return make_ca("fed.org")


@pytest.fixture(scope="module")
def bundles(local: Issuer, federated: Issuer) -> dict[str, list[x509.Certificate]]:
    # One bundle per trust domain, never merged, as a BundleSet keeps them.
    return {"local.org": [local.cert], "fed.org": [federated.cert]}


def refused(
    chain: list[x509.Certificate],
    bundles: dict[str, list[x509.Certificate]],
    *,
    usage: Usage = "client",
) -> str:
    with pytest.raises(X509SvidError) as caught:
        verify_x509_svid(chain, bundles.__getitem__, NOW, usage=usage)
    return str(caught.value)


# -- happy paths ----------------------------------------------------------------------------


def test_leaf_signed_by_the_trust_domains_ca(local: Issuer, bundles: dict) -> None:
    leaf = make_leaf(local)
    svid = verify_x509_svid([leaf], bundles.__getitem__, NOW)
    assert svid.spiffe_id == SpiffeId("local.org", "/workload")
    assert svid.leaf is leaf
    assert svid.expires_at == leaf.not_valid_after_utc


def test_leaf_under_an_intermediate(bundles: dict) -> None:
    root = make_ca("inter.org", path_length=1)
    intermediate = make_ca("inter.org", parent=root, not_after=NOW + timedelta(minutes=30))
    leaf = make_leaf(intermediate, ["spiffe://inter.org/ns/prod/sa/api"])
    authorities = {**bundles, "inter.org": [root.cert]}
    svid = verify_x509_svid([leaf, intermediate.cert], authorities.__getitem__, NOW)
    assert str(svid.spiffe_id) == "spiffe://inter.org/ns/prod/sa/api"
    # The intermediate expires before the leaf: the chain is only as good as its weakest link.
    assert svid.expires_at == intermediate.cert.not_valid_after_utc
    # Without the intermediate the path cannot be built.
    assert "does not verify up to an X.509 authority" in refused([leaf], authorities)


def test_empty_subject_with_a_critical_uri_san_is_fine(local: Issuer, bundles: dict) -> None:
    leaf = make_leaf(local, empty_subject=True)
    assert verify_x509_svid([leaf], bundles.__getitem__, NOW).spiffe_id.path == "/workload"


def test_a_leaf_without_extended_key_usage_serves_either_side(local: Issuer, bundles: dict) -> None:
    leaf = make_leaf(local, eku=None)
    for usage in ("client", "server"):
        verify_x509_svid([leaf], bundles.__getitem__, NOW, usage=usage)


def test_naive_now_is_utc(local: Issuer, bundles: dict) -> None:
    leaf = make_leaf(local)
    verify_x509_svid([leaf], bundles.__getitem__, NOW.replace(tzinfo=None))


def test_spiffe_id_of(local: Issuer) -> None:
    assert spiffe_id_of(make_leaf(local)) == SpiffeId.parse("spiffe://local.org/workload")
    assert spiffe_id_of(local.cert) == SpiffeId("local.org")


# -- the URI SAN ----------------------------------------------------------------------------


def test_no_uri_san(local: Issuer, bundles: dict) -> None:
    no_san = make_leaf(local, uris=())
    assert "has no URI SAN" in refused([no_san], bundles)
    dns_only = make_leaf(local, uris=(), dns=["workload.local.org"])
    assert "has no URI SAN" in refused([dns_only], bundles)


def test_two_uri_sans(local: Issuer, bundles: dict) -> None:
    leaf = make_leaf(local, uris=["spiffe://local.org/a", "spiffe://local.org/admin"])
    assert "has 2 URI SANs; an X509-SVID has exactly one" in refused([leaf], bundles)
    mixed = make_leaf(local, uris=["spiffe://local.org/a", "https://local.org/a"])
    assert "has 2 URI SANs" in refused([mixed], bundles)


def test_uri_san_that_is_not_a_spiffe_id(local: Issuer, bundles: dict) -> None:
    for uri in ("https://local.org/workload", "spiffe://Local.org/w", "spiffe://local.org/a/"):
        message = refused([make_leaf(local, uris=[uri])], bundles)
        assert "is not a valid SPIFFE ID" in message, uri


def test_bare_trust_domain_is_not_a_workload(local: Issuer, bundles: dict) -> None:
    leaf = make_leaf(local, uris=["spiffe://local.org"])
    assert "bare trust domain, not a workload" in refused([leaf], bundles)


def test_empty_subject_needs_a_critical_san(local: Issuer, bundles: dict) -> None:
    leaf = make_leaf(local, empty_subject=True, san_critical=False)
    assert "SAN extension must be critical" in refused([leaf], bundles)


# -- a CA as leaf ---------------------------------------------------------------------------


def test_ca_certificate_presented_as_leaf(local: Issuer, bundles: dict) -> None:
    # A signing certificate with a workload's ID in it, issued by the trust domain's own CA.
    rogue_ca = make_leaf(local, ca=True, key_usage=_key_usage(digital_signature=True))
    assert "the leaf is a CA certificate (basicConstraints cA=true)" in refused([rogue_ca], bundles)
    # The trust domain's CA itself: its ID is the bare trust domain.
    assert "bare trust domain" in refused([local.cert], bundles)
    # An intermediate with a workload path, signed by the root.
    root = make_ca("local.org", path_length=1)
    sub = make_ca("local.org", parent=root)
    assert "bare trust domain" in refused([sub.cert, root.cert], {"local.org": [root.cert]})


def test_leaf_without_basic_constraints(local: Issuer, bundles: dict) -> None:
    leaf = make_leaf(local, ca=None)
    assert "no basicConstraints extension" in refused([leaf], bundles)


# -- key usage ------------------------------------------------------------------------------


def test_key_cert_sign_on_a_leaf(local: Issuer, bundles: dict) -> None:
    leaf = make_leaf(local, key_usage=_key_usage(digital_signature=True, cert_sign=True))
    assert "key usage has keyCertSign" in refused([leaf], bundles)


def test_crl_sign_on_a_leaf(local: Issuer, bundles: dict) -> None:
    leaf = make_leaf(local, key_usage=_key_usage(digital_signature=True, crl_sign=True))
    assert "key usage has cRLSign" in refused([leaf], bundles)


def test_missing_digital_signature(local: Issuer, bundles: dict) -> None:
    no_signature = x509.KeyUsage(
        digital_signature=False,
        content_commitment=False,
        key_encipherment=True,
        data_encipherment=False,
        key_agreement=True,
        key_cert_sign=False,
        crl_sign=False,
        encipher_only=False,
        decipher_only=False,
    )
    leaf = make_leaf(local, key_usage=no_signature)
    assert "lacks digitalSignature" in refused([leaf], bundles)


def test_key_usage_not_critical(local: Issuer, bundles: dict) -> None:
    not_critical = make_leaf(local, key_usage_critical=False)
    assert "key usage extension must be critical" in refused([not_critical], bundles)


def test_no_key_usage_at_all(local: Issuer, bundles: dict) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "w")]))
        .issuer_name(local.cert.subject)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(NOW - timedelta(minutes=1))
        .not_valid_after(NOW + timedelta(minutes=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier("spiffe://local.org/w")]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(local.key, hashes.SHA256())
    )
    assert "no key usage extension" in refused([leaf], bundles)


# -- extended key usage ---------------------------------------------------------------------


def test_server_auth_only_when_client_auth_is_required(local: Issuer, bundles: dict) -> None:
    server_only = make_leaf(local, eku=[SERVER])
    assert "does not allow clientAuth" in refused([server_only], bundles)
    # The same certificate is fine for a server we called.
    verify_x509_svid([server_only], bundles.__getitem__, NOW, usage="server")


def test_client_auth_only_when_server_auth_is_required(local: Issuer, bundles: dict) -> None:
    client_only = make_leaf(local, eku=[CLIENT])
    assert "does not allow serverAuth" in refused([client_only], bundles, usage="server")
    verify_x509_svid([client_only], bundles.__getitem__, NOW, usage="client")


def test_a_ca_restricted_to_server_auth_cannot_vouch_for_a_client() -> None:
    root = make_ca("eku.org", path_length=1)
    server_ca = make_ca("eku.org", parent=root, eku=[SERVER])
    leaf = make_leaf(server_ca, ["spiffe://eku.org/w"])
    authorities = {"eku.org": [root.cert]}
    message = refused([leaf, server_ca.cert], authorities)
    assert "extended key usage does not allow clientAuth" in message
    verify_x509_svid([leaf, server_ca.cert], authorities.__getitem__, NOW, usage="server")


# -- trust domains --------------------------------------------------------------------------


def test_federated_ca_claiming_the_local_trust_domain(
    federated: Issuer, bundles: dict, local: Issuer
) -> None:
    # fed.org's CA is trusted, but only for fed.org: it cannot mint local.org identities.
    forged = make_leaf(federated, ["spiffe://local.org/admin"])
    message = refused([forged], bundles)
    assert "does not verify up to an X.509 authority of trust domain 'local.org'" in message
    # Presenting fed.org's CA as an intermediate does not help either.
    assert "trust domain 'local.org'" in refused([forged, federated.cert], bundles)
    # The same CA is accepted for its own trust domain...
    own = make_leaf(federated, ["spiffe://fed.org/billing"])
    assert verify_x509_svid([own], bundles.__getitem__, NOW).spiffe_id.trust_domain == "fed.org"
    # ...and the local CA cannot mint fed.org identities.
    assert "trust domain 'fed.org'" in refused([make_leaf(local, ["spiffe://fed.org/x"])], bundles)


def test_only_the_ids_own_trust_domain_is_asked_for(local: Issuer) -> None:
    asked: list[str] = []

    def authorities_for(trust_domain: str) -> list[x509.Certificate]:
        asked.append(trust_domain)
        return [local.cert]

    verify_x509_svid([make_leaf(local)], authorities_for, NOW)
    assert asked == ["local.org"]


def test_unknown_trust_domain(local: Issuer, bundles: dict) -> None:
    leaf = make_leaf(local, ["spiffe://unknown.org/w"])
    assert "no X.509 authorities are known for trust domain 'unknown.org'" in refused(
        [leaf], bundles
    )
    with pytest.raises(X509SvidError, match="no X.509 authorities"):
        verify_x509_svid([leaf], lambda _td: [], NOW)


def test_self_signed_leaf(bundles: dict) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "local.org")])
    myself = Issuer(
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(NOW)
        .not_valid_after(NOW + timedelta(days=1))
        .sign(key, hashes.SHA256()),
        key,
    )
    leaf = make_leaf(myself)
    assert "does not verify up to an X.509 authority" in refused([leaf], bundles)


# -- validity -------------------------------------------------------------------------------


def test_expired(local: Issuer, bundles: dict) -> None:
    leaf = make_leaf(local, not_after=NOW - timedelta(seconds=1))
    assert "the leaf expired at" in refused([leaf], bundles)


def test_not_yet_valid(local: Issuer, bundles: dict) -> None:
    leaf = make_leaf(local, not_before=NOW + timedelta(minutes=1))
    assert "the leaf is not yet valid" in refused([leaf], bundles)


def test_expired_intermediate() -> None:
    root = make_ca("inter.org", path_length=1)
    old = make_ca("inter.org", parent=root, not_after=NOW - timedelta(seconds=1))
    leaf = make_leaf(old, ["spiffe://inter.org/w"])
    assert "certificate 1 of the chain expired" in refused(
        [leaf, old.cert], {"inter.org": [root.cert]}
    )


def test_expired_authority() -> None:
    root = make_ca("old.org", not_after=NOW - timedelta(seconds=1))
    leaf = make_leaf(root, ["spiffe://old.org/w"])
    message = refused([leaf], {"old.org": [root.cert]})
    assert "does not verify" in message and "an authority of the trust domain" in message
    assert "expired at" in message


def test_an_unneeded_stale_certificate_in_the_chain_is_ignored(
    local: Issuer, bundles: dict
) -> None:
    stale = make_ca("local.org", not_after=NOW - timedelta(days=1))
    svid = verify_x509_svid([make_leaf(local), stale.cert], bundles.__getitem__, NOW)
    assert svid.spiffe_id.path == "/workload"


def test_path_length_constraint_is_enforced() -> None:
    root = make_ca("len.org", path_length=0)  # may sign leaves only
    sub = make_ca("len.org", parent=root)
    leaf = make_leaf(sub, ["spiffe://len.org/w"])
    assert "does not verify" in refused([leaf, sub.cert], {"len.org": [root.cert]})


def test_empty_or_overlong_chain(local: Issuer, bundles: dict) -> None:
    assert "chain is empty" in refused([], bundles)
    assert "more than 16" in refused([make_leaf(local)] + [local.cert] * 16, bundles)


def test_unknown_critical_extension_on_the_leaf(local: Issuer, bundles: dict) -> None:
    # RFC 5280 4.2: an extension marked critical that the validator does not know is refused.
    key = ec.generate_private_key(ec.SECP256R1())
    unknown = x509.UnrecognizedExtension(x509.ObjectIdentifier("1.3.6.1.4.1.99999.1"), b"\x05\x00")
    leaf = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "w")]))
        .issuer_name(local.cert.subject)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(NOW - timedelta(minutes=1))
        .not_valid_after(NOW + timedelta(minutes=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier("spiffe://local.org/w")]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(digital_signature=True), critical=True)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(local.key.public_key()), False
        )
        .add_extension(unknown, critical=True)
        .sign(local.key, hashes.SHA256())
    )
    assert "unaccounted-for critical extensions" in refused([leaf], bundles)
