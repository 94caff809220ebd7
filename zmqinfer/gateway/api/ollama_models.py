"""Ollama's model routes: GET /api/tags, POST /api/show, GET /api/ps, GET /api/version.

The gateway serves one model, always loaded: /api/tags and /api/ps list it (and the plain names
of `[gateway] aliases`, so a client that picks from the list finds the names it hard-codes);
/api/show describes it with `capabilities` (completion always; tools and thinking when its chat
template speaks of them) and, in `model_info`, the context length clients size prompts by. A
name that is neither the model nor an alias is Ollama's 404 `{"error": ...}`. Sizes are 0: the
model's weights are spread over the ring's nodes, not a local blob; the digest is a stable hash
of the name for the same reason.
"""

from __future__ import annotations

import hashlib
from datetime import datetime, timezone
from typing import Any

from aiohttp import web

from zmqinfer.gateway.api.fields import RequestError, parse_body
from zmqinfer.gateway.api.http import ADMISSION, BACKEND, STARTED, read_body
from zmqinfer.gateway.api.shape import is_served, listed_names, only, require

# What /api/version says. Clients gate features on Ollama's version (VS Code Copilot wants at
# least 0.6.4); these routes follow Ollama's API as of this release.
OLLAMA_API_VERSION = "0.13.0"
ARCHITECTURE = "zmqinfer"  # model_info's general.architecture: the key prefix of context_length


def add_routes(router: web.UrlDispatcher) -> None:
    router.add_get("/api/tags", tags)
    router.add_post("/api/show", show)
    router.add_get("/api/ps", ps)
    router.add_get("/api/version", version)


def _card(app: web.Application, name: str) -> dict[str, Any]:
    modified = datetime.fromtimestamp(app[STARTED], timezone.utc).isoformat().replace("+00:00", "Z")
    return {"name": name, "model": name, "modified_at": modified, "size": 0,
            "digest": hashlib.sha256(app[BACKEND].model_id.encode()).hexdigest(),
            "details": {"parent_model": "", "format": "mlx", "family": "", "families": [],
                        "parameter_size": "", "quantization_level": ""}}


async def tags(request: web.Request) -> web.Response:
    return web.json_response({"models": [_card(request.app, n) for n in listed_names(request.app)]})


async def ps(request: web.Request) -> web.Response:
    context = request.app[BACKEND].context_length
    return web.json_response({"models": [
        _card(request.app, n) | {"expires_at": "9999-12-31T23:59:59Z", "size_vram": 0,
                                 "context_length": context} for n in listed_names(request.app)]})


async def version(request: web.Request) -> web.Response:
    return web.json_response({"version": OLLAMA_API_VERSION})


async def show(request: web.Request) -> web.Response:
    body = parse_body(await read_body(request, request.app[ADMISSION].body_timeout))
    only(body, {"model", "name", "verbose"})
    name = body.get("model") if body.get("model") is not None else body.get("name")
    if name is None:
        require(body, "model", str)
    if not isinstance(name, str):
        raise RequestError("model must be a string", param="model", code="invalid_type")
    if not is_served(request.app, name):
        raise RequestError(f"model '{name[:200]}' not found", param="model",
                           code="model_not_found", status=404)
    backend = request.app[BACKEND]
    template = getattr(backend.tokenizer, "chat_template", None) or ""
    template = template if isinstance(template, str) else ""
    capabilities = ["completion"]
    if "tools" in template:
        capabilities.append("tools")
    if "enable_thinking" in template or "<think>" in template:
        capabilities.append("thinking")
    card = _card(request.app, name)
    return web.json_response({
        "modelfile": f"FROM {backend.model_id}\n", "parameters": "", "template": template,
        "details": card["details"], "modified_at": card["modified_at"],
        "model_info": {"general.architecture": ARCHITECTURE, "general.basename": backend.model_id,
                       f"{ARCHITECTURE}.context_length": backend.context_length},
        "capabilities": capabilities})
