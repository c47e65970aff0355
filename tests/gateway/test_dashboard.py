"""The dashboard end to end in headless Chromium (Debian's `chromium`, driven by Playwright):
load /ui, see a call that waits for approval appear, approve it with the button, see it
complete, and open its timeline. Also: the page's security headers, data shown as text (a call
whose arguments hold markup does not run it), and a bearer token pasted into the page.

Chromium must be installed (`apt-get install -y chromium`; `make test` installs it when it can):
without it these tests fail, saying so, rather than skip. On failure a screenshot is saved in
the test's tmp directory and named in the assertion message.
"""

from __future__ import annotations

import asyncio
import re
import shutil
from collections.abc import Coroutine, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
import yaml
from playwright.sync_api import Browser, Page, expect, sync_playwright

from identity.dev_ca import DevCA, write_x509_svid
from tests.gateway.conftest import (
    TEST_CONFIG,
    GatewayFactory,
    GatewayProcess,
    config_with,
    mcp_session,
)
from tests.gateway.test_auth_jwt import session_as

pytestmark = [pytest.mark.timeout(240)]
T = TypeVar("T")

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
WAIT_MS = 60_000  # generous: the machine is shared

POLICY = """
tenant: default
members: [spiffe://duragate.local/**]
tools:
  "*":
    call: [group:members]
  slow_echo:
    call: [group:members]
    approval: {approvers: [group:members], allow_self: true, expires_seconds: 600}
"""


def _chromium() -> str:
    path = shutil.which("chromium") or (str(CHROMIUM) if CHROMIUM.exists() else None)
    if path is None:
        pytest.fail(
            "headless Chromium is not installed: `apt-get install -y chromium` (Debian's "
            "package; `make test` installs it when run as root)"
        )
    return path


@contextmanager
def browser() -> Iterator[Browser]:
    with sync_playwright() as p:
        launched = p.chromium.launch(executable_path=_chromium(), args=CHROMIUM_ARGS)
        try:
            yield launched
        finally:
            launched.close()


@contextmanager
def screenshot_on_failure(page: Page, tmp_path: Path, gateway: GatewayProcess) -> Iterator[None]:
    try:
        yield
    except Exception as exc:
        shot = tmp_path / "dashboard-failure.png"
        try:
            page.screenshot(path=str(shot), full_page=True)
        except Exception as again:  # noqa: BLE001 - the original failure matters more
            shot = Path(f"(no screenshot: {again})")
        raise AssertionError(
            f"dashboard test failed: {exc}\nscreenshot: {shot}\ngateway log:\n{gateway.log()}"
        ) from exc


def run_async(coroutine: Coroutine[Any, Any, T]) -> T:
    """Run MCP client code from a test that drives Playwright's sync API (which keeps an event
    loop of its own in this thread)."""
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coroutine).result(timeout=120)


def _errors(page: Page) -> list[str]:
    """Console errors and uncaught exceptions (a CSP violation shows up as one)."""
    found: list[str] = []
    page.on("console", lambda m: found.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: found.append(str(e)))
    page.on(
        "response",
        lambda r: found.append(f"{r.status} {r.url}") if r.status >= 400 else None,
    )
    return found


@pytest.fixture
def demo_gateway(spawn_gateway: GatewayFactory, tmp_path: Path) -> GatewayProcess:
    """Anonymous callers on loopback, and the anonymous principal a global admin (the demo)."""
    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "default.yaml").write_text(POLICY)
    config = config_with(
        tmp_path,
        policy={"dir": str(policies)},
        admin={"principals": ["spiffe://duragate.local/anonymous"]},
    )
    return spawn_gateway(config=config)


async def _start_waiting_call(url: str) -> str:
    async with mcp_session(url) as session:
        created = await session.experimental.call_tool_as_task(
            "slow_echo", {"text": "from the dashboard", "seconds": 0}
        )
        return created.task.taskId


def test_see_a_call_approve_it_and_see_it_complete(
    demo_gateway: GatewayProcess, tmp_path: Path
) -> None:
    with browser() as chromium:
        page = chromium.new_page()
        errors = _errors(page)
        with screenshot_on_failure(page, tmp_path, demo_gateway):
            page.goto(f"{demo_gateway.base}/ui")
            expect(page.locator("#who")).to_contain_text("admin of every tenant", timeout=WAIT_MS)
            expect(page.locator("#tools tbody")).to_contain_text("slow_echo", timeout=WAIT_MS)
            expect(page.locator("#policies tbody")).to_contain_text("default.yaml")

            task_id = run_async(_start_waiting_call(demo_gateway.url))
            row = page.locator(f'#calls tr[data-task-id="{task_id}"]')
            expect(row).to_have_attribute("data-state", "input_required", timeout=WAIT_MS)
            expect(row).to_contain_text("approval")

            approve = page.locator(f'#approvals button.approve[data-task-id="{task_id}"]')
            expect(approve).to_be_enabled(timeout=WAIT_MS)
            approve.click()
            expect(row).to_have_attribute("data-state", "completed", timeout=WAIT_MS)
            expect(approve).to_have_count(0, timeout=WAIT_MS)

            row.click()
            expect(page.locator("#detail-id")).to_have_text(task_id, timeout=WAIT_MS)
            activities = page.locator("#activities tbody tr")
            expect(activities).to_have_count(1, timeout=WAIT_MS)
            expect(activities.first).to_contain_text("completed")
            expect(page.locator("#waits")).to_contain_text("duragate.approval")
            expect(page.locator("#timeline .bar")).not_to_have_count(0)
            expect(page.locator("#detail-io")).to_contain_text("from the dashboard")
        assert errors == [], errors


def test_markup_in_a_call_is_shown_as_text(demo_gateway: GatewayProcess, tmp_path: Path) -> None:
    markup = "<img src=x onerror=window.__pwned=1><b>bold</b>"

    async def call() -> None:
        async with mcp_session(demo_gateway.url) as session:
            await session.call_tool("word_count", {"text": markup})

    run_async(call())
    with browser() as chromium:
        page = chromium.new_page()
        with screenshot_on_failure(page, tmp_path, demo_gateway):
            page.goto(f"{demo_gateway.base}/ui")
            row = page.locator("#calls tr.call", has_text="word_count")
            expect(row).to_have_count(1, timeout=WAIT_MS)
            row.click()
            expect(page.locator("#detail-io")).to_contain_text(markup, timeout=WAIT_MS)
            assert page.locator("#detail-section img, #detail-section b").count() == 0
            assert page.evaluate("window.__pwned") is None


def test_security_headers(demo_gateway: GatewayProcess) -> None:
    for path in ("/ui", "/ui/dashboard.js", "/ui/dashboard.css"):
        answer = httpx.get(f"{demo_gateway.base}{path}")
        assert answer.status_code == 200
        csp = answer.headers["content-security-policy"]
        assert "script-src 'self'" in csp and "default-src 'none'" in csp
        assert "unsafe-inline" not in csp
        assert answer.headers["x-content-type-options"] == "nosniff"
    page = httpx.get(f"{demo_gateway.base}/ui").text
    # No inline code: scripts only by src, no event handler attributes, no style attributes.
    assert "<script>" not in page and not re.search(r"\son[a-z]+=", page)
    assert "style=" not in page
    assert httpx.get(f"{demo_gateway.base}/ui/secrets.txt").status_code == 404


def test_a_pasted_bearer_token(spawn_gateway: GatewayFactory, tmp_path: Path) -> None:
    """Without anonymous admins the page says the caller is not allowed; with an admin's
    JWT-SVID pasted into it, it shows the calls."""
    ca = DevCA.create(tmp_path / "ca", "example.org")
    config = yaml.safe_load(TEST_CONFIG.read_text())
    config["identity"] = {
        "trust_domain": "example.org",
        "allow_anonymous": False,
        "bundles": {"example.org": str(tmp_path / "ca" / "bundle.json")},
    }
    config["admin"] = {"principals": ["spiffe://example.org/ops/*"]}
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(config))
    gateway = spawn_gateway(config=path)

    def token(spiffe_id: str) -> str:
        return ca.issue_jwt_svid(spiffe_id, "duragate", ttl=timedelta(minutes=10))

    async def call() -> None:
        async with session_as(gateway.url, token("spiffe://example.org/apps/one")) as session:
            await session.call_tool("add", {"a": 2, "b": 3})

    run_async(call())
    with browser() as chromium:
        page = chromium.new_page()
        with screenshot_on_failure(page, tmp_path, gateway):
            page.goto(f"{gateway.base}/ui")
            expect(page.locator("#error")).to_contain_text("401", timeout=WAIT_MS)
            page.fill("#token-input", token("spiffe://example.org/apps/one"))
            page.click("#token-save")
            expect(page.locator("#error")).to_contain_text("is not an admin", timeout=WAIT_MS)
            page.fill("#token-input", token("spiffe://example.org/ops/alice"))
            page.click("#token-save")
            expect(page.locator("#who")).to_contain_text("ops/alice", timeout=WAIT_MS)
            expect(page.locator("#calls tr.call", has_text="add")).to_have_count(1, timeout=WAIT_MS)
            assert page.evaluate("sessionStorage.getItem('duragate.token')").count(".") == 2
            assert page.locator("#token-input").input_value() == "********"


def test_a_browser_client_certificate(spawn_gateway: GatewayFactory, tmp_path: Path) -> None:
    """Over mTLS, the browser's client certificate (an X.509-SVID) is the admin's identity."""
    ca = DevCA.create(tmp_path / "ca", "example.org")
    server, server_key = ca.issue_x509_svid(
        "spiffe://example.org/duragate",
        timedelta(hours=1),
        server_names=["127.0.0.1", "localhost"],
        for_server=True,
    )
    write_x509_svid(tmp_path / "server.pem", tmp_path / "server.key", server, server_key)
    client, client_key = ca.issue_x509_svid("spiffe://example.org/ops/carol", timedelta(hours=1))
    write_x509_svid(tmp_path / "carol.pem", tmp_path / "carol.key", client, client_key)
    config = yaml.safe_load(TEST_CONFIG.read_text())
    config["listen"] = {
        "host": "127.0.0.1",
        "port": 0,
        "tls": {"cert": "server.pem", "key": "server.key", "client_certs": "optional"},
    }
    config["identity"] = {
        "trust_domain": "example.org",
        "allow_anonymous": False,
        "bundles": {"example.org": str(tmp_path / "ca" / "bundle.json")},
    }
    config["admin"] = {"principals": ["spiffe://example.org/ops/*"]}
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(config))
    gateway = spawn_gateway(config=path)
    assert gateway.base.startswith("https://")
    with browser() as chromium:
        context = chromium.new_context(
            ignore_https_errors=True,  # the development CA is not in the browser's store
            client_certificates=[
                {
                    "origin": gateway.base,
                    "certPath": str(tmp_path / "carol.pem"),
                    "keyPath": str(tmp_path / "carol.key"),
                }
            ],
        )
        page = context.new_page()
        with screenshot_on_failure(page, tmp_path, gateway):
            page.goto(f"{gateway.base}/ui")
            expect(page.locator("#who")).to_contain_text(
                "spiffe://example.org/ops/carol (x509-svid)", timeout=WAIT_MS
            )
            expect(page.locator("#tools tbody")).to_contain_text("word_count", timeout=WAIT_MS)
