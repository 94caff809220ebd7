"""Liveness bookkeeping with an injected clock: alive within dead_after, dead after it, and how
long a peer has been alive (a rejoining peer is trusted only after a while)."""

from __future__ import annotations

import math

from zmqinfer.liveness import (
    DEAD_AFTER_S,
    HEARTBEAT_INTERVAL_S,
    HEARTBEAT_LIVENESS,
    Liveness,
)


class Clock:
    def __init__(self, now: float = 100.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, dt: float) -> None:
        self.now += dt


def make(dead_after: float = 2.0) -> tuple[Liveness[str], Clock]:
    clock = Clock()
    return Liveness(dead_after, clock), clock


def test_defaults_are_missed_beats_times_interval() -> None:
    assert DEAD_AFTER_S == HEARTBEAT_INTERVAL_S * HEARTBEAT_LIVENESS
    assert Liveness().dead_after == DEAD_AFTER_S


def test_never_heard_peer_is_dead_and_silent_forever() -> None:
    live, _ = make()
    assert not live.alive("a")
    assert live.silent_for("a") == math.inf
    assert live.alive_for("a") == 0.0


def test_alive_within_dead_after_and_dead_after_it() -> None:
    live, clock = make(dead_after=2.0)
    live.heard("a")
    assert live.alive("a") and live.silent_for("a") == 0.0
    clock.advance(2.0)  # exactly dead_after: still alive (<=)
    assert live.alive("a")
    assert live.silent_for("a") == 2.0
    clock.advance(0.001)
    assert not live.alive("a")
    assert live.alive_for("a") == 0.0
    assert math.isclose(live.silent_for("a"), 2.001)


def test_heard_resets_the_silence() -> None:
    live, clock = make(dead_after=2.0)
    live.heard("a")
    for _ in range(10):  # beats every 1.5 s keep it alive indefinitely
        clock.advance(1.5)
        assert live.alive("a")
        live.heard("a")
        assert live.silent_for("a") == 0.0
    clock.advance(2.5)
    assert not live.alive("a")


def test_peers_are_independent() -> None:
    live, clock = make(dead_after=2.0)
    live.heard("a")
    clock.advance(1.5)
    live.heard("b")
    clock.advance(1.0)
    assert not live.alive("a") and live.alive("b")


def test_forget_kills_at_once() -> None:
    live, clock = make(dead_after=2.0)
    live.heard("a")
    clock.advance(0.1)
    live.forget("a")
    assert not live.alive("a")
    assert live.silent_for("a") == math.inf
    assert live.alive_for("a") == 0.0
    live.forget("never-heard")  # harmless
    live.heard("a")  # a new run of liveness starts now, not at the first beat
    clock.advance(1.0)
    assert live.alive_for("a") == 1.0


def test_alive_for_counts_from_the_start_of_the_current_run() -> None:
    live, clock = make(dead_after=2.0)
    live.heard("a")
    for _ in range(4):
        clock.advance(1.0)
        live.heard("a")
    assert live.alive_for("a") == 4.0  # continuous since the first beat, not since the last
    clock.advance(0.5)
    assert live.alive_for("a") == 4.5


def test_alive_for_restarts_after_a_death() -> None:
    live, clock = make(dead_after=2.0)
    live.heard("a")
    clock.advance(1.0)
    live.heard("a")
    clock.advance(5.0)  # silent past dead_after: dead
    assert live.alive_for("a") == 0.0
    live.heard("a")  # back: a new run
    assert live.alive_for("a") == 0.0
    clock.advance(1.5)
    assert live.alive_for("a") == 1.5
    live.heard("a")
    clock.advance(1.5)
    assert live.alive_for("a") == 3.0
