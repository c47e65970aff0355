"""Outbound OAuth with authlib: access tokens for the gateway's calls to remote MCP servers and
A2A agents that want one.

    oauth = OutboundOAuth(OutboundOAuthConfig(token_endpoint=..., client_id=...,
                                              client_secret_env="REMOTE_SECRET"), own=own)
    await oauth.client_credentials(resource="https://mcp.example/mcp")      # the gateway itself
    await oauth.exchange(caller_token, resource="https://mcp.example/mcp")  # for a caller
    await oauth.aclose()

- Client credentials (RFC 6749 4.4): the gateway calls as itself.
- Token exchange (RFC 8693) carries the delegation chain: the caller's token is the
  `subject_token`, the gateway's own JWT-SVID (audience: the token endpoint) the
  `actor_token`, so the authorization server can issue a token for the caller whose `act`
  names the gateway (and, nested, whoever acted before).
Tokens are cached until shortly before they expire (the earlier of `expires_in` minus a minute
and half their lifetime; 60 s when the server gives no `expires_in`), per grant, resource,
audience and scope (and, for an exchange, per subject token), in a bounded cache. Concurrent
requests for the same token share one request. The client secret comes from an environment
variable, never from a file; tokens and secrets are never logged or put in an error.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import re
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Literal

from authlib.integrations.base_client.errors import OAuthError
from authlib.integrations.httpx_client import AsyncOAuth2Client
from pydantic import BaseModel, ConfigDict, Field, field_validator

from gateway.config import _https_url
from identity.own import OwnIdentity, OwnIdentityError

try:
    # authlib's httpx integration runs on httpx2 when it is installed, on httpx otherwise: its
    # transport errors are that package's.
    import httpx2 as _http
except ImportError:  # pragma: no cover - depends on what is installed
    import httpx as _http  # type: ignore[no-redef]

log = logging.getLogger(__name__)

TOKEN_EXCHANGE = "urn:ietf:params:oauth:grant-type:token-exchange"
ACCESS_TOKEN_TYPE = "urn:ietf:params:oauth:token-type:access_token"
JWT_TOKEN_TYPE = "urn:ietf:params:oauth:token-type:jwt"
DEFAULT_LIFETIME_SECONDS = 60.0
RENEW_MARGIN_SECONDS = 60.0
MAX_CACHED = 512
TIMEOUT_SECONDS = 10.0


class OutboundAuthError(RuntimeError):
    """No token could be had; the message says why (the server's `error` and description)."""


class OutboundOAuthConfig(BaseModel):
    """How the gateway gets tokens from one authorization server."""

    model_config = ConfigDict(extra="forbid")

    token_endpoint: str
    client_id: str = Field(min_length=1)
    # The name of the environment variable holding the client secret (none: a public client,
    # which then proves itself with the actor token only).
    client_secret_env: str | None = None
    auth_method: Literal["client_secret_basic", "client_secret_post", "none"] = (
        "client_secret_basic"
    )
    scope: str | None = None
    resource: str | None = None  # RFC 8707
    audience: str | None = None  # RFC 8693 2.1

    @field_validator("token_endpoint")
    @classmethod
    def _endpoint(cls, value: str) -> str:
        return _https_url(value, "the token endpoint")

    @field_validator("client_secret_env")
    @classmethod
    def _env(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", value):
            raise ValueError(f"{value!r} is not an environment variable name")
        return value


@dataclass(frozen=True)
class _Cached:
    token: str
    renew_at: float


class OutboundOAuth:
    def __init__(
        self,
        config: OutboundOAuthConfig,
        *,
        own: OwnIdentity | None = None,
        env: dict[str, str] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.own = own
        self._clock = clock
        secret = None
        if config.client_secret_env is not None:
            secret = (os.environ if env is None else env).get(config.client_secret_env)
            if not secret:
                raise OutboundAuthError(
                    f"the client secret of {config.client_id!r} is missing: set the "
                    f"environment variable {config.client_secret_env}"
                )
        method = config.auth_method if secret is not None else "none"
        self._client = AsyncOAuth2Client(
            client_id=config.client_id,
            client_secret=secret,
            token_endpoint_auth_method=method,
            token_endpoint=config.token_endpoint,
            timeout=TIMEOUT_SECONDS,
            follow_redirects=False,
        )
        self._cache: OrderedDict[tuple[str, ...], _Cached] = OrderedDict()
        self._pending: dict[tuple[str, ...], asyncio.Future[str]] = {}
        self.requests = 0  # requests sent to the token endpoint (for tests and metrics)

    async def aclose(self) -> None:
        await self._client.aclose()

    async def client_credentials(
        self, *, scope: str | None = None, resource: str | None = None
    ) -> str:
        """An access token for the gateway itself."""
        params = self._params(scope, resource, None)
        key = ("client_credentials", *_flat(params))
        return await self._cached(key, lambda: self._fetch("client_credentials", params))

    async def exchange(
        self,
        subject_token: str,
        *,
        subject_token_type: str = ACCESS_TOKEN_TYPE,
        scope: str | None = None,
        resource: str | None = None,
        audience: str | None = None,
        actor_token: str | None = None,
    ) -> str:
        """An access token for the caller whose token is `subject_token`, with the gateway as
        the actor: `actor_token` or, by default, the gateway's own JWT-SVID for the token
        endpoint."""
        if not subject_token:
            raise ValueError("a token exchange needs the caller's token")
        params = self._params(scope, resource, audience)
        # The subject token's hash, not the token, keys the cache.
        digest = hashlib.sha256(subject_token.encode()).hexdigest()
        key = (TOKEN_EXCHANGE, digest, *_flat(params))

        async def fetch() -> _Cached:
            actor = actor_token or await self._actor_token()
            body = {
                **params,
                "subject_token": subject_token,
                "subject_token_type": subject_token_type,
                "requested_token_type": ACCESS_TOKEN_TYPE,
            }
            if actor is not None:
                body["actor_token"] = actor
                body["actor_token_type"] = JWT_TOKEN_TYPE
            return await self._fetch(TOKEN_EXCHANGE, body)

        return await self._cached(key, fetch)

    # -- the machinery -----------------------------------------------------------------------

    def _params(
        self, scope: str | None, resource: str | None, audience: str | None
    ) -> dict[str, str]:
        params = {
            "scope": scope or self.config.scope,
            "resource": resource or self.config.resource,
            "audience": audience or self.config.audience,
        }
        return {k: v for k, v in params.items() if v}

    async def _actor_token(self) -> str | None:
        if self.own is None:
            return None
        try:
            return await self.own.jwt_svid(self.config.token_endpoint)
        except OwnIdentityError as exc:
            raise OutboundAuthError(f"no actor token (the gateway's JWT-SVID): {exc}") from None

    async def _cached(self, key: tuple[str, ...], fetch: Callable[[], Awaitable[_Cached]]) -> str:
        now = self._clock()
        entry = self._cache.get(key)
        if entry is not None and now < entry.renew_at:
            self._cache.move_to_end(key)
            return entry.token
        pending = self._pending.get(key)
        if pending is not None:
            return await asyncio.shield(pending)
        future: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._pending[key] = future
        try:
            entry = await fetch()
            self._cache[key] = entry
            while len(self._cache) > MAX_CACHED:
                self._cache.popitem(last=False)
            future.set_result(entry.token)
            return entry.token
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # retrieved: a lone waiter-less failure must not warn
            raise
        finally:
            del self._pending[key]

    async def _fetch(self, grant_type: str, body: dict[str, str]) -> _Cached:
        self.requests += 1
        started = self._clock()
        try:
            token = await self._client.fetch_token(
                self.config.token_endpoint, grant_type=grant_type, **body
            )
        except OAuthError as exc:
            description = f": {exc.description}" if exc.description else ""
            raise OutboundAuthError(
                f"{self.config.token_endpoint} refused the {_grant_name(grant_type)} request "
                f"({exc.error}{description})"
            ) from None
        except _http.HTTPError as exc:
            raise OutboundAuthError(
                f"{self.config.token_endpoint} cannot be reached: {type(exc).__name__}: {exc}"
            ) from None
        except ValueError as exc:  # a response that is not JSON
            raise OutboundAuthError(
                f"{self.config.token_endpoint} sent an unreadable token response: {exc}"
            ) from None
        access = token.get("access_token")
        if not isinstance(access, str) or not access:
            raise OutboundAuthError(f"{self.config.token_endpoint} sent no access_token")
        token_type = str(token.get("token_type", ""))
        if token_type.lower() != "bearer":
            raise OutboundAuthError(
                f"{self.config.token_endpoint} sent a token of type {token_type[:40]!r}, not Bearer"
            )
        lifetime = token.get("expires_in")
        seconds = (
            float(lifetime)
            if isinstance(lifetime, int | float) and lifetime > 0
            else DEFAULT_LIFETIME_SECONDS
        )
        # Renewed early: a token handed out is never about to expire on its way.
        return _Cached(access, started + min(seconds - RENEW_MARGIN_SECONDS, seconds / 2))


def _flat(params: dict[str, str]) -> tuple[str, ...]:
    return tuple(f"{k}={v}" for k, v in sorted(params.items()))


def _grant_name(grant_type: str) -> str:
    return "token exchange" if grant_type == TOKEN_EXCHANGE else grant_type.replace("_", " ")
