"""One `mcp` entry importing a remote server's tools (`options.tools`, `options.prefix`): the
remote is FastMCP in a subprocess (`tests/adapters/mcp_remote_server.py`), the gateway a real
process, called through its MCP front door with the mcp client."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import anyio
import pytest
import yaml
from mcp import McpError, types

from adapters.base import ToolLoadError
from adapters.mcp import ADAPTER, IDEMPOTENCY_META, McpTool
from gateway.a2a_agents import agents_of, check_agents
from gateway.audit import AUDIT_FILE_NAME
from gateway.config import ConfigError, ToolConfig, parse_config
from gateway.registry import Registry
from identity.dev_ca import DevCA, write_x509_svid
from tests.adapters.test_mcp_adapter import (
    CALLER,
    MTLS_REMOTE,
    TIMEOUT,
    Servers,
    context,
    free_port,
    gateway_config,
    mcp_config,
)
from tests.gateway.conftest import GatewayFactory, GatewayProcess, child_env, mcp_session

pytestmark = [
    pytest.mark.timeout(240),
    pytest.mark.filterwarnings("ignore:The experimental tasks API:DeprecationWarning"),
]


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


REMOTE_TOOLS = {"add", "shout", "explode", "count_up", "wait_for_file"}


async def remote_listing(url: str) -> dict[str, types.Tool]:
    """The remote's own tools/list, as a client of it sees it."""
    async with mcp_session(url) as session:
        return {t.name: t for t in (await session.list_tools()).tools}


def imported(remote_url: str, tools: Any = "*", prefix: str = "", **fields: Any) -> dict[str, Any]:
    """A config entry importing tools of the server at `remote_url`."""
    options: dict[str, Any] = {"tools": tools}
    if prefix:
        options["prefix"] = prefix
    return {"name": "files", "kind": "mcp", "target": remote_url, "options": options, **fields}


def prepare_all(entry: dict[str, Any]) -> list[McpTool]:
    made = ADAPTER.prepare_all(ToolConfig.model_validate(entry))
    assert all(isinstance(t, McpTool) for t in made)
    return made  # type: ignore[return-value]


# --- loading: the adapter ---------------------------------------------------------------------


async def test_import_all_with_a_prefix_carries_descriptions_and_schemas(
    servers: Servers,
) -> None:
    remote = servers()
    tools = await asyncio.to_thread(prepare_all, imported(remote.url, prefix="r_"))
    listing = await remote_listing(remote.url)
    assert set(listing) == REMOTE_TOOLS
    # Every remote tool, in the server's order, under the prefix.
    assert [t.spec.name for t in tools] == [f"r_{name}" for name in listing]
    for tool in tools:
        original = listing[tool.remote_name]
        assert tool.spec.name == "r_" + original.name
        assert tool.spec.description == original.description
        assert tool.spec.input_schema == original.inputSchema
        assert tool.spec.output_schema == original.outputSchema
        assert tool.spec.kind == "mcp" and tool.spec.target == remote.url
        assert tool.spec.origin == f"remote tool {original.name!r} imported by tools entry 'files'"
    add = next(t for t in tools if t.spec.name == "r_add")
    assert add.spec.output_schema is not None
    assert set(add.spec.output_schema["properties"]) == {"total", "terms"}


async def test_an_allow_list_imports_only_those_in_its_order(servers: Servers) -> None:
    remote = servers()
    entry = imported(remote.url, tools=["shout", "add"], timeout_seconds=7)
    tools = await asyncio.to_thread(prepare_all, entry)
    assert [t.spec.name for t in tools] == ["shout", "add"]
    # The entry's settings apply to each imported tool.
    assert all(t.spec.timeout_seconds == 7 for t in tools)


async def test_an_allow_listed_tool_the_server_lacks_is_refused_with_its_place(
    servers: Servers,
) -> None:
    remote = servers()
    with pytest.raises(ToolLoadError) as refused:
        await asyncio.to_thread(prepare_all, imported(remote.url, tools=["add", "nope"]))
    message = str(refused.value)
    assert f"the MCP server {remote.url} has no tool 'nope'" in message
    assert "add" in message and "options.tools" in message
    assert refused.value.at == ("options", "tools", 1)


async def test_a_name_that_is_not_a_valid_tool_name_after_prefixing_is_refused(
    servers: Servers,
) -> None:
    remote = servers()
    prefix = "p" * 124  # + "add" = 127 characters, fine; + "shout" = 129, too long
    tools = await asyncio.to_thread(prepare_all, imported(remote.url, ["add"], prefix))
    assert [t.spec.name for t in tools] == [prefix + "add"]
    with pytest.raises(ToolLoadError) as refused:
        await asyncio.to_thread(prepare_all, imported(remote.url, "*", prefix))
    message = str(refused.value)
    assert "remote tool 'shout'" in message and "not a valid MCP tool name" in message
    assert "options.prefix" in message and "allow-list" in message


@pytest.mark.parametrize(
    ("options", "fields", "error", "at"),
    [
        ({"tools": "all"}, {}, 'give "\\*"', ("options", "tools")),
        ({"tools": []}, {}, "empty allow-list", ("options", "tools")),
        ({"tools": ["a", "a"]}, {}, "'a' is listed twice", ("options", "tools")),
        ({"tools": "*", "tool": "add"}, {}, "not both", ("options",)),
        ({"prefix": "x_"}, {}, "needs `tools`", ("options",)),
        ({"tools": "*", "prefix": "a/b"}, {}, "prefix", ("options", "prefix")),
        ({"tools": "*"}, {"description": "d"}, "description describes one tool", ("description",)),
        ({"tools": "*"}, {"input_schema": {"type": "object"}}, "input_schema", ("input_schema",)),
    ],
)
def test_bad_import_options_are_refused_precisely(
    options: dict[str, Any], fields: dict[str, Any], error: str, at: tuple[Any, ...]
) -> None:
    # Nothing listens there: each of these is refused before the server is contacted.
    url = f"http://127.0.0.1:{free_port()}/mcp"
    with pytest.raises(ToolLoadError, match=error) as refused:
        ADAPTER.prepare_all(mcp_config("files", url, options=options, **fields))
    assert refused.value.at == at


def test_an_unreachable_server_at_load_is_refused_naming_it() -> None:
    url = f"http://127.0.0.1:{free_port()}/mcp"
    entry = imported(url)
    entry["options"]["connect_timeout_seconds"] = 5
    with pytest.raises(ToolLoadError) as refused:
        prepare_all(entry)
    message = str(refused.value)
    assert f"cannot read the tools of the MCP server {url}" in message
    assert "it must be up then" in message


# --- the registry: names across entries -------------------------------------------------------


def registry_config(tools: list[dict[str, Any]]) -> str:
    return yaml.safe_dump({"tools": tools}, sort_keys=False)


async def test_a_clash_with_another_entry_names_both_entries_and_the_remote_tool(
    servers: Servers, tmp_path: Path
) -> None:
    remote = servers()
    text = registry_config(
        [
            {"name": "r_add", "kind": "python", "target": "examples.tools:add"},
            imported(remote.url, prefix="r_"),
        ],
    )
    config = parse_config(text, "clash.yaml", tmp_path)
    with pytest.raises(ConfigError) as refused:
        await asyncio.to_thread(Registry.from_config, config)
    message = str(refused.value)
    assert "clash.yaml:5: tools[1].name" in message, message
    assert "tool 'r_add' (remote tool 'add' imported by tools entry 'files')" in message
    assert "already defined by tools[0] (tools entry 'r_add')" in message
    assert "options.prefix" in message
    # Two imports of the same server without prefixes clash on every name: each is reported.
    twice = [imported(remote.url, ["add", "shout"]), {**imported(remote.url), "name": "again"}]
    config = parse_config(registry_config(twice), "twice.yaml", tmp_path)
    with pytest.raises(ConfigError) as refused:
        await asyncio.to_thread(Registry.from_config, config)
    message = str(refused.value)
    for name in ("add", "shout"):
        assert f"tool {name!r} (remote tool {name!r} imported by tools entry 'again')" in message
    assert "'count_up'" not in message


async def test_an_unknown_allow_listed_tool_is_placed_on_its_line(
    servers: Servers, tmp_path: Path
) -> None:
    remote = servers()
    text = registry_config([imported(remote.url, ["add", "nope"])])
    config = parse_config(text, "allow.yaml", tmp_path)
    with pytest.raises(ConfigError) as refused:
        await asyncio.to_thread(Registry.from_config, config)
    message = str(refused.value)
    assert "allow.yaml:8: tools[0].options.tools[1]" in message, message
    assert "tool 'files' cannot be loaded" in message and "no tool 'nope'" in message


# --- through the gateway ----------------------------------------------------------------------


def text_of(result: types.CallToolResult) -> str:
    return " ".join(c.text for c in result.content if isinstance(c, types.TextContent))


async def test_the_gateway_serves_and_calls_imported_tools(
    servers: Servers, gateways: GatewayFactory, tmp_path: Path
) -> None:
    remote = servers()
    config = gateway_config(
        tmp_path,
        [
            {"name": "add", "kind": "python", "target": "examples.tools:add"},
            imported(remote.url, ["add", "explode", "count_up"], prefix="files_"),
        ],
    )
    gateway = gateways(config)
    listing = await remote_listing(remote.url)
    async with mcp_session(gateway.url) as session:
        listed = {t.name: t for t in (await session.list_tools()).tools}
        assert set(listed) == {"add", "files_add", "files_explode", "files_count_up"}
        for name in ("add", "explode", "count_up"):
            mine, theirs = listed[f"files_{name}"], listing[name]
            assert mine.description == theirs.description
            assert mine.inputSchema == theirs.inputSchema
            assert mine.outputSchema == theirs.outputSchema

        result = await session.call_tool("files_add", {"a": 40, "b": 2})
        assert not result.isError, (result, gateway.log())
        assert result.structuredContent == {"total": 42, "terms": 2}
        # The gateway's own `add` is another tool.
        own = await session.call_tool("add", {"a": 1, "b": 2})
        assert own.structuredContent == {"result": 3.0}

        # Arguments are checked against the imported schema before anything is scheduled.
        refused = await session.call_tool("files_add", {"a": "forty"})
        assert refused.isError and "invalid arguments for files_add" in text_of(refused)

        seen: list[tuple[float, float | None, str | None]] = []

        async def on_progress(progress: float, total: float | None, message: str | None) -> None:
            seen.append((progress, total, message))

        counted = await session.call_tool(
            "files_count_up", {"steps": 2}, progress_callback=on_progress
        )
        assert counted.structuredContent == {"result": 2}
        assert (2, 2, "step 2 of 2") in seen

        failed = await session.call_tool("files_explode", {"message": "remote says no"})
        assert failed.isError and "remote says no" in text_of(failed)
    # The remote ran each call once, under its own name, with the idempotency key.
    [call] = remote.calls("add")
    assert call["args"] == {"a": 40, "b": 2} and call["meta"][IDEMPOTENCY_META]
    assert len(remote.calls("explode")) == 1
    assert remote.calls("shout") == []


POLICY = """
tenant: default
members: [spiffe://duragate.local/**]
tools:
  "files_*":
    call: [group:members]
  files_add:
    call: [group:members]
    deny:
      - when: "args.a > 100"
        reason: too big for the remote
  files_explode:
    deny:
      - reason: explosions are off
"""


async def test_policies_limits_and_audit_see_the_imported_names(
    servers: Servers, gateways: GatewayFactory, tmp_path: Path
) -> None:
    remote = servers()
    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "default.yaml").write_text(POLICY)
    config = gateway_config(
        tmp_path,
        [
            {"name": "word_count", "kind": "python", "target": "examples.tools:word_count"},
            imported(remote.url, ["add", "shout", "explode"], prefix="files_"),
        ],
    )
    data = yaml.safe_load(config.read_text())
    data["policy"] = {"dir": str(policies)}
    config.write_text(yaml.safe_dump(data))
    gateway = gateways(config)
    async with mcp_session(gateway.url) as session:
        listed = {t.name for t in (await session.list_tools()).tools}
        # The pattern grants the imported tools; an unconditional deny hides one; the gateway's
        # own tool no rule names is invisible.
        assert listed == {"files_add", "files_shout"}
        ok = await session.call_tool("files_shout", {"text": "hi"})
        assert not ok.isError and text_of(ok) == "HI"
        with pytest.raises(McpError, match="too big for the remote"):
            await session.call_tool("files_add", {"a": 101, "b": 1})
        with pytest.raises(McpError, match="unknown tool"):
            await session.call_tool("files_explode", {"message": "x"})
    assert remote.calls("add") == [] and remote.calls("explode") == []
    records = [
        json.loads(line)
        for line in (gateway.data_dir / AUDIT_FILE_NAME).read_text().splitlines()
        if line
    ]
    seen = {(r["event"], r["tool"]) for r in records}
    assert ("denied", "files_add") in seen, records
    assert any(tool == "files_shout" for _, tool in seen), records
    denied = next(r for r in records if r["event"] == "denied")
    assert denied["rule"].startswith("default.yaml:tools[files_add]"), denied


async def test_a_remote_that_is_down_stops_the_start_naming_it(
    gateways: GatewayFactory, tmp_path: Path
) -> None:
    url = f"http://127.0.0.1:{free_port()}/mcp"
    entry = imported(url, prefix="files_")
    entry["options"]["connect_timeout_seconds"] = 5
    config = gateway_config(tmp_path, [entry])
    with pytest.raises(RuntimeError, match="did not start") as failed:
        gateways(config)
    log = str(failed.value)
    assert f"cannot read the tools of the MCP server {url}" in log, log
    assert "tools[0]" in log and "'files'" in log


async def test_reload_reimports_notifies_and_keeps_the_tools_when_the_remote_is_down(
    servers: Servers, gateways: GatewayFactory, tmp_path: Path
) -> None:
    port = free_port()
    remote = servers(port=port)
    entry = imported(remote.url, prefix="files_")
    entry["options"]["connect_timeout_seconds"] = 5
    config = gateway_config(tmp_path, [entry])
    gateway = gateways(config)
    changed = anyio.Event()

    async def on_message(message: Any) -> None:
        if isinstance(message, types.ServerNotification) and isinstance(
            message.root, types.ToolListChangedNotification
        ):
            changed.set()

    async with mcp_session(gateway.url, message_handler=on_message) as session:
        before = {t.name for t in (await session.list_tools()).tools}
        assert before == {f"files_{name}" for name in REMOTE_TOOLS}

        # The remote now has one tool more: a reload imports it and tells the session.
        remote.stop()
        remote = servers(port=port, extra_tool="brand_new")
        gateway.signal(signal.SIGHUP)
        with anyio.fail_after(TIMEOUT):
            await changed.wait()
        after = {t.name for t in (await session.list_tools()).tools}
        assert after == before | {"files_brand_new"}
        echoed = await session.call_tool("files_brand_new", {"text": "fresh"})
        assert echoed.structuredContent == {"echo": "fresh"}, gateway.log()

        # The remote is down at the next reload: the reload fails, naming the server, and the
        # tools that were serving stay.
        remote.stop()
        changed = anyio.Event()
        gateway.signal(signal.SIGHUP)
        with anyio.fail_after(TIMEOUT):
            while "config reload failed" not in gateway.log():
                await anyio.sleep(0.1)
        assert f"cannot read the tools of the MCP server {remote.url}" in gateway.log()
        assert {t.name for t in (await session.list_tools()).tools} == after
        assert not changed.is_set()
        # Back up: the kept tool works again (nothing was dropped).
        remote = servers(port=port, extra_tool="brand_new")
        echoed = await session.call_tool("files_brand_new", {"text": "again"})
        assert echoed.structuredContent == {"echo": "again"}


@pytest.mark.crash
async def test_a_call_recorded_before_a_crash_finds_its_imported_tool_after_restart(
    servers: Servers, gateways: GatewayFactory, tmp_path: Path
) -> None:
    remote = servers()
    entry = imported(remote.url, ["wait_for_file"], prefix="files_", timeout_seconds=120)
    entry["retry"] = {"max_attempts": 5, "first_interval_seconds": 0.2}
    config = gateway_config(tmp_path, [entry])
    data_dir = tmp_path / "data"
    release = tmp_path / "release"
    first: GatewayProcess = gateways(config, data_dir=data_dir)
    async with mcp_session(first.url) as session:
        created = await session.experimental.call_tool_as_task(
            "files_wait_for_file", {"path": str(release)}
        )
        task_id = created.task.taskId
        deadline = time.monotonic() + TIMEOUT
        while not remote.calls("wait_for_file"):  # the remote tool is running
            assert time.monotonic() < deadline, first.log()
            await asyncio.sleep(0.05)
        first.kill()  # SIGKILL, mid-call

    second = gateways(config, data_dir=data_dir)
    release.touch()
    async with mcp_session(second.url) as session:
        with anyio.fail_after(TIMEOUT):
            result = await session.experimental.get_task_result(task_id, types.CallToolResult)
        task = await session.experimental.get_task(task_id)
    assert not result.isError, (result, second.log())
    assert result.structuredContent == {"seen": str(release)}
    assert task.status == "completed"
    # The restarted gateway ran the same activity again: same tool, same idempotency key.
    runs = remote.calls("wait_for_file")
    assert len(runs) >= 2, runs
    assert len({run["meta"][IDEMPOTENCY_META] for run in runs}) == 1


async def test_an_import_over_stdio(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    log = tmp_path / "stdio.jsonl"
    target = f"stdio:{sys.executable} -m tests.adapters.mcp_remote_server --stdio --log {log}"
    monkeypatch.setenv("PYTHONPATH", child_env()["PYTHONPATH"])  # `tests` importable there
    entry = imported(target, ["shout", "add"], prefix="local.")
    entry["options"]["env_from_env"] = {"PYTHONPATH": "PYTHONPATH"}
    shout, add = await asyncio.to_thread(prepare_all, entry)
    assert (shout.spec.name, add.spec.name) == ("local.shout", "local.add")
    assert shout.spec.description == "Echo text back, as plain text."
    assert await shout.invoke({"text": "quiet"}, context()) == "QUIET"
    assert await add.invoke({"a": 1, "b": 2}, context()) == {"total": 3, "terms": 2}
    assert [json.loads(line)["tool"] for line in log.read_text().splitlines()] == ["shout", "add"]


async def test_a2a_agents_may_group_imported_tools(servers: Servers, tmp_path: Path) -> None:
    remote = servers()
    text = yaml.safe_dump(
        {
            "a2a": {"agents": [{"name": "files", "tools": ["files_add", "files_shout"]}]},
            "tools": [imported(remote.url, ["add", "shout"], prefix="files_")],
        }
    )
    config = parse_config(text, "agents.yaml", tmp_path)
    registry = await asyncio.to_thread(Registry.from_config, config)
    check_agents(config, registry)  # the loaded names: accepted
    with pytest.raises(ConfigError, match="no tool named 'files_add'"):
        check_agents(config)  # the entry names alone do not have them


async def test_every_imported_tool_is_an_a2a_agent_when_every_tool_is(
    servers: Servers, tmp_path: Path
) -> None:
    remote = servers()
    text = yaml.safe_dump(
        {
            "a2a": {"tools_as_agents": "all"},
            "tools": [
                {"name": "plus", "kind": "python", "target": "examples.tools:add"},
                imported(remote.url, ["add", "shout"], prefix="files_"),
            ],
        }
    )
    config = parse_config(text, "agents.yaml", tmp_path)
    registry = await asyncio.to_thread(Registry.from_config, config)
    agents = agents_of(config, registry)
    # One agent per loaded tool; none named after the import entry, which is not a tool.
    assert set(agents) == {"", "plus", "files_add", "files_shout"}
    assert agents["files_shout"].tools == ("files_shout",)
    assert agents["files_add"].description == registry.specs()[1].description


async def test_an_import_from_a_remote_duragate_presents_the_gateways_own_identity(
    gateways: GatewayFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The remote requires a client certificate: the import (tools/list at start-up) and the
    calls both present the front gateway's SVID from `identity.own`; without it, nothing
    loads."""
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
    own = {"source": "dev_ca", "ca_dir": str(remote_dir / "ca"), "spiffe_id": CALLER}
    entry = imported(remote.url, prefix="remote_")
    entry["options"]["identity"] = "own"
    front_config = {
        "listen": {"host": "127.0.0.1", "port": 0},
        "identity": {"allow_anonymous": True, "own": own},
        "tools": [entry],
    }
    (tmp_path / "front.yaml").write_text(yaml.safe_dump(front_config))
    front = gateways(tmp_path / "front.yaml", data_dir=tmp_path / "front-data")
    async with mcp_session(front.url) as session:
        listed = {t.name: t for t in (await session.list_tools()).tools}
        assert set(listed) == {"remote_record"}
        assert set(listed["remote_record"].inputSchema["properties"]) == {"note"}
        result = await session.call_tool("remote_record", {"note": "imported"})
    assert not result.isError, (result, front.log(), remote.log())
    assert result.structuredContent == {"note": "imported", "runs": 1}
    assert f"principal={CALLER} tenant=team-a" in remote.log_path.read_text()

    # The same import trusting the remote but without a certificate of its own: the remote
    # refuses the connection, so the tools cannot be read and the gateway does not start.
    del entry["options"]["identity"]
    entry["options"]["tls"] = {"ca": str(remote_dir / "ca" / "bundle.pem")}
    front_config["identity"] = {"allow_anonymous": True}
    (tmp_path / "anonymous.yaml").write_text(yaml.safe_dump(front_config))
    with pytest.raises(RuntimeError, match="did not start") as failed:
        gateways(tmp_path / "anonymous.yaml", data_dir=tmp_path / "anonymous-data")
    assert f"cannot read the tools of the MCP server {remote.url}" in str(failed.value)
