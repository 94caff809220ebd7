"""API keys and protected mode (gateway/auth.py) through a real aiohttp server and the `openai`
client; where keys come from (nodes.toml, key files, the environment); keys never logged.
Protected mode's refusal of a non-loopback client is proved across network namespaces in
tests/netns/test_protected_netns.py (here every client is loopback)."""

from __future__ import annotations

from pathlib import Path

import openai
import pytest
from structlog.testing import capture_logs

from tests.unit.gateway.test_api_openai import CHAT, ScriptedBackend, script, serve
from zmqinfer.cli.serve import api_guard
from zmqinfer.config import ConfigError, parse_cluster
from zmqinfer.gateway.api.auth import (
    ApiGuard,
    KeyFileError,
    from_env,
    gather,
    is_local,
    is_loopback,
    own_addresses,
    read_key_file,
)

ALICE, BOB = "sk-alice-0123456789abcdef", "sk-bob-fedcba9876543210"


def guard() -> ApiGuard:
    return ApiGuard.from_keys({"alice": ALICE, "bob": BOB})


async def test_401_without_or_with_a_wrong_key_and_200_with_each_key() -> None:
    with capture_logs() as logs:
        async with serve(ScriptedBackend(script()), guard=guard()) as client:
            for headers in ({}, {"Authorization": "Bearer sk-wrong-0123456789abcdef"},
                            {"Authorization": ALICE}, {"Authorization": f"Basic {ALICE}"}):
                for path in ("/v1/models", "/cluster/status", "/v1/chat/completions", "/a/route/added/later"):
                    r = await (client.post(path, json=CHAT, headers=headers) if "chat" in path
                               else client.get(path, headers=headers))
                    body = await r.json()
                    assert r.status == 401, (path, headers)
                    assert body["error"]["code"] == "invalid_api_key" and body["error"]["type"]
                    assert ALICE not in await r.text()
            for key in (ALICE, BOB):
                async with openai.AsyncOpenAI(base_url=str(client.make_url("/v1")), api_key=key,
                                              max_retries=0) as api:
                    assert [m.id for m in (await api.models.list()).data] == ["scripted-model"]
                    out = await api.chat.completions.create(model="scripted-model", max_tokens=5,
                                                            messages=[{"role": "user", "content": "hi"}])
                    assert out.choices[0].message.content
            async with openai.AsyncOpenAI(base_url=str(client.make_url("/v1")), api_key="sk-wrong-0123456789",
                                          max_retries=0) as api:
                with pytest.raises(openai.AuthenticationError):
                    await api.models.list()
            assert (await client.get("/health")).status == 200  # open for load balancers
            r = await client.get("/metrics")
            assert r.status == 401  # keyed unless [api] metrics_open
    text = repr(logs)
    assert ALICE not in text and BOB not in text and "sk-wrong" not in text
    generated = [e for e in logs if e["event"] == "generate"]
    assert [e["api_key"] for e in generated] == ["alice", "bob"]  # the key's name, for the logs
    assert sum("refused" in e["event"] for e in logs) >= 16


async def test_metrics_open_setting_leaves_only_metrics_and_health_open() -> None:
    g = ApiGuard.from_keys({"alice": ALICE}, metrics_open=True)
    async with serve(ScriptedBackend(script()), guard=g) as client:
        r = await client.get("/metrics")
        assert r.status == 200 and "zmqinfer_" in await r.text()  # no key asked
        assert (await client.get("/v1/models")).status == 401


async def test_the_pages_load_without_a_key_but_their_data_does_not() -> None:
    """A browser cannot send a header with a page load: the page and chat files hold no data and
    send the key (given once as ?key=) with each API call, which is what stays keyed."""
    g = ApiGuard.from_keys({"alice": ALICE})
    async with serve(ScriptedBackend(script()), guard=g) as client:
        for path in ("/", "/chat", "/static/common.js"):
            assert (await client.get(path)).status == 200, path
        for path in ("/cluster/status", "/metrics", "/v1/models"):
            assert (await client.get(path)).status == 401, path
        ok = await client.get("/cluster/status", headers={"Authorization": f"Bearer {ALICE}"})
        assert ok.status == 200


async def test_protected_mode_answers_loopback_and_no_auth_is_explicit() -> None:
    g = ApiGuard.from_keys({})
    assert g.mode == "protected" and ApiGuard.from_keys({}, no_auth=True).mode == "open"
    async with serve(ScriptedBackend(script()), guard=g) as client:
        assert (await client.get("/v1/models")).status == 200  # the test client is loopback
    assert g.describe() == {"mode": "protected", "keys": [], "metrics_open": False, "refused": 0}


def test_keys_are_kept_as_digests_and_compared_by_name() -> None:
    g = guard()
    assert g.match(ALICE) == "alice" and g.match(BOB) == "bob" and g.match(ALICE + "x") is None
    assert ALICE not in repr(g) and ALICE.encode() not in b"".join(d for _, d in g.digests)
    assert g.describe()["keys"] == ["alice", "bob"]


def test_loopback_addresses() -> None:
    for ip in ("127.0.0.1", "127.8.9.1", "::1", "::ffff:127.0.0.1"):
        assert is_loopback(ip), ip
    for ip in ("10.0.0.2", "192.168.1.5", "::ffff:10.0.0.1", "fe80::1%eth0", "", None, "nonsense"):
        assert not is_loopback(ip), ip
    mine = own_addresses()
    assert "127.0.0.1" in mine and all(is_local(ip) for ip in mine)
    assert "192.0.2.77" not in mine and not is_local("192.0.2.77")  # TEST-NET-1: never ours here


def test_key_sources(tmp_path: Path) -> None:
    f = tmp_path / "keys.txt"
    f.write_text(f"# team keys\n\nalice {ALICE}\n{BOB}\n")
    assert read_key_file(f) == {"alice": ALICE, "keys.txt:4": BOB}
    assert from_env({"ZMQINFER_API_KEY": f" {ALICE},{BOB} "}) == {"env:1": ALICE, "env:2": BOB}
    assert from_env({}) == {}
    named = gather([ALICE], [f], {"ZMQINFER_API_KEY": "sk-carol-0123456789abcdef"})
    assert set(named) == {"config:1", "alice", "keys.txt:4", "env:1"}
    f.write_text("short\n")
    with pytest.raises(KeyFileError) as e:
        read_key_file(f)
    assert "short" not in str(e.value) and "keys.txt:1" in str(e.value)
    with pytest.raises(KeyFileError) as e:
        read_key_file(tmp_path / "missing.txt")
    assert "missing.txt" in str(e.value)
    with pytest.raises(ConfigError):
        api_guard(frozenset({ALICE}), [], True, False)  # keys and --no-auth contradict each other
    f.write_text(f"bob {BOB}\n")
    g = api_guard(frozenset({ALICE}), [f], False, True)  # nodes.toml keys + a key file, as cmd_gateway
    assert g.mode == "keys" and g.metrics_open and g.match(ALICE) == "config:1" and g.match(BOB) == "bob"
    (tmp_path / "short.txt").write_text("x\n")
    with pytest.raises(ConfigError, match="short.txt:1"):  # a bad file stops the gateway, naming the line
        api_guard(frozenset(), [tmp_path / "short.txt"], False, False)


def test_nodes_toml_api_section(tmp_path: Path) -> None:
    cfg = parse_cluster({"api": {"keys": [ALICE], "key_file": "keys.txt", "metrics_open": True}},
                        str(tmp_path / "nodes.toml"))
    assert cfg.api_keys == frozenset({ALICE}) and cfg.metrics_open
    assert cfg.api_key_file == tmp_path / "keys.txt"
    with pytest.raises(ConfigError, match="api.metrics_open"):
        parse_cluster({"api": {"metrics_open": "yes"}}, "nodes.toml")
    with pytest.raises(ConfigError, match="api.key_file"):
        parse_cluster({"api": {"key_file": 3}}, "nodes.toml")
