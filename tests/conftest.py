"""Suite-wide: every test that starts real processes (loopback/) or hosts in network namespaces
(netns/) is marked `slow`, so `bin/test -m "not slow"` is the fast loop (unit tests: no sockets,
tiny models) and the full run is `bin/test`."""

from __future__ import annotations

from pathlib import Path

import pytest

SLOW_ROOMS = ("loopback", "netns")  # folders under tests/ whose tests are all slow
_HERE = Path(__file__).parent


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        parts = Path(item.path).relative_to(_HERE).parts
        if parts and parts[0] in SLOW_ROOMS:
            item.add_marker(pytest.mark.slow)
