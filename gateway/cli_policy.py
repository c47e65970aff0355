"""`duragate policy check | explain`: tenant policy files, without starting a gateway."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Annotated

import typer

CEL_HELP = (
    "CEL backend: cel-expr-python or cel-python "
    "(default: $DURAGATE_CEL_BACKEND, else cel-expr-python)."
)
policy_app = typer.Typer(help="Tenant policy files: validate them, explain a decision.")


@policy_app.command("check")
def check(
    paths: Annotated[
        list[Path], typer.Argument(help="Policy files, or directories of <tenant>.yaml files.")
    ],
    cel: Annotated[str | None, typer.Option("--cel", help=CEL_HELP)] = None,
) -> None:
    """Validate policy files: every problem with its file, line and key; exit 1 if any."""
    from policies.loader import check_paths

    try:
        problems = check_paths(paths, cel)
    except ValueError as exc:  # an unknown CEL backend
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    for line in problems:
        typer.echo(line, err=True)
    if problems:
        raise typer.Exit(1)
    typer.echo(f"ok: {', '.join(str(p) for p in paths)}")


@policy_app.command("explain")
def explain(
    path: Annotated[Path, typer.Option("--policy", help="Policy directory (or one file).")],
    tenant: Annotated[str, typer.Option("--tenant", help="The caller's tenant.")],
    caller: Annotated[str, typer.Option("--caller", help="The caller's SPIFFE ID.")],
    tool: Annotated[str, typer.Option("--tool", help="The tool's name.")],
    args: Annotated[str, typer.Option("--args", help="Arguments as a JSON object.")] = "{}",
    chain: Annotated[
        list[str] | None, typer.Option("--chain", help="Delegating callers, outermost first.")
    ] = None,
    cel: Annotated[str | None, typer.Option("--cel", help=CEL_HELP)] = None,
) -> None:
    """Print the decision for one call and the rule that made it."""
    from gateway.config import ConfigError
    from policies.evaluator import explain as explain_call

    try:
        arguments = json.loads(args)
    except ValueError as exc:
        raise typer.BadParameter(f"not JSON: {exc}", param_hint="'--args'") from None
    if not isinstance(arguments, dict):
        raise typer.BadParameter("must be a JSON object", param_hint="'--args'")
    try:
        decision = explain_call(
            path,
            tenant=tenant,
            caller=caller,
            tool=tool,
            arguments=arguments,
            chain=tuple(chain or ()),
            cel=cel,
        )
    except (ConfigError, ValueError, OSError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    typer.echo(json.dumps(asdict(decision), indent=2, default=str))
    if decision.effect == "deny":
        raise typer.Exit(3)  # scripts can tell a refusal from an error


def register(app: typer.Typer) -> None:
    app.add_typer(policy_app, name="policy")
