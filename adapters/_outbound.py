"""Access tokens for tools that call remote servers as the gateway (`options.oauth`): an
OAuth client-credentials grant (identity.outbound), one client per event loop (a tool's schema
is read at start-up on a loop of its own, its calls run on the worker's)."""

from __future__ import annotations

import asyncio
from typing import Any

from pydantic import ValidationError

import adapters
from adapters.base import ToolLoadError
from identity.outbound import OutboundAuthError, OutboundOAuth, OutboundOAuthConfig


class OAuthTokens:
    def __init__(self, options: dict[str, Any]) -> None:
        try:
            self.config = OutboundOAuthConfig.model_validate(options)
        except ValidationError as exc:
            problems = "; ".join(
                f"oauth.{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()
            )
            raise ToolLoadError(f"bad oauth options: {problems}") from None
        self._clients: dict[int, OutboundOAuth] = {}
        self._client()  # a missing client secret stops the start, not the first call

    def _client(self) -> OutboundOAuth:
        try:
            loop = id(asyncio.get_running_loop())
        except RuntimeError:
            loop = 0
        client = self._clients.get(loop)
        if client is None:
            try:
                client = OutboundOAuth(self.config, own=adapters.own_identity())
            except OutboundAuthError as exc:
                raise ToolLoadError(str(exc)) from None
            self._clients[loop] = client
        return client

    async def token(self) -> str:
        """The gateway's current access token (cached until shortly before it expires).
        Raises OutboundAuthError when the authorization server gives none."""
        return await self._client().client_credentials(
            scope=self.config.scope, resource=self.config.resource
        )
