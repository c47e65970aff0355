"""A remote MCP server for the `mcp` adapter's tests: FastMCP, as third-party servers use it.

    python -m tests.adapters.mcp_remote_server --port PORT --log FILE [--expect-token-env VAR]
        [--extra-tool NAME]
    python -m tests.adapters.mcp_remote_server --stdio --log FILE

`--extra-tool NAME` adds a tool `NAME` (echoes its `text`): a server whose tool list changed.

Over Streamable HTTP on 127.0.0.1:PORT (path /mcp), or over stdio. Every tool run appends one
JSON line to `--log` (`{"tool", "args", "meta", "auth"}`): what the tests count side effects
and check headers and `_meta` with. `auth` is whether the request's Authorization header was
`Bearer <value of --expect-token-env>`; the value itself is never written.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
from pathlib import Path
from typing import Any

from mcp.server.fastmcp import Context, FastMCP
from pydantic import BaseModel, Field


class Settings:
    log = Path()
    token: str | None = None


def _record(tool: str, args: dict[str, Any], ctx: Context[Any, Any, Any]) -> None:
    meta = ctx.request_context.meta
    request = ctx.request_context.request
    auth = None
    if Settings.token is not None and request is not None:
        auth = request.headers.get("authorization") == f"Bearer {Settings.token}"
    line = {
        "tool": tool,
        "args": args,
        "meta": meta.model_dump(exclude_none=True, by_alias=True) if meta else None,
        "auth": auth,
    }
    with open(Settings.log, "a") as f:
        f.write(json.dumps(line) + "\n")
        f.flush()
        os.fsync(f.fileno())


class Sum(BaseModel):
    total: float = Field(description="a + b")
    terms: int = Field(description="How many numbers were added.")


server = FastMCP("remote-test", log_level="WARNING")


@server.tool(description="Add two numbers on the remote server.")
def add(a: float, b: float, ctx: Context[Any, Any, Any]) -> Sum:
    _record("add", {"a": a, "b": b}, ctx)
    return Sum(total=a + b, terms=2)


@server.tool(description="Echo text back, as plain text.", structured_output=False)
def shout(text: str, ctx: Context[Any, Any, Any]) -> str:
    _record("shout", {"text": text}, ctx)
    return text.upper()


@server.tool(description="Always fails with the given message.")
def explode(message: str, ctx: Context[Any, Any, Any]) -> str:
    _record("explode", {"message": message}, ctx)
    raise ValueError(message)


@server.tool(description="Reports progress `steps` times, then returns the step count.")
async def count_up(steps: int, ctx: Context[Any, Any, Any]) -> int:
    _record("count_up", {"steps": steps}, ctx)
    for i in range(1, steps + 1):
        await ctx.report_progress(i, steps, f"step {i} of {steps}")
    return steps


@server.tool(description="Waits until the file `path` exists (at most two minutes).")
async def wait_for_file(path: str, ctx: Context[Any, Any, Any]) -> dict[str, Any]:
    _record("wait_for_file", {"path": path}, ctx)
    for _ in range(1200):
        if Path(path).exists():
            return {"seen": path}
        await asyncio.sleep(0.1)
    raise TimeoutError(f"{path} did not appear")


def _add_extra_tool(name: str) -> None:
    def extra(text: str, ctx: Context[Any, Any, Any]) -> dict[str, str]:
        _record(name, {"text": text}, ctx)
        return {"echo": text}

    server.add_tool(extra, name=name, description=f"The extra tool {name}.")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--stdio", action="store_true")
    parser.add_argument("--log", type=Path, required=True)
    parser.add_argument("--expect-token-env")
    parser.add_argument("--extra-tool")
    args = parser.parse_args()
    if args.extra_tool:
        _add_extra_tool(args.extra_tool)
    Settings.log = args.log
    if args.expect_token_env:
        Settings.token = os.environ[args.expect_token_env]
    if args.stdio:
        server.run("stdio")
        return
    server.settings.host = "127.0.0.1"
    server.settings.port = args.port
    server.run("streamable-http")


if __name__ == "__main__":
    main()
