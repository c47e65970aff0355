"""The `a2a` tool kind: a remote A2A agent (A2A 1.0, through a2a-sdk) as a tool.

    - name: remote_add
      kind: a2a
      target: https://agents.example/a2a/agents/math    # base URL (card at
                                                        # /.well-known/agent-card.json) or card URL
      options:
        skill: add                       # sent as message metadata {"skill": ...}
        headers: {Authorization: REMOTE_TOKEN}   # header -> environment variable with its value
        binding: JSONRPC                 # or HTTP+JSON; default: the card's first we speak
        text: false                      # true: input {"text": string} sent as a text part
        request_timeout_seconds: 30      # one HTTP request (card, send, get)
        poll_seconds: 1                  # GetTask interval when the agent cannot stream
        stream: true                     # follow with SubscribeToTask when the card allows

The card is fetched when the tool loads: an agent that does not answer, or a `skill` its card
does not list, stops the gateway from starting (the error names the URL), so a typo shows at
once rather than at the first call. Description: the skill's (or the agent's) from the card.

Input: A2A skills have no input schema. By default the tool takes any JSON object
(`{"type": "object"}`, or the config's `input_schema`) and sends it as one data part; with
`text: true` it takes `{"text": string}` and sends a text part. Output: the remote task's
first artifact: a data part's value (an object as is, anything else as `{"result": value}`),
else its text as `{"text": ...}`.

Durability. The message id is derived from the call and the activity's task execution id, so a
retried activity resends the same message (a Duragate peer then returns the task it already
started instead of running it twice). The remote task id is saved as soon as it is known; a
retry that finds it follows that task (subscribe or GetTask) instead of sending anything.

While the remote task runs, its status messages are reported as progress. COMPLETED gives the
result; FAILED, REJECTED, CANCELED and AUTH_REQUIRED are the tool's error with the remote's
message (not retried); INPUT_REQUIRED makes this call wait for input with the remote's message,
and the value supplied is sent as a message on the remote task (a data part, or text for a
string). Transport failures and a remote internal error are retried per the tool's retry policy.
Header values come from the environment at each call and are never logged.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import urlsplit

import httpx
from pydantic_core import to_jsonable_python

import adapters
from adapters._outbound import OAuthTokens
from adapters._targets import check_options
from adapters.base import InputRequired, ToolContext, ToolError, ToolLoadError, ToolSpec
from gateway.config import ToolConfig
from identity.outbound import OutboundAuthError

CARD_PATH = "/.well-known/agent-card.json"
BINDINGS = ("JSONRPC", "HTTP+JSON")
OPTIONS: dict[str, type | tuple[type, ...]] = {
    "skill": str,
    "headers": dict,
    "binding": str,
    "text": bool,
    "request_timeout_seconds": (int, float),
    "poll_seconds": (int, float),
    "stream": bool,
    # "own": present the gateway's own identity (identity.own): its X.509-SVID over https, and
    # with `jwt_audience` a JWT-SVID for that audience as the bearer token.
    "identity": str,
    "jwt_audience": str,
    # An access token for the gateway itself from an authorization server (client credentials):
    # {token_endpoint, client_id, client_secret_env, scope, resource, audience}.
    "oauth": dict,
}
HEADER_NAME_RE = re.compile(r"[A-Za-z0-9-]{1,100}")
ENV_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,200}")
DEFAULT_REQUEST_TIMEOUT = 30.0
DEFAULT_POLL_SECONDS = 1.0
MAX_PROGRESS_TEXT = 500
TEXT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"text": {"type": "string", "description": "the message to the agent"}},
    "required": ["text"],
    "additionalProperties": False,
}


def card_url(target: str) -> str:
    """The card's URL for a target that is a base URL or the card URL itself."""
    if target.endswith(".json"):
        return target
    return target.rstrip("/") + CARD_PATH


class A2AAdapter:
    kind = "a2a"

    def prepare(self, config: ToolConfig) -> A2ATool:
        options = check_options(config.name, config.options, OPTIONS)
        name = config.name
        if not config.target.startswith(("http://", "https://")):
            raise ToolLoadError(
                f"tool {name!r}: target {config.target!r} must be the agent's http(s) URL"
            )
        binding = options.get("binding")
        if binding is not None and binding not in BINDINGS:
            raise ToolLoadError(
                f"tool {name!r}: option 'binding' must be one of {', '.join(BINDINGS)}"
            )
        for key in ("request_timeout_seconds", "poll_seconds"):
            if key in options and not options[key] > 0:
                raise ToolLoadError(f"tool {name!r}: option {key!r} must be > 0")
        headers = options.get("headers") or {}
        for header, env in headers.items():
            if not isinstance(header, str) or not HEADER_NAME_RE.fullmatch(header):
                raise ToolLoadError(f"tool {name!r}: {header!r} is not an HTTP header name")
            if not isinstance(env, str) or not ENV_NAME_RE.fullmatch(env):
                raise ToolLoadError(
                    f"tool {name!r}: header {header!r} must name an environment variable "
                    "holding its value"
                )
        _check_identity(name, config.target, options)
        oauth = None
        if "oauth" in options:
            if "jwt_audience" in options:
                raise ToolLoadError(f"tool {name!r}: oauth and jwt_audience both set the token")
            host = urlsplit(config.target).hostname or ""
            if not config.target.startswith("https://") and host not in (
                "127.0.0.1",
                "localhost",
                "::1",
            ):
                raise ToolLoadError(
                    f"tool {name!r}: access tokens are sent only over https (or to loopback)"
                )
            try:
                oauth = OAuthTokens(options["oauth"])
            except ToolLoadError as exc:
                raise ToolLoadError(f"tool {name!r}: {exc}") from None
        tool = A2ATool(config, options, oauth)
        tool.load_card()
        return tool


ADAPTER = A2AAdapter()


def _check_identity(name: str, target: str, options: dict[str, Any]) -> None:
    identity = options.get("identity")
    if identity is None:
        if "jwt_audience" in options:
            raise ToolLoadError(f"tool {name!r}: option 'jwt_audience' needs identity: own")
        return
    if identity != "own":
        raise ToolLoadError(f"tool {name!r}: option 'identity' can only be 'own'")
    if adapters.own_identity() is None:
        raise ToolLoadError(
            f"tool {name!r}: identity: own needs the gateway's own identity: set identity.own "
            "in the gateway config"
        )
    host = urlsplit(target).hostname or ""
    if not target.startswith("https://") and host not in ("127.0.0.1", "localhost", "::1"):
        raise ToolLoadError(
            f"tool {name!r}: the gateway's identity is presented only over https (or to a "
            "loopback host)"
        )


def _headers(tool: str, mapping: dict[str, str]) -> dict[str, str]:
    """Header values from the environment (never logged, never in an error)."""
    out: dict[str, str] = {}
    for header, env in mapping.items():
        value = os.environ.get(env)
        if not value:
            raise ToolLoadError(
                f"tool {tool!r}: environment variable {env!r} (header {header!r}) is not set"
            )
        out[header] = value
    return out


def _short(text: str) -> str:
    return text if len(text) <= MAX_PROGRESS_TEXT else text[: MAX_PROGRESS_TEXT - 1] + "…"


class A2ATool:
    def __init__(
        self, config: ToolConfig, options: dict[str, Any], oauth: OAuthTokens | None = None
    ) -> None:
        self._config = config
        self._options = options
        self._oauth = oauth
        self._card_url = card_url(config.target)
        self._timeout = float(options.get("request_timeout_seconds", DEFAULT_REQUEST_TIMEOUT))
        self._poll = float(options.get("poll_seconds", DEFAULT_POLL_SECONDS))
        self._text_mode = bool(options.get("text", False))
        self._card: Any = None
        self._spec = ToolSpec.from_config(
            config,
            description=None,
            input_schema=TEXT_SCHEMA if self._text_mode else {"type": "object"},
            output_schema=None,
        )

    @property
    def spec(self) -> ToolSpec:
        return self._spec

    def _headers(self) -> dict[str, str]:
        return _headers(self._config.name, self._options.get("headers") or {})

    def _verify(self) -> ssl.SSLContext | bool:
        """With identity: own over https, a TLS context presenting the gateway's current SVID."""
        own = adapters.own_identity()
        if self._options.get("identity") == "own" and own is not None:
            if self._card_url.startswith("https://"):
                context: ssl.SSLContext = own.client_ssl_context()
                return context
        return True

    async def _call_headers(self) -> dict[str, str]:
        headers = self._headers()
        audience = self._options.get("jwt_audience")
        own = adapters.own_identity()
        if audience and own is not None:
            headers["Authorization"] = f"Bearer {await own.jwt_svid(audience)}"
        if self._oauth is not None:
            try:
                headers["Authorization"] = f"Bearer {await self._oauth.token()}"
            except OutboundAuthError as exc:  # the server refused or is down: retried
                raise RuntimeError(f"no access token for {self._card_url}: {exc}") from None
        return headers

    def load_card(self) -> None:
        """Fetch and check the card (blocking: tools load in a worker thread)."""
        from a2a.client.card_resolver import parse_agent_card

        name, url = self._config.name, self._card_url
        try:
            response = httpx.get(
                url, headers=self._headers(), timeout=self._timeout, verify=self._verify()
            )
        except httpx.HTTPError as exc:
            raise ToolLoadError(
                f"tool {name!r}: the agent card at {url} cannot be fetched: {exc}"
            ) from None
        if response.status_code != 200:
            raise ToolLoadError(
                f"tool {name!r}: the agent card at {url} answered HTTP {response.status_code}"
            )
        try:
            card = parse_agent_card(response.json())
        except Exception as exc:  # not JSON, or not a card
            raise ToolLoadError(f"tool {name!r}: {url} is not an A2A agent card: {exc}") from None
        bindings = {i.protocol_binding for i in card.supported_interfaces}
        wanted = self._options.get("binding")
        if wanted is not None and wanted not in bindings:
            raise ToolLoadError(
                f"tool {name!r}: the agent at {url} does not offer the {wanted} binding "
                f"(it offers: {', '.join(sorted(bindings)) or 'none'})"
            )
        if not bindings & set(BINDINGS):
            raise ToolLoadError(
                f"tool {name!r}: the agent at {url} offers no binding this gateway speaks "
                f"({', '.join(sorted(bindings)) or 'none'}; wanted one of {', '.join(BINDINGS)})"
            )
        skill = self._options.get("skill")
        description = card.description
        if skill is not None:
            found = next((s for s in card.skills if s.id == skill), None)
            if found is None:
                offered = ", ".join(s.id for s in card.skills) or "none"
                raise ToolLoadError(
                    f"tool {name!r}: the agent at {url} has no skill {skill!r} (it offers: "
                    f"{offered})"
                )
            description = found.description or description
        self._card = card
        self._spec = ToolSpec.from_config(
            self._config,
            description=description,
            input_schema=TEXT_SCHEMA if self._text_mode else {"type": "object"},
            output_schema=None,
        )

    # --- the call ------------------------------------------------------------------------

    @asynccontextmanager
    async def _client(self, streaming: bool) -> AsyncIterator[Any]:
        from a2a.client import ClientConfig, ClientFactory

        timeout = httpx.Timeout(self._timeout, read=None if streaming else self._timeout)
        headers = await self._call_headers()
        async with httpx.AsyncClient(
            headers=headers, timeout=timeout, verify=self._verify()
        ) as http:
            wanted = self._options.get("binding")
            config = ClientConfig(
                httpx_client=http,
                streaming=streaming,
                supported_protocol_bindings=[wanted] if wanted else list(BINDINGS),
            )
            client = ClientFactory(config).create(self._card)
            try:
                yield client
            finally:
                await client.close()

    def _message(self, message_id: str, value: Any, task_id: str = "", context_id: str = "") -> Any:
        from a2a.types import Message, Part, Role

        from gateway.a2a_render import value_of

        message = Message(
            message_id=message_id, role=Role.ROLE_USER, task_id=task_id, context_id=context_id
        )
        if isinstance(value, str):
            message.parts.append(Part(text=value))
        else:
            message.parts.append(Part(data=value_of(value)))
        skill = self._options.get("skill")
        if skill is not None and not task_id:
            message.metadata.update({"skill": skill})
        return message

    async def invoke(self, arguments: dict[str, Any], context: ToolContext) -> Any:
        store = context.require_checkpoints()
        task_key = context.call_key("a2a", "task")
        wait_key = context.call_key("a2a", "wait")
        saved = await store.aget(task_key)
        remote_id = saved.get("task_id") if isinstance(saved, dict) else None
        context_id = saved.get("context_id", "") if isinstance(saved, dict) else ""
        try:
            if remote_id is None:
                task = await self._send(arguments, context, task_key)
                if not hasattr(task, "status"):  # the agent answered with a message
                    return _message_result(task)
                remote_id, context_id = task.id, task.context_id
            elif context.supplied_input is not None:
                await self._answer(context, remote_id, context_id, wait_key)
            task = await self._follow(remote_id, context)
        except (ToolError, InputRequired):
            raise
        except ToolLoadError as exc:  # a header's environment variable is gone
            raise ToolError(str(exc)) from None
        except Exception as exc:
            raise self._classify(exc) from exc
        return await self._outcome(task, wait_key, store)

    async def _send(self, arguments: dict[str, Any], context: ToolContext, task_key: str) -> Any:
        from a2a.types import SendMessageConfiguration, SendMessageRequest

        value: Any = arguments["text"] if self._text_mode else arguments
        digest = hashlib.sha256(
            f"{context.instance_id}\0{context.task_execution_id}".encode()
        ).hexdigest()
        message = self._message(f"duragate-{digest[:40]}", value)
        request = SendMessageRequest(
            message=message, configuration=SendMessageConfiguration(return_immediately=True)
        )
        answer: Any = None
        async with self._client(streaming=False) as client:
            async for event in client.send_message(request):
                if event.HasField("task"):
                    answer = event.task
                elif event.HasField("message"):
                    answer = event.message
        if answer is None:
            raise RuntimeError("the agent answered the message with nothing")
        if hasattr(answer, "status"):
            # From here on a retry follows this task instead of sending again.
            await context.require_checkpoints().aput(
                task_key, {"task_id": answer.id, "context_id": answer.context_id}
            )
        return answer

    async def _answer(
        self, context: ToolContext, remote_id: str, context_id: str, wait_key: str
    ) -> None:
        """Send the supplied input on the remote task, unless that was done already (a retry
        after the answer went out): only while the remote still shows the wait we relayed."""
        from a2a.types import (
            GetTaskRequest,
            SendMessageConfiguration,
            SendMessageRequest,
            TaskState,
        )

        supplied = context.supplied_input
        assert supplied is not None
        waited = await context.require_checkpoints().aget(wait_key)
        async with self._client(streaming=False) as client:
            task = await client.get_task(GetTaskRequest(id=remote_id))
            if task.status.state != TaskState.TASK_STATE_INPUT_REQUIRED:
                return
            if waited is not None and waited != _stamp(task):
                return  # it waits for something newer, which the caller has not seen
            digest = hashlib.sha256(
                f"{context.instance_id}\0input\0{supplied.round}".encode()
            ).hexdigest()
            message = self._message(
                f"duragate-{digest[:40]}", supplied.value, task_id=remote_id, context_id=context_id
            )
            request = SendMessageRequest(
                message=message, configuration=SendMessageConfiguration(return_immediately=True)
            )
            async for _ in client.send_message(request):
                pass

    async def _follow(self, remote_id: str, context: ToolContext) -> Any:
        """The remote task once it ends or stops for input, reporting its status messages."""
        from a2a.types import GetTaskRequest, SubscribeToTaskRequest

        count = 0
        last = ""

        def report(status: Any) -> None:
            nonlocal count, last
            text = _status_text(status)
            if text and text != last:
                last = text
                count += 1
                context.progress(count, None, _short(text))

        async with self._client(streaming=False) as client:
            task = await client.get_task(GetTaskRequest(id=remote_id))
        report(task.status)
        streaming = bool(self._options.get("stream", True)) and bool(
            self._card.capabilities.streaming
        )
        if streaming and not _settled(task):
            from a2a.utils.errors import A2AError

            try:
                async with self._client(streaming=True) as client:
                    async for event in client.subscribe(SubscribeToTaskRequest(id=remote_id)):
                        if event.HasField("status_update"):
                            report(event.status_update.status)
                            if _settled_state(event.status_update.status.state):
                                break
            except A2AError as exc:
                from a2a.client.errors import A2AClientError

                if isinstance(exc, A2AClientError):
                    raise
                # The task ended between the get and the subscribe: get it below.
        while True:
            async with self._client(streaming=False) as client:
                task = await client.get_task(GetTaskRequest(id=remote_id))
            report(task.status)
            if _settled(task):
                return task
            await asyncio.sleep(self._poll)

    async def _outcome(self, task: Any, wait_key: str, store: Any) -> Any:
        from a2a.types import TaskState

        state = task.status.state
        text = _status_text(task.status)
        if state == TaskState.TASK_STATE_COMPLETED:
            return _artifact_result(task)
        if state == TaskState.TASK_STATE_INPUT_REQUIRED:
            await store.aput(wait_key, _stamp(task))
            payload = {"remote_task_id": task.id}
            request = _metadata(task.status.message).get("input_request")
            if request is not None:
                payload["request"] = request
            raise InputRequired(text or f"{self._config.name} waits for input", payload)
        name = TaskState.Name(state).removeprefix("TASK_STATE_").lower()
        raise ToolError(
            f"the remote agent's task {task.id} ended {name}: {text or 'no message'}",
            data={"remote_task_id": task.id, "state": name},
        )

    def _classify(self, exc: Exception) -> Exception:
        """A failure the remote agent decided (not retried) or a transport one (retried)."""
        from a2a.client.errors import A2AClientError
        from a2a.utils.errors import A2AError, InternalError

        if isinstance(exc, A2AClientError | InternalError) or not isinstance(exc, A2AError):
            return RuntimeError(f"calling the agent at {self._config.target} failed: {exc}")
        return ToolError(f"the agent at {self._config.target} refused the call: {exc}")


def _settled_state(state: int) -> bool:
    from a2a.types import TaskState

    return state in (
        TaskState.TASK_STATE_COMPLETED,
        TaskState.TASK_STATE_FAILED,
        TaskState.TASK_STATE_CANCELED,
        TaskState.TASK_STATE_REJECTED,
        TaskState.TASK_STATE_INPUT_REQUIRED,
        TaskState.TASK_STATE_AUTH_REQUIRED,
    )


def _settled(task: Any) -> bool:
    return _settled_state(task.status.state)


def _stamp(task: Any) -> str:
    """What tells one wait of the remote task from the next: its status time and message."""
    status = task.status
    stamp = status.timestamp.ToJsonString() if status.HasField("timestamp") else ""
    return f"{stamp}|{status.message.message_id}|{_status_text(status)}"


def _status_text(status: Any) -> str:
    if not status.HasField("message"):
        return ""
    return "\n".join(p.text for p in status.message.parts if p.WhichOneof("content") == "text")


def _metadata(message: Any) -> dict[str, Any]:
    from google.protobuf.json_format import MessageToDict

    from gateway.a2a_render import integral

    data = integral(MessageToDict(message.metadata)) if message.HasField("metadata") else {}
    return data if isinstance(data, dict) else {}


def _parts_value(parts: Any) -> Any:
    from google.protobuf.json_format import MessageToDict

    from gateway.a2a_render import integral

    texts: list[str] = []
    for part in parts:
        content = part.WhichOneof("content")
        if content == "data":
            value = integral(MessageToDict(part.data))
            return value if isinstance(value, dict) else {"result": value}
        if content == "text":
            texts.append(part.text)
    if texts:
        return {"text": "\n".join(texts)}
    return None


def _artifact_result(task: Any) -> Any:
    for artifact in task.artifacts:
        value = _parts_value(artifact.parts)
        if value is not None:
            return to_jsonable_python(value)
    if task.status.HasField("message"):
        value = _parts_value(task.status.message.parts)
        if value is not None:
            return value
    return {}


def _message_result(message: Any) -> Any:
    value = _parts_value(message.parts)
    return value if value is not None else {}
