"""The `mcp` tool kind against real remote servers: FastMCP in a subprocess, and a second
Duragate gateway.

The remote server journals every tool run (`tests/adapters/mcp_remote_server.py`), so the tests
see side effects, the `_meta` a call carried and whether the credentials arrived.
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from mcp import types

from adapters.base import ToolContext, ToolError, ToolLoadError
from adapters.mcp import ADAPTER, IDEMPOTENCY_META, McpTool, RemoteCallError
from gateway.config import ToolConfig
from identity.dev_ca import DevCA, write_x509_svid
from tests.gateway.conftest import (
    TEST_CONFIG,
    GatewayFactory,
    GatewayProcess,
    child_env,
    mcp_session,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
TIMEOUT = 60.0  # the longest any single wait may take (the machine is shared)
SECRET = "s3cr3t-token-value-for-tests"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _accepts(port: int) -> bool:
    with socket.socket() as probe:
        probe.settimeout(1.0)
        return probe.connect_ex(("127.0.0.1", port)) == 0


@dataclass
class RemoteServer:
    popen: subprocess.Popen[bytes]
    port: int
    log: Path
    stderr: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/mcp"

    def calls(self, tool: str | None = None) -> list[dict[str, Any]]:
        if not self.log.exists():
            return []
        lines = [json.loads(line) for line in self.log.read_text().splitlines() if line]
        return [c for c in lines if tool is None or c["tool"] == tool]

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(15)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(10)


class Servers:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.started: list[RemoteServer] = []

    def __call__(
        self, port: int | None = None, token_env: str | None = None, extra_tool: str | None = None
    ) -> RemoteServer:
        port = port or free_port()
        log = self.tmp / f"remote-{port}.jsonl"
        stderr = self.tmp / f"remote-{port}.stderr"
        cmd = [sys.executable, "-m", "tests.adapters.mcp_remote_server", "--port", str(port)]
        cmd += ["--log", str(log)]
        if token_env:
            cmd += ["--expect-token-env", token_env]
        if extra_tool:
            cmd += ["--extra-tool", extra_tool]
        with open(stderr, "ab") as err:
            popen = subprocess.Popen(cmd, cwd=REPO_ROOT, env=child_env(), stderr=err)
        server = RemoteServer(popen, port, log, stderr)
        self.started.append(server)
        deadline = time.monotonic() + TIMEOUT
        while not _accepts(port):
            if popen.poll() is not None or time.monotonic() > deadline:
                server.stop()
                raise RuntimeError(f"the remote MCP server did not start:\n{stderr.read_text()}")
            time.sleep(0.05)
        return server

    def stop_all(self) -> None:
        for server in self.started:
            server.stop()


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[Servers]:
    factory = Servers(tmp_path)
    yield factory
    factory.stop_all()


@pytest.fixture
def gateways(tmp_path: Path) -> Iterator[GatewayFactory]:
    factory = GatewayFactory(tmp_path)
    yield factory
    factory.stop_all()


def mcp_config(name: str, target: str, **fields: Any) -> ToolConfig:
    return ToolConfig(name=name, kind="mcp", target=target, **fields)


def context(execution_id: str = "exec-1", sink: list[Any] | None = None) -> ToolContext:
    def report(progress: float, total: float | None, message: str | None) -> None:
        if sink is not None:
            sink.append((progress, total, message))

    return ToolContext(instance_id="i-1", task_execution_id=execution_id, report_progress=report)


def gateway_config(tmp_path: Path, tools: list[dict[str, Any]], name: str = "gw.yaml") -> Path:
    config = yaml.safe_load(TEST_CONFIG.read_text())
    config["tools"] = tools
    path = tmp_path / name
    path.write_text(yaml.safe_dump(config))
    return path


# --- prepare: schemas, options, start-up ------------------------------------------------------


def test_prepare_reads_the_remote_schema(servers: Servers) -> None:
    remote = servers()
    tool = ADAPTER.prepare(mcp_config("sum", remote.url, options={"tool": "add"}))
    spec = tool.spec
    assert spec.kind == "mcp" and spec.target == remote.url
    assert spec.description == "Add two numbers on the remote server."
    assert spec.input_schema["required"] == ["a", "b"]
    assert set(spec.input_schema["properties"]) == {"a", "b"}
    assert spec.output_schema is not None
    assert set(spec.output_schema["properties"]) == {"total", "terms"}
    # Config wins over what the server says.
    tool = ADAPTER.prepare(
        mcp_config("sum", remote.url, description="mine", options={"tool": "add"})
    )
    assert tool.spec.description == "mine"


def test_an_unreachable_server_at_start_up_refuses_to_load_naming_the_url() -> None:
    url = f"http://127.0.0.1:{free_port()}/mcp"
    with pytest.raises(ToolLoadError) as refused:
        ADAPTER.prepare(mcp_config("sum", url, options={"connect_timeout_seconds": 5}))
    message = str(refused.value)
    assert url in message and "input_schema" in message


def test_config_schemas_load_without_contacting_the_server() -> None:
    url = f"http://127.0.0.1:{free_port()}/mcp"
    schema = {"type": "object", "properties": {"a": {"type": "number"}}}
    tool = ADAPTER.prepare(mcp_config("sum", url, input_schema=schema))
    assert tool.spec.input_schema == schema and tool.spec.output_schema is None


def test_a_missing_remote_tool_is_named(servers: Servers) -> None:
    remote = servers()
    with pytest.raises(ToolLoadError, match=r"has no tool 'nope' \(it has: .*add"):
        ADAPTER.prepare(mcp_config("x", remote.url, options={"tool": "nope"}))


@pytest.mark.parametrize(
    ("target", "options", "error"),
    [
        ("ftp://example.com/mcp", {}, "is not an MCP server URL"),
        ("stdio:", {}, "names no command"),
        ("http://127.0.0.1:1/mcp", {"colour": "red"}, "colour: Extra inputs are not permitted"),
        ("http://127.0.0.1:1/mcp", {"connect_timeout_seconds": 0}, "connect_timeout_seconds"),
        ("http://127.0.0.1:1/mcp", {"bearer_token_env": "DURAGATE_UNSET_VAR"}, "DURAGATE_UNSET"),
        ("http://tools.example.com/mcp", {"bearer_token_env": "MCP_TEST_TOKEN"}, "only over https"),
        ("stdio:server", {"bearer_token_env": "MCP_TEST_TOKEN"}, "not over stdio"),
    ],
)
def test_bad_configuration_is_refused_precisely(
    target: str, options: dict[str, Any], error: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MCP_TEST_TOKEN", SECRET)
    monkeypatch.delenv("DURAGATE_UNSET_VAR", raising=False)
    schema = {"type": "object"}
    with pytest.raises(ToolLoadError, match=error) as refused:
        ADAPTER.prepare(mcp_config("x", target, input_schema=schema, options=options))
    assert SECRET not in str(refused.value)


# --- invoke -----------------------------------------------------------------------------------


async def test_a_call_returns_structured_content_or_text_and_carries_the_key(
    servers: Servers,
) -> None:
    remote = servers()
    tool = ADAPTER.prepare(mcp_config("sum", remote.url, options={"tool": "add"}))
    assert await tool.invoke({"a": 2, "b": 3.5}, context("exec-7")) == {"total": 5.5, "terms": 2}
    shout = ADAPTER.prepare(mcp_config("shout", remote.url))
    assert await shout.invoke({"text": "hi"}, context()) == "HI"
    call = remote.calls("add")[0]
    assert call["args"] == {"a": 2, "b": 3.5}
    assert call["meta"][IDEMPOTENCY_META] == "exec-7"


async def test_a_remote_error_is_a_tool_error(servers: Servers) -> None:
    remote = servers()
    tool = ADAPTER.prepare(mcp_config("explode", remote.url))
    with pytest.raises(ToolError, match="kaboom"):
        await tool.invoke({"message": "kaboom"}, context())
    # Invalid arguments, refused by the remote's JSON-RPC layer or its validation: a tool error.
    with pytest.raises(ToolError):
        await tool.invoke({"wrong": 1}, context())


async def test_progress_of_the_remote_is_forwarded(servers: Servers) -> None:
    remote = servers()
    tool = ADAPTER.prepare(mcp_config("count_up", remote.url))
    seen: list[Any] = []
    assert await tool.invoke({"steps": 3}, context(sink=seen)) == {"result": 3}
    assert seen == [(1, 3, "step 1 of 3"), (2, 3, "step 2 of 3"), (3, 3, "step 3 of 3")]


async def test_a_server_that_is_down_raises_a_retryable_error(servers: Servers) -> None:
    port = free_port()
    schema = {"type": "object", "properties": {"text": {"type": "string"}}}
    tool = ADAPTER.prepare(
        mcp_config(
            "shout",
            f"http://127.0.0.1:{port}/mcp",
            input_schema=schema,
            options={"connect_timeout_seconds": 5},
        )
    )
    with pytest.raises(RemoteCallError, match=f"127.0.0.1:{port}") as failed:
        await tool.invoke({"text": "a"}, context())
    assert not isinstance(failed.value, ToolError)
    servers(port=port)
    assert await tool.invoke({"text": "a"}, context()) == "A"


async def test_credentials_come_from_the_environment_and_are_never_logged(
    servers: Servers, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("MCP_TEST_TOKEN", SECRET)
    caplog.set_level(logging.DEBUG)
    remote = servers(token_env="MCP_TEST_TOKEN")
    options = {"tool": "add", "bearer_token_env": "MCP_TEST_TOKEN"}
    tool = ADAPTER.prepare(mcp_config("sum", remote.url, options=options))
    await tool.invoke({"a": 1, "b": 1}, context())
    assert [c["auth"] for c in remote.calls("add")] == [True]
    # Without the token the remote still answers (it only reports what it saw).
    plain = ADAPTER.prepare(mcp_config("sum", remote.url, options={"tool": "add"}))
    await plain.invoke({"a": 1, "b": 1}, context())
    assert [c["auth"] for c in remote.calls("add")] == [True, False]
    assert SECRET not in caplog.text
    assert SECRET not in repr(tool.spec) and SECRET not in repr(vars(tool.options))


async def test_a_server_over_stdio(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    log = tmp_path / "stdio.jsonl"
    target = f"stdio:{sys.executable} -m tests.adapters.mcp_remote_server --stdio --log {log}"
    # The server gets only the variables it is given: PYTHONPATH, so `tests` is importable.
    monkeypatch.setenv("PYTHONPATH", child_env()["PYTHONPATH"])
    tool = ADAPTER.prepare(
        mcp_config("shout", target, options={"env_from_env": {"PYTHONPATH": "PYTHONPATH"}})
    )
    assert tool.spec.description == "Echo text back, as plain text."
    assert await tool.invoke({"text": "quiet"}, context()) == "QUIET"
    assert [json.loads(line)["tool"] for line in log.read_text().splitlines()] == ["shout"]


# --- through the gateway ----------------------------------------------------------------------


async def test_the_gateway_lists_and_calls_remote_tools(
    servers: Servers, gateways: GatewayFactory, tmp_path: Path
) -> None:
    remote = servers()
    config = gateway_config(
        tmp_path,
        [
            {"name": "remote_add", "kind": "mcp", "target": remote.url, "options": {"tool": "add"}},
            {
                "name": "explode",
                "kind": "mcp",
                "target": remote.url,
                "retry": {"max_attempts": 3, "first_interval_seconds": 0.1},
            },
        ],
    )
    gateway = gateways(config)
    async with mcp_session(gateway.url) as session:
        listed = {t.name: t for t in (await session.list_tools()).tools}
        assert set(listed) == {"remote_add", "explode"}
        assert listed["remote_add"].description == "Add two numbers on the remote server."
        assert set(listed["remote_add"].inputSchema["properties"]) == {"a", "b"}
        assert listed["remote_add"].outputSchema is not None

        result = await session.call_tool("remote_add", {"a": 20, "b": 22})
        assert not result.isError, result
        assert result.structuredContent == {"total": 42, "terms": 2}

        failed = await session.call_tool("explode", {"message": "remote says no"})
        assert failed.isError
        text = " ".join(c.text for c in failed.content if isinstance(c, types.TextContent))
        assert "remote says no" in text
    # A remote tool error is final: not retried, although the tool has a retry policy.
    assert len(remote.calls("explode")) == 1


class RefusingListener:
    """A port that accepts connections and closes them at once, counting them: a remote that is
    there but broken, so the test knows a call has failed before the real server comes up."""

    def __init__(self, port: int) -> None:
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", port))
        self.sock.listen(16)
        self.accepted = 0
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            conn.close()

    def close(self) -> None:
        self.sock.close()
        self._thread.join(timeout=10)


async def test_remote_down_then_up_is_retried_to_success(
    servers: Servers, gateways: GatewayFactory, tmp_path: Path
) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}/mcp"
    schema = {"type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]}
    config = gateway_config(
        tmp_path,
        [
            {
                "name": "shout",
                "kind": "mcp",
                "target": url,
                "input_schema": schema,  # the gateway starts while the remote is down
                "timeout_seconds": 120,
                "retry": {
                    "max_attempts": 60,
                    "first_interval_seconds": 0.2,
                    "backoff_coefficient": 1.0,
                },
                "options": {"connect_timeout_seconds": 5},
            }
        ],
    )
    broken = RefusingListener(port)
    gateway = gateways(config)
    async with mcp_session(gateway.url) as session:
        call = asyncio.create_task(session.call_tool("shout", {"text": "back"}))
        deadline = time.monotonic() + TIMEOUT
        while broken.accepted < 2:  # at least one failed attempt and its retry
            assert time.monotonic() < deadline, gateway.log()
            assert not call.done(), call.result()
            await asyncio.sleep(0.05)
        broken.close()
        remote = servers(port=port)
        result = await asyncio.wait_for(call, TIMEOUT)
    assert not result.isError, (result, gateway.log())
    text = " ".join(c.text for c in result.content if isinstance(c, types.TextContent))
    assert "BACK" in text
    assert len(remote.calls("shout")) == 1


# --- Duragate to Duragate ---------------------------------------------------------------------


@pytest.fixture
def remote_duragate(
    gateways: GatewayFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> tuple[GatewayProcess, Path]:
    """A second gateway whose `record` tool appends to a file on every run."""
    effects = tmp_path / "effects.txt"
    monkeypatch.setenv("SIDE_EFFECTS_FILE", str(effects))  # inherited by the gateway process
    remote_dir = tmp_path / "remote"
    remote_dir.mkdir()
    config = gateway_config(
        remote_dir,
        [{"name": "record", "kind": "python", "target": "tests.adapters.side_effects:record"}],
    )
    return gateways(config, data_dir=remote_dir / "data"), effects


async def test_duragate_to_duragate_dedupes_a_retried_call(
    remote_duragate: tuple[GatewayProcess, Path],
) -> None:
    remote, effects = remote_duragate
    tool: McpTool = ADAPTER.prepare(mcp_config("record", remote.url))
    assert set(tool.spec.input_schema["properties"]) == {"note"}
    first = await tool.invoke({"note": "pay"}, context("exec-A"))
    assert first == {"note": "pay", "runs": 1}
    # A retry of the same activity (same task execution id): the remote replays its result.
    again = await tool.invoke({"note": "pay"}, context("exec-A"))
    assert again == first
    assert effects.read_text().splitlines() == ["pay"]
    # Another call (another execution id) runs again.
    other = await tool.invoke({"note": "pay"}, context("exec-B"))
    assert other == {"note": "pay", "runs": 2}


async def test_a_call_chained_through_two_gateways(
    remote_duragate: tuple[GatewayProcess, Path], gateways: GatewayFactory, tmp_path: Path
) -> None:
    remote, effects = remote_duragate
    front_dir = tmp_path / "front"
    front_dir.mkdir()
    config = gateway_config(
        front_dir,
        [
            {
                "name": "remote_record",
                "kind": "mcp",
                "target": remote.url,
                "options": {"tool": "record"},
            }
        ],
    )
    front = gateways(config, data_dir=front_dir / "data")
    async with mcp_session(front.url) as session:
        result = await session.call_tool("remote_record", {"note": "chained"})
    assert not result.isError, (result, front.log(), remote.log())
    assert result.structuredContent == {"note": "chained", "runs": 1}
    assert effects.read_text().splitlines() == ["chained"]


# --- the gateway's own identity, outbound -----------------------------------------------------

CALLER = "spiffe://example.org/team-a/front-gateway"
MTLS_REMOTE = """\
listen:
  host: 127.0.0.1
  port: 0
  tls:
    cert: server.pem
    key: server.key
    client_certs: required
identity:
  trust_domain: example.org
  allow_anonymous: false
  bundles:
    example.org: ca/bundle.json
  tenants:
    - match: spiffe://example.org/team-a/**
      tenant: team-a
tools:
  - name: record
    kind: python
    target: tests.adapters.side_effects:record
"""


async def test_the_gateway_presents_its_svid_to_a_remote_duragate(
    gateways: GatewayFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    effects = tmp_path / "effects.txt"
    monkeypatch.setenv("SIDE_EFFECTS_FILE", str(effects))
    remote_dir = tmp_path / "mtls"
    ca = DevCA.create(remote_dir / "ca", "example.org")
    cert, key = ca.issue_x509_svid(
        "spiffe://example.org/remote",
        timedelta(hours=1),
        server_names=["127.0.0.1"],
        for_server=True,
    )
    write_x509_svid(remote_dir / "server.pem", remote_dir / "server.key", cert, key)
    cert, key = ca.issue_x509_svid(CALLER, timedelta(hours=1))
    svid = (tmp_path / "svid.pem", tmp_path / "svid.key")
    write_x509_svid(*svid, cert, key)
    (remote_dir / "gateway.yaml").write_text(MTLS_REMOTE)
    remote = gateways(remote_dir / "gateway.yaml", data_dir=remote_dir / "data")
    assert remote.url.startswith("https://127.0.0.1:")

    tls = {"cert": str(svid[0]), "key": str(svid[1]), "ca": str(remote_dir / "ca" / "bundle.pem")}
    tool = ADAPTER.prepare(mcp_config("record", remote.url, options={"tls": tls}))
    assert await tool.invoke({"note": "signed"}, context("exec-tls")) == {
        "note": "signed",
        "runs": 1,
    }
    # The remote knew who called: our SVID, as its own tenant's principal.
    assert f"principal={CALLER} tenant=team-a" in remote.log_path.read_text()

    # Without the certificate the remote refuses the connection: a retryable transport error.
    schema = {"type": "object", "properties": {"note": {"type": "string"}}}
    anonymous = ADAPTER.prepare(
        mcp_config("record", remote.url, input_schema=schema, options={"tls": {"ca": tls["ca"]}})
    )
    with pytest.raises(RemoteCallError):
        await anonymous.invoke({"note": "unsigned"}, context("exec-anon"))
    assert effects.read_text().splitlines() == ["signed"]


async def test_the_gateway_presents_its_own_identity_from_its_config(
    gateways: GatewayFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`identity.own` in the calling gateway's config and `options.identity: own` on its tool:
    no certificate files on the tool, the gateway's current SVID is presented."""
    effects = tmp_path / "effects.txt"
    monkeypatch.setenv("SIDE_EFFECTS_FILE", str(effects))
    remote_dir = tmp_path / "mtls"
    ca = DevCA.create(remote_dir / "ca", "example.org")
    cert, key = ca.issue_x509_svid(
        "spiffe://example.org/remote",
        timedelta(hours=1),
        server_names=["127.0.0.1"],
        for_server=True,
    )
    write_x509_svid(remote_dir / "server.pem", remote_dir / "server.key", cert, key)
    (remote_dir / "gateway.yaml").write_text(MTLS_REMOTE)
    remote = gateways(remote_dir / "gateway.yaml", data_dir=remote_dir / "data")
    front_config = {
        "listen": {"host": "127.0.0.1", "port": 0},
        "identity": {
            "allow_anonymous": True,
            "own": {"source": "dev_ca", "ca_dir": str(remote_dir / "ca"), "spiffe_id": CALLER},
        },
        "tools": [
            {
                "name": "record",
                "kind": "mcp",
                "target": remote.url,
                "options": {"identity": "own"},
                "input_schema": {"type": "object", "properties": {"note": {"type": "string"}}},
            }
        ],
    }
    (tmp_path / "front.yaml").write_text(yaml.safe_dump(front_config))
    front = gateways(tmp_path / "front.yaml", data_dir=tmp_path / "front-data")
    async with mcp_session(front.url) as session:
        result = await session.call_tool("record", {"note": "own"})
    assert not result.isError, (result, front.log(), remote.log())
    assert result.structuredContent == {"note": "own", "runs": 1}
    assert f"principal={CALLER} tenant=team-a" in remote.log_path.read_text()


async def test_an_access_token_from_client_credentials(
    gateways: GatewayFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`options.oauth`: the gateway gets an access token for itself from an authorization
    server (client credentials) and a remote Duragate that trusts that server accepts it."""
    from tests.identity.oauth_server import AuthServer

    monkeypatch.setenv("SIDE_EFFECTS_FILE", str(tmp_path / "effects.txt"))
    monkeypatch.setenv("REMOTE_CLIENT_SECRET", "s3cret")
    audience = "https://remote.example/mcp"
    with AuthServer() as idp:
        remote_dir = tmp_path / "remote"
        remote_dir.mkdir()
        remote_config = {
            "listen": {"host": "127.0.0.1", "port": 0},
            "identity": {
                "trust_domain": "example.org",
                "allow_anonymous": False,
                "oauth": [{"issuer": idp.issuer, "audience": audience, "tenant": "partners"}],
            },
            "tools": [
                {"name": "record", "kind": "python", "target": "tests.adapters.side_effects:record"}
            ],
        }
        (remote_dir / "gateway.yaml").write_text(yaml.safe_dump(remote_config))
        remote = gateways(remote_dir / "gateway.yaml", data_dir=remote_dir / "data")
        oauth = {
            "token_endpoint": idp.token_endpoint,
            "client_id": "gateway",
            "client_secret_env": "REMOTE_CLIENT_SECRET",
            "resource": audience,
        }
        tool = ADAPTER.prepare(mcp_config("record", remote.url, options={"oauth": oauth}))
        assert await tool.invoke({"note": "oauth"}, context("exec-oauth")) == {
            "note": "oauth",
            "runs": 1,
        }
        # The token is cached: the second call asks the authorization server nothing new.
        asked = len(idp.token_requests)
        again = await tool.invoke({"note": "again"}, context("exec-oauth-2"))
        assert again["note"] == "again"
        assert len(idp.token_requests) == asked
    assert "principal=spiffe://example.org/user/gateway tenant=partners" in (
        remote.log_path.read_text()
    )
    monkeypatch.delenv("REMOTE_CLIENT_SECRET")
    with pytest.raises(ToolLoadError, match="REMOTE_CLIENT_SECRET"):
        ADAPTER.prepare(
            mcp_config("x", remote.url, input_schema={"type": "object"}, options={"oauth": oauth})
        )


def test_own_identity_options_are_checked() -> None:
    schema = {"type": "object"}
    url = "https://127.0.0.1:1/mcp"
    # No `identity.own` in the gateway (nothing set it): refused at load, with the fix named.
    with pytest.raises(ToolLoadError, match="set identity.own"):
        ADAPTER.prepare(mcp_config("x", url, input_schema=schema, options={"identity": "own"}))
    with pytest.raises(ToolLoadError, match="jwt_audience needs identity: own"):
        ADAPTER.prepare(mcp_config("x", url, input_schema=schema, options={"jwt_audience": "a"}))


def test_tls_options_are_checked(tmp_path: Path) -> None:
    schema = {"type": "object"}
    url = "https://127.0.0.1:1/mcp"
    with pytest.raises(ToolLoadError, match="tls.cert and tls.key go together"):
        ADAPTER.prepare(mcp_config("x", url, input_schema=schema, options={"tls": {"cert": "a"}}))
    with pytest.raises(ToolLoadError, match="need an https:// URL"):
        ADAPTER.prepare(
            mcp_config("x", "http://127.0.0.1:1/mcp", input_schema=schema, options={"tls": {}})
        )
    missing = tmp_path / "nope.pem"
    with pytest.raises(ToolLoadError, match=f"tls.cert {missing}"):
        ADAPTER.prepare(
            mcp_config(
                "x",
                url,
                input_schema=schema,
                options={"tls": {"cert": str(missing), "key": str(missing)}},
            )
        )
