"""--log-file: JSON lines to a file that rotates by size, so a service's log never grows without
bound (launchd's StandardOutPath never rotates). Crosses the real limit, then a small one for
the backup count."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Iterator

import pytest
import structlog

from zmqinfer import log


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    handlers = logging.root.handlers[:]
    yield
    for h in logging.root.handlers:
        if h not in handlers:
            h.close()
    logging.root.handlers[:] = handlers
    structlog.reset_defaults()
    structlog.contextvars.clear_contextvars()


def files(path: Path) -> list[Path]:
    return sorted(path.parent.glob(path.name + "*"))


def test_rotates_at_the_real_limit(tmp_path: Path) -> None:
    path = tmp_path / "logs" / "node.log"  # the folder does not exist yet
    log.setup("node:n1", path)
    lg = structlog.get_logger()
    payload = "x" * 65536
    lines = log.LOG_MAX_BYTES // len(payload) + 2  # just past one file's worth
    for i in range(lines):
        lg.info("filler", i=i, payload=payload)
    assert [p.name for p in files(path)] == ["node.log", "node.log.1"]
    assert path.stat().st_size <= log.LOG_MAX_BYTES
    assert (path.parent / "node.log.1").stat().st_size <= log.LOG_MAX_BYTES
    last = json.loads(path.read_text().splitlines()[-1])
    assert (last["event"], last["i"], last["component"], last["level"]) == ("filler", lines - 1, "node:n1", "info")


def test_keeps_only_the_backups(tmp_path: Path) -> None:
    path = tmp_path / "gw.log"
    log.setup("gateway", path, max_bytes=4096, backups=2)
    lg = structlog.get_logger()
    for i in range(400):  # ~40 KB: ten files' worth, so old ones must go
        lg.warning("line", i=i, pad="y" * 50)
    logging.getLogger("aiohttp.server").error("from the standard library")
    assert [p.name for p in files(path)] == ["gw.log", "gw.log.1", "gw.log.2"]
    oldest_first = files(path)[::-1]  # gw.log.2, gw.log.1, gw.log
    rows = [json.loads(line) for p in oldest_first for line in p.read_text().splitlines()]
    assert all(p.stat().st_size <= 4096 for p in files(path))
    assert rows[-1] == {**rows[-1], "event": "from the standard library", "logger": "aiohttp.server",
                        "level": "error"}  # one format in the file, whoever logs
    kept = [r["i"] for r in rows if "i" in r]
    assert kept == list(range(kept[0], 400)) and kept[0] > 0  # the newest lines, in order


def test_without_a_file_lines_go_to_stderr(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    log.setup("node:n1")
    structlog.get_logger().info("hello")
    err = capsys.readouterr().err
    assert json.loads(err.splitlines()[-1])["event"] == "hello"  # not a TTY: JSON lines
    assert list(tmp_path.iterdir()) == []
