"""Streamable HTTP for the MCP front door: each POST answered as plain JSON or as an SSE stream,
whichever the request needs.

The mcp SDK's transport answers every request of a server one way (`json_response`). An SSE
stream is what carries progress and log notifications while a call runs, but it costs a stream,
several tasks and a chunked response per request (about a third of the gateway's CPU per call,
and more in the client, which parses it). The specification lets the server choose per request
(the client accepts both), so this transport streams only when something can be sent before the
answer: the request asks for progress (`_meta.progressToken`), or its session asked for log
messages (`logging/setLevel`). Everything else, including a call that does not ask for progress,
gets one JSON response. A client that does not accept `text/event-stream` always gets JSON.
"""

from __future__ import annotations

import contextvars
import json
from typing import Any

from mcp.server.auth.middleware.bearer_auth import AuthorizationContext
from mcp.server.streamable_http import StreamableHTTPServerTransport
from mcp.server.streamable_http_manager import StreamableHTTPSessionManager
from starlette.requests import Request
from starlette.types import Receive, Scope, Send

# Whether the POST being handled (in this task) is answered as JSON.
_json_answer: contextvars.ContextVar[bool] = contextvars.ContextVar("json_answer", default=False)


class AdaptiveTransport(StreamableHTTPServerTransport):
    """The SDK's transport, answering each POST as JSON unless it needs a stream (see above)."""

    # The session asked for log messages: its requests are streamed from then on.
    wants_logs = False

    @property
    def is_json_response_enabled(self) -> bool:
        return _json_answer.get()

    @is_json_response_enabled.setter
    def is_json_response_enabled(self, value: bool) -> None:
        """The SDK's constructor sets the server-wide mode; here it is decided per request."""

    async def _handle_post_request(
        self, scope: Scope, request: Request, receive: Receive, send: Send
    ) -> None:
        # The body is read once: Starlette keeps it for the SDK's own read.
        body = await request.body()
        token = _json_answer.set(not self._streams(request, body))
        try:
            await super()._handle_post_request(scope, request, receive, send)
        finally:
            _json_answer.reset(token)

    def _streams(self, request: Request, body: bytes) -> bool:
        if "text/event-stream" not in request.headers.get("accept", ""):
            return False
        try:
            message = json.loads(body)
        except ValueError:
            return False  # the SDK answers the parse error
        if not isinstance(message, dict) or "id" not in message:
            return False  # notifications and responses get 202 either way
        params = message.get("params")
        if message.get("method") == "logging/setLevel":
            self.wants_logs = True
        meta = params.get("_meta") if isinstance(params, dict) else None
        return self.wants_logs or (isinstance(meta, dict) and "progressToken" in meta)


class AdaptiveSessionManager(StreamableHTTPSessionManager):
    """The SDK's session manager, its sessions on `AdaptiveTransport`."""

    def _admit_session(self, requestor: AuthorizationContext | None) -> Any:
        transport = super()._admit_session(requestor)
        if transport is not None:
            # The SDK builds its own transport class: this one only adds the per-request
            # choice (no state of its own besides `wants_logs`, which has a class default).
            transport.__class__ = AdaptiveTransport
        return transport
