"""Anonymous callers and the local (stdio) principal.

- `duragate serve` of a config that does not admit anonymous callers: an unauthenticated call
  gets 401 and nothing is scheduled; with `--allow-anonymous` the same call runs as the
  configured anonymous principal and tenant, and still does after a reload (SIGHUP);
- over stdio the caller is `identity.local_principal` or `spiffe://<td>/local/<user>`.
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml
from mcp import ClientSession
from mcp.client.stdio import StdioServerParameters, stdio_client

from gateway.config import IdentityConfig
from gateway.stdio import local_principal
from tests.gateway.conftest import INIT, MCP_HEADERS, REPO_ROOT, TEST_CONFIG, child_env

pytestmark = [
    pytest.mark.timeout(90),
    pytest.mark.filterwarnings("ignore:The experimental tasks API:DeprecationWarning"),
]

CALL = {
    "jsonrpc": "2.0",
    "id": 2,
    "method": "tools/call",
    "params": {"name": "add", "arguments": {"a": 1, "b": 2}},
}
CLOSED = {"allow_anonymous": False, "trust_domain": "example.org"}


class Served:
    """`python -m gateway serve` in its own process."""

    def __init__(self, tmp: Path, *flags: str) -> None:
        config = yaml.safe_load(TEST_CONFIG.read_text())
        config["identity"] = {
            **CLOSED,
            "anonymous_principal": "spiffe://example.org/guest",
            "anonymous_tenant": "guests",
        }
        self.config = tmp / "gateway.yaml"
        self.config.write_text(yaml.safe_dump(config))
        self.log_path = tmp / "serve.log"
        argv = [
            sys.executable,
            "-m",
            "gateway",
            "--log-format",
            "json",
            "--data-dir",
            str(tmp / "data"),
        ]
        argv += ["serve"]
        argv += ["--config", str(self.config), "--port", "0", *flags]
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            argv, cwd=REPO_ROOT, env=child_env(), stdout=self._log, stderr=self._log
        )
        self.base = self._wait_for(r"MCP at (http://127\.0\.0\.1:\d+)/mcp").group(1)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def _wait_for(self, pattern: str, after: int = 0) -> re.Match[str]:
        deadline = time.monotonic() + 45
        while time.monotonic() < deadline:
            found = re.search(pattern, self.log()[after:])
            if found:
                return found
            if self.proc.poll() is not None:
                break
            time.sleep(0.1)
        raise AssertionError(f"{pattern!r} not in the log:\n{self.log()[-3000:]}")

    def reload(self) -> None:
        mark = len(self.log())
        self.proc.send_signal(signal.SIGHUP)
        self._wait_for("config reloaded", after=mark)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()


@pytest.fixture
def served(tmp_path: Path) -> Iterator[list[Served]]:
    started: list[Served] = []
    yield started
    for server in started:
        server.stop()


async def _call_without_credentials(base: str) -> tuple[httpx.Response, httpx.Response]:
    async with httpx.AsyncClient(base_url=base, timeout=30) as http:
        opened = await http.post("/mcp", json=INIT, headers=MCP_HEADERS)
        headers = dict(MCP_HEADERS)
        if "mcp-session-id" in opened.headers:
            headers["mcp-session-id"] = opened.headers["mcp-session-id"]
            await http.post(
                "/mcp",
                json={"jsonrpc": "2.0", "method": "notifications/initialized"},
                headers=headers,
            )
        called = await http.post("/mcp", json=CALL, headers=headers)
    return opened, called


async def test_without_the_flag_an_unauthenticated_call_is_401_and_not_scheduled(
    tmp_path: Path, served: list[Served]
) -> None:
    server = Served(tmp_path)
    served.append(server)
    opened, called = await _call_without_credentials(server.base)
    for response in (opened, called):
        assert response.status_code == 401
        assert "identity.allow_anonymous is false" in response.json()["message"]
    assert "audit scheduled" not in server.log()


async def test_allow_anonymous_flag_admits_the_configured_principal(
    tmp_path: Path, served: list[Served]
) -> None:
    server = Served(tmp_path, "--allow-anonymous")
    served.append(server)
    for _ in range(2):  # before and after a reload of the config file, which says false
        opened, called = await _call_without_credentials(server.base)
        assert opened.status_code == 200 and called.status_code == 200
        assert '"structuredContent":{"result":3' in called.text.replace(" ", "")
        server.reload()
    log = server.log()
    assert (
        log.count("audit scheduled tool=add principal=spiffe://example.org/guest tenant=guests")
        == 2
    )


def test_allow_anonymous_flag_is_refused_beyond_loopback(tmp_path: Path) -> None:
    config = yaml.safe_load(TEST_CONFIG.read_text())
    config["identity"] = CLOSED
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(config))
    argv = [sys.executable, "-m", "gateway", "--data-dir", str(tmp_path / "data"), "serve"]
    argv += ["--config", str(path), "--host", "0.0.0.0", "--allow-anonymous"]
    result = subprocess.run(
        argv, cwd=REPO_ROOT, env=child_env(), capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2
    flat = " ".join(re.sub("[│╭╮╰╯─]", " ", result.stderr).split())  # rich's box and wrapping
    assert "allow_anonymous is only allowed on loopback" in flat
    assert not (tmp_path / "data").exists()


# -- stdio ------------------------------------------------------------------------------------


def test_local_principal_defaults_and_settings() -> None:
    plain = local_principal(IdentityConfig(), "bob")
    assert (plain.id, plain.tenant, plain.via) == (
        "spiffe://duragate.local/local/bob",
        "default",
        "local",
    )
    own = local_principal(IdentityConfig(trust_domain="example.org", local_tenant="dev"), "b@b")
    assert (own.id, own.tenant) == ("spiffe://example.org/local/b_b", "dev")
    configured = IdentityConfig(
        local_principal="spiffe://example.org/team-a/bob", local_tenant="team-a"
    )
    assert local_principal(configured, "ignored").id == "spiffe://example.org/team-a/bob"


async def test_stdio_caller_is_the_configured_local_principal(tmp_path: Path) -> None:
    config = yaml.safe_load(TEST_CONFIG.read_text())
    config["identity"] = {
        **CLOSED,
        "local_principal": "spiffe://example.org/team-a/dev",
        "local_tenant": "team-a",
    }
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(config))
    args = ["-m", "gateway", "--log-format", "json", "--data-dir", str(tmp_path / "data")]
    args += ["stdio", "--config", str(path)]
    params = StdioServerParameters(
        command=sys.executable, args=args, env=child_env(), cwd=str(REPO_ROOT)
    )
    log = tmp_path / "stderr.log"
    with log.open("w") as errlog:
        async with stdio_client(params, errlog=errlog) as (read, write):
            async with ClientSession(read, write) as session:
                await session.initialize()
                result = await session.call_tool("add", {"a": 1, "b": 2})
    assert not result.isError
    text = log.read_text()
    assert (
        "audit scheduled tool=add principal=spiffe://example.org/team-a/dev tenant=team-a" in text
    )
