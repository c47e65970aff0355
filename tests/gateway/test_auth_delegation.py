"""Delegation at the HTTP front door, over real mTLS: an agent presents its own X.509-SVID and a
user's token whose `act.sub` names the agent. Accepted, the workflow input records who acts for
whom (`principal.chain`); an `act` naming another agent, or a delegation token without the
agent's certificate, is refused with 401 and nothing is scheduled.
"""

from __future__ import annotations

import json
import re
import ssl
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from mcp import ClientSession
from mcp.client.streamable_http import streamable_http_client

from gateway.config import load_config
from gateway.paths import engine_db_path
from gateway.runtime import DurableRuntime
from identity.dev_ca import DevCA, write_x509_svid
from tests.gateway.conftest import INIT, MCP_HEADERS, TEST_CONFIG, GatewayFactory, GatewayProcess

pytestmark = [
    pytest.mark.timeout(90),
    pytest.mark.filterwarnings("ignore:The experimental tasks API:DeprecationWarning"),
]

ALICE = "spiffe://example.org/team-a/alice"  # the user
PLANNER = "spiffe://example.org/agents/planner"  # an agent Alice asked
CODER = "spiffe://example.org/agents/coder"  # an agent the planner asked in turn
IDENTITY = """\
identity:
  trust_domain: example.org
  allow_anonymous: false
  bundles:
    example.org: ca/bundle.json
  tenants:
    - match: spiffe://example.org/team-a/**
      tenant: team-a
"""
LISTEN = """\
listen:
  host: 127.0.0.1
  port: 0
  tls:
    cert: server.pem
    key: server.key
    client_certs: optional
"""


@dataclass
class Setup:
    tmp: Path
    ca: DevCA
    gateway: GatewayProcess

    def context(self, spiffe_id: str | None) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.ca.directory / "bundle.pem"))
        if spiffe_id is not None:
            cert, key = self.ca.issue_x509_svid(spiffe_id, timedelta(minutes=10))
            name = spiffe_id.rsplit("/", 1)[1]
            files = (self.tmp / f"{name}.pem", self.tmp / f"{name}.key")
            write_x509_svid(*files, cert, key)
            ctx.load_cert_chain(*files)
        return ctx

    def user_token(self, act: dict[str, Any] | None) -> str:
        extra = {"act": act} if act is not None else None
        return self.ca.issue_jwt_svid(ALICE, "duragate", timedelta(minutes=5), extra_claims=extra)

    def scheduled(self) -> int:
        return self.gateway.log_path.read_text(errors="replace").count("audit scheduled")


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    tmp = tmp_path_factory.mktemp("delegation")
    ca = DevCA.create(tmp / "ca", "example.org")
    cert, key = ca.issue_x509_svid(
        "spiffe://example.org/duragate",
        timedelta(hours=1),
        server_names=["127.0.0.1", "localhost"],
        for_server=True,
    )
    write_x509_svid(tmp / "server.pem", tmp / "server.key", cert, key)
    text = TEST_CONFIG.read_text().replace("identity:\n  allow_anonymous: true\n", IDENTITY)
    text = text.replace("listen:\n  host: 127.0.0.1\n  port: 0\n", "")
    config = tmp / "gateway.yaml"
    config.write_text(LISTEN + text)
    factory = GatewayFactory(tmp)
    try:
        yield Setup(tmp, ca, factory(config, data_dir=tmp / "data"))
    finally:
        factory.stop_all()


@asynccontextmanager
async def session(setup: Setup, agent: str, token: str) -> AsyncIterator[ClientSession]:
    headers = {"Authorization": f"Bearer {token}"}
    async with httpx.AsyncClient(
        verify=setup.context(agent), headers=headers, timeout=httpx.Timeout(30, read=300)
    ) as http:
        async with streamable_http_client(setup.gateway.url, http_client=http) as (read, write, _):
            async with ClientSession(read, write) as client:
                await client.initialize()
                yield client


async def workflow_input(setup: Setup, task_id: str) -> dict[str, Any]:
    """The recorded input of a workflow, read from the engine's database after the gateway
    stopped (its file is the gateway's own while it runs)."""
    setup.gateway.stop()
    config = load_config(setup.gateway.config)
    runtime = DurableRuntime(config.engine, engine_db_path(setup.tmp / "data"), lambda _: None)
    await runtime.start()
    try:
        state = await runtime.client.get_workflow_state(task_id)
    finally:
        await runtime.stop()
    assert state is not None and state.serialized_input
    return dict(json.loads(state.serialized_input))


async def _refused(setup: Setup, agent: str | None, token: str) -> httpx.Response:
    headers = {**MCP_HEADERS, "Authorization": f"Bearer {token}"}
    async with httpx.AsyncClient(base_url=setup.gateway.base, verify=setup.context(agent)) as http:
        response = await http.post("/mcp", json=INIT, headers=headers)
    assert response.status_code == 401
    assert 'error="invalid_token"' in response.headers["www-authenticate"]
    return response


async def test_act_naming_another_agent_is_refused(setup: Setup) -> None:
    before = setup.scheduled()
    token = setup.user_token({"sub": CODER})
    response = await _refused(setup, PLANNER, token)
    assert response.json()["message"] == (
        f"delegation refused: the token's act.sub ({CODER}) is not the client certificate's "
        f"SPIFFE ID ({PLANNER}); only the agent the token names may use it"
    )
    assert setup.scheduled() == before
    log = setup.gateway.log_path.read_text()
    assert re.search(r"audit unauthenticated status=401 .* reason=delegation refused: ", log)


async def test_delegation_token_without_the_agents_certificate_is_refused(setup: Setup) -> None:
    response = await _refused(setup, None, setup.user_token({"sub": PLANNER}))
    assert "a delegation token is only accepted over mTLS" in response.json()["message"]


async def test_malformed_act_is_refused(setup: Setup) -> None:
    response = await _refused(setup, PLANNER, setup.user_token({"sub": "planner"}))
    assert "act.sub 'planner' is not a SPIFFE ID" in response.json()["message"]


# Last: it stops the gateway to read the engine's database.
async def test_an_agent_acting_for_a_user_is_recorded_in_the_workflow_input(
    setup: Setup,
) -> None:
    # Alice asked the planner, which asked the coder: the coder presents the token.
    token = setup.user_token({"sub": CODER, "act": {"sub": PLANNER}})
    async with session(setup, CODER, token) as client:
        created = await client.experimental.call_tool_as_task(
            "slow_echo", {"text": "for alice", "seconds": 0.1}
        )
        task_id = created.task.taskId
    log = setup.gateway.log_path.read_text()
    assert f"audit scheduled tool=slow_echo principal={CODER} tenant=team-a" in log
    assert f"audit delegated principal={CODER} tenant=team-a chain={ALICE},{PLANNER}" in log
    principal = (await workflow_input(setup, task_id))["principal"]
    assert principal == {
        "id": CODER,
        "tenant": "team-a",
        "via": "x509-svid",
        "chain": [ALICE, PLANNER],
    }
