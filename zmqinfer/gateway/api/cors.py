"""Browsers: which web pages' scripts may call the API (CORS), as one middleware.

* `allowed(origin, configured)`: an origin in `[api] cors_origins` (or "*" there: any). With
  none configured, only pages served from this machine (http(s)://localhost, 127.0.0.1, [::1],
  any port): closed by default off loopback, like the API keys' protected mode.
* A preflight (OPTIONS with Access-Control-Request-Method) is answered here, before the key
  check (a browser never sends credentials on one): 204 with what may follow, or 403 for an
  origin not allowed. Every other response to an allowed origin carries
  Access-Control-Allow-Origin (streams included: the header is added as the response starts).
* Requests without an Origin header (every non-browser client) are untouched.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from urllib.parse import urlsplit

from aiohttp import web

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
LOOPBACK_HOSTS = frozenset({"localhost", "127.0.0.1", "::1"})
ALLOW_METHODS = "GET, POST, OPTIONS"
ALLOW_HEADERS = "Authorization, Content-Type, OpenAI-Organization, OpenAI-Project, X-Stainless-*"
EXPOSE_HEADERS = "x-request-id, Retry-After"
PREFLIGHT_MAX_AGE_S = 600  # browsers cache the answer this long (Chrome caps it at 7200)


def allowed(origin: str, configured: tuple[str, ...]) -> bool:
    if configured:
        return "*" in configured or origin.rstrip("/") in configured
    try:
        parts = urlsplit(origin)
        return parts.scheme in ("http", "https") and parts.hostname in LOOPBACK_HOSTS
    except ValueError:
        return False


def _headers(origin: str) -> dict[str, str]:
    # Echo the origin (never "*"): an Authorization header needs an exact origin; Vary keeps
    # caches from serving one origin's answer to another.
    return {"Access-Control-Allow-Origin": origin, "Vary": "Origin",
            "Access-Control-Expose-Headers": EXPOSE_HEADERS}


def middleware(configured: tuple[str, ...]) -> Callable[..., Awaitable[web.StreamResponse]]:
    @web.middleware
    async def cors(request: web.Request, handler: Handler) -> web.StreamResponse:
        origin = request.headers.get("Origin")
        if origin is None:
            return await handler(request)
        ok = allowed(origin, configured)
        if request.method == "OPTIONS" and "Access-Control-Request-Method" in request.headers:
            if not ok:
                return web.Response(status=403, text=f"origin {origin} is not allowed ([api] cors_origins)")
            return web.Response(status=204, headers=_headers(origin) | {
                "Access-Control-Allow-Methods": ALLOW_METHODS,
                "Access-Control-Allow-Headers": request.headers.get(
                    "Access-Control-Request-Headers", ALLOW_HEADERS),
                "Access-Control-Max-Age": str(PREFLIGHT_MAX_AGE_S)})
        if ok:
            request[_ORIGIN] = origin
        return await handler(request)

    return cors


_ORIGIN = web.RequestKey("cors_origin", str)


async def add_headers(request: web.Request, response: web.StreamResponse) -> None:
    """on_response_prepare: a stream's headers leave before the handler returns."""
    origin = request.get(_ORIGIN)
    if origin is not None:
        response.headers.update(_headers(origin))
