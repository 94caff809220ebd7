"""Worker.load on a hub model: a node needs only the weight files holding its layers in the
local Hugging Face cache (what `zmqinfer model fetch org/name --layers A:B` leaves there)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.unit.model.test_resolve import make_sharded
from zmqinfer.model.resolve import ModelNotFound, model_fingerprint
from zmqinfer.model.shards import shard_weight_files
from zmqinfer.node.loading import load_shard
from zmqinfer.node.worker import Worker

REPO = "zmqinfer-test/tiny-sharded"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def hub_cache_with(full: Path, cache: Path, weights: list[str]) -> Path:
    """The real cache layout (refs/main -> snapshots/<commit>) holding every small file of the
    repo but only `weights` of its weight files."""
    repo = cache / ("models--" + REPO.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    snapshot = repo / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    for f in full.iterdir():
        if not f.name.endswith(".safetensors") or f.name in weights:
            shutil.copy(f, snapshot / f.name)
    return snapshot


def test_a_node_loads_its_layers_from_a_partial_hub_cache(tmp_path, monkeypatch):
    import huggingface_hub
    import huggingface_hub.constants

    full = make_sharded(tmp_path / "full")
    mine = shard_weight_files(full, 1, 3)
    assert len(mine) < len(list(full.glob("*.safetensors")))  # the point: not every file
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    hub_cache_with(full, tmp_path / "hub", mine)
    asked: list[list[str]] = []
    real = huggingface_hub.snapshot_download

    def recording(repo_id, **kwargs):
        assert kwargs["local_files_only"], "a node never downloads at run time"
        asked.append(list(kwargs["allow_patterns"]))
        return real(repo_id, **kwargs)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", recording)
    w = Worker()
    w.install(load_shard(REPO, 1, 3))
    assert w.stage is not None and (w.stage.start, w.stage.end) == (1, 3) and w.shard_bytes > 0
    assert w.fingerprint == model_fingerprint(full)  # the gateway's check sees the same model
    assert {p for p in asked[-1] if p.endswith(".safetensors")} == set(mine)
    # Layers whose files are not in the cache: refused with the fix, never randomly initialised.
    with pytest.raises(ModelNotFound, match=r"layers \[3, 4\) need model-00004-of-00004.safetensors, "
                       r"which the local Hugging Face cache lacks; fetch them with `zmqinfer model "
                       r"fetch zmqinfer-test/tiny-sharded --layers 3:4`"):
        load_shard(REPO, 3, 4)
