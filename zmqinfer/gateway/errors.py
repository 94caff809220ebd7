"""What a request can end with besides its tokens: the errors the ring, the scheduler and the API
share, and what each becomes over HTTP (the API renders them; nothing else decides a status).
"""

from __future__ import annotations

# What a 429 tells the client to wait (Retry-After, seconds): about one short request's time.
RETRY_AFTER_S = 2


class RingUnavailable(Exception):
    """The ring cannot serve right now (not assigned, a node missing, no placement fits): 503."""


class RingTimeout(Exception):
    """The ring stopped answering for a request within its deadline: 504."""


class Overloaded(Exception):
    """The admission queue is full: 429, with `retry_after` seconds for Retry-After."""

    def __init__(self, message: str, retry_after: int = RETRY_AFTER_S) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class StepNotSent(Exception):
    """A step that could not be encoded or sent for a reason other than the ring (a bug, or a
    value the wire cannot carry): its requests fail with a 500; the pump and the rest go on."""
