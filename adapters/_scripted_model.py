"""A scripted model for the `agent` kind: a Python function in place of a chat-completions API.

    options:
      script: examples.agents:analyst    # package.module:function

The function gets the request body the agent would POST to `/chat/completions` (`model`,
`messages` with the system prompt first, `tools` offered as functions) and returns the body of
the response (`choices[0].message` with `content` and/or `tool_calls`, and optional `usage`),
so everything else (checkpoints after each step, tool calls through the gateway's dispatch
path, usage summed and reported) is the agent loop the HTTP model goes through. For an offline
demo and for tests: a script decides deterministically from the conversation.

The function may be sync (run in a worker thread) or async. It gets its own copy of the
request, so it cannot change the saved conversation. `adapters.agent.ModelError` raised by it
is a refusal for good (the tool's error, as a 4xx from an API); any other exception is an
unexpected failure, retried by the tool's retry policy (as a 5xx would be).
"""

from __future__ import annotations

import asyncio
import copy
import inspect
from collections.abc import Callable
from typing import Any

from adapters._targets import import_target
from adapters.base import ToolLoadError


class ScriptedModel:
    def __init__(self, tool: str, target: str) -> None:
        function = import_target(target)
        if not callable(function) or inspect.isclass(function):
            raise ToolLoadError(
                f"tool {tool!r}: option 'script' names {target!r}, a "
                f"{type(function).__name__}, not a function"
            )
        try:
            inspect.signature(function).bind({})
        except TypeError:
            raise ToolLoadError(
                f"tool {tool!r}: option 'script' names {target!r}, which must take one "
                "argument (the chat-completions request body)"
            ) from None
        except ValueError:
            pass  # no signature to read (a builtin): try it
        self.target = target
        self._function: Callable[[dict[str, Any]], Any] = function

    async def complete(self, body: dict[str, Any]) -> dict[str, Any]:
        request = copy.deepcopy(body)
        if inspect.iscoroutinefunction(self._function):
            response = await self._function(request)
        else:
            response = await asyncio.to_thread(self._function, request)
        if not isinstance(response, dict):
            raise RuntimeError(
                f"the script {self.target} returned a {type(response).__name__}, not a "
                "chat-completions response (a dict with 'choices')"
            )
        return response
