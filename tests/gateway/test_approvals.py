"""Approvals over HTTP: a call the policy makes wait for a person, listed at /approvals, decided
with a POST, across a gateway SIGKILL and restart; refusals for bad requests and DNS rebinding."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
from mcp import types

from tests.gateway.conftest import (
    GatewayFactory,
    GatewayProcess,
    config_with_policy,
    mcp_session,
)

POLICY = """
tenant: default
members:
  - spiffe://duragate.local/**
tools:
  slow_echo:
    call: [group:members]
    approval:
      approvers: [group:members]
      allow_self: true
      expires_seconds: 600
"""


def write_config(tmp_path: Path) -> Path:
    return config_with_policy(tmp_path, POLICY)


def pending(gateway: GatewayProcess, task_id: str, timeout: float = 15) -> list[dict[str, str]]:
    deadline = time.monotonic() + timeout
    with httpx.Client() as http:
        while True:
            listed = http.get(f"{gateway.base}/approvals").json()["approvals"]
            if any(a["task_id"] == task_id for a in listed):
                return listed
            assert time.monotonic() < deadline, gateway.log()
            time.sleep(0.1)


async def test_approve_after_a_sigkill_and_deny(
    spawn_gateway: GatewayFactory, tmp_path: Path
) -> None:
    config = write_config(tmp_path)
    data = tmp_path / "data"
    first = spawn_gateway(config=config, data_dir=data)
    async with mcp_session(first.url) as session:
        created = await session.experimental.call_tool_as_task(
            "slow_echo", {"text": "approved", "seconds": 0}
        )
        task_id = created.task.taskId
    listed = pending(first, task_id)
    assert listed[0]["tool"] == "slow_echo" and "waiting for approval" in listed[0]["message"]
    async with mcp_session(first.url) as session:
        assert (await session.experimental.get_task(task_id)).status == "input_required"
    first.kill()  # the wait for a person survives the gateway

    second = spawn_gateway(config=config, data_dir=data)
    pending(second, task_id)
    with httpx.Client() as http:
        answer = http.post(
            f"{second.base}/approvals/{task_id}", json={"approve": True, "reason": "fine"}
        )
        assert answer.status_code == 200, answer.text
        again = http.post(f"{second.base}/approvals/{task_id}", json={"approve": True})
        assert again.status_code == 409 and again.json()["error"] == "not_waiting"
    async with mcp_session(second.url) as session:
        result = await session.experimental.get_task_result(task_id, types.CallToolResult)
    assert result.structuredContent == {"result": "approved"}

    async with mcp_session(second.url) as session:
        denied_id = (
            await session.experimental.call_tool_as_task("slow_echo", {"text": "x", "seconds": 0})
        ).task.taskId
    pending(second, denied_id)
    with httpx.Client() as http:
        answer = http.post(
            f"{second.base}/approvals/{denied_id}", json={"approve": False, "reason": "no"}
        )
        assert answer.status_code == 200
    async with mcp_session(second.url) as session:
        result = await session.experimental.get_task_result(denied_id, types.CallToolResult)
    assert result.isError and "not approved" in result.content[0].text  # type: ignore[union-attr]


async def test_bad_approval_requests(spawn_gateway: GatewayFactory, tmp_path: Path) -> None:
    gateway = spawn_gateway(config=write_config(tmp_path))
    with httpx.Client() as http:
        unknown = http.post(f"{gateway.base}/approvals/nope", json={"approve": True})
        assert unknown.status_code == 404
        malformed = http.post(f"{gateway.base}/approvals/nope", json={"approve": "yes"})
        assert malformed.status_code == 400 and "approve" in malformed.json()["message"]
        rebinding = http.get(f"{gateway.base}/approvals", headers={"Host": "evil.example"})
        assert rebinding.status_code in (400, 403, 421)


async def test_approvals_cli(spawn_gateway: GatewayFactory, tmp_path: Path) -> None:
    import subprocess
    import sys

    from tests.gateway.conftest import REPO_ROOT, child_env

    def duragate(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "gateway", *args, "--url", gateway.url],
            cwd=REPO_ROOT,
            env=child_env(),
            capture_output=True,
            text=True,
            timeout=60,
        )

    gateway = spawn_gateway(config=write_config(tmp_path))
    async with mcp_session(gateway.url) as session:
        task_id = (
            await session.experimental.call_tool_as_task("slow_echo", {"text": "cli", "seconds": 0})
        ).task.taskId
    pending(gateway, task_id)
    listed = duragate("approvals", "list")
    assert listed.returncode == 0 and task_id[:12] in listed.stdout
    approved = duragate("approvals", "approve", task_id, "--reason", "ok")
    assert approved.returncode == 0 and "approved" in approved.stdout
    missing = duragate("approvals", "deny", "nope", "--reason", "x")
    assert missing.returncode == 1 and "no task" in missing.stderr
