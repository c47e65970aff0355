"""`duragate identity ...`: a development CA for trying SPIFFE identities on one machine.

    duragate identity init --trust-domain example.org
    duragate identity issue spiffe://example.org/ide/alice [--jwt --aud duragate] [--ttl 1h]
    duragate identity show FILE

The CA lives in `<data-dir>/identity/ca` (keys 0600). Not for production: use SPIRE, or your
own PKI, and point the gateway at its bundle.
"""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated, Any

import typer
from cryptography import x509

from identity.bundle import BundleSet
from identity.dev_ca import DevCA, DevCAError, write_x509_svid
from identity.jwt_svid import JwtSvidError, verify_jwt_svid
from identity.spiffe_id import SpiffeId, SpiffeIdError
from identity.x509_svid import X509SvidError, spiffe_id_of, verify_x509_svid

identity_app = typer.Typer(
    help="A development CA: SPIFFE X.509-SVIDs and JWT-SVIDs for local use.",
    no_args_is_help=True,
)

_DURATION = re.compile(r"(\d+)([smhd])")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}


def _duration(text: str) -> timedelta:
    match = _DURATION.fullmatch(text.strip())
    if match is None:
        raise typer.BadParameter(f"{text!r} is not a duration like 30m, 12h or 7d")
    return timedelta(**{_UNITS[match.group(2)]: int(match.group(1))})


def _ca_dir(ctx: typer.Context) -> Path:
    from gateway.cli import _options  # the global options live on the main app

    return _options(ctx).data_dir() / "identity" / "ca"


def _load(ctx: typer.Context) -> DevCA:
    directory = _ca_dir(ctx)
    if not (directory / "ca.key").exists():
        typer.echo(
            f"error: no development CA in {directory}; create one with "
            "`duragate identity init --trust-domain example.org`",
            err=True,
        )
        raise typer.Exit(1)
    try:
        return DevCA.load(directory)
    except (DevCAError, OSError, ValueError) as exc:
        typer.echo(f"error: the development CA in {directory} cannot be loaded: {exc}", err=True)
        raise typer.Exit(1) from None


@identity_app.command("init")
def init(
    ctx: typer.Context,
    trust_domain: Annotated[str, typer.Option("--trust-domain", help="e.g. example.org")],
) -> None:
    """Create the development CA and its trust bundle."""
    directory = _ca_dir(ctx)
    try:
        ca = DevCA.create(directory, trust_domain)
    except FileExistsError:
        typer.echo(f"error: a development CA already exists in {directory}", err=True)
        raise typer.Exit(1) from None
    except SpiffeIdError as exc:
        raise typer.BadParameter(str(exc), param_hint="'--trust-domain'") from None
    typer.echo(f"created a CA for spiffe://{ca.trust_domain} in {directory}")
    typer.echo(f"trust bundle: {directory / 'bundle.json'} (SPIFFE) and {directory / 'bundle.pem'}")


@identity_app.command("issue")
def issue(
    ctx: typer.Context,
    spiffe_id: Annotated[str, typer.Argument(help="spiffe://<trust domain>/<path>")],
    jwt: Annotated[bool, typer.Option("--jwt", help="Print a JWT-SVID instead.")] = False,
    aud: Annotated[
        list[str] | None, typer.Option("--aud", help="JWT audience (repeatable).")
    ] = None,
    ttl: Annotated[str, typer.Option("--ttl", help="Lifetime: 30m, 12h, 7d.")] = "1h",
    out: Annotated[
        Path | None, typer.Option("--out", help="Folder for the certificate and key.")
    ] = None,
    server_name: Annotated[
        list[str] | None,
        typer.Option("--server-name", help="DNS name or IP, for a server certificate."),
    ] = None,
    act: Annotated[
        list[str] | None,
        typer.Option(
            "--act",
            help="With --jwt: an agent acting for the subject (repeatable, earliest first; "
            "the last one presents the token over mTLS).",
        ),
    ] = None,
) -> None:
    """Issue an X.509-SVID (certificate and key files) or print a JWT-SVID."""
    ca = _load(ctx)
    lifetime = _duration(ttl)
    try:
        if jwt:
            if not aud:
                raise typer.BadParameter(
                    "a JWT-SVID needs at least one --aud", param_hint="'--aud'"
                )
            extra = {"act": act_claim(act)} if act else None
            typer.echo(ca.issue_jwt_svid(spiffe_id, aud, lifetime, extra_claims=extra))
            return
        if act:
            raise typer.BadParameter("--act goes with --jwt", param_hint="'--act'")
        names = tuple(server_name or ())
        cert, key = ca.issue_x509_svid(
            spiffe_id, lifetime, server_names=names, for_server=bool(names)
        )
    except (SpiffeIdError, DevCAError, ValueError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    folder = out or Path.cwd()
    stem = spiffe_id_of(cert).path.strip("/").replace("/", "-") or "svid"
    cert_path, key_path = folder / f"{stem}.pem", folder / f"{stem}.key"
    write_x509_svid(cert_path, key_path, cert, key)
    typer.echo(f"wrote {cert_path} and {key_path} (key mode 0600)")


def act_claim(actors: list[str]) -> dict[str, Any]:
    """The RFC 8693 `act` claim for agents acting in this order (the last one is the current
    actor, outermost; earlier ones nested)."""
    claim: dict[str, Any] | None = None
    for actor in actors:
        SpiffeId.parse(actor)  # agents are workloads: SpiffeIdError otherwise
        claim = {"sub": actor, **({"act": claim} if claim else {})}
    assert claim is not None
    return claim


@identity_app.command("show")
def show(
    ctx: typer.Context,
    file: Annotated[Path, typer.Argument(exists=True, dir_okay=False, readable=True)],
) -> None:
    """Explain an X.509-SVID (PEM) or a JWT-SVID, and check it against the development CA."""
    data = file.read_bytes()
    if b"-----BEGIN CERTIFICATE-----" in data:
        certs = x509.load_pem_x509_certificates(data)
        leaf = certs[0]
        try:
            who = str(spiffe_id_of(leaf))
        except (X509SvidError, SpiffeIdError) as exc:
            who = f"(not an X.509-SVID: {exc})"
        info = {
            "spiffe_id": who,
            "subject": leaf.subject.rfc4514_string(),
            "issuer": leaf.issuer.rfc4514_string(),
            "not_before": leaf.not_valid_before_utc.isoformat(),
            "not_after": leaf.not_valid_after_utc.isoformat(),
            "expired": leaf.not_valid_after_utc < datetime.now(UTC),
        }
        ca_dir = _ca_dir(ctx)
        if (ca_dir / "ca.pem").exists():
            ca = DevCA.load(ca_dir)
            try:
                verify_x509_svid(certs, ca.authorities_for)
                info["verified_by_dev_ca"] = "yes"
            except X509SvidError as exc:
                info["verified_by_dev_ca"] = f"no: {exc}"
        typer.echo(json.dumps(info, indent=2))
        return
    token = data.decode(errors="replace").strip()
    from joserfc import jws

    try:
        compact = jws.extract_compact(token.encode())
    except ValueError as exc:
        typer.echo(f"error: {file} is neither a PEM certificate nor a JWT: {exc}", err=True)
        raise typer.Exit(1) from None
    claims = json.loads(compact.payload)
    info = {"header": compact.protected, "claims": claims}
    ca_dir = _ca_dir(ctx)
    if (ca_dir / "bundle.json").exists():
        aud = claims.get("aud") if isinstance(claims, dict) else None
        audiences = {aud} if isinstance(aud, str) else set(aud or []) or {"(none)"}
        try:
            verify_jwt_svid(token, BundleSet([DevCA.load(ca_dir).trust_bundle()]), audiences)
            info["verified_by_dev_ca"] = "yes"
        except JwtSvidError as exc:
            info["verified_by_dev_ca"] = f"no: {exc}"
    typer.echo(json.dumps(info, indent=2))


def register(app: typer.Typer) -> None:
    app.add_typer(identity_app, name="identity")
