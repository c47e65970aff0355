"""`duragate identity init | issue | show`: the development CA from the command line."""

from __future__ import annotations

import json
import stat
import subprocess
import sys
from pathlib import Path

from cryptography import x509

from identity.dev_ca import DevCA
from identity.x509_svid import verify_x509_svid


def duragate(data: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway", "--data-dir", str(data), "identity", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=data.parent,
    )


def test_init_issue_show(tmp_path: Path) -> None:
    data = tmp_path / "data"
    created = duragate(data, "init", "--trust-domain", "example.org")
    assert created.returncode == 0, created.stderr
    ca_dir = data / "identity" / "ca"
    assert stat.S_IMODE((ca_dir / "ca.key").stat().st_mode) == 0o600
    again = duragate(data, "init", "--trust-domain", "example.org")
    assert again.returncode == 1 and "already exists" in again.stderr

    issued = duragate(data, "issue", "spiffe://example.org/ide/alice", "--out", str(tmp_path))
    assert issued.returncode == 0, issued.stderr
    cert_file, key_file = tmp_path / "ide-alice.pem", tmp_path / "ide-alice.key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    certs = x509.load_pem_x509_certificates(cert_file.read_bytes())
    svid = verify_x509_svid(certs, DevCA.load(ca_dir).authorities_for)
    assert str(svid.spiffe_id) == "spiffe://example.org/ide/alice"
    shown = json.loads(duragate(data, "show", str(cert_file)).stdout)
    assert shown["spiffe_id"] == "spiffe://example.org/ide/alice"
    assert shown["verified_by_dev_ca"] == "yes"

    token = duragate(data, "issue", "spiffe://example.org/ide/alice", "--jwt", "--aud", "duragate")
    assert token.returncode == 0, token.stderr
    (tmp_path / "t.jwt").write_text(token.stdout)
    decoded = json.loads(duragate(data, "show", str(tmp_path / "t.jwt")).stdout)
    assert decoded["header"]["alg"] == "ES256"
    assert decoded["claims"]["sub"] == "spiffe://example.org/ide/alice"
    assert decoded["claims"]["aud"] == ["duragate"]
    assert decoded["verified_by_dev_ca"] == "yes"


def test_refusals_are_clear(tmp_path: Path) -> None:
    data = tmp_path / "data"
    none_yet = duragate(data, "issue", "spiffe://example.org/x")
    assert none_yet.returncode == 1 and "identity init" in none_yet.stderr
    assert duragate(data, "init", "--trust-domain", "Example.org").returncode == 2
    assert duragate(data, "init", "--trust-domain", "example.org").returncode == 0
    foreign = duragate(data, "issue", "spiffe://other.org/x")
    assert foreign.returncode == 1 and "other.org" in foreign.stderr
    no_aud = duragate(data, "issue", "spiffe://example.org/x", "--jwt")
    assert no_aud.returncode == 2 and "--aud" in no_aud.stderr
    bad_ttl = duragate(data, "issue", "spiffe://example.org/x", "--ttl", "soon")
    assert bad_ttl.returncode == 2


def test_issue_a_delegation_token(tmp_path: Path) -> None:
    data = tmp_path / "data"
    assert duragate(data, "init", "--trust-domain", "example.org").returncode == 0
    planner, coder = "spiffe://example.org/agents/planner", "spiffe://example.org/agents/coder"
    args = ["issue", "spiffe://example.org/ide/alice", "--jwt", "--aud", "duragate"]
    token = duragate(data, *args, "--act", planner, "--act", coder)
    assert token.returncode == 0, token.stderr
    (tmp_path / "t.jwt").write_text(token.stdout)
    claims = json.loads(duragate(data, "show", str(tmp_path / "t.jwt")).stdout)["claims"]
    # The coder presents it (the current actor, outermost); the planner acted before.
    assert claims["act"] == {"sub": coder, "act": {"sub": planner}}
    not_an_id = duragate(data, *args, "--act", "planner")
    assert not_an_id.returncode == 1 and "planner" in not_an_id.stderr
    without_jwt = duragate(data, "issue", "spiffe://example.org/x", "--act", planner)
    assert without_jwt.returncode == 2 and "--act goes with --jwt" in without_jwt.stderr
