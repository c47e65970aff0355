"""Per-request cost of authentication at the HTTP front door (`python -m bench.auth_bench`).

What `McpEndpoint` adds to every `/mcp` request, measured in process (no network, no server):
reading the headers, `Authenticator.authenticate_http`, and for a JWT-SVID the session-binding
user handed to the SDK. Cases:

- `jwt_svid_cache_on`: a client sending the same token with every request (the usual case);
- `jwt_svid_cache_off`: `token_cache_seconds: 0`, a full JWT-SVID verification every time;
- `jwt_svid_first_use`: cache on, a new token each request (a miss, then an insert);
- `anonymous`: no credentials, `allow_anonymous: true`;
- `mtls_reused_connection`: an X.509-SVID client certificate, every request on one connection
  (the check is kept on the connection: the target is no cost beyond the first request);
- `mtls_first_request`: the first request of each new connection (a full `verify_x509_svid`);
- `oauth_cache_on` / `oauth_cache_off`: an OAuth access token (ES256) of an issuer configured
  in `identity.oauth` (keys from a JWKS file, so no fetch is measured), cache on and off;
- `delegation_mtls_reused`: an agent's client certificate on a reused connection plus a user's
  JWT-SVID whose `act.sub` names it (cache on): the chain check per request.

Tokens are ES256 JWT-SVIDs from a development CA made in a temporary directory, as SPIRE issues
by default. Prints one JSON document, times in microseconds. The issue's target: at most 150 us
p50 added per request for a JWT-SVID.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.serialization import Encoding
from joserfc import jwt
from joserfc.jwk import ECKey
from starlette.datastructures import Headers

from gateway.config import IdentityConfig
from gateway.http_app import session_user
from identity.authenticate import VIA_ANONYMOUS, Authenticator
from identity.dev_ca import DevCA
from identity.tls import TlsPeer

TARGET_P50_US = 150.0
SUBJECT = "spiffe://example.org/team-a/bench"
AGENT = "spiffe://example.org/agents/bench"
ISSUER = "https://login.example.org"
RESOURCE = "https://gateway.example.org/mcp"


def _scope(token: str | None) -> dict[str, Any]:
    # The headers a real MCP client sends with a request, so header handling costs what it does
    # in the gateway.
    raw = [
        (b"host", b"127.0.0.1:8770"),
        (b"accept", b"application/json, text/event-stream"),
        (b"content-type", b"application/json"),
        (b"mcp-protocol-version", b"2025-11-25"),
        (b"mcp-session-id", b"0123456789abcdef0123456789abcdef"),
    ]
    if token is not None:
        raw.append((b"authorization", f"Bearer {token}".encode()))
    return {"type": "http", "headers": raw}


def _per_request(auth: Authenticator, scope: dict[str, Any], peer: TlsPeer | None = None) -> None:
    # What McpEndpoint does before handing the request to the session manager.
    principal = auth.authenticate_http(Headers(scope=scope), peer)
    if principal.via != VIA_ANONYMOUS:
        session_user(principal)


def _measure(run: Callable[[int], None], n: int, warmup: int) -> dict[str, float]:
    for i in range(warmup):
        run(i)
    samples: list[float] = []
    for i in range(warmup, warmup + n):
        start = time.perf_counter_ns()
        run(i)
        samples.append((time.perf_counter_ns() - start) / 1000)
    samples.sort()

    def pick(q: float) -> float:
        return round(samples[min(len(samples) - 1, int(q * len(samples)))], 1)

    return {
        "p50_us": pick(0.50),
        "p99_us": pick(0.99),
        "mean_us": round(statistics.fmean(samples), 1),
        "n": n,
    }


def run(n: int, warmup: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        ca = DevCA.create(Path(tmp) / "ca", "example.org")
        idp_key = ECKey.generate_key("P-256", parameters={"kid": "idp-1"})
        jwks = Path(tmp) / "jwks.json"
        jwks.write_text(json.dumps({"keys": [idp_key.as_dict(private=False)]}))
        base = {
            "trust_domain": "example.org",
            "bundles": {"example.org": str(Path(tmp) / "ca" / "bundle.json")},
            "resource": RESOURCE,
            "oauth": [{"issuer": ISSUER, "jwks_file": str(jwks)}],
        }

        def authenticator(**settings: Any) -> Authenticator:
            return Authenticator(IdentityConfig.model_validate({**base, **settings}))

        def issue() -> str:
            return ca.issue_jwt_svid(SUBJECT, "duragate", timedelta(minutes=10))

        token_scope = _scope(issue())
        now = int(time.time())
        access = jwt.encode(
            {"alg": "ES256", "kid": "idp-1", "typ": "at+jwt"},
            {"iss": ISSUER, "sub": "bench", "aud": RESOURCE, "iat": now, "exp": now + 600},
            idp_key,
            algorithms=["ES256"],
        )
        oauth_scope = _scope(access)
        delegated = _scope(
            ca.issue_jwt_svid(
                SUBJECT, "duragate", timedelta(minutes=10), extra_claims={"act": {"sub": AGENT}}
            )
        )
        agent_cert, _ = ca.issue_x509_svid(AGENT, timedelta(minutes=10))
        agent_connection = TlsPeer(agent_cert.public_bytes(Encoding.DER))
        cached = authenticator(token_cache_seconds=60)
        uncached = authenticator(token_cache_seconds=0)
        anonymous = authenticator(allow_anonymous=True)
        # Distinct tokens differ in iat/exp; issued beforehand, signing is not what we measure.
        fresh = [_scope(issue()) for _ in range(n + warmup)]
        cert, _ = ca.issue_x509_svid(SUBJECT, timedelta(minutes=10))
        der = cert.public_bytes(Encoding.DER)
        connection = TlsPeer(der)
        new_connections = [TlsPeer(der) for _ in range(n + warmup)]
        cases: dict[str, Callable[[int], None]] = {
            "jwt_svid_cache_on": lambda i: _per_request(cached, token_scope),
            "jwt_svid_cache_off": lambda i: _per_request(uncached, token_scope),
            "jwt_svid_first_use": lambda i: _per_request(cached, fresh[i]),
            "anonymous": lambda i: _per_request(anonymous, _scope(None)),
            "mtls_reused_connection": lambda i: _per_request(cached, _scope(None), connection),
            "mtls_first_request": lambda i: _per_request(cached, _scope(None), new_connections[i]),
            "oauth_cache_on": lambda i: _per_request(cached, oauth_scope),
            "oauth_cache_off": lambda i: _per_request(uncached, oauth_scope),
            "delegation_mtls_reused": lambda i: _per_request(cached, delegated, agent_connection),
        }
        results = {}
        for name, case in cases.items():
            gc.collect()
            results[name] = _measure(case, n, warmup)
    p50 = results["jwt_svid_cache_on"]["p50_us"]
    return {
        "benchmark": "auth",
        "python": platform.python_version(),
        "machine": platform.machine(),
        "algorithm": "ES256",
        "cases": results,
        "target_p50_us": TARGET_P50_US,
        "meets_target": {
            "cache_on": p50 <= TARGET_P50_US,
            "cache_off": results["jwt_svid_cache_off"]["p50_us"] <= TARGET_P50_US,
        },
        "cache_speedup_p50": round(results["jwt_svid_cache_off"]["p50_us"] / p50, 1),
        # What a reused mTLS connection adds over a request without credentials.
        "mtls_reused_over_anonymous_p50_us": round(
            results["mtls_reused_connection"]["p50_us"] - results["anonymous"]["p50_us"], 1
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=3000, help="measured requests per case")
    parser.add_argument("--warmup", type=int, default=300, help="unmeasured requests first")
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    args = parser.parse_args()
    doc = run(args.n, args.warmup)
    text = json.dumps(doc, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
