"""Tenant policy files in force in a running gateway: list filtering, denial before anything is
scheduled, obligations, and hot reload (a broken file keeps the last good one, /readyz says so)."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest
from mcp import McpError

from tests.gateway.conftest import GatewayFactory, config_with_policy, mcp_session

POLICY = """
tenant: default
members:
  - spiffe://duragate.local/**
tools:
  add:
    call: [group:members]
    deny:
      - when: "args.a < 0"
        reason: no negative numbers
  slow_echo:
    call: [group:members]
    obligations:
      timeout_seconds: 0.5
"""


def write_config(tmp_path: Path) -> Path:
    return config_with_policy(tmp_path, POLICY)


async def test_policy_filters_denies_and_obliges(
    spawn_gateway: GatewayFactory, tmp_path: Path
) -> None:
    gateway = spawn_gateway(config=write_config(tmp_path))
    async with mcp_session(gateway.url) as session:
        listed = {t.name for t in (await session.list_tools()).tools}
        assert listed == {"add", "slow_echo"}  # default deny: the others are invisible
        ok = await session.call_tool("add", {"a": 1, "b": 2})
        assert ok.structuredContent == {"result": 3.0}
        with pytest.raises(McpError) as info:
            await session.call_tool("add", {"a": -1, "b": 2})
        assert "no negative numbers" in info.value.error.message
        with pytest.raises(McpError):
            await session.call_tool("flaky", {"key": "k"})  # invisible, so unknown
        # The policy's timeout (0.5 s) wins over the tool's (120 s).
        slow = await session.call_tool("slow_echo", {"text": "x", "seconds": 3})
        assert slow.isError
        assert "did not finish within 0.5 s" in slow.content[0].text  # type: ignore[union-attr]


async def test_policy_hot_reload(spawn_gateway: GatewayFactory, tmp_path: Path) -> None:
    config = write_config(tmp_path)
    gateway = spawn_gateway(config=config)
    policy_file = tmp_path / "policies" / "default.yaml"
    policy_file.write_text(POLICY.replace("add:", "word_count:\n    call: [group:members]\n  add:"))
    deadline = time.monotonic() + 15
    async with mcp_session(gateway.url) as session:
        while "word_count" not in {t.name for t in (await session.list_tools()).tools}:
            assert time.monotonic() < deadline, gateway.log()
            time.sleep(0.2)
    policy_file.write_text("tenant: default\nmembers: [nope]\n")  # broken
    with httpx.Client() as http:
        while "policy_errors" not in (body := http.get(f"{gateway.base}/readyz").json()):
            assert time.monotonic() < deadline + 15, gateway.log()
            time.sleep(0.2)
    assert body["status"] == "ready" and "default.yaml" in body["policy_errors"][0]
    async with mcp_session(gateway.url) as session:  # the last good version is in force
        assert "word_count" in {t.name for t in (await session.list_tools()).tools}
