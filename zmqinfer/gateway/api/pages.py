"""The gateway's own pages: `/` a live status page, `/chat` a minimal streaming chat.

Plain files under static/ (package data): no build step, nothing fetched from the internet.
The page polls /cluster/status once a second; the chat streams /v1/chat/completions (fetch +
ReadableStream). Both send `Authorization: Bearer <key>` when one is given (`?key=`, then kept
in the browser's localStorage), so they work behind API keys like any other client.
Routes go through the app's router, so whatever guards the other routes guards these too.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path

from aiohttp import web

STATIC = Path(__file__).with_name("static")


def add_routes(router: web.UrlDispatcher) -> None:
    router.add_get("/", _page("index.html"))
    router.add_get("/chat", _page("chat.html"))
    router.add_static("/static/", STATIC)


def _page(name: str) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    path = STATIC / name

    async def handler(request: web.Request) -> web.StreamResponse:
        return web.FileResponse(path, headers={"Cache-Control": "no-cache"})

    return handler
