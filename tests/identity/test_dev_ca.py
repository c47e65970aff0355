"""The development CA: its files, what it issues, and an mTLS handshake with its certificates."""

from __future__ import annotations

import asyncio
import base64
import json
import ssl
import stat
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID
from joserfc import jwt
from joserfc.jwk import ECKey

from identity.bundle import BundleSet, TrustBundle
from identity.dev_ca import (
    BUNDLE_JSON_FILE,
    BUNDLE_PEM_FILE,
    CA_CERT_FILE,
    CA_KEY_FILE,
    JWT_KEY_FILE,
    DevCA,
    DevCAError,
    write_x509_svid,
)
from identity.jwt_svid import verify_jwt_svid
from identity.spiffe_id import SpiffeId
from identity.x509_svid import X509SvidError, authorities_in, verify_x509_svid

TD = "example.org"
ALICE = "spiffe://example.org/ide/alice"


@pytest.fixture(scope="module")
def ca_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("ca") / "identity"
    DevCA.create(directory, TD)
    return directory


@pytest.fixture(scope="module")
def ca(ca_dir: Path) -> DevCA:
    return DevCA.load(ca_dir)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# -- creating and loading -------------------------------------------------------------------


def test_create_then_load_round_trip(tmp_path: Path) -> None:
    created = DevCA.create(tmp_path / "ca", TD)
    loaded = DevCA.load(tmp_path / "ca")
    assert loaded.trust_domain == created.trust_domain == TD
    assert loaded.ca_certificate == created.ca_certificate
    assert loaded.jwt_kid == created.jwt_kid
    assert loaded.jwt_public_key == created.jwt_public_key
    assert loaded.sequence == 1
    assert loaded.bundle() == created.bundle()


def test_files_and_modes(ca_dir: Path) -> None:
    assert mode(ca_dir) == 0o700
    assert mode(ca_dir / CA_KEY_FILE) == 0o600
    assert mode(ca_dir / JWT_KEY_FILE) == 0o600
    for public in (CA_CERT_FILE, BUNDLE_JSON_FILE, BUNDLE_PEM_FILE):
        assert mode(ca_dir / public) == 0o644, public
    # No temporary file is left behind by the atomic writes.
    assert sorted(p.name for p in ca_dir.iterdir()) == sorted(
        [CA_CERT_FILE, CA_KEY_FILE, JWT_KEY_FILE, BUNDLE_JSON_FILE, BUNDLE_PEM_FILE]
    )


def test_create_refuses_to_replace_a_ca(ca_dir: Path) -> None:
    before = (ca_dir / CA_KEY_FILE).read_bytes()
    with pytest.raises(FileExistsError):
        DevCA.create(ca_dir, TD)
    assert (ca_dir / CA_KEY_FILE).read_bytes() == before


def test_create_refuses_a_bad_trust_domain(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="lowercase"):
        DevCA.create(tmp_path / "ca", "Example.org")


def test_load_refuses_a_key_that_is_not_the_cas(tmp_path: Path, ca_dir: Path) -> None:
    other = tmp_path / "other"
    DevCA.create(other, TD)
    (other / CA_KEY_FILE).write_bytes((ca_dir / CA_KEY_FILE).read_bytes())
    with pytest.raises(DevCAError, match="is not the key of"):
        DevCA.load(other)


def test_repr_shows_no_key(ca: DevCA) -> None:
    text = repr(ca)
    assert "example.org" in text and "PRIVATE" not in text and "_key" not in text


def test_ca_certificate(ca: DevCA) -> None:
    cert = ca.ca_certificate
    basic = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert basic.critical and basic.value.ca and basic.value.path_length == 0
    usage = cert.extensions.get_extension_for_class(x509.KeyUsage)
    assert usage.critical and usage.value.key_cert_sign and not usage.value.digital_signature
    cert.verify_directly_issued_by(cert)  # self-signed
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == ["spiffe://example.org"]
    assert isinstance(cert.public_key(), type(ca.jwt_public_key))  # both EC P-256
    assert ca.jwt_public_key.curve.name == "secp256r1"


# -- the bundle files -----------------------------------------------------------------------


def test_spiffe_bundle_file(ca: DevCA, ca_dir: Path) -> None:
    doc = json.loads((ca_dir / BUNDLE_JSON_FILE).read_text())
    assert doc["spiffe_sequence"] == 1
    assert isinstance(doc["spiffe_refresh_hint"], int)
    by_use = {entry["use"]: entry for entry in doc["keys"]}
    assert sorted(by_use) == ["jwt-svid", "x509-svid"] and len(doc["keys"]) == 2

    x509_entry = by_use["x509-svid"]
    assert "kid" not in x509_entry  # X509-SVID 6.1: MUST NOT be set
    assert len(x509_entry["x5c"]) == 1
    der = base64.b64decode(x509_entry["x5c"][0], validate=True)
    assert x509.load_der_x509_certificate(der) == ca.ca_certificate
    assert x509_entry["kty"] == "EC" and x509_entry["crv"] == "P-256"

    jwt_entry = by_use["jwt-svid"]
    assert jwt_entry["kid"] == ca.jwt_kid
    assert "d" not in jwt_entry and "d" not in x509_entry  # public keys only
    members = {k: v for k, v in jwt_entry.items() if k not in ("use", "kid")}
    assert ECKey.import_key(members).as_dict() == ECKey.import_key(ca.jwt_public_key).as_dict()

    # The bundle parser reads it back: one authority, one JWT key.
    bundle = TrustBundle.load(TD, ca_dir / BUNDLE_JSON_FILE)
    assert list(bundle.x509_authorities) == [ca.ca_certificate]
    assert list(bundle.jwt_authorities) == [ca.jwt_kid]
    assert bundle.sequence == 1


def test_pem_bundle_file(ca: DevCA, ca_dir: Path) -> None:
    certs = x509.load_pem_x509_certificates((ca_dir / BUNDLE_PEM_FILE).read_bytes())
    assert certs == [ca.ca_certificate]
    assert list(TrustBundle.load(TD, ca_dir / BUNDLE_PEM_FILE).x509_authorities) == certs


# -- X509-SVIDs -----------------------------------------------------------------------------


def test_issued_x509_svid_verifies(ca: DevCA, ca_dir: Path) -> None:
    cert, key = ca.issue_x509_svid(ALICE, timedelta(hours=1))
    assert cert.public_key() == key.public_key()
    bundles = BundleSet([TrustBundle.load(TD, ca_dir / BUNDLE_JSON_FILE)])
    for usage in ("client", "server"):
        svid = verify_x509_svid([cert], authorities_in(bundles), usage=usage)
        assert svid.spiffe_id == SpiffeId.parse(ALICE)
        assert svid.expires_at == cert.not_valid_after_utc
    assert cert.not_valid_after_utc - cert.not_valid_before_utc <= timedelta(hours=1, seconds=30)
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.CLIENT_AUTH, ExtendedKeyUsageOID.SERVER_AUTH}
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca


def test_server_certificate_names(ca: DevCA) -> None:
    cert, _ = ca.issue_x509_svid(
        "spiffe://example.org/gateway",
        timedelta(hours=1),
        server_names=["localhost", "127.0.0.1"],
        for_server=True,
    )
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [
        "spiffe://example.org/gateway"
    ]
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    svid = verify_x509_svid([cert], ca.authorities_for, usage="server")
    assert str(svid.spiffe_id) == "spiffe://example.org/gateway"


def test_issue_refusals(ca: DevCA) -> None:
    hour = timedelta(hours=1)
    with pytest.raises(DevCAError, match="only for trust domain 'example.org'"):
        ca.issue_x509_svid("spiffe://other.org/x", hour)
    with pytest.raises(DevCAError, match="bare trust domain"):
        ca.issue_x509_svid("spiffe://example.org", hour)
    with pytest.raises(ValueError, match="does not start with 'spiffe://'"):
        ca.issue_x509_svid("https://example.org/x", hour)
    with pytest.raises(DevCAError, match="at least one DNS name"):
        ca.issue_x509_svid("spiffe://example.org/gw", hour, for_server=True)
    with pytest.raises(DevCAError, match="must be positive"):
        ca.issue_x509_svid(ALICE, timedelta(0))
    with pytest.raises(DevCAError, match="only for trust domain"):
        ca.issue_jwt_svid("spiffe://other.org/x", "duragate", hour)
    with pytest.raises(DevCAError, match="audience"):
        ca.issue_jwt_svid(ALICE, [], hour)


def test_an_svid_never_outlives_its_ca(ca: DevCA) -> None:
    cert, _ = ca.issue_x509_svid(ALICE, timedelta(days=10_000))
    assert cert.not_valid_after_utc == ca.ca_certificate.not_valid_after_utc
    with pytest.raises(DevCAError, match="the CA expired"):
        ca.issue_x509_svid(ALICE, timedelta(hours=1), now=datetime(2300, 1, 1, tzinfo=UTC))


def test_svids_of_another_dev_ca_are_refused(ca: DevCA, tmp_path: Path) -> None:
    # Another CA for the same trust domain name (e.g. someone else's laptop) is not ours.
    impostor = DevCA.create(tmp_path / "impostor", TD)
    cert, _ = impostor.issue_x509_svid(ALICE, timedelta(hours=1))
    with pytest.raises(X509SvidError, match="does not verify up to an X.509 authority"):
        verify_x509_svid([cert], ca.authorities_for)


def test_write_x509_svid(ca: DevCA, tmp_path: Path) -> None:
    cert, key = ca.issue_x509_svid(ALICE, timedelta(hours=1))
    write_x509_svid(tmp_path / "alice.pem", tmp_path / "alice.key", cert, key)
    assert mode(tmp_path / "alice.key") == 0o600
    assert mode(tmp_path / "alice.pem") == 0o644
    assert x509.load_pem_x509_certificates((tmp_path / "alice.pem").read_bytes()) == [cert]
    loaded = serialization.load_pem_private_key((tmp_path / "alice.key").read_bytes(), None)
    assert loaded.public_key() == key.public_key()
    # Rewriting (rotation) replaces the files and keeps the key private.
    cert2, key2 = ca.issue_x509_svid(ALICE, timedelta(hours=1))
    (tmp_path / "alice.key").chmod(0o644)
    write_x509_svid(tmp_path / "alice.pem", tmp_path / "alice.key", cert2, key2)
    assert mode(tmp_path / "alice.key") == 0o600
    assert x509.load_pem_x509_certificates((tmp_path / "alice.pem").read_bytes()) == [cert2]


# -- JWT-SVIDs ------------------------------------------------------------------------------


def test_issued_jwt_svid(ca: DevCA, ca_dir: Path) -> None:
    now = datetime.now(UTC).replace(microsecond=0)
    token = ca.issue_jwt_svid(ALICE, "duragate", timedelta(minutes=5), now=now)

    # With joserfc alone and the bundle file's jwt-svid key...
    entry = next(
        e
        for e in json.loads((ca_dir / BUNDLE_JSON_FILE).read_text())["keys"]
        if e["use"] == "jwt-svid"
    )
    public = ECKey.import_key({k: v for k, v in entry.items() if k != "use"})
    decoded = jwt.decode(token, public, algorithms=["ES256"])
    assert decoded.header == {"alg": "ES256", "kid": ca.jwt_kid, "typ": "JWT"}
    claims = decoded.claims
    assert claims["sub"] == ALICE and claims["aud"] == ["duragate"]
    assert claims["iat"] == int(now.timestamp())
    assert claims["exp"] - claims["iat"] == 300

    # ...and with the gateway's JWT-SVID verifier over the bundle file.
    bundles = BundleSet([TrustBundle.load(TD, ca_dir / BUNDLE_JSON_FILE)])
    svid = verify_jwt_svid(token, bundles, "duragate", now=now.timestamp())
    assert svid.spiffe_id == SpiffeId.parse(ALICE) and svid.key_id == ca.jwt_kid


def test_jwt_svid_with_several_audiences(ca: DevCA) -> None:
    token = ca.issue_jwt_svid(ALICE, ["a", "b"], timedelta(minutes=1))
    bundles = BundleSet([ca.trust_bundle()])
    assert verify_jwt_svid(token, bundles, "b").audience == ["a", "b"]


# -- real TLS -------------------------------------------------------------------------------


async def test_mutual_tls_with_dev_ca_certificates(ca: DevCA, ca_dir: Path, tmp_path: Path) -> None:
    server_cert, server_key = ca.issue_x509_svid(
        "spiffe://example.org/gateway",
        timedelta(hours=1),
        server_names=["localhost", "127.0.0.1"],
        for_server=True,
    )
    client_cert, client_key = ca.issue_x509_svid(ALICE, timedelta(hours=1))
    write_x509_svid(tmp_path / "server.pem", tmp_path / "server.key", server_cert, server_key)
    write_x509_svid(tmp_path / "client.pem", tmp_path / "client.key", client_cert, client_key)
    ca_file = str(ca_dir / BUNDLE_PEM_FILE)

    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(tmp_path / "server.pem", tmp_path / "server.key")
    server_ctx.verify_mode = ssl.CERT_REQUIRED  # client certificates required
    server_ctx.load_verify_locations(cafile=ca_file)

    client_ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca_file)
    client_ctx.load_cert_chain(tmp_path / "client.pem", tmp_path / "client.key")

    seen: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        ssl_object = writer.get_extra_info("ssl_object")
        seen.set_result(ssl_object.getpeercert(binary_form=True))
        writer.write(b"hello " + (await reader.readline()))
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=server_ctx)
    port = server.sockets[0].getsockname()[1]
    try:
        async with asyncio.timeout(5):
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", port, ssl=client_ctx, server_hostname="localhost"
            )
            writer.write(b"alice\n")
            assert await reader.readline() == b"hello alice\n"
            server_der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
            writer.close()
            client_der = await seen
    finally:
        server.close()
        await server.wait_closed()

    # The app re-checks the peer against its own trust domain's bundle.
    bundles = BundleSet([TrustBundle.load(TD, ca_dir / BUNDLE_JSON_FILE)])
    caller = verify_x509_svid([x509.load_der_x509_certificate(client_der)], authorities_in(bundles))
    assert str(caller.spiffe_id) == ALICE
    gateway = verify_x509_svid(
        [x509.load_der_x509_certificate(server_der)], authorities_in(bundles), usage="server"
    )
    assert str(gateway.spiffe_id) == "spiffe://example.org/gateway"
