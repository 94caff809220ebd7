"""The cluster directory (`zmqinfer keys`, keys.py) and the ZAP authenticator, over real CURVE
sockets on 127.0.0.1: trusted keys get through with their name, others are refused and
counted, and a revoked key stops being accepted on an open connection after a reload."""

from __future__ import annotations

import asyncio
import stat
from pathlib import Path

import pytest
import zmq
import zmq.asyncio

from zmqinfer.cli.main import main
from zmqinfer.protocol import sockets
from zmqinfer.protocol.keys import (
    RELOAD_EVERY_S,
    ClusterAuth,
    CurveKeyError,
    load_keys,
    trusted,
)


def keys(*args: str) -> int:
    return main(["keys", *args])


def test_init_add_trust_revoke_list(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = tmp_path / "cluster"
    assert keys("init", "--dir", str(d)) == 0
    assert keys("add", "mini1", "--dir", str(d)) == 0
    assert stat.S_IMODE((d / "private_keys").stat().st_mode) == 0o700
    for f in (d / "private_keys").glob("*.key_secret"):
        assert stat.S_IMODE(f.stat().st_mode) == 0o600, f
    assert set(trusted(d).values()) == {"gateway", "mini1"}
    assert load_keys(d, "mini1").toward("gateway").server_key == load_keys(d, "gateway").public
    # A key made on another machine: trusting its secret file copies only the public half.
    other = tmp_path / "other"
    assert keys("init", "--dir", str(other)) == 0 and keys("add", "mini2", "--dir", str(other)) == 0
    assert keys("trust", str(other / "private_keys" / "mini2.key_secret"), "--dir", str(d)) == 0
    assert "secret" not in (d / "public_keys" / "mini2.key").read_text()
    assert trusted(d)[load_keys(other, "mini2").public] == "mini2"
    capsys.readouterr()
    assert keys("list", "--dir", str(d)) == 0
    listed = capsys.readouterr().out
    assert "mini1" in listed and "mini2" in listed and load_keys(d, "mini1").public.decode() in listed
    assert load_keys(d, "mini1").secret.decode() not in listed
    assert keys("revoke", "mini1", "--dir", str(d)) == 0
    assert "mini1" not in trusted(d).values() and (d / "revoked_keys" / "mini1.key").exists()
    with pytest.raises(CurveKeyError, match="not in the trust list"):
        load_keys(d, "mini1")  # its own key pair is still here, but it is no longer trusted
    assert keys("add", "mini2", "--dir", str(other)) == 2  # exists: revoke first
    assert keys("add", "bad name!", "--dir", str(d)) == 2
    assert keys("revoke", "nobody", "--dir", str(d)) == 2
    assert keys("add", "x", "--dir", str(tmp_path / "none")) == 2  # no directory yet
    assert "secret" not in repr(load_keys(d, "gateway")) and load_keys(d, "gateway").secret.decode() \
        not in repr(load_keys(d, "gateway"))


async def test_zap_names_trusted_keys_refuses_others_and_reloads(tmp_path: Path) -> None:
    d, elsewhere = tmp_path / "cluster", tmp_path / "elsewhere"
    for args in (("init",), ("add", "node0"), ("add", "node1")):
        assert keys(*args, "--dir", str(d)) == 0
    for args in (("init",), ("add", "node1")):  # same name, another key: not trusted in d
        assert keys(*args, "--dir", str(elsewhere)) == 0
    server_ctx, client_ctx = zmq.asyncio.Context(), zmq.asyncio.Context()
    auth = ClusterAuth(server_ctx, d)
    auth.bind()
    pull = sockets.data_pull(server_ctx, "tcp://127.0.0.1:*", load_keys(d, "node1"))
    endpoint = pull.getsockopt_string(zmq.LAST_ENDPOINT)
    good = sockets.data_push(client_ctx, endpoint, load_keys(d, "node0").toward("node1"))
    rogue_keys = load_keys(elsewhere, "node1")
    rogue = sockets.data_push(client_ctx, endpoint, type(rogue_keys)(
        "node1", rogue_keys.public, rogue_keys.secret, d, load_keys(d, "node1").public))
    try:
        async with asyncio.timeout(20), asyncio.TaskGroup() as tg:
            runner = tg.create_task(auth.run())
            await sockets.send(good, [b"hello"], 5.0)
            frames = await sockets.recv(pull, sockets.DATA_FRAMES)
            assert bytes(frames[0]) == b"hello" and auth.peer(frames[0]) == "node0"
            with pytest.raises(TimeoutError):  # IMMEDIATE: never connected, nothing queued
                await sockets.send(rogue, [b"forged"], 1.0)
            while auth.refused_handshakes == 0:
                await asyncio.sleep(0.05)
            assert "handshake" in next(iter(auth.refused_peers.values()))
            keys("revoke", "node0", "--dir", str(d))
            await asyncio.sleep(RELOAD_EVERY_S * 2.5)
            await sockets.send(good, [b"after"], 5.0)  # the connection is still open ...
            frames = await sockets.recv(pull, sockets.DATA_FRAMES)
            assert bytes(frames[0]) == b"after" and auth.peer(frames[0]) is None  # ... but unnamed now
            runner.cancel()
    finally:
        for s in (pull, good, rogue):
            s.close(linger=0)
        auth.stop()
        server_ctx.term()
        client_ctx.term()


def test_status_shows_how_the_ring_is_guarded_and_what_was_refused() -> None:
    from tests.unit.cli.test_status import STATUS, text
    from zmqinfer.cli.status import status_view

    assert "security:" not in text(status_view(STATUS))  # an older gateway sends no security
    st = dict(STATUS, security={"curve": True, "trusted": ["gateway", "n1"], "refused_handshakes": 7,
                                "refused_messages": 3, "refused_peers": {"127.0.0.1": "handshake with a key "
                                                                          "not in the cluster directory"},
                                "api": {"mode": "protected", "keys": [], "metrics_open": False, "refused": 2}})
    st["nodes"] = [dict(n, refused_by_node=4) for n in STATUS["nodes"]]
    out = text(status_view(st))  # type: ignore[arg-type]
    assert "security: curve (gateway, n1 trusted); api: protected" in out
    assert f"7 handshakes and 3 messages refused by the gateway, {4 * len(st['nodes'])} by nodes, 2 api" in out
    assert "refused 127.0.0.1: handshake with a key not in the cluster directory" in out
    plain = dict(st, security={**st["security"], "curve": False})
    assert "zeromq unencrypted" in text(status_view(plain))  # type: ignore[arg-type]
