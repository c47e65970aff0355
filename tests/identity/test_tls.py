"""mTLS in the app and the server's TLS context: a client certificate re-checked against its own
trust domain's bundle (once per connection), certificate plus bearer token, `listen.tls` config,
and server certificate rotation by `ServerTls` (no sockets here: see tests/gateway/test_mtls.py).
"""

from __future__ import annotations

import json
import ssl
import textwrap
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

import identity.authenticate as authenticate
from gateway.config import ConfigError, GatewayConfig, IdentityConfig, parse_config
from identity.authenticate import VIA_X509_SVID, AuthenticationError, Authenticator
from identity.dev_ca import DevCA, write_x509_svid
from identity.tls import PEER_KEY, TLS_EXTENSION, ServerTls, TlsPeer, peer_of
from tests.identity.keys import jwk_set
from tests.identity.test_x509_svid import NOW, Issuer, make_ca, make_leaf

LOCAL = "local.org"
FED = "fed.org"
ALICE = "spiffe://local.org/team-a/alice"


def der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


# -- the app-level check, with CAs of two trust domains (times in 2030) -----------------------


@pytest.fixture(scope="module")
def local() -> Issuer:
    return make_ca(LOCAL)


@pytest.fixture(scope="module")
def fed() -> Issuer:
    return make_ca(FED)


@pytest.fixture
def clock() -> Clock:
    return Clock(NOW.timestamp())


@pytest.fixture
def auth(tmp_path: Path, local: Issuer, fed: Issuer, clock: Clock) -> Authenticator:
    paths = {LOCAL: tmp_path / "local.json", FED: tmp_path / "fed.json"}
    paths[LOCAL].write_text(json.dumps(jwk_set(x509_cas=[local.cert])))
    paths[FED].write_text(json.dumps(jwk_set(x509_cas=[fed.cert])))
    config = IdentityConfig.model_validate(
        {
            "trust_domain": LOCAL,
            "bundles": {k: str(v) for k, v in paths.items()},
            "tenants": [{"match": "spiffe://local.org/team-a/**", "tenant": "team-a"}],
        }
    )
    return Authenticator(config, clock=clock)


def refusal(auth: Authenticator, peer: TlsPeer) -> str:
    with pytest.raises(AuthenticationError) as caught:
        auth.authenticate_http({}, peer)
    assert caught.value.status == 401
    return caught.value.reason


def test_a_local_svid_is_a_principal(auth: Authenticator, local: Issuer) -> None:
    principal = auth.authenticate_http({}, TlsPeer(der(make_leaf(local, [ALICE]))))
    assert (principal.id, principal.tenant, principal.via) == (ALICE, "team-a", VIA_X509_SVID)


def test_a_federated_svid_signed_by_its_own_ca(auth: Authenticator, fed: Issuer) -> None:
    # The app accepts it (the TLS layer is where only the local domain's CAs are trusted).
    principal = auth.authenticate_http({}, TlsPeer(der(make_leaf(fed, ["spiffe://fed.org/x"]))))
    assert (principal.id, principal.tenant) == ("spiffe://fed.org/x", FED)


def test_local_id_signed_by_a_federated_ca_is_refused(auth: Authenticator, fed: Issuer) -> None:
    reason = refusal(auth, TlsPeer(der(make_leaf(fed, [ALICE]))))
    assert "does not verify up to an X.509 authority of trust domain 'local.org'" in reason


def test_federated_id_signed_by_the_local_ca_is_refused(auth: Authenticator, local: Issuer) -> None:
    # What a merged CA file in the TLS layer would let through.
    reason = refusal(auth, TlsPeer(der(make_leaf(local, ["spiffe://fed.org/x"]))))
    assert "trust domain 'fed.org'" in reason


def test_expired_svid_is_refused(auth: Authenticator, local: Issuer) -> None:
    leaf = make_leaf(
        local, [ALICE], not_before=NOW - timedelta(hours=2), not_after=NOW - timedelta(hours=1)
    )
    assert "expired" in refusal(auth, TlsPeer(der(leaf)))


def test_garbage_and_non_svid_certificates(auth: Authenticator, local: Issuer) -> None:
    assert "cannot be parsed" in refusal(auth, TlsPeer(b"not a certificate"))
    assert "no URI SAN" in refusal(auth, TlsPeer(der(make_leaf(local, [], dns=["a.example"]))))


def test_checked_once_per_connection(
    auth: Authenticator, local: Issuer, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[Any] = []
    real = authenticate.verify_x509_svid

    def counting(*args: Any, **kwargs: Any) -> Any:
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(authenticate, "verify_x509_svid", counting)
    peer = TlsPeer(der(make_leaf(local, [ALICE])))
    for _ in range(5):
        auth.authenticate_http({}, peer)
    assert len(calls) == 1
    # Another connection with the same certificate is checked on its own.
    auth.authenticate_http({}, TlsPeer(peer.der))
    assert len(calls) == 2


def test_refusal_is_kept_on_the_connection_too(
    auth: Authenticator, fed: Issuer, clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    peer = TlsPeer(der(make_leaf(fed, [ALICE])))
    refusal(auth, peer)
    calls: list[Any] = []
    monkeypatch.setattr(authenticate, "verify_x509_svid", lambda *a, **k: calls.append(a))
    refusal(auth, peer)
    assert calls == []


def test_the_kept_result_ends_when_the_certificate_does(
    auth: Authenticator, local: Issuer, clock: Clock
) -> None:
    peer = TlsPeer(der(make_leaf(local, [ALICE], not_after=NOW + timedelta(minutes=1))))
    auth.authenticate_http({}, peer)
    clock.now += 120
    assert "expired" in refusal(auth, peer)


def test_a_bundle_change_checks_the_connection_again(
    auth: Authenticator, local: Issuer, tmp_path: Path, clock: Clock
) -> None:
    peer = TlsPeer(der(make_leaf(local, [ALICE])))
    auth.authenticate_http({}, peer)
    # The local CA is withdrawn from its bundle: the live connection stops working.
    (tmp_path / "local.json").write_text(json.dumps(jwk_set(x509_cas=[make_ca(LOCAL).cert])))
    clock.now += 10
    assert "does not verify" in refusal(auth, peer)


def test_a_tls_connection_without_a_certificate_falls_back(auth: Authenticator) -> None:
    reason = refusal(auth, TlsPeer(None))
    assert "present an X.509-SVID client certificate or send" in reason


def test_peer_of_scope() -> None:
    peer = TlsPeer(b"x")
    assert peer_of({"extensions": {TLS_EXTENSION: {PEER_KEY: peer}}}) is peer
    assert peer_of({"type": "http"}) is None
    assert peer_of({"extensions": {TLS_EXTENSION: {PEER_KEY: "forged"}}}) is None


# -- certificate plus bearer token, with a development CA (real time) --------------------------


@pytest.fixture(scope="module")
def dev(tmp_path_factory: pytest.TempPathFactory) -> DevCA:
    return DevCA.create(tmp_path_factory.mktemp("dev") / "ca", "example.org")


def dev_auth(ca: DevCA) -> Authenticator:
    return Authenticator(
        IdentityConfig.model_validate(
            {
                "trust_domain": "example.org",
                "bundles": {"example.org": str(ca.directory / "bundle.json")},
            }
        )
    )


def test_certificate_and_token_of_the_same_caller(dev: DevCA) -> None:
    cert, _ = dev.issue_x509_svid("spiffe://example.org/a", timedelta(minutes=5))
    token = dev.issue_jwt_svid("spiffe://example.org/a", "duragate", timedelta(minutes=5))
    principal = dev_auth(dev).authenticate_http(
        {"authorization": f"Bearer {token}"}, TlsPeer(der(cert))
    )
    assert (principal.id, principal.via) == ("spiffe://example.org/a", VIA_X509_SVID)


def test_certificate_and_token_of_another_caller_is_401(dev: DevCA) -> None:
    cert, _ = dev.issue_x509_svid("spiffe://example.org/agent", timedelta(minutes=5))
    token = dev.issue_jwt_svid("spiffe://example.org/alice", "duragate", timedelta(minutes=5))
    with pytest.raises(AuthenticationError) as caught:
        dev_auth(dev).authenticate_http({"authorization": f"Bearer {token}"}, TlsPeer(der(cert)))
    assert caught.value.status == 401
    assert "has no act claim naming it" in caught.value.reason


# -- listen.tls and ServerTls ------------------------------------------------------------------


def config(tmp_path: Path, tls: str, identity: str = "") -> GatewayConfig:
    text = f"listen:\n  tls:\n{textwrap.indent(textwrap.dedent(tls), '    ')}{identity}"
    return parse_config(text, "gateway.yaml", tmp_path)


def test_tls_config_defaults_and_unknown_keys(tmp_path: Path) -> None:
    tls = config(tmp_path, "cert: a.pem\nkey: a.key\n").listen.tls
    assert tls is not None
    assert (tls.cert, tls.client_certs, tls.ca_bundle_domain) == (
        tmp_path / "a.pem",
        "optional",
        None,
    )
    with pytest.raises(ConfigError) as caught:
        config(tmp_path, "cert: a.pem\nkey: a.key\nclient_cert: required\n")
    assert (
        "gateway.yaml:5: listen.tls.client_cert: unknown key (did you mean 'client_certs'?)"
        in str(caught.value)
    )
    with pytest.raises(ConfigError, match="client_certs"):
        config(tmp_path, "cert: a.pem\nkey: a.key\nclient_certs: sometimes\n")


def test_client_certificates_need_the_local_bundle(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="identity.trust_domain or listen.tls.ca_bundle_domain"):
        ServerTls.from_config(config(tmp_path, "cert: a.pem\nkey: a.key\n"))
    with pytest.raises(ConfigError) as caught:
        ServerTls.from_config(
            config(
                tmp_path,
                "cert: a.pem\nkey: a.key\nca_bundle_domain: example.org\n",
                "identity:\n  trust_domain: other.org\n",
            )
        )
    assert "gateway.yaml:5: listen.tls.ca_bundle_domain: no bundle for trust domain" in str(
        caught.value
    )


@pytest.fixture
def server_files(tmp_path: Path, dev: DevCA) -> Path:
    cert, key = dev.issue_x509_svid(
        "spiffe://example.org/gw", timedelta(hours=1), server_names=["127.0.0.1"]
    )
    write_x509_svid(tmp_path / "gw.pem", tmp_path / "gw.key", cert, key)
    return tmp_path


def server_tls(tmp_path: Path, dev: DevCA, mode: str = "required") -> ServerTls:
    identity = (
        "identity:\n  trust_domain: example.org\n  bundles:\n"
        f"    example.org: {dev.directory / 'bundle.json'}\n"
    )
    tls = f"cert: gw.pem\nkey: gw.key\nclient_certs: {mode}\nreload_seconds: 2\n"
    result = ServerTls.from_config(config(tmp_path, tls, identity))
    assert result is not None
    return result


def test_server_context(server_files: Path, dev: DevCA) -> None:
    tls = server_tls(server_files, dev)
    assert tls.context.verify_mode == ssl.CERT_REQUIRED
    assert tls.context.minimum_version == ssl.TLSVersion.TLSv1_2
    assert tls.context.sni_callback is not None
    assert server_tls(server_files, dev, "none").context.verify_mode == ssl.CERT_NONE


def test_rotation_at_most_every_reload_seconds(server_files: Path, dev: DevCA) -> None:
    clock = Clock(0.0)
    tls = server_tls(server_files, dev)
    tls = ServerTls(tls.files, reload_seconds=2, clock=clock)
    first = tls.current
    cert, key = dev.issue_x509_svid(
        "spiffe://example.org/gw", timedelta(hours=2), server_names=["127.0.0.1"]
    )
    write_x509_svid(server_files / "gw.pem", server_files / "gw.key", cert, key)
    clock.now = 1.0
    assert not tls.maybe_reload() and tls.current is first  # too soon
    clock.now = 2.5
    assert tls.maybe_reload() and tls.current is not first


def test_a_half_rotated_pair_keeps_the_old_context(server_files: Path, dev: DevCA) -> None:
    clock = Clock(0.0)
    tls = ServerTls(server_tls(server_files, dev).files, reload_seconds=1, clock=clock)
    first = tls.current
    cert, _ = dev.issue_x509_svid(
        "spiffe://example.org/gw", timedelta(hours=2), server_names=["127.0.0.1"]
    )
    # The new certificate lands before its key.
    (server_files / "gw.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    clock.now = 5.0
    assert not tls.maybe_reload() and tls.current is first
