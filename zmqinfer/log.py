"""structlog setup: readable console lines on a terminal, JSON lines under a service manager.

Every line about a request carries its request id (bound by the API); level from ZMQINFER_LOG.
With a log file (`--log-file`, what the launchd plists use: launchd's StandardOutPath never
rotates) every line, ours and the standard library's, goes as JSON to that file, which rotates
by size; under systemd, stderr goes to journald, which rotates by itself.
"""

from __future__ import annotations

import json
import logging
import logging.handlers
import os
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import structlog

# 10 MiB a file: days of INFO lines for a busy node (a few lines per request and re-plan), and
# still small enough to open in an editor. 5 backups: at most 60 MiB on disk per service.
LOG_MAX_BYTES = 10 * 1024 * 1024
LOG_BACKUPS = 5


def setup(component: str, log_file: Path | None = None, *, max_bytes: int = LOG_MAX_BYTES,
          backups: int = LOG_BACKUPS) -> None:
    level = getattr(logging, os.environ.get("ZMQINFER_LOG", "info").upper(), logging.INFO)
    if log_file is not None:
        handler = rotating_handler(log_file, max_bytes, backups)
        renderer: Any = structlog.processors.JSONRenderer()
        factory: Any = lambda *_: _HandlerLogger(handler)  # noqa: E731  one file, one rotation
    else:
        renderer = (structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty()) if sys.stderr.isatty()
                    else structlog.processors.JSONRenderer())
        factory = structlog.PrintLoggerFactory(sys.stderr)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=factory,
        cache_logger_on_first_use=True,
    )
    structlog.contextvars.bind_contextvars(component=component)
    # aiohttp's access log would print every request at INFO; keep it for debugging only.
    if log_file is not None:
        logging.basicConfig(level=logging.WARNING, handlers=[handler], force=True)
    else:
        logging.basicConfig(level=logging.WARNING, stream=sys.stderr)


def rotating_handler(path: Path, max_bytes: int, backups: int) -> logging.handlers.RotatingFileHandler:
    """The one handler that owns the file: structlog's lines and the standard library's share it,
    so a rollover never races a second writer of the same file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.handlers.RotatingFileHandler(path, maxBytes=max_bytes, backupCount=backups,
                                                   encoding="utf-8")
    handler.setFormatter(_JsonLines())
    return handler


class _JsonLines(logging.Formatter):
    """structlog's lines arrive rendered; the standard library's (aiohttp, asyncio) become JSON
    objects of the same shape, so the file stays one JSON object a line."""

    def format(self, record: logging.LogRecord) -> str:
        if getattr(record, "rendered", False):
            return record.getMessage()
        line: dict[str, Any] = {
            "event": record.getMessage(), "level": record.levelname.lower(), "logger": record.name,
            "timestamp": datetime.fromtimestamp(record.created, timezone.utc).isoformat()}
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line)


class _HandlerLogger:
    """A structlog logger that hands each rendered line to a logging handler (which rotates)."""

    def __init__(self, handler: logging.Handler) -> None:
        self._handler = handler

    def msg(self, message: str) -> None:
        record = logging.LogRecord("zmqinfer", logging.INFO, "", 0, message, None, None)
        record.rendered = True
        self._handler.handle(record)

    log = debug = info = warn = warning = err = error = critical = exception = fatal = failure = msg
