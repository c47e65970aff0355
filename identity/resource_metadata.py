"""OAuth 2.0 Protected Resource Metadata (RFC 9728) for the MCP endpoint, and the URL of it
that a 401 names (`WWW-Authenticate: Bearer resource_metadata="..."`), so an IDE client can
find the authorization server its user signs in with.

    metadata_url(identity, base)            -> "https://gw.example/.well-known/oauth-protected-resource/mcp"
    protected_resource_metadata(identity, base) -> {"resource": ..., "authorization_servers": [...]}

`base` is the origin the request came to (scheme and Host). `identity.resource`, when set,
wins over it: behind a proxy the Host the gateway sees is not the one clients use, and the
resource a token's `aud` must name is a setting, not a header.
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import urlsplit

from gateway.config import IdentityConfig

WELL_KNOWN = "/.well-known/oauth-protected-resource"
MCP_PATH = "/mcp"
# What a Host header may hold here (a name or an address, and a port): anything else is not
# echoed into a header or a document.
_HOST = re.compile(r"[A-Za-z0-9.\-]+(:\d{1,5})?|\[[0-9A-Fa-f:.]+\](:\d{1,5})?")


def request_origin(scheme: str, host_header: str | None, server: tuple[str, int] | None) -> str:
    """The origin a request was sent to: its Host header when it looks like a host, else the
    address the server listens on."""
    if host_header and _HOST.fullmatch(host_header):
        return f"{scheme}://{host_header}"
    if server is not None:
        host, port = server
        host = f"[{host}]" if ":" in host else host
        return f"{scheme}://{host}:{port}"
    return f"{scheme}://localhost"


def resource_of(identity: IdentityConfig, origin: str) -> str:
    return identity.resource or f"{origin}{MCP_PATH}"


def metadata_url(identity: IdentityConfig, origin: str) -> str:
    """Where the metadata of the MCP endpoint is (RFC 9728 3.1: the well-known path inserted
    between the resource's host and its path)."""
    if identity.resource:
        parts = urlsplit(identity.resource)
        return f"{parts.scheme}://{parts.netloc}{WELL_KNOWN}{parts.path.rstrip('/')}"
    return f"{origin}{WELL_KNOWN}{MCP_PATH}"


def protected_resource_metadata(identity: IdentityConfig, origin: str) -> dict[str, Any]:
    return {
        "resource": resource_of(identity, origin),
        "authorization_servers": [issuer.issuer for issuer in identity.oauth],
        "bearer_methods_supported": ["header"],
        "resource_name": "Duragate",
    }
