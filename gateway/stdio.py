"""The MCP front door over stdio: the same server as `/mcp`, for one local client.

The caller is the local user, proved by `local` (whoever can start the process and talk to its
stdin is that user): `identity.local_principal` when set, else
`spiffe://<identity.trust_domain or duragate.local>/local/<username>`, in `identity.local_tenant`
(`default`).

stdout carries only the protocol. Before anything else runs, file descriptor 1 is pointed at
stderr (and `sys.stdout` with it), so a tool that prints, or a library that logs to stdout,
cannot corrupt the JSON-RPC stream; the protocol writes to a private duplicate of the original
stdout. Logs go to stderr.
"""

from __future__ import annotations

import contextlib
import getpass
import os
import re
import sys
from collections.abc import Iterator
from typing import IO

import anyio
from mcp.server.stdio import stdio_server

from gateway.config import IdentityConfig
from gateway.mcp_front import McpFront
from identity.principal import Principal

LOCAL_TRUST_DOMAIN = "duragate.local"


def local_principal(
    identity: IdentityConfig | None = None, username: str | None = None
) -> Principal:
    """The principal of the user running this process."""
    identity = identity or IdentityConfig()
    if identity.local_principal is not None:
        return Principal(id=identity.local_principal, tenant=identity.local_tenant, via="local")
    if username is None:
        try:
            username = getpass.getuser()
        except Exception:  # noqa: BLE001 - no passwd entry (containers): fall back to the uid
            username = f"uid-{os.getuid()}"
    # A SPIFFE path segment: letters, digits, '.', '-', '_'.
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", username) or "unknown"
    domain = identity.trust_domain or LOCAL_TRUST_DOMAIN
    return Principal(
        id=f"spiffe://{domain}/local/{safe}", tenant=identity.local_tenant, via="local"
    )


@contextlib.contextmanager
def protocol_stdout() -> Iterator[IO[str]]:
    """A text stream on the original stdout for the protocol, while fd 1 and `sys.stdout`
    point at stderr. Restored on exit."""
    sys.stdout.flush()
    saved_fd = os.dup(1)
    saved_stdout = sys.stdout
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    stream = open(saved_fd, "w", encoding="utf-8", newline="\n", closefd=False)  # noqa: SIM115
    try:
        yield stream
    finally:
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
        stream.close()
        os.dup2(saved_fd, 1)
        os.close(saved_fd)
        sys.stdout = saved_stdout


async def run_stdio(front: McpFront, out: IO[str]) -> None:
    """Serve `front` on stdin / `out` until stdin closes."""
    server = front.server
    async with stdio_server(stdout=anyio.wrap_file(out)) as (read_stream, write_stream):
        await server.run(read_stream, write_stream, server.create_initialization_options())
