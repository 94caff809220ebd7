"""The entrance of every receive loop: frames -> a decoded, checked message, or a counted drop.

Nothing a peer sends may take a loop down (DESIGN §5): any exception while decoding or checking
one message drops that message, never the loop. Drops are counted by reason and logged at a
rate limit, so a flood of junk costs a log line every few seconds instead of one per frame.
"""

from __future__ import annotations

import time
from collections import Counter
from typing import Any, Callable

from zmqinfer.protocol.checks import check
from zmqinfer.protocol.codec import decode
from zmqinfer.protocol.wire import Message, WireError

# One summary line per loop at most this often: 2,000 junk frames used to write 2,000 warnings;
# 5 s still shows an attack (or a protocol bug) within a heartbeat or two.
DROP_LOG_EVERY_S = 5.0


class Inbox:
    """One receive loop's reader and drop counter (`dropped`, `reasons` by kind of error)."""

    def __init__(self, loop: str, log: Any, clock: Callable[[], float] = time.monotonic,
                 every_s: float = DROP_LOG_EVERY_S) -> None:
        self.loop, self.log, self.clock, self.every_s = loop, log, clock, every_s
        self.dropped = 0
        self.reasons: Counter[str] = Counter()
        self._unlogged = 0
        self._last_log = -float("inf")

    def read(self, frames: list[Any], **context: Any) -> Message | None:
        """The message in `frames`, or None (counted) if it is malformed or means nothing."""
        try:
            msg = decode(frames)
            check(msg)
            return msg
        except WireError as e:
            self.drop(str(e), **context)
        except Exception as e:  # a decoder bug on hostile input must cost one message, not the loop
            self.drop(f"{type(e).__name__} while decoding", **context)
        return None

    def drop(self, reason: str, **context: Any) -> None:
        """Count one dropped message; log the count (and this reason) at most every `every_s`."""
        self.dropped += 1
        self._unlogged += 1
        self.reasons[reason.split(":", 1)[0][:40]] += 1
        now = self.clock()
        if now - self._last_log >= self.every_s:
            self.log.warning("dropped messages", loop=self.loop, count=self._unlogged,
                             total=self.dropped, last_reason=reason[:200], **context)
            self._last_log, self._unlogged = now, 0
