"""The `duragate` command line, run as a real subprocess (`python -m gateway` and the installed
console script)."""

from __future__ import annotations

import fcntl
import importlib.util
import json
import os
import re
import select
import signal
import socket
import stat
import subprocess
import sys
import textwrap
import time
import urllib.request
from collections.abc import Callable, Mapping
from pathlib import Path

import pytest

import gateway

COMMANDS = ("version", "paths", "sidecar", "serve", "stdio", "call", "tasks")
TOKEN = "tok-3f9a1c0d7e5b4a2f"  # a recognisable fake value: it must never reach a log line


def _env(extra: Mapping[str, str] | None = None, *, drop: tuple[str, ...] = ()) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DURAGATE_", "DAPR_"))}
    # Wide, plain output so that messages are not wrapped or coloured.
    env.update({"COLUMNS": "250", "TERM": "dumb", "NO_COLOR": "1", "PYTHONUNBUFFERED": "1"})
    env.update(extra or {})
    for name in drop:
        env.pop(name, None)
    return env


def duragate(
    *args: str, cwd: Path | None = None, env: Mapping[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway", *args],
        cwd=cwd,
        env=_env(env),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def flat(text: str) -> str:
    """Output with rich's box drawing and line wrapping removed."""
    for ch in "│╭╮╰╯─":
        text = text.replace(ch, " ")
    return " ".join(text.split())


# ---------------------------------------------------------------------------------------------
# help and version


def test_help_lists_every_command() -> None:
    result = duragate("--help")
    assert result.returncode == 0, result.stderr
    for command in COMMANDS:
        assert command in result.stdout
    for option in ("--log-level", "--log-format", "--data-dir"):
        assert option in result.stdout


def test_no_arguments_shows_help() -> None:
    result = duragate()
    assert "Usage" in result.stdout + result.stderr
    assert "sidecar" in result.stdout + result.stderr


@pytest.mark.parametrize("command", COMMANDS)
def test_each_command_has_help(command: str) -> None:
    result = duragate(command, "--help")
    assert result.returncode == 0, result.stderr
    assert f"duragate {command}" in flat(result.stdout)


def test_sidecar_help_names_the_token_variable_and_defaults() -> None:
    out = flat(duragate("sidecar", "--help").stdout)
    assert "DAPR_API_TOKEN" in out
    assert "127.0.0.1:50001" in out
    assert "127.0.0.1:3500" in out
    assert "<data-dir>/engine.db" in out
    assert "--token" not in out  # the token is never a flag


def test_version() -> None:
    result = duragate("version")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"duragate {gateway.__version__}"


def test_installed_console_script() -> None:
    script = Path(sys.executable).parent / "duragate"
    assert script.exists(), "the `duragate` console script is not installed (pip install -e .)"
    result = subprocess.run(
        [str(script), "version"], env=_env(), capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert gateway.__version__ in result.stdout


def test_unknown_command_and_bad_option_exit_2() -> None:
    assert duragate("no-such-command").returncode == 2
    bad_level = duragate("--log-level", "loud", "version")
    assert bad_level.returncode == 2
    assert "--log-level" in flat(bad_level.stderr)
    assert duragate("--log-format", "xml", "version").returncode == 2
    assert duragate("sidecar", "--synchronous", "OFF").returncode == 2
    assert duragate("sidecar", "--max-payload-bytes", "10").returncode == 2


# ---------------------------------------------------------------------------------------------
# data directory


def _paths(tmp_path: Path, *args: str, env: Mapping[str, str] | None = None) -> dict[str, str]:
    result = duragate(*args, "paths", "--json", cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr
    return dict(json.loads(result.stdout))


def test_data_dir_option_beats_environment(tmp_path: Path) -> None:
    opt, envdir = tmp_path / "from-option", tmp_path / "from-env"
    got = _paths(tmp_path, "--data-dir", str(opt), env={"DURAGATE_DATA_DIR": str(envdir)})
    assert Path(got["data_dir"]) == opt
    assert Path(got["engine_db"]) == opt / "engine.db"
    assert opt.is_dir()
    assert not envdir.exists()


def test_data_dir_from_environment(tmp_path: Path) -> None:
    envdir = tmp_path / "from-env"
    got = _paths(tmp_path, env={"DURAGATE_DATA_DIR": str(envdir)})
    assert Path(got["data_dir"]) == envdir
    assert envdir.is_dir()
    assert not (tmp_path / ".duragate").exists()


def test_data_dir_default_is_dot_duragate_in_cwd(tmp_path: Path) -> None:
    got = _paths(tmp_path)
    assert Path(got["data_dir"]) == tmp_path / ".duragate"


def test_data_dir_is_created_private(tmp_path: Path) -> None:
    target = tmp_path / "a" / "b"
    _paths(tmp_path, "--data-dir", str(target))
    assert stat.S_IMODE(target.stat().st_mode) == 0o700


@pytest.mark.parametrize("via", ["option", "env"])
def test_data_dir_that_is_a_file_is_refused(tmp_path: Path, via: str) -> None:
    afile = tmp_path / "not-a-dir"
    afile.write_text("x")
    if via == "option":
        result = duragate("--data-dir", str(afile), "paths", cwd=tmp_path)
    else:
        result = duragate("paths", cwd=tmp_path, env={"DURAGATE_DATA_DIR": str(afile)})
    assert result.returncode == 2
    assert "--data-dir" in flat(result.stderr)
    assert "not-a-dir" in flat(result.stderr)
    assert afile.read_text() == "x"


# ---------------------------------------------------------------------------------------------
# argument checks that need no running sidecar


def test_sidecar_beyond_loopback_without_token_exits_2(tmp_path: Path) -> None:
    result = duragate("sidecar", "--listen", "0.0.0.0:0", cwd=tmp_path)
    assert result.returncode == 2
    assert "DAPR_API_TOKEN" in flat(result.stderr)
    assert not (tmp_path / ".duragate").exists()  # refused before touching anything


def test_sidecar_http_beyond_loopback_without_token_exits_2(tmp_path: Path) -> None:
    result = duragate("sidecar", "--http-listen", "0.0.0.0:3500", cwd=tmp_path)
    assert result.returncode == 2
    assert "DAPR_API_TOKEN" in flat(result.stderr)
    assert "--http-listen" in flat(result.stderr)


def test_serve_refuses_anonymous_callers_beyond_loopback(tmp_path: Path) -> None:
    # The demo config allows anonymous callers: only acceptable on loopback.
    result = duragate("serve", "--host", "0.0.0.0", cwd=tmp_path)
    assert result.returncode == 2
    assert "allow_anonymous" in flat(result.stderr)
    assert not (tmp_path / ".duragate").exists()


def test_empty_token_counts_as_missing(tmp_path: Path) -> None:
    result = duragate("sidecar", "--listen", "0.0.0.0:0", cwd=tmp_path, env={"DAPR_API_TOKEN": ""})
    assert result.returncode == 2
    assert "DAPR_API_TOKEN" in flat(result.stderr)


@pytest.mark.parametrize(
    "value", ["nonsense", "127.0.0.1", ":50001", "127.0.0.1:99999", "host:port", "unix://rel"]
)
def test_bad_listen_exits_2_with_clear_message(tmp_path: Path, value: str) -> None:
    result = duragate("sidecar", "--listen", value, cwd=tmp_path)
    assert result.returncode == 2
    message = flat(result.stderr)
    assert "--listen" in message
    assert "HOST:PORT" in message or "unix:///" in message
    assert not (tmp_path / ".duragate").exists()


@pytest.mark.parametrize("value", ["nonsense", "unix:///tmp/x.sock", "localhost:70000"])
def test_bad_http_listen_exits_2(tmp_path: Path, value: str) -> None:
    result = duragate("sidecar", "--http-listen", value, cwd=tmp_path)
    assert result.returncode == 2
    assert "--http-listen" in flat(result.stderr)


def test_serve_rejects_bad_config(tmp_path: Path) -> None:
    cfg = tmp_path / "gateway.yaml"
    cfg.write_text("engine:\n  kind: dapr\n")
    result = duragate("serve", "--config", str(cfg), cwd=tmp_path)
    assert result.returncode == 2
    assert "gateway.yaml:1: engine.grpc_address: required key is missing" in flat(result.stderr)
    cfg.write_text("tools: []\nbogus: 1\n")
    result = duragate("serve", "--config", str(cfg), cwd=tmp_path)
    assert result.returncode == 2
    assert "gateway.yaml:2: bogus: unknown key" in flat(result.stderr)
    cfg.write_text("tools:\n  - name: x\n    kind: python\n    target: no_such_module:f\n")
    result = duragate("serve", "--config", str(cfg), cwd=tmp_path)
    assert result.returncode == 2
    assert "gateway.yaml:4" in flat(result.stderr) and "no_such_module" in flat(result.stderr)
    missing = duragate("serve", "--config", str(tmp_path / "nope.yaml"), cwd=tmp_path)
    assert missing.returncode == 2
    assert not (tmp_path / ".duragate").exists()  # nothing started, nothing created


def test_example_config_loads_with_all_its_tools() -> None:
    """config/gateway.yaml, which `serve` uses by default, is valid and every tool loads."""
    from gateway.config import load_config
    from gateway.registry import Registry

    example = Path(__file__).resolve().parents[1] / "config" / "gateway.yaml"
    config = load_config(example)
    assert config.engine.kind == "embedded"
    assert config.listen.host == "127.0.0.1"
    assert len(Registry.from_config(config)) == len(config.tools) > 0


# ---------------------------------------------------------------------------------------------
# signals and shutdown, against a stand-in `run_sidecar` (tests the CLI, not the sidecar)

_FAKE_SERVER = textwrap.dedent(
    """
    import asyncio, logging, sys, types

    async def run_sidecar(settings):
        log = logging.getLogger("fake.sidecar")
        token = settings.api_token.get_secret_value() if settings.api_token else None
        log.info("fake sidecar with token %s", token, extra={"token": token})
        print("READY", settings.db_path, settings.grpc_listen, settings.http_listen, flush=True)
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            await asyncio.sleep(0.1)  # a shutdown that takes a moment
            print("CLEAN", flush=True)
            raise

    module = types.ModuleType("gateway.sidecar.server")
    module.run_sidecar = run_sidecar
    sys.modules["gateway.sidecar.server"] = module

    from gateway.cli import run
    sys.argv[0] = "duragate"
    run()
    """
)


def _readline(proc: subprocess.Popen[str], timeout: float = 30) -> str:
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    if not ready:
        proc.kill()
        pytest.fail(f"no output within {timeout} s")
    return proc.stdout.readline()


def _start(
    tmp_path: Path, argv: list[str], env: Mapping[str, str] | None = None
) -> tuple[subprocess.Popen[str], Path]:
    """Start a process; its stderr goes to a file (a pipe left unread could fill and block)."""
    errlog = tmp_path / f"stderr-{time.monotonic_ns()}.log"
    with errlog.open("w") as err:
        proc = subprocess.Popen(
            argv, cwd=tmp_path, env=_env(env), stdout=subprocess.PIPE, stderr=err, text=True
        )
    return proc, errlog


def _start_fake(
    tmp_path: Path, *args: str, env: Mapping[str, str] | None = None
) -> tuple[subprocess.Popen[str], Path]:
    script = tmp_path / "fake_duragate.py"
    script.write_text(_FAKE_SERVER)
    return _start(tmp_path, [sys.executable, str(script), *args], env)


def _wait_for_text(path: Path, text: str, proc: subprocess.Popen[str], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if text in path.read_text():
            return
        if proc.poll() is not None:
            break
        time.sleep(0.1)
    proc.kill()
    proc.communicate()
    pytest.fail(f"{text!r} not logged within {timeout} s:\n{path.read_text()}")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_sidecar_stops_cleanly_on_signal(tmp_path: Path, sig: signal.Signals) -> None:
    proc, errlog = _start_fake(
        tmp_path, "sidecar", "--listen", "127.0.0.1:0", "--http-listen", "off"
    )
    line = _readline(proc)
    assert line.startswith("READY"), line
    assert f"{tmp_path / '.duragate' / 'engine.db'} 127.0.0.1:0 None" in line
    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=30)
    err = errlog.read_text()
    assert proc.returncode == 0, err
    assert "CLEAN" in out
    assert "shutting down" in err


def test_api_token_never_reaches_the_logs(tmp_path: Path) -> None:
    proc, errlog = _start_fake(
        tmp_path,
        "--log-level",
        "debug",
        "--log-format",
        "json",
        "sidecar",
        "--listen",
        "0.0.0.0:0",
        "--http-listen",
        "off",
        env={"DAPR_API_TOKEN": TOKEN},
    )
    assert _readline(proc).startswith("READY")
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=30)
    err = errlog.read_text()
    assert proc.returncode == 0, err
    records = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    assert any(r["logger"] == "fake.sidecar" for r in records), err
    assert TOKEN not in err
    assert any(r.get("token") == "***" for r in records), err
    for r in records:
        assert {"timestamp", "level", "logger", "message"} <= r.keys()


# ---------------------------------------------------------------------------------------------
# against the real embedded sidecar, once it exists


def _needs_server() -> None:
    if importlib.util.find_spec("gateway.sidecar.server") is None:
        pytest.skip("gateway.sidecar.server is not written yet")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return 200 <= int(response.status) < 300
    except OSError:
        return False


def _start_healthy(
    tmp_path: Path, make_argv: Callable[[int], list[str]], timeout: float = 30
) -> tuple[subprocess.Popen[str], Path]:
    """Start `make_argv(http_port)` and wait until its health endpoint answers 2xx.

    A free port is picked, then released before the child binds it, so another process can take
    it in between: a start that fails because an address is in use is retried on new ports.
    """
    for _attempt in range(3):
        port = _free_port()
        proc, errlog = _start(tmp_path, make_argv(port))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and proc.poll() is None:
            if _healthy(f"http://127.0.0.1:{port}/v1.0/healthz"):
                return proc, errlog
            time.sleep(0.2)
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
            pytest.fail(f"not healthy within {timeout} s:\n{errlog.read_text()}")
        log = errlog.read_text()
        if "in use" not in log:
            pytest.fail(f"exited with {proc.returncode} before becoming healthy:\n{log}")
    pytest.fail(f"no free ports after 3 attempts:\n{log}")


@pytest.mark.slow
def test_real_sidecar_serves_health_and_stops_on_sigterm(tmp_path: Path) -> None:
    _needs_server()
    db = tmp_path / "db" / "engine.db"

    def argv(http_port: int) -> list[str]:
        return [sys.executable, "-m", "gateway", "sidecar", "--db", str(db)] + [
            "--listen",
            f"127.0.0.1:{_free_port()}",
            "--http-listen",
            f"127.0.0.1:{http_port}",
        ]

    proc, errlog = _start_healthy(tmp_path, argv)
    try:
        assert db.exists()
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=30)
        assert proc.returncode == 0, errlog.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


@pytest.mark.slow
def test_real_serve_comes_up_and_stops_on_sigint(tmp_path: Path) -> None:
    data = tmp_path / "data"
    argv = [sys.executable, "-m", "gateway", "--data-dir", str(data), "serve", "--port", "0"]
    proc, errlog = _start(tmp_path, argv)
    try:
        _wait_for_text(errlog, "gateway is up", proc)
        url = re.search(r"http://127\.0\.0\.1:\d+/mcp", flat(errlog.read_text()))
        assert url is not None, errlog.read_text()
        assert _healthy(url.group(0).replace("/mcp", "/healthz"))
        assert (data / "engine.db").exists()
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=30)
        assert proc.returncode == 0, errlog.read_text()
        # The embedded engine stopped with it (it runs in the gateway; no sidecar process was
        # left behind): its database lock is free for the next gateway.
        deadline = time.monotonic() + 10
        while _sidecar_processes(data) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _sidecar_processes(data)
        with (data / "engine.db.lock").open("a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def _sidecar_processes(data: Path) -> list[str]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if "gateway.sidecar.server" in cmdline and str(data) in cmdline:
                found.append(cmdline)
    return found


# ---------------------------------------------------------------------------------------------
# in-process checks of the helpers behind the CLI


def test_resolve_data_dir_order(tmp_path: Path) -> None:
    from gateway.paths import resolve_data_dir

    env = {"DURAGATE_DATA_DIR": str(tmp_path / "env")}
    assert resolve_data_dir(tmp_path / "opt", env=env, config_value="cfg") == tmp_path / "opt"
    assert resolve_data_dir(None, env=env, config_value="cfg") == tmp_path / "env"
    assert resolve_data_dir(None, env={}, config_value=tmp_path / "cfg") == tmp_path / "cfg"
    assert resolve_data_dir("", env={"DURAGATE_DATA_DIR": ""}) == Path.cwd() / ".duragate"


def test_logs_redact_registered_secrets_everywhere() -> None:
    import io
    import logging

    from gateway import logs

    root = logging.getLogger()
    saved_handlers, saved_level = root.handlers[:], root.level
    logs.register_secret("s3cret-value-123")
    try:
        for fmt in ("json", "console"):
            out = io.StringIO()
            logs.configure_logging("debug", fmt, stream=out)
            logger = logging.getLogger(f"test.redact.{fmt}")
            extra = {"header": "Bearer s3cret-value-123"}
            logger.info("token is %s", "s3cret-value-123", extra=extra)
            try:
                raise RuntimeError("failed with s3cret-value-123")
            except RuntimeError:
                logger.exception("boom")
            text = out.getvalue()
            assert "s3cret-value-123" not in text, text
            assert "***" in text
            if fmt == "json":
                records = [json.loads(line) for line in text.splitlines()]
                assert records[0]["header"] == "Bearer ***"
                assert "RuntimeError" in records[1]["exc_info"]
    finally:
        for handler in root.handlers[:]:
            if handler not in saved_handlers:
                root.removeHandler(handler)
        root.setLevel(saved_level)
        logging.captureWarnings(False)
