"""The `duragate` command line.

    duragate [--log-level L] [--log-format console|json] [--data-dir DIR] COMMAND ...

Commands: `serve` (the gateway: MCP over Streamable HTTP), `stdio` (MCP over stdio), `call` and
`tasks` (against a running gateway), `sidecar` (the embedded Dapr-compatible sidecar on its
own), `worker` (the tools of one worker app, in a process of their own), `paths` (where the
data lives), `version`.

The sidecar's API token is read from the `DAPR_API_TOKEN` environment variable only: a
command-line flag would show in `ps` and in shell history.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from pydantic import SecretStr, ValidationError

from gateway import __version__, logs, paths
from gateway.cli_identity import register as register_identity_commands
from gateway.cli_policy import register as register_policy_commands
from gateway.cli_remote import register as register_remote_commands
from gateway.sidecar.settings import SidecarSettings, is_local_address

if TYPE_CHECKING:
    from gateway.config import GatewayConfig

# The demo configuration, served when `serve` is given none.
DEMO_CONFIG = Path(__file__).resolve().parents[1] / "config" / "gateway.yaml"

log = logging.getLogger("duragate.cli")

TOKEN_ENV = "DAPR_API_TOKEN"
CONFIG_ENV = "DURAGATE_CONFIG"
OFF_WORDS = frozenset({"off", "none", "no", "false", "0", "disabled"})

_DEFAULTS = {name: field.default for name, field in SidecarSettings.model_fields.items()}
# Option names as the user typed them, by SidecarSettings field.
_OPTION_OF_FIELD = {
    "db_path": "--db",
    "grpc_listen": "--listen",
    "http_listen": "--http-listen",
    "app_id": "--app-id",
    "apps": "--app",
    "state_store_name": "--state-store-name",
    "state_stores": "--extra-state-store",
    "max_payload_bytes": "--max-payload-bytes",
    "synchronous": "--synchronous",
}


class LogLevel(StrEnum):
    debug = "debug"
    info = "info"
    warning = "warning"
    error = "error"


class LogFormat(StrEnum):
    console = "console"
    json = "json"


class Synchronous(StrEnum):
    FULL = "FULL"
    NORMAL = "NORMAL"


DEFAULT_SYNCHRONOUS = Synchronous(_DEFAULTS["synchronous"])


@dataclass
class GlobalOptions:
    log_level: str
    log_format: str
    data_dir_option: Path | None

    def data_dir(self, config_value: str | os.PathLike[str] | None = None) -> Path:
        """Resolve and create the data directory (exit 2 if it is unusable)."""
        path = paths.resolve_data_dir(self.data_dir_option, config_value=config_value)
        try:
            paths.ensure_data_dir(path)
        except paths.DataDirError as exc:
            raise typer.BadParameter(str(exc), param_hint="'--data-dir'") from None
        if not paths.is_private(path):
            log.warning("data directory %s is accessible to other users; chmod 700 it", path)
        return path


app = typer.Typer(
    name="duragate",
    help="Duragate: AI tool calls run as durable Dapr workflows.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,  # locals may hold the API token
    context_settings={"help_option_names": ["-h", "--help"]},
)


@app.callback()
def main(
    ctx: typer.Context,
    log_level: Annotated[
        LogLevel,
        typer.Option(
            "--log-level", envvar="DURAGATE_LOG_LEVEL", case_sensitive=False, help="Log level."
        ),
    ] = LogLevel.info,
    log_format: Annotated[
        LogFormat,
        typer.Option(
            "--log-format",
            envvar="DURAGATE_LOG_FORMAT",
            case_sensitive=False,
            help="console: readable lines on stderr; json: one JSON object per line on stderr.",
        ),
    ] = LogFormat.console,
    data_dir: Annotated[
        Path | None,
        typer.Option(
            "--data-dir",
            envvar=paths.ENV_DATA_DIR,
            show_default="./.duragate",
            help="Where Duragate keeps its data (created with mode 0700 if missing).",
        ),
    ] = None,
) -> None:
    """Duragate: AI tool calls run as durable Dapr workflows."""
    logs.register_secret(os.environ.get(TOKEN_ENV))
    logs.configure_logging(log_level.value, log_format.value)
    ctx.obj = GlobalOptions(log_level.value, log_format.value, data_dir)


def _options(ctx: typer.Context) -> GlobalOptions:
    obj = ctx.find_object(GlobalOptions)
    if obj is None:  # pragma: no cover - the callback always runs first
        raise RuntimeError("global options missing")
    return obj


@app.command()
def version() -> None:
    """Print the version."""
    typer.echo(f"duragate {__version__}")


@app.command("paths")
def show_paths(
    ctx: typer.Context,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Show (and create) the data directory and the engine's database file."""
    data_dir = _options(ctx).data_dir()
    db = paths.engine_db_path(data_dir)
    if as_json:
        import json

        typer.echo(json.dumps({"data_dir": str(data_dir), "engine_db": str(db)}))
    else:
        typer.echo(f"data_dir   {data_dir}")
        typer.echo(f"engine_db  {db}")


# ---------------------------------------------------------------------------------------------
# Addresses and settings


def _check_address(value: str, *, allow_unix: bool) -> str:
    """`HOST:PORT` (port 0 picks a free one) or, when allowed, `unix:///absolute/path`."""
    value = value.strip()
    if value.startswith("unix:"):
        if not allow_unix:
            raise typer.BadParameter(f"{value!r}: unix sockets are only for gRPC; use HOST:PORT")
        if not value.startswith("unix:///") or len(value) == len("unix:///"):
            raise typer.BadParameter(f"{value!r} is not unix:///absolute/path")
        return value
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        want = "HOST:PORT or unix:///absolute/path" if allow_unix else "HOST:PORT"
        raise typer.BadParameter(f"{value!r} is not {want} (port 0-65535, 0 picks a free port)")
    if any(c.isspace() for c in host) or (host.startswith("[") != host.endswith("]")):
        raise typer.BadParameter(f"{value!r}: bad host {host!r}")
    return value


def _grpc_address(value: str) -> str:
    return _check_address(value, allow_unix=True)


def _http_address(value: str | None) -> str | None:
    if value is None or value.strip().lower() in OFF_WORDS:
        return None
    return _check_address(value, allow_unix=False)


def _app_listeners(pairs: list[str]) -> dict[str, str]:
    """`--app LISTEN=APP_ID` options -> {app id: listen address}."""
    apps: dict[str, str] = {}
    for pair in pairs:
        listen, sep, app = pair.rpartition("=")
        if not sep or not listen or not app:
            raise typer.BadParameter(f"{pair!r} is not LISTEN=APP_ID", param_hint="'--app'")
        if app in apps:
            raise typer.BadParameter(f"app {app!r} is given twice", param_hint="'--app'")
        apps[app] = _grpc_address(listen)
    return apps


def _api_token() -> SecretStr | None:
    value = os.environ.get(TOKEN_ENV)
    return SecretStr(value) if value else None


def _build_settings(
    listen_options: tuple[str, str] = ("--listen", "--http-listen"), **fields: Any
) -> SidecarSettings:
    """SidecarSettings, with validation errors reported against the option that caused them."""
    try:
        settings = SidecarSettings(**fields)
    except ValidationError as exc:
        err = exc.errors()[0]
        field = str(err["loc"][0]) if err["loc"] else ""
        raise typer.BadParameter(
            err["msg"].removeprefix("Value error, "),
            param_hint=f"'{_OPTION_OF_FIELD.get(field, field)}'",
        ) from None
    if settings.require_token() and settings.api_token is None:
        remote = [a for a in (settings.grpc_listen, settings.http_listen) if a]
        remote += list(settings.apps.values())
        remote = [a for a in remote if not is_local_address(a)]
        if settings.grpc_listen in remote:
            option = listen_options[0]
        elif settings.http_listen in remote:
            option = listen_options[1]
        else:
            option = "--app"
        raise typer.BadParameter(
            f"{TOKEN_ENV} is not set, and {', '.join(remote)} is beyond loopback, where an API "
            f"token is required. Export {TOKEN_ENV}=<secret> (an environment variable, never a "
            "flag), or listen on 127.0.0.1 or a unix:/// socket.",
            param_hint=f"'{option}'",
        )
    return settings


def _ensure_parent(db: Path) -> None:
    try:
        paths.ensure_data_dir(db.parent)
    except paths.DataDirError as exc:
        raise typer.BadParameter(str(exc), param_hint="'--db'") from None


# ---------------------------------------------------------------------------------------------
# Running until a signal


def _run_sidecar_until_signalled(
    settings: SidecarSettings, on_up: Callable[[], None] | None = None
) -> int:
    try:
        from gateway.sidecar.server import (  # type: ignore[import-not-found, unused-ignore]
            run_sidecar,
        )
    except ImportError as exc:
        log.error("the embedded sidecar cannot be loaded: %s", exc)
        return 1
    return _run_until_signalled(lambda: run_sidecar(settings), on_up=on_up, what="sidecar")


def _run_until_signalled(
    make: Callable[[], Coroutine[Any, Any, None]],
    on_up: Callable[[], None] | None = None,
    up_after: float = 0.5,
    what: str = "gateway",
) -> int:
    """Run `make()` until SIGINT/SIGTERM; return the process exit code.

    The first signal cancels the task (it shuts down cleanly on cancellation); a second one
    exits at once. `on_up` is called once the task has run `up_after` seconds without failing.
    """
    signals_seen: list[int] = []

    async def main() -> None:
        loop = asyncio.get_running_loop()
        runner = asyncio.create_task(make(), name=f"duragate-{what}")

        def on_signal(signum: int) -> None:
            name = signal.Signals(signum).name
            if signals_seen:
                log.warning("%s again: exiting without waiting for shutdown", name)
                os._exit(128 + signum)
            signals_seen.append(signum)
            log.info("%s received: shutting down", name)
            runner.cancel()

        handled = (signal.SIGINT, signal.SIGTERM)
        for sig in handled:
            loop.add_signal_handler(sig, on_signal, sig)
        try:
            if on_up is not None:
                done, _ = await asyncio.wait({runner}, timeout=up_after)
                if not done:
                    on_up()
            await runner
        except asyncio.CancelledError:
            if not signals_seen:
                raise
        finally:
            for sig in handled:
                loop.remove_signal_handler(sig)

    try:
        asyncio.run(main())
    except KeyboardInterrupt:  # a SIGINT before the handlers were installed
        return 130
    except Exception as exc:
        log.error(
            "the %s stopped with an error: %s", what, exc, exc_info=log.isEnabledFor(logging.DEBUG)
        )
        return 1
    return 0


# ---------------------------------------------------------------------------------------------
# sidecar


@app.command()
def sidecar(
    ctx: typer.Context,
    db: Annotated[
        Path | None,
        typer.Option(
            "--db",
            dir_okay=False,
            show_default="<data-dir>/engine.db",
            help="The SQLite database file.",
        ),
    ] = None,
    listen: Annotated[
        str,
        typer.Option(
            "--listen",
            callback=_grpc_address,
            help="gRPC address: HOST:PORT (port 0 picks a free one) or unix:///absolute/path.",
        ),
    ] = _DEFAULTS["grpc_listen"],
    http_listen: Annotated[
        str | None,
        typer.Option(
            "--http-listen",
            callback=_http_address,
            help="HTTP health endpoints (GET /v1.0/healthz): HOST:PORT, or 'off'.",
        ),
    ] = _DEFAULTS["http_listen"],
    app_id: Annotated[str, typer.Option("--app-id", help="Dapr app id.")] = _DEFAULTS["app_id"],
    app_pairs: Annotated[
        list[str] | None,
        typer.Option(
            "--app",
            metavar="LISTEN=APP_ID",
            help="Also serve the Dapr app APP_ID, on its own gRPC address LISTEN; its workers "
            "connect there (cross-app calls with app_id=...). Repeatable.",
        ),
    ] = None,
    state_store_name: Annotated[
        str, typer.Option("--state-store-name", help="Name of the state store component.")
    ] = _DEFAULTS["state_store_name"],
    extra_state_stores: Annotated[
        list[str] | None,
        typer.Option(
            "--extra-state-store",
            metavar="NAME",
            help="Also serve the state store component NAME, a key space of its own (apps that "
            "look theirs up by name, e.g. Dapr Agents' agent-memory). Repeatable.",
        ),
    ] = None,
    max_payload_bytes: Annotated[
        int, typer.Option("--max-payload-bytes", min=1024, help="Largest accepted payload.")
    ] = _DEFAULTS["max_payload_bytes"],
    synchronous: Annotated[
        Synchronous,
        typer.Option(
            "--synchronous",
            case_sensitive=False,
            help="SQLite synchronous mode: FULL survives power loss; NORMAL only process crashes.",
        ),
    ] = DEFAULT_SYNCHRONOUS,
) -> None:
    """Run the embedded Dapr-compatible sidecar on its own, until SIGINT or SIGTERM.

    The API token comes from the DAPR_API_TOKEN environment variable, never from a flag.
    It is required when a listener is beyond loopback (unix sockets count as local).
    """
    settings = _build_settings(
        db_path=db if db is not None else Path("engine.db"),  # placeholder, replaced below
        grpc_listen=listen,
        http_listen=http_listen,
        api_token=_api_token(),
        app_id=app_id,
        apps=_app_listeners(app_pairs or []),
        state_store_name=state_store_name,
        state_stores=extra_state_stores or [],
        max_payload_bytes=max_payload_bytes,
        synchronous=synchronous.value,
    )
    if db is None:
        db_path = paths.engine_db_path(_options(ctx).data_dir())
    else:
        db_path = db.expanduser().absolute()
        _ensure_parent(db_path)
    settings = settings.model_copy(update={"db_path": db_path})
    log.info(
        "starting the sidecar: db=%s grpc=%s (app %s)%s http=%s api_token=%s",
        settings.db_path,
        settings.grpc_listen,
        settings.app_id,
        "".join(f", {listen} (app {app})" for app, listen in settings.apps.items()),
        settings.http_listen or "off",
        "set" if settings.api_token else "not set",
    )
    raise typer.Exit(_run_sidecar_until_signalled(settings))


# ---------------------------------------------------------------------------------------------
# serve


def _load_gateway_config(path: Path | None) -> GatewayConfig:
    """The config (the demo one in config/ when none is given), with every tool loaded: a
    problem anywhere stops here, before anything starts, with exit code 2."""
    from gateway.config import ConfigError, load_config
    from gateway.registry import Registry

    if path is None:
        if not DEMO_CONFIG.is_file():
            raise typer.BadParameter(
                "no configuration: pass --config PATH (or set DURAGATE_CONFIG)",
                param_hint="'--config'",
            )
        path = DEMO_CONFIG
        log.info("no --config given: serving the demo configuration %s", path)
    from gateway.http_app import build_authenticator

    try:
        config = load_config(path)
        Registry.from_config(config)  # every tool's target loads, or nothing starts
        build_authenticator(config)  # and every trust bundle
    except ConfigError as exc:
        typer.echo(f"error: the configuration is not valid:\n{exc}", err=True)
        raise typer.Exit(2) from None
    return config


def with_anonymous_callers(config: GatewayConfig) -> GatewayConfig:
    """`config` with `identity.allow_anonymous` on (`serve --allow-anonymous`)."""
    identity = config.identity.model_copy(update={"allow_anonymous": True})
    return config.model_copy(update={"identity": identity})


def _check_exposure(config: GatewayConfig, host: str) -> None:
    if config.identity.allow_anonymous and not is_local_address(f"{host}:0"):
        raise typer.BadParameter(
            f"identity.allow_anonymous is only allowed on loopback, and {host} is not: "
            "anyone who can reach it could call every tool",
            param_hint="'--host'",
        )


CONFIG_OPTION = typer.Option(
    "--config",
    "-c",
    envvar=CONFIG_ENV,
    exists=True,
    dir_okay=False,
    readable=True,
    show_default="config/gateway.yaml (the demo)",
    help="gateway.yaml (see config/README.md).",
)


@app.command()
def serve(
    ctx: typer.Context,
    config: Annotated[Path | None, CONFIG_OPTION] = None,
    host: Annotated[
        str | None, typer.Option("--host", help="Listen address (default: the config's).")
    ] = None,
    port: Annotated[
        int | None,
        typer.Option("--port", min=0, max=65535, help="Listen port (default: the config's)."),
    ] = None,
    allow_anonymous: Annotated[
        bool,
        typer.Option(
            "--allow-anonymous",
            help="Admit callers without credentials as identity.anonymous_principal (in "
            "identity.anonymous_tenant), whatever the config says. Loopback only.",
        ),
    ] = False,
) -> None:
    """Run the gateway: MCP over Streamable HTTP at /mcp, every call a durable workflow."""
    from gateway.server import serve as serve_gateway

    cfg = _load_gateway_config(config)
    adjust = with_anonymous_callers if allow_anonymous else None
    if adjust is not None:
        cfg = adjust(cfg)
    listen_host = host or cfg.listen.host
    _check_exposure(cfg, listen_host)
    if adjust is not None:
        log.warning(
            "--allow-anonymous: callers without credentials are %s (tenant %s)",
            cfg.identity.anonymous_principal,
            cfg.identity.anonymous_tenant,
        )
    data_dir = _options(ctx).data_dir(cfg.data_dir)

    def announce(url: str) -> None:
        log.info("Duragate gateway is up: MCP at %s; data in %s", url, data_dir)

    raise typer.Exit(
        _run_until_signalled(
            lambda: serve_gateway(
                cfg, data_dir, listen_host, port, on_ready=announce, adjust=adjust
            )
        )
    )


@app.command()
def stdio(
    ctx: typer.Context,
    config: Annotated[Path | None, CONFIG_OPTION] = None,
) -> None:
    """Serve MCP over stdin/stdout (for an IDE that starts the gateway itself)."""
    from gateway.server import serve_stdio

    cfg = _load_gateway_config(config)
    data_dir = _options(ctx).data_dir(cfg.data_dir)
    raise typer.Exit(_run_until_signalled(lambda: serve_stdio(cfg, data_dir)))


# ---------------------------------------------------------------------------------------------
# worker


WORKER_CONFIG_OPTION = typer.Option(
    "--config",
    "-c",
    envvar=CONFIG_ENV,
    exists=True,
    dir_okay=False,
    readable=True,
    show_default=False,
    help="The gateway's gateway.yaml (required): the worker runs its tools with --app-id.",
)


@app.command()
def worker(
    ctx: typer.Context,
    app_id: Annotated[
        str,
        typer.Option("--app-id", help="The worker app: run the tools whose app_id is this."),
    ],
    config: Annotated[Path | None, WORKER_CONFIG_OPTION] = None,
    address: Annotated[
        str | None,
        typer.Option(
            "--address",
            callback=lambda v: None if v is None else _grpc_address(v),
            help="The sidecar's gRPC address for this app (default: engine.apps in the config;"
            " with engine.kind: dapr, DAPR_GRPC_ENDPOINT or DAPR_GRPC_PORT).",
        ),
    ] = None,
    http_address: Annotated[
        str | None,
        typer.Option(
            "--http-address",
            help="The sidecar's HTTP health address, HOST:PORT (optional: without it the gRPC"
            " address is checked instead).",
        ),
    ] = None,
    connect_timeout: Annotated[
        float,
        typer.Option(
            "--connect-timeout", min=0.1, help="Seconds to wait for the sidecar at start-up."
        ),
    ] = 30.0,
) -> None:
    """Run the tools of one worker app (tools with `app_id: APP`) in this process and Python
    environment, connected to the sidecar that serves that app, until SIGINT or SIGTERM."""
    from gateway.config import WORKFLOW_KINDS, ConfigError, check_app_id, load_config
    from gateway.worker import ToolWorker, WorkerError, resolve_address, run_worker

    try:
        check_app_id(app_id)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="'--app-id'") from None
    if config is None:
        raise typer.BadParameter(
            "pass the gateway's config with --config PATH (or set DURAGATE_CONFIG)",
            param_hint="'--config'",
        )
    http_address = _http_address(http_address)
    try:
        cfg = load_config(config)
        if not any(t.app_id == app_id and t.kind not in WORKFLOW_KINDS for t in cfg.tools):
            agents = [t.name for t in cfg.tools if t.app_id == app_id]
            if agents:  # workflow kinds: their own app serves them, not a duragate worker
                raise WorkerError(
                    f"app {app_id!r} runs its own workflows for {', '.join(agents)} (e.g. a "
                    "Dapr Agents app); a duragate worker has nothing to serve there"
                )
            raise WorkerError(f"no tool in {config} has app_id {app_id!r}: nothing to serve")
        resolve_address(cfg, app_id, address, http_address)
    except ConfigError as exc:
        typer.echo(f"error: the configuration is not valid:\n{exc}", err=True)
        raise typer.Exit(2) from None
    except WorkerError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    data_dir = _options(ctx).data_dir(cfg.data_dir)
    started: list[ToolWorker] = []
    code = _run_until_signalled(
        lambda: run_worker(
            cfg,
            app_id,
            data_dir,
            address=address,
            http_address=http_address,
            connect_timeout=connect_timeout,
            on_ready=started.append,
        ),
        what="worker",
    )
    running = started[0].running if started else 0
    if running:
        # Once the worker's stream is closed a tool's result has nowhere to go, and the sidecar
        # hands the call to the next worker of the app (activities run at least once; the
        # rerun resumes from checkpoints): waiting for the tool (a crew can run for minutes)
        # would only delay the stop. Its thread would hold the interpreter's exit: skip it.
        log.warning(
            "%d tool run(s) still in progress: exiting without them; the next worker of app "
            "%s runs their calls again",
            running,
            app_id,
        )
        logging.shutdown()
        os._exit(code)
    raise typer.Exit(code)


register_remote_commands(app)
register_identity_commands(app)
register_policy_commands(app)


def run() -> None:
    """Entry point of `python -m gateway`: the same as the `duragate` script."""
    app(prog_name="duragate")


if __name__ == "__main__":  # pragma: no cover
    run()
