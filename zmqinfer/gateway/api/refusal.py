"""How each dialect says no: the error body a client of that dialect parses, chosen by path.

Every refusal the gateway makes before a response starts (validation 400s, 401/403 from auth,
408/413/429, the ring's 503/504/500, aiohttp's 404/405) goes through `refuse`, so a client gets
its own dialect's error even from the middleware:

* Anthropic (/v1/messages...): `{"type": "error", "error": {"type": <by status>, "message"}}`,
  the types Anthropic's SDK maps to its exception classes.
* Ollama (/api/...): `{"error": "<message>"}`, which ollama's clients raise as ResponseError.
* OpenAI, Responses and the gateway's own routes: `{"error": {"message", "type", "param", "code"}}`.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from zmqinfer.gateway.api.http import error_body

ANTHROPIC_PREFIX = "/v1/messages"
OLLAMA_PREFIX = "/api/"
# Anthropic's error types by HTTP status (docs.anthropic.com "Errors"); 503 is its "overloaded".
ANTHROPIC_TYPES = {400: "invalid_request_error", 401: "authentication_error",
                   403: "permission_error", 404: "not_found_error", 405: "invalid_request_error",
                   408: "timeout_error", 413: "request_too_large", 429: "rate_limit_error",
                   500: "api_error", 503: "overloaded_error", 504: "timeout_error"}


def anthropic_body(status: int, message: str) -> dict[str, Any]:
    return {"type": "error", "error": {"type": ANTHROPIC_TYPES.get(status, "api_error"),
                                       "message": message}}


def body_for(path: str, status: int, message: str, *, type: str = "invalid_request_error",
             param: str | None = None, code: str | None = None) -> dict[str, Any]:
    if path == ANTHROPIC_PREFIX or path.startswith(ANTHROPIC_PREFIX + "/"):
        return anthropic_body(status, message)
    if path.startswith(OLLAMA_PREFIX):
        return {"error": message}
    return error_body(message, type=type, param=param, code=code)


def refuse(request: web.Request, status: int, message: str, *,
           headers: dict[str, str] | None = None, **kw: Any) -> web.Response:
    return web.json_response(body_for(request.path, status, message, **kw), status=status,
                             headers=headers)
