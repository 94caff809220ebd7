"""The no-idle-sleep assertion: Awake's hold/release rules with a fake clock and a recording
backend, SleepGuard's one thread, and the real wakepy backend failing here (no session D-Bus)."""

from __future__ import annotations

import asyncio
import threading

import pytest
import structlog
from structlog.testing import capture_logs

from zmqinfer.node.awake import (
    IDLE_RELEASE_S,
    RETRY_S,
    Awake,
    SleepGuard,
    WakepyBackend,
)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Recorder:
    """A backend that records calls (and their threads) and fails while `fail` is set."""

    def __init__(self, fail: str | None = None, raises: bool = False) -> None:
        self.calls: list[str] = []
        self.threads: set[int] = set()
        self.fail, self.raises = fail, raises

    def hold(self) -> str | None:
        self.calls.append("hold")
        self.threads.add(threading.get_ident())
        if self.raises:
            raise OSError("no such file: caffeinate")
        return self.fail

    def release(self) -> None:
        self.calls.append("release")
        self.threads.add(threading.get_ident())


def awake(backend: Recorder, clock: Clock) -> Awake:
    return Awake(backend, structlog.get_logger(), clock=clock)


def test_held_while_busy_released_after_the_idle_time() -> None:
    b, clock = Recorder(), Clock()
    a = awake(b, clock)
    a.update(False)
    assert b.calls == [] and not a.held  # idle from the start: nothing to hold
    for _ in range(10):  # busy for a while: one hold, not one per beat
        last_busy = clock.now
        a.update(True)
        clock.now += 0.5
    assert b.calls == ["hold"] and a.held
    clock.now = last_busy + IDLE_RELEASE_S - 0.5  # idle, but not long enough yet
    a.update(False)
    assert b.calls == ["hold"] and a.held
    clock.now = last_busy + IDLE_RELEASE_S
    a.update(False)
    assert b.calls == ["hold", "release"] and not a.held
    a.update(False)
    a.update(True)  # busy again: hold again
    assert b.calls == ["hold", "release", "hold"]


def test_busy_again_within_the_idle_time_keeps_it() -> None:
    b, clock = Recorder(), Clock()
    a = awake(b, clock)
    a.update(True)
    clock.now += IDLE_RELEASE_S - 1
    a.update(True)  # the idle time counts from the last busy beat
    clock.now += IDLE_RELEASE_S - 1
    a.update(False)
    assert b.calls == ["hold"] and a.held


@pytest.mark.parametrize("raises", [False, True], ids=["refused", "raises"])
def test_a_failed_hold_is_logged_once_and_retried_later(raises: bool) -> None:
    b, clock = Recorder(fail="no session bus", raises=raises), Clock()
    a = awake(b, clock)
    with capture_logs() as logs:
        for _ in range(20):
            a.update(True)
            clock.now += 1.0
        assert b.calls == ["hold"] and not a.held  # not once per beat
        clock.now += RETRY_S
        a.update(True)
        assert b.calls == ["hold", "hold"] and a.failures == 2
    warnings = [e for e in logs if e["log_level"] == "warning"]
    assert len(warnings) == 1 and "may sleep" in warnings[0]["event"]
    assert warnings[0]["reason"] == ("OSError: no such file: caffeinate" if raises else "no session bus")
    b.fail, b.raises = None, False  # the service came up
    clock.now += RETRY_S
    a.update(True)
    assert a.held and b.calls[-1] == "hold"


def test_close_releases_only_what_is_held() -> None:
    b, clock = Recorder(), Clock()
    a = awake(b, clock)
    a.close()
    assert b.calls == []
    a.update(True)
    a.close()
    a.close()
    assert b.calls == ["hold", "release"]


def settle(guard: SleepGuard) -> None:
    if guard._pending is not None:
        guard._pending.result(timeout=5)


async def test_guard_calls_the_backend_from_one_thread_off_the_loop() -> None:
    b = Recorder()
    guard = SleepGuard(True, structlog.get_logger(), backend=b)
    guard.awake.idle_release_s = 0.0
    for busy in (True, False, True, False, True):
        guard.update(busy)
        settle(guard)
    await guard.close()
    assert b.calls == ["hold", "release", "hold", "release", "hold", "release"]
    assert len(b.threads) == 1 and threading.get_ident() not in b.threads  # wakepy modes are per thread


class Stuck(Recorder):
    """hold and release block until `go` is set (a D-Bus call that hangs)."""

    def __init__(self) -> None:
        super().__init__()
        self.entered, self.go = threading.Event(), threading.Event()

    def hold(self) -> str | None:
        self.entered.set()
        self.go.wait(10)
        return super().hold()

    def release(self) -> None:
        self.go.wait(10)
        super().release()


async def test_a_hung_backend_never_holds_up_the_beat() -> None:
    b = Stuck()
    guard = SleepGuard(True, structlog.get_logger(), backend=b)
    try:
        for _ in range(5):  # five beats while the first hold hangs: none of them waits
            guard.update(True)
        assert b.entered.wait(5) and not b.go.is_set()
        b.go.set()
        settle(guard)
        assert b.calls == ["hold"] and guard.awake.held  # the skipped beats did not queue up calls
    finally:
        b.go.set()
        await guard.close()


async def test_close_gives_up_on_a_stuck_release() -> None:
    b = Stuck()
    b.go.set()
    guard = SleepGuard(True, structlog.get_logger(), backend=b, close_timeout_s=0.2)
    guard.update(True)
    settle(guard)
    b.go.clear()  # now release hangs
    try:
        with capture_logs() as logs:
            async with asyncio.timeout(5):  # close itself returns after close_timeout_s
                await guard.close()
        assert any("did not release in time" in e["event"] for e in logs)
    finally:
        b.go.set()  # let the sleep thread finish


async def test_allow_sleep_never_touches_the_backend() -> None:
    b = Recorder()
    guard = SleepGuard(False, structlog.get_logger(), backend=b)
    guard.update(True)
    await guard.close()
    assert b.calls == []


def test_real_wakepy_without_a_session_bus_says_why(monkeypatch: pytest.MonkeyPatch) -> None:
    # CI and headless Linux have no session D-Bus: the real backend must refuse, not raise.
    monkeypatch.delenv("DBUS_SESSION_BUS_ADDRESS", raising=False)
    monkeypatch.delenv("WAKEPY_FAKE_SUCCESS", raising=False)
    backend = WakepyBackend()
    why = backend.hold()
    assert why is not None and "DBUS_SESSION_BUS_ADDRESS" in why
    backend.release()  # nothing held: a no-op
