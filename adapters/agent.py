"""The `agent` tool kind: a durable LLM agent defined in config.

    - name: assistant
      kind: agent
      target: assistant                      # a label; the agent's identity is
                                             # spiffe://<trust domain>/agent/<tool name>
      options:
        model: gpt-4o-mini
        base_url: https://api.openai.com/v1  # any OpenAI-compatible chat-completions endpoint
        api_key_env: OPENAI_API_KEY          # the key's environment variable (optional)
        # script: examples.agents:analyst    # instead of model/base_url: a scripted model
        system_prompt: You are a helpful assistant.
        tools: [add, word_count]             # gateway tools the agent may call
        max_steps: 10                        # model calls per call, at most
        request_timeout_seconds: 60          # one model request
        max_retries: 4                       # on 429 / 5xx / transport errors, per request
        tool_timeout_seconds: 300            # one tool call
        memory_messages: 50                  # kept per conversation

Input `{"message": string, "context_id"?: string}`; output `{"answer", "steps", "tool_calls"}`.

The loop: the model gets the system prompt, the conversation and the tools (their input schemas
as function parameters); each tool call it asks for runs, its result (or refusal) goes back as
the tool message; it ends when the model answers without tool calls, or fails after
`max_steps` model calls.

Durability. The conversation is checkpointed after every step (one model response, one tool
result) under the activity's task execution id, so a retried activity (a crash, a failed
request) resumes mid-conversation: finished model calls are not repeated. Tool calls go
through the gateway's dispatch path (`ToolContext.tools`, `gateway.delegation`): the agent
calls as `spiffe://<trust domain>/agent/<name>` for its caller (policy, limits and audit apply;
a refusal is the tool's result the model sees), each as a durable call whose idempotency key is
derived from (task execution id, step, tool call), so a retry replays it instead of running it
again.

Memory: with a `context_id` (the argument, else the call's A2A contextId) the conversation is
kept in the state store under (tenant, caller, tool, context) and the next call with that
context continues it (the last `memory_messages` messages, cut at a user message).

Usage: each response's `usage` (prompt, completion and total tokens) is summed, across retries,
and reported with the result (for budgets). HTTP to the model is in `chat_completion` only.

The model is either that HTTP API (`model`, `base_url`, ...) or, with `script`, a Python
function given the same request body and returning the same response body
(`adapters._scripted_model`): a deterministic, offline model for demos and tests that goes
through the same loop, checkpoints, tool calls and usage reporting.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import os
import re
import time
from typing import Any, Protocol

import httpx

from adapters._scripted_model import ScriptedModel
from adapters._targets import check_options
from adapters.base import ToolContext, ToolError, ToolLoadError, ToolSpec
from adapters.checkpoints import key
from gateway.config import ToolConfig

OPTIONS: dict[str, type | tuple[type, ...]] = {
    "model": str,
    "base_url": str,
    "api_key_env": str,
    "system_prompt": str,
    "tools": list,
    "max_steps": int,
    "request_timeout_seconds": (int, float),
    "max_retries": int,
    "tool_timeout_seconds": (int, float),
    "memory_messages": int,
    "script": str,
}
# Options that only mean something for a model behind an HTTP API.
HTTP_OPTIONS = ("base_url", "api_key_env", "request_timeout_seconds", "max_retries")
FUNCTION_NAME_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")
ENV_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,200}")
MAX_RETRY_AFTER_SECONDS = 60.0
MAX_ERROR_TEXT = 300
# A tool result longer than this is cut before the model sees it (and before it is saved).
MAX_TOOL_RESULT_CHARS = 20_000
USAGE_KEYS = ("prompt_tokens", "completion_tokens", "total_tokens")

INPUT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "message": {"type": "string", "description": "what to ask the agent"},
        "context_id": {
            "type": "string",
            "description": "a conversation to continue (and keep) across calls",
            "minLength": 1,
            "maxLength": 200,
        },
    },
    "required": ["message"],
    "additionalProperties": False,
}
OUTPUT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "answer": {"type": "string"},
        "steps": {"type": "integer"},
        "tool_calls": {"type": "integer"},
    },
    "required": ["answer", "steps", "tool_calls"],
}


class AgentAdapter:
    kind = "agent"

    def prepare(self, config: ToolConfig) -> AgentTool:
        name = config.name
        options = check_options(name, config.options, OPTIONS)
        model: ChatModel
        if "script" in options:
            for http_only in HTTP_OPTIONS:
                if http_only in options:
                    raise ToolLoadError(
                        f"tool {name!r}: option {http_only!r} is for a model behind an HTTP "
                        "API; this agent's model is the function named by 'script'"
                    )
            model = ScriptedModel(name, options["script"])
            options.setdefault("model", "scripted")
        else:
            model = HttpModel(name, options)
        tools = options.get("tools") or []
        for tool in tools:
            if not isinstance(tool, str) or not FUNCTION_NAME_RE.fullmatch(tool):
                raise ToolLoadError(
                    f"tool {name!r}: option 'tools' lists {tool!r}; the model API names "
                    "functions with 1-64 letters, digits, '_' and '-'"
                )
        if name in tools:
            raise ToolLoadError(f"tool {name!r}: an agent cannot list itself in 'tools'")
        for positive in ("max_steps", "request_timeout_seconds", "tool_timeout_seconds"):
            if positive in options and not options[positive] > 0:
                raise ToolLoadError(f"tool {name!r}: option {positive!r} must be > 0")
        for counted in ("max_retries", "memory_messages"):
            if counted in options and options[counted] < 0:
                raise ToolLoadError(f"tool {name!r}: option {counted!r} must be >= 0")
        return AgentTool(config, options, model)


ADAPTER = AgentAdapter()


# --- the model API: every HTTP request to the model is made here ----------------------------


class ModelError(Exception):
    """The model API refused the request for good (4xx other than 429)."""


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after")
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        seconds = when.timestamp() - time.time()
    return min(max(seconds, 0.0), MAX_RETRY_AFTER_SECONDS)


async def chat_completion(
    base_url: str,
    api_key: str | None,
    body: dict[str, Any],
    *,
    timeout: float,
    max_retries: int,
) -> dict[str, Any]:
    """One chat-completions response. 429, 5xx and transport errors are retried (honouring
    `Retry-After`, else 1, 2, 4 ... s) up to `max_retries` times, then raised as RuntimeError
    (the activity's retry policy takes over); other 4xx raise ModelError with the API's
    message. The key is sent as a bearer token and never logged or put in an error."""
    url = base_url.rstrip("/") + "/chat/completions"
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    problem = ""
    async with httpx.AsyncClient(timeout=timeout) as http:
        for attempt in range(max_retries + 1):
            wait: float | None = None
            try:
                response = await http.post(url, json=body, headers=headers)
            except httpx.HTTPError as exc:
                problem = f"{type(exc).__name__}: {exc}"
            else:
                if response.status_code == 200:
                    try:
                        data = response.json()
                    except ValueError:
                        data = None
                    if not isinstance(data, dict):
                        raise RuntimeError(f"the model API at {url} answered something not JSON")
                    return data
                problem = f"HTTP {response.status_code}: {_api_error(response)}"
                if response.status_code != 429 and response.status_code < 500:
                    raise ModelError(f"the model API at {url} refused the request: {problem}")
                wait = _retry_after(response)
            if attempt == max_retries:
                break
            await asyncio.sleep(wait if wait is not None else min(2.0**attempt, 30.0))
    raise RuntimeError(f"the model API at {url} failed {max_retries + 1} time(s): {problem}")


def _api_error(response: httpx.Response) -> str:
    try:
        data = response.json()
        error = data.get("error") if isinstance(data, dict) else None
        text = error.get("message") if isinstance(error, dict) else error or response.text
    except ValueError:
        text = response.text
    text = str(text)
    return text if len(text) <= MAX_ERROR_TEXT else text[:MAX_ERROR_TEXT] + "…"


class ChatModel(Protocol):
    """Where the agent's model calls go: a chat-completions request body in, the response
    body out. Raises ModelError for a refusal for good; anything else is retried."""

    async def complete(self, body: dict[str, Any]) -> dict[str, Any]: ...


class HttpModel:
    """A model behind an OpenAI-compatible chat-completions API."""

    def __init__(self, tool: str, options: dict[str, Any]) -> None:
        for required in ("model", "base_url"):
            if not options.get(required):
                raise ToolLoadError(
                    f"tool {tool!r}: option {required!r} is required (or 'script' for a "
                    "scripted model)"
                )
        if not options["base_url"].startswith(("http://", "https://")):
            raise ToolLoadError(f"tool {tool!r}: option 'base_url' must be an http(s) URL")
        env = options.get("api_key_env")
        if env is not None and not ENV_NAME_RE.fullmatch(env):
            raise ToolLoadError(f"tool {tool!r}: 'api_key_env' is not an environment variable name")
        self._tool = tool
        self._base_url: str = options["base_url"]
        self._env: str | None = env
        self._timeout = float(options.get("request_timeout_seconds", 60))
        self._max_retries = int(options.get("max_retries", 4))

    def _api_key(self) -> str | None:
        if self._env is None:
            return None
        value = os.environ.get(self._env)
        if not value:
            raise ToolError(f"agent {self._tool}: environment variable {self._env!r} is not set")
        return value

    async def complete(self, body: dict[str, Any]) -> dict[str, Any]:
        return await chat_completion(
            self._base_url,
            self._api_key(),
            body,
            timeout=self._timeout,
            max_retries=self._max_retries,
        )


# --- the agent ------------------------------------------------------------------------------


def _pending_calls(messages: list[dict[str, Any]]) -> list[tuple[int, dict[str, Any]]]:
    """(index, call) of the last model response's tool calls that have no result yet."""
    answered: set[Any] = set()
    for message in reversed(messages):
        if message.get("role") == "tool":
            answered.add(message.get("tool_call_id"))
            continue
        if message.get("role") != "assistant":
            return []
        calls = message.get("tool_calls") or []
        return [(i, c) for i, c in enumerate(calls) if c.get("id") not in answered]
    return []


class AgentTool:
    def __init__(self, config: ToolConfig, options: dict[str, Any], model: ChatModel) -> None:
        self._name = config.name
        self._options = options
        self._model = model
        self._tools: list[str] = list(options.get("tools") or [])
        self._max_steps = int(options.get("max_steps", 10))
        script = options.get("script")
        model_name = f"scripted: {script}" if script else options["model"]
        self._spec = ToolSpec.from_config(
            config,
            description=f"An LLM agent ({model_name})",
            input_schema=INPUT_SCHEMA,
            output_schema=OUTPUT_SCHEMA,
        )

    @property
    def spec(self) -> ToolSpec:
        return self._spec

    def _memory_key(self, context: ToolContext, context_id: str) -> str:
        caller = context.principal or {}
        chain = ",".join(caller.get("chain") or [])
        who = [str(caller.get("tenant", "")), str(caller.get("id", "")), chain]
        return key("agent-memory", *who, self._name, context_id)

    async def invoke(self, arguments: dict[str, Any], context: ToolContext) -> Any:
        store = context.require_checkpoints()
        if self._tools and context.tools is None:
            raise ToolError(f"agent {self._name}: this runtime cannot call other tools")
        run_key = context.execution_key("agent")
        context_id = arguments.get("context_id") or context.context_id
        memory_key = self._memory_key(context, context_id) if context_id else None
        state = await store.aget(run_key)
        if not isinstance(state, dict):
            history: list[dict[str, Any]] = []
            if memory_key is not None:
                kept = await store.aget(memory_key)
                history = list((kept or {}).get("messages") or [])
            state = {
                "messages": [*history, {"role": "user", "content": arguments["message"]}],
                "steps": 0,
                "tool_calls": 0,
                "usage": {},
            }
            await store.aput(run_key, state)
        functions = await self._functions(context)
        messages: list[dict[str, Any]] = state["messages"]
        while True:
            last = messages[-1]
            pending = _pending_calls(messages)
            if pending:
                await self._run_tool_calls(pending, state, context, run_key)
                continue
            if last.get("role") == "assistant":
                break  # the final answer
            if state["steps"] >= self._max_steps:
                raise ToolError(
                    f"agent {self._name} did not answer within {self._max_steps} model calls"
                )
            reply = await self._complete(messages, functions, state)
            messages.append(reply)
            state["steps"] += 1
            await store.aput(run_key, state)  # this model call is done for good
        if memory_key is not None:
            await store.aput(memory_key, {"messages": self._remembered(messages)})
        for name, value in state["usage"].items():
            context.report_usage(**{name: value})
        return {
            "answer": str(messages[-1].get("content") or ""),
            "steps": state["steps"],
            "tool_calls": state["tool_calls"],
        }

    async def _functions(self, context: ToolContext) -> list[dict[str, Any]]:
        if not self._tools or context.tools is None:
            return []
        specs = await context.tools.visible(self._name, self._tools)
        return [
            {
                "type": "function",
                "function": {
                    "name": spec.name,
                    "description": spec.description,
                    "parameters": spec.input_schema,
                },
            }
            for spec in specs
        ]

    async def _complete(
        self,
        messages: list[dict[str, Any]],
        functions: list[dict[str, Any]],
        state: dict[str, Any],
    ) -> dict[str, Any]:
        body: dict[str, Any] = {"model": self._options["model"], "messages": messages}
        prompt = self._options.get("system_prompt")
        if prompt:
            body["messages"] = [{"role": "system", "content": prompt}, *messages]
        if functions:
            body["tools"] = functions
        try:
            data = await self._model.complete(body)
        except ModelError as exc:
            raise ToolError(f"agent {self._name}: {exc}") from None
        usage = data.get("usage")
        if isinstance(usage, dict):
            for name in USAGE_KEYS:
                value = usage.get(name)
                if isinstance(value, int | float) and not isinstance(value, bool):
                    state["usage"][name] = state["usage"].get(name, 0) + value
        try:
            message = data["choices"][0]["message"]
        except (KeyError, IndexError, TypeError):
            raise RuntimeError(f"agent {self._name}: the model's answer has no message") from None
        reply: dict[str, Any] = {"role": "assistant", "content": message.get("content") or ""}
        calls = message.get("tool_calls")
        if isinstance(calls, list) and calls:
            reply["tool_calls"] = [
                {
                    "id": str(c.get("id") or f"call_{i}"),
                    "type": "function",
                    "function": {
                        "name": str((c.get("function") or {}).get("name", "")),
                        "arguments": str((c.get("function") or {}).get("arguments") or "{}"),
                    },
                }
                for i, c in enumerate(calls)
                if isinstance(c, dict)
            ]
        return reply

    async def _run_tool_calls(
        self,
        pending: list[tuple[int, dict[str, Any]]],
        state: dict[str, Any],
        context: ToolContext,
        run_key: str,
    ) -> None:
        """Run the tool calls of the last model response that have no result yet, saving each
        result as it comes (a retry runs only those still missing)."""
        messages: list[dict[str, Any]] = state["messages"]
        for index, call in pending:
            content = await self._tool_result(call, context, state["steps"], index)
            if len(content) > MAX_TOOL_RESULT_CHARS:
                content = content[:MAX_TOOL_RESULT_CHARS] + " …(cut)"
            messages.append({"role": "tool", "tool_call_id": call["id"], "content": content})
            state["tool_calls"] += 1
            await context.require_checkpoints().aput(run_key, state)

    async def _tool_result(
        self, call: dict[str, Any], context: ToolContext, step: int, index: int
    ) -> str:
        function = call["function"]
        name = function["name"]
        if name not in self._tools or context.tools is None:
            return json.dumps({"error": f"there is no tool {name!r} for this agent"})
        try:
            arguments = json.loads(function["arguments"] or "{}")
        except ValueError as exc:
            return json.dumps({"error": f"the arguments are not JSON: {exc}"})
        if not isinstance(arguments, dict):
            return json.dumps({"error": "the arguments must be a JSON object"})
        idempotency = f"agent:{context.instance_id}:{context.task_execution_id}:{step}:{index}"
        outcome = await context.tools.call(
            self._name,
            name,
            arguments,
            key=idempotency,
            timeout=float(self._options.get("tool_timeout_seconds", 300)),
        )
        if outcome.get("ok"):
            return json.dumps(outcome.get("result"), ensure_ascii=False, default=str)
        error = outcome.get("error") or {}
        kind, message = error.get("type", "error"), error.get("message", "")
        return json.dumps({"error": f"{kind}: {message}"}, ensure_ascii=False)

    def _remembered(self, messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The last `memory_messages` messages, starting at a user message (a tool result
        without the call it answers would be refused by the model API)."""
        limit = int(self._options.get("memory_messages", 50))
        if limit == 0:
            return []
        kept = messages[-limit:]
        while kept and kept[0].get("role") != "user":
            kept = kept[1:]
        return kept
