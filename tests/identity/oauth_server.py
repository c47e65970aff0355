"""A small but real OAuth authorization server for the tests, on a loopback port in a thread:

GET  /.well-known/oauth-authorization-server   RFC 8414 metadata (issuer, jwks_uri, token_endpoint)
GET  /jwks                                     the JWK Set (public keys), fetches counted
POST /token                                    client_credentials and RFC 8693 token exchange

with AuthServer() as server:
    token = server.issue("alice", aud="https://gw/mcp")
"""

from __future__ import annotations

import base64
import json
import threading
import time
import urllib.parse
from collections.abc import Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from joserfc import jwt
from joserfc.jwk import ECKey

from tests.identity.keys import PrivateKey, default_alg, ec_key, jose_key, public_jwk

TOKEN_EXCHANGE = "urn:ietf:params:oauth:grant-type:token-exchange"
JWT_TOKEN_TYPE = "urn:ietf:params:oauth:token-type:jwt"
ACCESS_TOKEN_TYPE = "urn:ietf:params:oauth:token-type:access_token"


class AuthServer:
    def __init__(self, *, clients: Mapping[str, str] | None = None) -> None:
        self.keys: dict[str, PrivateKey] = {"k1": ec_key()}
        self.published: list[str] = ["k1"]  # the kids the JWK Set shows
        self.clients = dict(clients or {"gateway": "s3cret"})
        self.jwks_fetches = 0
        self.metadata_fetches = 0
        self.token_requests: list[dict[str, str]] = []
        self.token_ttl = 300
        self.metadata_issuer: str | None = None  # to serve metadata of another issuer
        self._lock = threading.Lock()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.base = f"http://127.0.0.1:{self._httpd.server_address[1]}"
        self.issuer = self.base
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    def __enter__(self) -> AuthServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(10)

    # -- what the tests use ---------------------------------------------------------------------

    @property
    def jwks_uri(self) -> str:
        return f"{self.base}/jwks"

    @property
    def token_endpoint(self) -> str:
        return f"{self.base}/token"

    def jwks(self) -> dict[str, Any]:
        return {"keys": [public_jwk(self.keys[kid], kid=kid, use="sig") for kid in self.published]}

    def add_key(self, kid: str, key: PrivateKey | None = None, *, publish: bool = True) -> None:
        self.keys[kid] = key or ec_key()
        if publish:
            self.published.append(kid)

    def issue(
        self,
        sub: str = "alice",
        *,
        aud: str | list[str] | None = "https://gateway.test/mcp",
        ttl: float = 300,
        kid: str | None = "k1",
        iss: str | None = None,
        alg: str | None = None,
        typ: str = "at+jwt",
        **extra: Any,
    ) -> str:
        now = int(time.time())
        claims: dict[str, Any] = {"iss": iss or self.issuer, "sub": sub, "iat": now}
        if ttl is not None:
            claims["exp"] = int(now + ttl)
        if aud is not None:
            claims["aud"] = aud
        claims.update(extra)
        key = self.keys[kid or "k1"]
        alg = alg or default_alg(key)
        header: dict[str, Any] = {"alg": alg, "typ": typ}
        if kid is not None:
            header["kid"] = kid
        return jwt.encode(header, claims, jose_key(key), algorithms=[alg])

    # -- the server ---------------------------------------------------------------------------

    def _metadata(self) -> dict[str, Any]:
        return {
            "issuer": self.metadata_issuer or self.issuer,
            "jwks_uri": self.jwks_uri,
            "token_endpoint": self.token_endpoint,
            "grant_types_supported": ["client_credentials", TOKEN_EXCHANGE],
        }

    def _token(self, form: dict[str, str], client_id: str) -> tuple[int, dict[str, Any]]:
        grant = form.get("grant_type")
        extra: dict[str, Any] = {}
        if grant == "client_credentials":
            sub = client_id
        elif grant == TOKEN_EXCHANGE:
            subject_token = form.get("subject_token")
            if not subject_token:
                return 400, {"error": "invalid_request", "error_description": "no subject_token"}
            subject = _unverified(subject_token)
            sub = str(subject.get("sub"))
            actor_token = form.get("actor_token")
            if actor_token:
                actor = _unverified(actor_token)
                # RFC 8693 4.1: the new actor on top, earlier ones nested.
                act: dict[str, Any] = {"sub": actor.get("sub")}
                if "act" in subject:
                    act["act"] = subject["act"]
                extra["act"] = act
        else:
            return 400, {"error": "unsupported_grant_type"}
        aud = form.get("resource") or form.get("audience")
        token = self.issue(sub, aud=aud, ttl=self.token_ttl, scope=form.get("scope"), **extra)
        body = {
            "access_token": token,
            "token_type": "Bearer",
            "expires_in": self.token_ttl,
        }
        if grant == TOKEN_EXCHANGE:
            body["issued_token_type"] = ACCESS_TOKEN_TYPE
        return 200, body

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass

            def _send(self, status: int, body: dict[str, Any]) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:  # noqa: N802
                with server._lock:
                    if self.path == "/jwks":
                        server.jwks_fetches += 1
                        self._send(200, server.jwks())
                    elif self.path == "/.well-known/oauth-authorization-server":
                        server.metadata_fetches += 1
                        self._send(200, server._metadata())
                    else:
                        self._send(404, {"error": "not_found"})

            def do_POST(self) -> None:  # noqa: N802
                length = int(self.headers.get("Content-Length") or 0)
                form = dict(urllib.parse.parse_qsl(self.rfile.read(length).decode()))
                client_id = _basic_client(self.headers.get("Authorization"), server.clients)
                if client_id is None and form.get("client_id") in server.clients:
                    if server.clients[form["client_id"]] == form.get("client_secret"):
                        client_id = form["client_id"]
                with server._lock:
                    server.token_requests.append({**form, "_client": client_id or ""})
                    if self.path != "/token":
                        self._send(404, {"error": "not_found"})
                    elif client_id is None:
                        self._send(401, {"error": "invalid_client"})
                    else:
                        self._send(*server._token(form, client_id))

        return Handler


def _basic_client(header: str | None, clients: Mapping[str, str]) -> str | None:
    if not header or not header.startswith("Basic "):
        return None
    user, _, password = base64.b64decode(header[6:]).decode().partition(":")
    user, password = urllib.parse.unquote(user), urllib.parse.unquote(password)
    return user if clients.get(user) == password else None


def _unverified(token: str) -> dict[str, Any]:
    payload = token.split(".")[1]
    return dict(json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4))))


__all__ = ["AuthServer", "ECKey"]
