"""The dashboard at `/ui`: static HTML, CSS and JavaScript served by the gateway (no CDN, no
build step), talking to the admin API (`/admin/api`) from the browser.

The page is locked down: a Content-Security-Policy that allows only this origin's own script,
style and fetches (no inline script or style, no frames, no forms posting elsewhere), and the
script renders everything with `textContent` (never as HTML), so data from calls, tools or
policies cannot run as code. Credentials are whatever the browser has for this origin: a client
certificate (mTLS), a bearer token the user pastes (kept in sessionStorage, sent as
`Authorization`), or none when the gateway makes the anonymous principal an admin on loopback.
"""

from __future__ import annotations

from functools import cache
from importlib import resources

from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Route

ASSETS = {
    "index.html": "text/html; charset=utf-8",
    "dashboard.js": "text/javascript; charset=utf-8",
    "dashboard.css": "text/css; charset=utf-8",
    "favicon.svg": "image/svg+xml",
}
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
    "img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-cache",
}


@cache
def asset(name: str) -> bytes:
    """A file of gateway/static/dashboard (from the installed package, wheel or source)."""
    return (resources.files("gateway") / "static" / "dashboard" / name).read_bytes()


def _serve(name: str) -> Response:
    return Response(asset(name), media_type=ASSETS[name], headers=HEADERS)


async def index(request: Request) -> Response:
    return _serve("index.html")


async def file(request: Request) -> Response:
    name = request.path_params["name"]
    if name not in ASSETS:
        return Response("no such file", status_code=404, media_type="text/plain", headers=HEADERS)
    return _serve(name)


async def slash(request: Request) -> Response:
    return RedirectResponse("/ui", status_code=308)


def dashboard_routes() -> list[Route]:
    return [
        Route("/ui", index, methods=["GET"]),
        Route("/ui/", slash, methods=["GET"]),
        Route("/ui/{name}", file, methods=["GET"]),
    ]
