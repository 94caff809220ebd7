"""Keep the machine awake while this node serves: hold a no-idle-sleep assertion while the node
has sequences, release it IDLE_RELEASE_S after the last one ends.

A Mac with its lid open but idle goes to sleep and drops out of the ring. `Awake` is the state
machine (injected clock and backend, no I/O of its own); `SleepGuard` is the node's side of it,
driven by the beat loop. The backend is wakepy's keep.running (caffeinate on macOS, D-Bus
inhibitors on Linux desktops). Where the assertion cannot be taken (a Linux box without a session
bus, CI) that is logged once and the node keeps serving: sleep is a risk, never a reason to stop.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, Protocol

# Release a minute after the last sequence: pauses between the requests of one conversation do
# not flap the assertion, and an idle Mac still sleeps on its own schedule (minutes).
IDLE_RELEASE_S = 60.0
# After a failed attempt, try again this much later, not every beat: a machine without the
# service rarely gains it, and each attempt costs a D-Bus round trip.
RETRY_S = 600.0
# Shutdown waits this long for the release (a caffeinate to end, a D-Bus call to return); a
# stuck one must not hold up the node's exit, and the OS drops the assertion with the process.
CLOSE_TIMEOUT_S = 5.0


class Backend(Protocol):
    def hold(self) -> str | None:
        """Take the assertion: None once held, else why it could not be."""
        ...

    def release(self) -> None: ...


class Awake:
    """hold while busy; release after `idle_release_s` without being busy; a failed hold is logged
    once and retried every `retry_s` while busy."""

    def __init__(self, backend: Backend, log: Any, *, clock: Callable[[], float] = time.monotonic,
                 idle_release_s: float = IDLE_RELEASE_S, retry_s: float = RETRY_S) -> None:
        self.backend, self.log, self.clock = backend, log, clock
        self.idle_release_s, self.retry_s = idle_release_s, retry_s
        self.held = False
        self.failures = 0
        self._last_busy = float("-inf")
        self._retry_at = float("-inf")

    def update(self, busy: bool) -> None:
        now = self.clock()
        if busy:
            self._last_busy = now
            if not self.held and now >= self._retry_at:
                self._hold(now)
        elif self.held and now - self._last_busy >= self.idle_release_s:
            self.close()

    def _hold(self, now: float) -> None:
        try:
            why = self.backend.hold()
        except Exception as e:  # a broken backend costs the assertion, never the node
            why = f"{type(e).__name__}: {e}"
        if why is None:
            self.held = True
            self.log.info("holding a no-idle-sleep assertion while serving")
            return
        self._retry_at = now + self.retry_s
        self.failures += 1
        if self.failures == 1:
            self.log.warning("cannot hold a no-idle-sleep assertion: this machine may sleep while "
                             "serving (zmqinfer node --allow-sleep silences this)", reason=why)

    def close(self) -> None:
        if self.held:
            self.held = False
            try:
                self.backend.release()
            except Exception as e:  # as for hold: never the node's problem
                self.log.warning("releasing the no-idle-sleep assertion failed", error=f"{type(e).__name__}: {e}")
                return
            self.log.info("released the no-idle-sleep assertion")


class WakepyBackend:
    """wakepy's keep.running mode. Its modes belong to the thread that made them: SleepGuard
    calls this from one thread only."""

    def __init__(self) -> None:
        self._mode: Any = None

    def hold(self) -> str | None:
        from wakepy import keep

        mode = keep.running(on_fail="pass")
        mode.__enter__()
        if mode.active:
            self._mode = mode
            return None
        why = mode.result.get_failure_text(style="inline")
        mode.__exit__(None, None, None)
        return why

    def release(self) -> None:
        if self._mode is not None:
            mode, self._mode = self._mode, None
            mode.__exit__(None, None, None)


class SleepGuard:
    """The node's hook: `update(busy)` every beat, `await close()` on the way out. The backend runs
    on its own thread and `update` never waits for it: a D-Bus call that hangs must not hold up
    the heartbeats (a beat skipped is a node declared dead). While a call is in flight, beats
    only skip the update; the next free beat catches up."""

    def __init__(self, enabled: bool, log: Any, backend: Backend | None = None, *,
                 close_timeout_s: float = CLOSE_TIMEOUT_S) -> None:
        self.enabled, self.log, self.close_timeout_s = enabled, log, close_timeout_s
        self.awake = Awake(backend or WakepyBackend(), log)
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sleep")
        self._pending: Future[None] | None = None

    def update(self, busy: bool) -> None:
        if self.enabled and (self._pending is None or self._pending.done()):
            self._pending = self._thread.submit(self.awake.update, busy)

    async def close(self) -> None:
        try:
            if self.enabled:
                async with asyncio.timeout(self.close_timeout_s):
                    await asyncio.wrap_future(self._thread.submit(self.awake.close))
        except TimeoutError:
            self.log.warning("the no-idle-sleep assertion did not release in time",
                             timeout_s=self.close_timeout_s)
        finally:
            self._thread.shutdown(wait=False)
