"""Gateway tools called by a tool (an `agent` tool), through the dispatch path, for its caller.

The activity that runs a tool gets `ToolContext.tools`: `DelegatedTools` bound to the call's
principal. A tool that calls another tool through it acts as an agent of its own,
`spiffe://<trust domain>/agent/<name>`, in the caller's tenant, with the caller appended to the
delegation chain. So the tenant policy decides what the agent may do for whom (cycles and depth
included), the call is audited and admitted like any other, and it runs as its own durable
call. An idempotency key per call makes a retried activity replay the call instead of running
it twice.

Activities run on the SDK worker's own event loop, while the dispatcher (and its gRPC client)
lives on the gateway's loop: calls hop over with `run_coroutine_threadsafe`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from typing import Any

from gateway.dispatch import CallRequest, Dispatcher, DispatchError
from identity.principal import Principal

FRONT_DOOR = "agent"
VIA = "agent"
# An activity recovered at start-up may run before the dispatcher exists.
DISPATCHER_WAIT_SECONDS = 30.0


def agent_principal(caller: Principal, agent: str, trust_domain: str) -> Principal:
    """`agent` acting for `caller`: its own ID, the caller's tenant, the caller last in chain."""
    return Principal(
        id=f"spiffe://{trust_domain}/agent/{agent}",
        tenant=caller.tenant,
        via=VIA,
        chain=(*caller.chain, caller.id),
    )


class Delegation:
    """Made once per gateway; `bind(principal)` gives one call's capability."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        dispatcher: Callable[[], Dispatcher | None],
        trust_domain: str,
    ) -> None:
        self._loop = loop
        self._dispatcher = dispatcher
        self.trust_domain = trust_domain

    def bind(self, principal: dict[str, Any] | None) -> DelegatedTools | None:
        if not principal:
            return None
        return DelegatedTools(self, Principal.from_json(principal))

    async def _dispatcher_ready(self) -> Dispatcher:
        deadline = time.monotonic() + DISPATCHER_WAIT_SECONDS
        while (dispatcher := self._dispatcher()) is None:
            if time.monotonic() > deadline:
                raise RuntimeError("the gateway's dispatcher is not running")
            await asyncio.sleep(0.1)
        return dispatcher

    async def _on_gateway_loop(self, coro: Any) -> Any:
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is self._loop:
            return await coro
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, self._loop))


class DelegatedTools:
    """What a tool may do with the gateway's other tools, for the caller of its call."""

    def __init__(self, delegation: Delegation, caller: Principal) -> None:
        self._delegation = delegation
        self.caller = caller

    def principal(self, agent: str) -> Principal:
        return agent_principal(self.caller, agent, self._delegation.trust_domain)

    async def visible(self, agent: str, names: Sequence[str]) -> list[Any]:
        """The specs of those of `names` the agent, acting for the caller, may see."""

        async def run() -> list[Any]:
            dispatcher = await self._delegation._dispatcher_ready()
            wanted = set(names)
            return [s for s in dispatcher.tools_for(self.principal(agent)) if s.name in wanted]

        result: list[Any] = await self._delegation._on_gateway_loop(run())
        return result

    async def call(
        self, agent: str, tool: str, arguments: dict[str, Any], *, key: str, timeout: float
    ) -> dict[str, Any]:
        """Run `tool` as `agent` for the caller; wait for it up to `timeout` seconds.

        Returns `{"ok": true, "result", "usage"?}` or `{"ok": false, "error": {"type",
        "message"}}`: a refusal (policy, limits, bad arguments) is an answer, not an exception.
        Exceptions mean the gateway could not be asked (retry)."""
        principal = self.principal(agent)

        async def run() -> dict[str, Any]:
            if principal.id in principal.chain:
                return _refused("denied", f"{agent} may not call itself on behalf of itself")
            dispatcher = await self._delegation._dispatcher_ready()
            request = CallRequest(
                tool=tool,
                arguments=arguments,
                principal=principal,
                front_door=FRONT_DOOR,
                idempotency_key=key,
            )
            try:
                view = await dispatcher.submit(request)
                if not view.terminal:
                    view = await dispatcher.wait(view.task_id, principal, timeout, known=view)
            except DispatchError as exc:
                return _refused(exc.code, exc.message)
            if view.state.value == "completed":
                answer: dict[str, Any] = {"ok": True, "result": view.result}
                if view.usage:
                    answer["usage"] = view.usage
                return answer
            if view.terminal:
                error = view.error or {}
                return _refused(
                    str(error.get("type") or view.state.value),
                    str(error.get("message") or f"{tool} {view.state.value}"),
                )
            waiting = f"waiting for {view.waiting_for}" if view.waiting_for else "still running"
            return _refused("pending", f"{tool} is {waiting} (task {view.task_id})")

        result: dict[str, Any] = await self._delegation._on_gateway_loop(run())
        return result


def _refused(kind: str, message: str) -> dict[str, Any]:
    return {"ok": False, "error": {"type": kind, "message": message}}
