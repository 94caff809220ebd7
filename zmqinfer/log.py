"""structlog setup: readable console lines on a terminal, JSON lines under a service manager.

Every line about a request carries its request id (bound by the API); level from ZMQINFER_LOG.
"""

from __future__ import annotations

import logging
import os
import sys

import structlog


def setup(component: str) -> None:
    level = getattr(logging, os.environ.get("ZMQINFER_LOG", "info").upper(), logging.INFO)
    renderer = (structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty()) if sys.stderr.isatty()
                else structlog.processors.JSONRenderer())
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=True,
    )
    structlog.contextvars.bind_contextvars(component=component)
    # aiohttp's access log would print every request at INFO; keep it for debugging only.
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
