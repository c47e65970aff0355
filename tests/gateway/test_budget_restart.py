"""A budget survives a gateway crash: spent through MCP, the gateway SIGKILLed and restarted on
the same data directory, the next call is still refused, naming the budget and when to retry."""

from __future__ import annotations

from pathlib import Path

import pytest
from mcp import McpError

from tests.gateway.conftest import GatewayFactory, config_with_policy, mcp_session

pytestmark = [pytest.mark.crash, pytest.mark.timeout(120)]

POLICY = """
tenant: default
members:
  - spiffe://duragate.local/**
tools:
  add:
    call: [group:members]
    obligations:
      budget: {calls: 2, per_seconds: 86400}
  word_count:
    call: [group:members]
    obligations:
      rate: {calls: 1, per_seconds: 86400}
"""


async def test_an_exhausted_budget_stays_exhausted_after_sigkill(
    spawn_gateway: GatewayFactory, tmp_path: Path
) -> None:
    config = config_with_policy(tmp_path, POLICY)
    data = tmp_path / "data"
    first = spawn_gateway(config=config, data_dir=data)
    async with mcp_session(first.url) as session:
        for a in (1, 2):
            done = await session.call_tool("add", {"a": a, "b": 1})
            assert done.structuredContent == {"result": a + 1.0}, first.log()
        with pytest.raises(McpError) as info:
            await session.call_tool("add", {"a": 3, "b": 1})
        assert info.value.error.code == -32004
        await session.call_tool("word_count", {"text": "a b"})  # its rate: 1 a day
    first.kill()  # SIGKILL: nothing is flushed or handed over

    second = spawn_gateway(config=config, data_dir=data)
    async with mcp_session(second.url) as session:
        with pytest.raises(McpError) as info:
            await session.call_tool("add", {"a": 4, "b": 1})
        error = info.value.error
        assert error.code == -32004, second.log()
        assert error.message.startswith(
            "budget of add for tenant default reached (2 calls per 86400 s); retry in "
        )
        assert isinstance(error.data, dict) and error.data["limit"] == "budget"
        assert 0 < error.data["retry_after_seconds"] <= 86400
        # Rate limits are kept in memory, per process: a restart starts them afresh (documented).
        counted = await session.call_tool("word_count", {"text": "a b c"})
        assert not counted.isError
