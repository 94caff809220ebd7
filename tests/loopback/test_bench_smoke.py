"""The benchmark runs end to end at toy sizes, so it cannot rot between real measurements."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


def test_bench_smoke(tmp_path: Path, model_dir: Path) -> None:
    out = tmp_path / "bench.json"
    r = subprocess.run([sys.executable, "-m", "zmqinfer", "bench", "--nodes", "2", "--tokens", "6",
                        "--reps", "1", "--json", str(out)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    report = json.loads(out.read_text())
    setups = [x["setup"] for x in report["results"]]
    assert setups == ["mlx-lm, single process", "ring, 2 nodes", "mlx-lm, single process"]
    assert all(x["decode_tps"] > 0 for x in report["results"])
    ring = report["results"][1]
    assert [n["layers"] for n in ring["nodes"]] == [[0, 15], [15, 30]]
    assert "| ring, 2 nodes |" in r.stdout
