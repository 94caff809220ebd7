"""A gateway whose nodes never come says which node and which address, within seconds."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import openai

from zmqinfer.local import free_port_block


def test_gateway_names_the_missing_node(tmp_path: Path, model_dir: Path) -> None:
    port = free_port_block()
    cfg = tmp_path / "nodes.toml"
    cfg.write_text(f"""
model = "{model_dir}"
[gateway]
address = "127.0.0.1"
port = {port}
control_port = {port + 1}
result_port = {port + 2}
[[node]]
name = "far-away"
address = "127.0.0.3"
port = {port + 10}
""")
    log = (tmp_path / "gw.log").open("w")
    gw = subprocess.Popen([sys.executable, "-m", "zmqinfer", "gateway", "--config", str(cfg)],
                          stdout=log, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(url + "/health", timeout=2)
                raise AssertionError("healthy without any node")
            except urllib.error.HTTPError as e:
                assert e.code == 503
                health = json.loads(e.read())
                break
            except (urllib.error.URLError, ConnectionError):
                assert time.monotonic() < deadline, (tmp_path / "gw.log").read_text()
                time.sleep(0.2)
        assert "far-away (127.0.0.3)" in json.dumps(health)
        t0 = time.monotonic()
        oc = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=60)
        try:
            oc.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
            raise AssertionError("a request succeeded without nodes")
        except openai.APIStatusError as e:
            assert e.status_code == 503
            assert "far-away (127.0.0.3) has not registered" in str(e)
        assert time.monotonic() - t0 < 15
        st = subprocess.run([sys.executable, "-m", "zmqinfer", "status", "--url", url],
                            capture_output=True, text=True, timeout=30)
        assert st.returncode == 1 and "far-away" in st.stdout and "not registered" in st.stdout
    finally:
        gw.terminate()
        gw.wait(15)
