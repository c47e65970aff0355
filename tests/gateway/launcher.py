"""Runs a gateway for the tests, in its own process:

    python -m tests.gateway.launcher --config C --data-dir D [--port 0] [--stdio]

Over HTTP it prints `READY_MARKER {"url": ...}` on stdout once the MCP endpoint accepts
requests; SIGTERM stops it cleanly (the tests also SIGKILL it). With `--stdio` it serves MCP on
stdin/stdout (what `python -m gateway stdio` does). Logs go to stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import sys
from pathlib import Path

from gateway.config import load_config
from gateway.server import serve, serve_stdio

READY_MARKER = "DURAGATE-TEST-READY "


def _ready(url: str) -> None:
    print(READY_MARKER + json.dumps({"url": url}), flush=True)


async def _main(args: argparse.Namespace) -> None:
    task = asyncio.current_task()
    assert task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    config = load_config(Path(args.config))
    if args.stdio:
        await serve_stdio(config, Path(args.data_dir))
    else:
        await serve(config, Path(args.data_dir), port=args.port, on_ready=_ready)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", required=True)
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--stdio", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(
        level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s %(message)s"
    )
    try:
        asyncio.run(_main(args))
    except (asyncio.CancelledError, KeyboardInterrupt):
        pass


if __name__ == "__main__":
    main()
