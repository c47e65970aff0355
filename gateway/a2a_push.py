"""A2A push notifications: webhook configs per task, kept in the sidecar's state store, and a
deliverer that follows each task and POSTs its state to the webhooks.

A config is stored under `duragate-a2a-push-<task id>` with the task's owner; the tasks whose
final state has not been delivered yet are listed under one index key. A gateway that starts
reads the index and follows those tasks again, so a notification missed while the gateway was
down (killed, restarted) is delivered after it comes back. Delivery is at least once: a webhook
may see the same state twice and should key on (task id, state).

Each notification is a `StreamResponse` holding the task (as the SDK's own sender does), with
the config's token in `X-A2A-Notification-Token` and its credentials in `Authorization`.
Failed deliveries are retried with exponential backoff up to `push.max_attempts` times.
Push URLs are screened against requests into internal networks unless their host is allowed
in the config (see A2APushConfig).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx
from a2a.types import StreamResponse
from a2a.utils.push_url_validator import validate_push_notification_url
from google.protobuf.json_format import MessageToDict

from gateway.config import A2APushConfig
from gateway.dispatch import CallState, CallView, Dispatcher, DispatchError, owns
from gateway.state_client import EtagMismatch, StateClient
from identity.principal import Principal

log = logging.getLogger(__name__)

# Dapr reserves "||" in keys (its app-id prefix separator).
CONFIG_PREFIX = "duragate-a2a-push-"
INDEX_KEY = "duragate-a2a-push-index"
# How many tasks one gateway follows for push delivery at once; beyond it new configs are
# refused (the caller can poll instead).
MAX_FOLLOWED = 10_000
MAX_URL_LENGTH = 2048
MAX_TOKEN_LENGTH = 4096


class PushConfigError(ValueError):
    """A push config that cannot be accepted; the message says why."""


@dataclass(frozen=True)
class PushTarget:
    id: str
    task_id: str
    url: str
    token: str = ""
    auth_scheme: str = ""
    auth_credentials: str = ""

    def to_json(self) -> dict[str, str]:
        return {
            "id": self.id,
            "task_id": self.task_id,
            "url": self.url,
            "token": self.token,
            "auth_scheme": self.auth_scheme,
            "auth_credentials": self.auth_credentials,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> PushTarget:
        return cls(**{k: str(data.get(k, "")) for k in cls.__dataclass_fields__})


def _task_key(task_id: str) -> str:
    return CONFIG_PREFIX + task_id


class PushService:
    def __init__(
        self,
        dispatcher: Callable[[], Dispatcher],
        state: StateClient,
        settings: Callable[[], A2APushConfig],
        http: httpx.AsyncClient | None = None,
    ) -> None:
        self._dispatcher = dispatcher
        self._state = state
        self._settings = settings
        self._http = http or httpx.AsyncClient(follow_redirects=False)
        self._followers: dict[str, asyncio.Task[None]] = {}
        self._closed = False

    # --- configs ---------------------------------------------------------------------------

    async def check_url(self, url: str) -> None:
        if len(url) > MAX_URL_LENGTH:
            raise PushConfigError(f"the push URL is longer than {MAX_URL_LENGTH} characters")
        parsed = urllib.parse.urlparse(url)
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise PushConfigError("the push URL must be an absolute http:// or https:// URL")
        if parsed.hostname in self._settings().allowed_hosts:
            return
        if not await validate_push_notification_url(url):
            raise PushConfigError(
                f"push notifications to {parsed.hostname} are not allowed: it is an internal "
                "address, or it does not resolve (an operator can allow a host in "
                "a2a.push.allowed_hosts)"
            )

    async def add(
        self,
        task_id: str,
        owner: Principal,
        url: str,
        token: str = "",
        auth_scheme: str = "",
        auth_credentials: str = "",
        config_id: str = "",
    ) -> PushTarget:
        """Store a webhook for a task the owner may see, and start following the task."""
        await self._dispatcher().get(task_id, owner)  # not_found for anyone but the owner
        await self.check_url(url)
        if len(token) > MAX_TOKEN_LENGTH or len(auth_credentials) > MAX_TOKEN_LENGTH:
            raise PushConfigError(f"tokens and credentials are limited to {MAX_TOKEN_LENGTH}")
        if len(self._followers) >= MAX_FOLLOWED and task_id not in self._followers:
            raise PushConfigError("the gateway follows too many tasks for push; poll instead")
        target = PushTarget(
            id=config_id or secrets.token_hex(8),
            task_id=task_id,
            url=url,
            token=token,
            auth_scheme=auth_scheme,
            auth_credentials=auth_credentials,
        )
        limit = self._settings().max_configs_per_task

        def change(record: dict[str, Any]) -> dict[str, Any]:
            targets = [t for t in record.get("targets", []) if t.get("id") != target.id]
            if len(targets) >= limit:
                raise PushConfigError(f"a task takes at most {limit} push configs")
            targets.append(target.to_json())
            return {"owner": owner.to_json(), "targets": targets, "delivered": None}

        await self._update(_task_key(task_id), change)
        await self._update(INDEX_KEY, lambda index: _with(index, task_id))
        self.follow(task_id)
        return target

    async def targets(self, task_id: str, owner: Principal) -> list[PushTarget]:
        record = await self._read(_task_key(task_id))
        if record is None or not _owned_by(record, owner):
            return []
        return [PushTarget.from_json(t) for t in record.get("targets", [])]

    async def remove(self, task_id: str, owner: Principal, config_id: str) -> bool:
        record = await self._read(_task_key(task_id))
        if record is None or not _owned_by(record, owner):
            return False
        found = any(t.get("id") == config_id for t in record.get("targets", []))

        def change(current: dict[str, Any]) -> dict[str, Any]:
            current["targets"] = [t for t in current.get("targets", []) if t.get("id") != config_id]
            return current

        if found:
            await self._update(_task_key(task_id), change)
        return found

    # --- delivery --------------------------------------------------------------------------

    async def resume(self) -> int:
        """Follow again every task whose final state was not delivered (after a restart)."""
        index = await self._read(INDEX_KEY) or {}
        tasks = list(index.get("tasks", []))
        for task_id in tasks:
            self.follow(task_id)
        if tasks:
            log.info("push: following %d task(s) again", len(tasks))
        return len(tasks)

    def follow(self, task_id: str) -> None:
        if self._closed or task_id in self._followers:
            return
        task = asyncio.create_task(self._follow(task_id), name=f"a2a-push-{task_id}")
        self._followers[task_id] = task
        task.add_done_callback(lambda _: self._followers.pop(task_id, None))

    async def _follow(self, task_id: str) -> None:
        try:
            record = await self._read(_task_key(task_id))
            if record is None:
                await self._update(INDEX_KEY, lambda index: _without(index, task_id))
                return
            owner = Principal.from_json(record["owner"])
            dispatcher = self._dispatcher()
            delivered: str | None = record.get("delivered")
            view = await dispatcher.get(task_id, owner)

            async def on_update(update: CallView) -> None:
                nonlocal delivered
                if update.state.value != delivered and not update.terminal:
                    await self._deliver(task_id, update)
                    delivered = update.state.value

            if view.state.value != delivered and not view.terminal:
                await self._deliver(task_id, view)
                delivered = view.state.value
            while not view.terminal:
                view = await dispatcher.wait(task_id, owner, timeout=3600, on_update=on_update)
            await self._deliver(task_id, view)
            await self._update(_task_key(task_id), lambda r: {**r, "delivered": view.state.value})
            await self._update(INDEX_KEY, lambda index: _without(index, task_id))
        except DispatchError as exc:
            log.warning("push: task %s cannot be followed (%s); dropping it", task_id, exc.code)
            with contextlib.suppress(Exception):
                await self._update(INDEX_KEY, lambda index: _without(index, task_id))
        except asyncio.CancelledError:
            raise
        except Exception:  # noqa: BLE001 - the index keeps it: a restart follows it again
            log.exception("push: following task %s failed", task_id)

    async def _deliver(self, task_id: str, view: CallView) -> None:
        from gateway.a2a_render import task_of  # the renderer imports the dispatcher too

        record = await self._read(_task_key(task_id)) or {}
        targets = [PushTarget.from_json(t) for t in record.get("targets", [])]
        if not targets:
            return
        body = MessageToDict(StreamResponse(task=task_of(view, history_length=0)))
        await asyncio.gather(*(self._post(target, body, view.state) for target in targets))

    async def _post(self, target: PushTarget, body: dict[str, Any], state: CallState) -> bool:
        settings = self._settings()
        headers = {"Content-Type": "application/json"}
        if target.token:
            headers["X-A2A-Notification-Token"] = target.token
        if target.auth_scheme and target.auth_credentials:
            headers["Authorization"] = f"{target.auth_scheme} {target.auth_credentials}"
        delay = settings.first_retry_seconds
        for attempt in range(1, settings.max_attempts + 1):
            retryable = True
            try:
                await self.check_url(target.url)  # DNS may have changed since the config
                response = await self._http.post(
                    target.url, json=body, headers=headers, timeout=settings.timeout_seconds
                )
                if response.status_code < 300:
                    return True
                reason = f"HTTP {response.status_code}"
                # The webhook refuses (a 4xx other than timeout or too-many): retrying won't help.
                status = response.status_code
                retryable = not (400 <= status < 500 and status not in (408, 429))
            except PushConfigError as exc:
                reason, retryable = str(exc), False
            except httpx.HTTPError as exc:
                reason = type(exc).__name__
            if not retryable or attempt == settings.max_attempts:
                log.warning(
                    "push: gave up on task %s (%s) to config %s after %d attempt(s): %s",
                    target.task_id,
                    state.value,
                    target.id,
                    attempt,
                    reason,
                )
                return False
            await asyncio.sleep(delay)
            delay = min(delay * 2, settings.max_retry_seconds)
        return False

    async def close(self) -> None:
        self._closed = True
        followers = list(self._followers.values())
        for task in followers:
            task.cancel()
        for task in followers:
            with contextlib.suppress(BaseException):
                await task
        await self._http.aclose()
        await self._state.close()

    # --- state -----------------------------------------------------------------------------

    async def _read(self, key: str) -> dict[str, Any] | None:
        entry = await self._state.get(key)
        return json.loads(entry.value) if entry.value else None

    async def _update(self, key: str, change: Callable[[dict[str, Any]], dict[str, Any]]) -> None:
        """Read-modify-write with the etag: safe with several gateways on one sidecar."""
        for _ in range(50):
            entry = await self._state.get(key)
            current = json.loads(entry.value) if entry.value else {}
            updated = change(current)
            try:
                await self._state.save(key, json.dumps(updated).encode(), entry.etag)
                return
            except EtagMismatch:
                await asyncio.sleep(0.01)
        raise RuntimeError(f"state key {key} keeps changing; giving up")


def _owned_by(record: dict[str, Any], principal: Principal) -> bool:
    return owns(principal, record.get("owner") or {})


def _with(index: dict[str, Any], task_id: str) -> dict[str, Any]:
    tasks = list(index.get("tasks", []))
    if task_id not in tasks:
        tasks.append(task_id)
    return {"tasks": tasks}


def _without(index: dict[str, Any], task_id: str) -> dict[str, Any]:
    return {"tasks": [t for t in index.get("tasks", []) if t != task_id]}
