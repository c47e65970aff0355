"""The `mcp` tool kind: tools of a remote MCP server, served as gateway tools.

One remote tool per entry:

    - name: remote_add
      kind: mcp
      target: https://tools.example.com/mcp            # Streamable HTTP
      # target: "stdio:python -m some.server --flag"   # or a local server over stdio
      options:
        tool: add                        # the remote tool's name (default: this tool's name)
        bearer_token_env: TOOLS_TOKEN    # sends `Authorization: Bearer $TOOLS_TOKEN`
        headers_from_env: {X-Api-Key: TOOLS_KEY}   # header -> environment variable
        env_from_env: {API_KEY: TOOLS_KEY}         # stdio: the server's variable -> ours
        connect_timeout_seconds: 10      # reaching the server, initialize, tools/list
        call_timeout_seconds: 300        # one tools/call (default: the tool's timeout)
        tls:                             # https: the gateway's own X.509-SVID, presented
          cert: /etc/duragate/svid.pem   #   as client certificate (mTLS), and the trust
          key: /etc/duragate/svid.key    #   bundle that verifies the server (default: the
          ca: /etc/duragate/bundle.pem   #   system's CAs); read again for every call

Or every tool of the server, or an allow-list of them, from one entry:

    - name: files                        # names the entry (in errors); not itself a tool
      kind: mcp
      target: https://files.example.com/mcp
      options:
        tools: "*"                       # or [read, write]: only these
        prefix: files_                   # gateway tools files_read, files_write, ...
        # ...and the same connection options as above

Each imported tool is a gateway tool of its own, named `prefix` + its remote name, with the
remote's description and input/output schemas, and the entry's timeout, retry and task
support; policies, limits, the audit log and the workflow input name it by that name. The
server must answer `tools/list` at start-up (and at each config reload: a reload that cannot
read it fails as a whole, and the running tools stay). Refused at load: a name that is not a
valid MCP tool name after prefixing, an allow-listed tool the server does not list, a remote
schema that is not a JSON Schema of an object, and (in the registry) a name another entry
already gives a tool.

For one tool, schemas and description come from the remote server's `tools/list`, read once at
start-up. A server that cannot be reached then stops the gateway from starting, with an error
naming the URL, unless the config gives `input_schema` (and, if wanted, `output_schema`): then
nothing is fetched at start-up and the server only has to be up when a call comes.

A call opens one MCP session and calls the remote tool (`adapters._mcp_client`):
- the remote's `isError` result becomes a `ToolError` with the remote's text (not retried);
  so does a JSON-RPC refusal of the call itself (unknown tool, invalid parameters);
- an unreachable server, a broken connection, a timeout, an HTTP error status: an ordinary
  exception, so the call is retried per the tool's retry policy;
- progress notifications of the remote reach the caller as this call's progress;
- the result is the remote's `structuredContent`, else its text.

Activities run at least once, so a retried call may repeat the remote's side effects. Every
call carries `_meta["io.duragate/idempotency-key"]` = the activity's task execution id, which
is the same for every retry of one call: a remote Duragate gateway answers a repeat with the
stored result instead of running the tool again. Other servers ignore it.

Header and environment values are read from the environment at start-up (a missing variable
stops the start, naming the variable) and are never logged. Secret headers go only over https
or to a loopback host. With `tls`, the gateway presents its own identity (its X.509-SVID) to
the remote: the files are checked at start-up and read again for each call, so a rotated SVID
is used without a restart.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Literal

from mcp import types
from pydantic import Field, ValidationError, field_validator, model_validator

from adapters._mcp_client import (
    IDEMPOTENCY_META,
    ConnectionOptions,
    RemoteCallError,
    RemoteServer,
    ServerUnreachable,
)
from adapters.base import PreparedTool, ToolContext, ToolLoadError, ToolSpec
from gateway.config import TOOL_NAME_RE, ToolConfig, check_tool_schema

__all__ = ["ADAPTER", "IDEMPOTENCY_META", "McpOptions", "McpTool", "RemoteCallError"]

log = logging.getLogger(__name__)

# Remote names shown in an error about a tool the server does not have.
_SHOWN_NAMES = 20


class McpOptions(ConnectionOptions):
    """`options` of an `mcp` entry: the connection, and which remote tools it serves."""

    tool: str | None = Field(default=None, min_length=1)
    # Import several tools: "*" (every tool the server lists) or an allow-list of remote names.
    tools: Literal["*"] | list[str] | None = None
    # Put before each imported tool's remote name to make its gateway name.
    prefix: str = Field(default="", max_length=127, pattern=r"^[A-Za-z0-9_.\-]*$")
    call_timeout_seconds: float | None = Field(default=None, gt=0)

    @field_validator("tools", mode="before")
    @classmethod
    def _tools(cls, value: Any) -> Any:
        if isinstance(value, str) and value != "*":
            raise ValueError('give "*" (every tool of the server) or a list of remote tool names')
        if isinstance(value, list):
            if not value:
                raise ValueError('an empty allow-list imports nothing: list tools, or give "*"')
            seen: set[Any] = set()
            for name in value:
                if not isinstance(name, str) or not name:
                    raise ValueError(f"{name!r} is not a remote tool name")
                if name in seen:
                    raise ValueError(f"{name!r} is listed twice")
                seen.add(name)
        return value

    @model_validator(mode="after")
    def _one_form(self) -> McpOptions:
        if self.tools is not None and self.tool is not None:
            raise ValueError("give `tool` (one remote tool) or `tools` (several), not both")
        if self.prefix and self.tools is None:
            raise ValueError("`prefix` names imported tools: it needs `tools`")
        return self


def _options(config: ToolConfig) -> McpOptions:
    try:
        return McpOptions.model_validate(config.options)
    except ValidationError as exc:
        errors = exc.errors()
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'options'}: {e['msg']}" for e in errors
        )
        raise ToolLoadError(
            f"bad options for an mcp tool: {problems}", at=("options", *errors[0]["loc"])
        ) from None


class McpTool:
    """One tool of a remote MCP server, served as the gateway tool `spec.name`."""

    def __init__(
        self, server: RemoteServer, remote_name: str, spec: ToolSpec, call_timeout: float
    ) -> None:
        self.server = server
        self.remote_name = remote_name
        self.call_timeout = call_timeout
        self._spec = spec

    @property
    def options(self) -> ConnectionOptions:
        return self.server.options

    @property
    def where(self) -> str:
        return self.server.where

    @property
    def spec(self) -> ToolSpec:
        return self._spec

    async def invoke(self, arguments: dict[str, Any], context: ToolContext) -> Any:
        return await self.server.call(self.remote_name, arguments, context, self.call_timeout)


class McpAdapter:
    kind = "mcp"

    def prepare(self, config: ToolConfig) -> McpTool:
        """The one tool of an entry without `options.tools`."""
        options = _options(config)
        if options.tools is not None:
            raise ToolLoadError(
                "options.tools imports several tools: this entry is loaded with prepare_all",
                at=("options", "tools"),
            )
        return _one_tool(config, options)

    def prepare_all(self, config: ToolConfig) -> list[PreparedTool]:
        """Every tool the entry makes: the imported ones with `options.tools`, else one."""
        options = _options(config)
        if options.tools is None:
            return [_one_tool(config, options)]
        return list(_imported_tools(config, options))


ADAPTER = McpAdapter()


def _call_timeout(config: ToolConfig, options: McpOptions) -> float:
    return options.call_timeout_seconds or config.timeout_seconds


def _one_tool(config: ToolConfig, options: McpOptions) -> McpTool:
    server = RemoteServer(config.target, options)
    remote_name = options.tool or config.name
    if config.input_schema is not None:
        # Schemas from the config: the server is only needed when a call comes.
        spec = ToolSpec.from_config(
            config, description=None, input_schema=config.input_schema, output_schema=None
        )
        return McpTool(server, remote_name, spec, _call_timeout(config, options))
    try:
        listed = server.read_tools()
    except ServerUnreachable as exc:
        raise ToolLoadError(
            f"cannot read the schema of tool {remote_name!r} from the MCP server {exc.where}: "
            f"{exc.reason}. Start the server first, or give input_schema (and output_schema) in "
            "the config to contact it only when called"
        ) from None
    remote = next((t for t in listed if t.name == remote_name), None)
    if remote is None:
        raise ToolLoadError(
            f"the MCP server {server.where} has no tool {remote_name!r} "
            f"(it has: {_shown(listed)}); set options.tool to the remote name"
        )
    spec = ToolSpec.from_config(
        config,
        description=remote.description,
        input_schema=remote.inputSchema,
        output_schema=remote.outputSchema,
    )
    return McpTool(server, remote_name, spec, _call_timeout(config, options))


def _shown(listed: list[types.Tool]) -> str:
    names = [t.name for t in listed]
    shown = ", ".join(names[:_SHOWN_NAMES]) + (", ..." if len(names) > _SHOWN_NAMES else "")
    return shown or "none"


def _imported_tools(config: ToolConfig, options: McpOptions) -> list[McpTool]:
    """The tools of the server that `options.tools` picks, each named `prefix` + remote name."""
    if config.app_id is not None:
        # The gateway lists a worker's tools from the config alone: it cannot know these.
        raise ToolLoadError(
            "an entry that imports tools (options.tools) runs in the gateway: leave out app_id",
            at=("app_id",),
        )
    for key in ("description", "input_schema", "output_schema"):
        if getattr(config, key) is not None:
            raise ToolLoadError(
                f"{key} describes one tool, and the tools this entry imports take theirs from "
                "the server: leave it out (or serve that tool alone, with options.tool)",
                at=(key,),
            )
    server = RemoteServer(config.target, options)
    try:
        listed = server.read_tools()
    except ServerUnreachable as exc:
        raise ToolLoadError(
            f"{exc}. The tools this entry imports are read from the server at start-up and at "
            "each config reload: it must be up then, and accept the gateway's credentials"
        ) from None
    by_name: dict[str, types.Tool] = {}
    for remote in listed:
        if remote.name in by_name:
            raise ToolLoadError(f"the MCP server {server.where} lists tool {remote.name!r} twice")
        by_name[remote.name] = remote
    picked: list[tuple[types.Tool, tuple[str | int, ...]]]
    if options.tools == "*":
        picked = [(remote, ("options", "tools")) for remote in listed]
    else:
        assert options.tools is not None
        picked = []
        for index, name in enumerate(options.tools):
            where = ("options", "tools", index)
            if name not in by_name:
                raise ToolLoadError(
                    f"the MCP server {server.where} has no tool {name!r} (it has: "
                    f"{_shown(listed)}); fix options.tools",
                    at=where,
                )
            picked.append((by_name[name], where))
    tools = [_imported(config, options, server, remote, at) for remote, at in picked]
    if not tools:
        log.warning("tools entry %r: the MCP server %s lists no tools", config.name, server.where)
    log.info("tools entry %r: %d tool(s) imported from %s", config.name, len(tools), server.where)
    return tools


def _imported(
    config: ToolConfig,
    options: McpOptions,
    server: RemoteServer,
    remote: types.Tool,
    at: tuple[str | int, ...],
) -> McpTool:
    name = options.prefix + remote.name
    leave_out = (
        "leave it out with an allow-list (options.tools: [...])"
        if options.tools == "*"
        else "leave it out of options.tools"
    )
    if not TOOL_NAME_RE.fullmatch(name):
        raise ToolLoadError(
            f"remote tool {remote.name!r} would be served as {name!r}, which is not a valid MCP "
            "tool name (1 to 128 letters, digits, '_', '-' or '.'): shorten options.prefix, or "
            + leave_out,
            at=at,
        )
    schemas = [("input", remote.inputSchema), ("output", remote.outputSchema)]
    for what, schema in schemas:
        if schema is None:
            continue
        try:
            check_tool_schema(schema)
        except ValueError as exc:
            raise ToolLoadError(
                f"the {what} schema of remote tool {remote.name!r} on {server.where}: {exc}; "
                + leave_out,
                at=at,
            ) from None
    spec = ToolSpec.from_config(
        config,
        description=remote.description or remote.title,
        input_schema=remote.inputSchema,
        output_schema=remote.outputSchema,
    )
    origin = f"remote tool {remote.name!r} imported by tools entry {config.name!r}"
    spec = dataclasses.replace(spec, name=name, origin=origin)
    return McpTool(server, remote.name, spec, _call_timeout(config, options))
