"""A local webhook for push-notification tests: an HTTP server on a loopback port, in a thread,
that records every POST (headers and JSON body), and can refuse the first ones.

    with serving_webhook() as hook:      # or the `webhook` fixture of tests/conftest.py
        ... hook.url ...; hook.wait_for(task_id, "TASK_STATE_COMPLETED")
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class Webhook:
    """A local HTTP server that records every POST (headers and JSON body)."""

    server: ThreadingHTTPServer
    received: list[tuple[dict[str, str], dict[str, Any]]] = field(default_factory=list)
    # Answers to give before accepting (e.g. [503, 503]: two refusals, then 200s).
    refusals: list[int] = field(default_factory=list)
    refused: list[int] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/hook"

    def states(self, task_id: str) -> list[str]:
        return [
            body["task"]["status"]["state"]
            for _, body in self.received
            if body.get("task", {}).get("id") == task_id
        ]

    def wait_for(self, task_id: str, state: str, timeout: float = 30) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        while True:
            for headers, body in self.received:
                task = body.get("task", {})
                if task.get("id") == task_id and task.get("status", {}).get("state") == state:
                    return headers
            assert time.monotonic() < deadline, self.received
            time.sleep(0.05)


@contextmanager
def serving_webhook() -> Iterator[Webhook]:
    hook: Webhook

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - the stdlib's name
            length = int(self.headers.get("Content-Length", "0"))
            body = json.loads(self.rfile.read(length))
            if hook.refusals:
                status = hook.refusals.pop(0)
                hook.refused.append(status)
                self.send_response(status)
                self.end_headers()
                return
            hook.received.append(({k.lower(): v for k, v in self.headers.items()}, body))
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    hook = Webhook(ThreadingHTTPServer(("127.0.0.1", 0), Handler))
    thread = threading.Thread(target=hook.server.serve_forever, daemon=True)
    thread.start()
    try:
        yield hook
    finally:
        hook.server.shutdown()
        hook.server.server_close()
