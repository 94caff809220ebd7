"""schemathesis against the gateway's own /openapi.json on a running 3-node ring: generated
requests (valid and invalid) get no 5xx but the documented 503, every status and content type
is one the document lists, and afterwards the ring still answers exactly as before. Bounded:
MAX_EXAMPLES per operation, generation capped at MAX_GENERATED tokens, SCHEMATHESIS_DEADLINE_S
for the whole run."""

from __future__ import annotations

import json
import time
import urllib.request
from typing import Any

import openai
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import content_type_conformance, status_code_conformance
from schemathesis.core.result import Ok

from zmqinfer.gateway.api.openapi import SPEC
from zmqinfer.local import LocalCluster

MAX_EXAMPLES = 15  # per operation (8) and mode (2); most operations have fewer distinct inputs
MAX_GENERATED = 3  # tokens per generated request: validation is the point, not generation
SCHEMATHESIS_DEADLINE_S = 75.0  # per generation mode
QUESTION = "What is the capital of France?"
WITH_BODIES = {"POST /v1/chat/completions", "POST /v1/completions", "POST /v1/messages",
               "POST /v1/messages/count_tokens", "POST /v1/responses", "POST /api/chat",
               "POST /api/generate", "POST /api/show"}
_seen: dict[int, int] = {}
_took: dict[str, float] = {}


def greedy(c: LocalCluster) -> str:
    oc = openai.OpenAI(base_url=c.url + "/v1", api_key="unused", timeout=120, max_retries=0)
    r = oc.chat.completions.create(model="default", messages=[{"role": "user", "content": QUESTION}],
                                   max_tokens=16, temperature=0)
    return r.choices[0].message.content or ""


@pytest.fixture(scope="module")
def before(cluster: LocalCluster) -> str:
    return greedy(cluster)


def bounded(path: str, body: Any) -> None:
    """Keep a generated request's generation short: cap (or set) its token budget."""
    if not isinstance(body, dict) or path.endswith(("/count_tokens", "/show")):  # generates nothing
        return
    if path.startswith("/api/"):  # Ollama: options.num_predict, where -1 and -2 mean "no limit"
        options = body.get("options")
        if not isinstance(options, dict):
            options = body["options"] = {} if options is None else options
        if isinstance(options, dict) and not (type(options.get("num_predict")) is int
                                              and 0 <= options["num_predict"] <= MAX_GENERATED):
            options["num_predict"] = MAX_GENERATED
        return
    budget = "max_output_tokens" if path == "/v1/responses" else "max_tokens"
    for name in (budget, "max_completion_tokens"):
        if type(body.get(name)) is int and body[name] > MAX_GENERATED:
            body[name] = MAX_GENERATED
    if body.get(budget) is None and body.get("max_completion_tokens") is None:
        body[budget] = MAX_GENERATED


def error_keys(path: str, body: Any) -> bool:
    """`body` is the error object of `path`'s dialect (gateway/api/refusal.py)."""
    if path.startswith("/v1/messages"):  # Anthropic
        return body["type"] == "error" and set(body["error"]) == {"type", "message"}
    if path.startswith("/api/"):  # Ollama
        return set(body) == {"error"} and isinstance(body["error"], str)
    return set(body["error"]) == {"message", "type", "param", "code"}  # OpenAI, Responses


def check_one(case: Any, cluster: LocalCluster) -> None:
    bounded(case.path, case.body)
    response = case.call(base_url=cluster.url, timeout=120)
    _seen[response.status_code] = _seen.get(response.status_code, 0) + 1
    assert response.status_code < 500 or response.status_code == 503, (
        f"{case.method} {case.path} -> {response.status_code}: {response.text[:500]}")
    if response.status_code >= 400:  # every error is its dialect's JSON error object
        ctype = response.headers.get("content-type", [""])[0]  # schemathesis: lower-case keys, lists
        assert ctype.startswith("application/json"), response.text[:200]
        assert error_keys(case.path, response.json()), response.text[:300]
        assert "Traceback" not in response.text
    case.validate_response(response, checks=[status_code_conformance, content_type_conformance])


# schemathesis's pytest plugin does not run under pytest 9 ('Function' has no '_nodeid'), so
# its Python API drives hypothesis here: one bounded property test per operation and mode.
@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=str)
def test_no_server_errors_but_documented_503s(cluster: LocalCluster, before: str, mode: GenerationMode) -> None:
    with urllib.request.urlopen(cluster.url + "/openapi.json", timeout=10) as r:
        document = json.loads(r.read())
    schema = schemathesis.openapi.from_dict(document)
    started = time.monotonic()
    results = list(schema.get_all_operations())
    assert all(isinstance(r, Ok) for r in results), results
    ops = [r.ok() for r in results if isinstance(r, Ok)]
    assert document == json.loads(json.dumps(SPEC)) and len(ops) == len(SPEC["paths"])
    for op in ops:
        @given(op.as_strategy(mode))
        @settings(max_examples=MAX_EXAMPLES, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck))
        def run(case: Any) -> None:
            if time.monotonic() - started < SCHEMATHESIS_DEADLINE_S:  # bounded in time
                t0 = time.monotonic()
                check_one(case, cluster)
                _took[op.label] = _took.get(op.label, 0.0) + time.monotonic() - t0

        try:
            run()
        except Unsatisfiable:  # nothing to negate (no body, no typed parameter): positive covers it
            assert mode is GenerationMode.NEGATIVE and op.label not in WITH_BODIES, op.label


def test_the_ring_answers_as_before(cluster: LocalCluster, before: str) -> None:
    assert _seen, "schemathesis sent nothing"
    assert sum(_seen.values()) >= 30 and any(400 <= s < 500 for s in _seen), _seen
    assert greedy(cluster) == before
    print(f"schemathesis: {sum(_seen.values())} requests, statuses {sorted(_seen.items())},"
          f" seconds per operation {({k: round(v, 1) for k, v in _took.items()})}")
    assert cluster.status()["ready"]
