"""A node whose no-idle-sleep assertion cannot be taken (no session D-Bus, as on CI and headless
Linux) still serves: the real wakepy backend fails, the node logs it once, and answers."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import openai

from zmqinfer import local

READY_TIMEOUT_S = 120.0
ATTEMPT_DEADLINE_S = 90.0  # requests until the node has tried (it tries on the beat it is busy)
MAX_REQUESTS = 10
STOP_TIMEOUT_S = 15.0


def events(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_a_node_without_the_assertion_still_serves(tmp_path: Path, model_dir: Path) -> None:
    port = local.free_port_block()
    cfg = local.write_config(tmp_path / "nodes.toml", port, ["n1"], model_dir)
    node_log = tmp_path / "logs" / "n1.log"  # --log-file: the JSON lines the launchd service keeps
    gw_log = tmp_path / "logs" / "gateway.log"
    gw = local.start_gateway(tmp_path, cfg, port, extra=["--log-file", str(gw_log)])
    # A bus that is not there: wakepy's D-Bus methods fail for real (not its forced-failure switch).
    node = local.start_node(tmp_path, "n1", f"127.0.0.1:{port + local.CONTROL_OFFSET}",
                             port + local.DATA_OFFSET, extra=["--log-file", str(node_log)],
                             env={"DBUS_SESSION_BUS_ADDRESS": "unix:path=/nonexistent/zmqinfer-test-bus",
                                  "WAKEPY_FAKE_SUCCESS": "0"})
    try:
        local.wait_status(
            gw, lambda st: bool(st["ready"]), READY_TIMEOUT_S, "the ring to be ready", nodes=[node])
        oc = openai.OpenAI(base_url=gw.url + "/v1", api_key="unused", max_retries=0, timeout=60)

        def ask() -> str:
            r = oc.chat.completions.create(model="m", messages=[{"role": "user", "content": "Count to ten."}],
                                           max_tokens=16, temperature=0)
            return r.choices[0].message.content or ""

        deadline, sent = time.monotonic() + ATTEMPT_DEADLINE_S, 0
        while not any("no-idle-sleep" in e["event"] for e in events(node_log)):
            assert sent < MAX_REQUESTS and time.monotonic() < deadline, node.output()[-3000:]
            assert ask()  # each one answered, assertion or not
            sent += 1
        assert ask() and ask()  # and afterwards too
        assert node.running()
        tried = [e for e in events(node_log) if "no-idle-sleep" in e["event"]]
        assert len(tried) == 1 and tried[0]["level"] == "warning"  # logged once, not once per request
        assert "DBUS_SESSION_BUS_ADDRESS" in tried[0]["reason"] or "DBus" in tried[0]["reason"]
        assert tried[0]["node"] == "n1"
        assert {e["component"] for e in events(gw_log)} == {"gateway"}  # the gateway's --log-file too
        node.proc.send_signal(signal.SIGINT)  # stop at once (SIGTERM would drain first)
        assert local.wait_exit(node.proc, STOP_TIMEOUT_S) == 0
        assert events(node_log)[-1]["event"] == "node stopped"
        assert node.output().strip() == ""  # with --log-file nothing goes to stderr
    finally:
        local.stop_node(node)
        local.stop(gw)
