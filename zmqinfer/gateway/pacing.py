"""How the scheduler paces the ring: how many micro-batch groups and prefill messages are in
flight, and how long a step or a request may wait before it is given up on.

Every step is answered or reclaimed. A step carries a deadline (STEP_TIMEOUT_S plus the prompt
tokens in the ring ahead of it); one not answered by then, one that never left, or one a node
reports failed (StepFailed) gives its group or prefill credit back, and each of its sequences
replays on the same ring under a fresh id (its old caches are released): the same replay as
after a re-plan. A sequence that fails MAX_REPLAYS times in a row fails with the last reason.

A request's deadline counts from the ring's work on it, not from its arrival: while one of its
steps is in flight it is that step's deadline; while it waits for its turn (credits, its group,
the KV budget) it is renewed every time the ring answers any step, so a queue behind other
prompts is never a timeout, and only a ring that stops answering is. Admission is bounded: a
sequence the KV budget (kvbudget.py) cannot hold yet waits, up to MAX_QUEUED of them; one more
is refused at once (Overloaded: 429 with Retry-After).
"""

from __future__ import annotations

# Prefill messages in the ring at once: one per stage keeps every stage busy with long prompts
# (per stage, not per device: stages that share a machine of several cores still overlap).
PREFILL_CREDITS_PER_STAGE = 1
# Micro-batch groups beyond one per device: while one group's tokens travel back through the
# gateway, the spare keeps the first device busy (README, "Keeping every device busy").
SPARE_GROUPS = 1
# A decode step through a healthy ring takes milliseconds; 30 s means something is wrong. A step
# is reclaimed (its sequences replay) STEP_TIMEOUT_S after it was sent plus PREFILL_S_PER_TOKEN
# for every token row in it and ahead of it in the ring (a 256-token chunk behind 3 others:
# 30 + 20 s). A request waiting its turn times out only when the ring answers nothing at all
# for STEP_TIMEOUT_S.
STEP_TIMEOUT_S = 30.0
PREFILL_S_PER_TOKEN = 0.02
# How long a request waits for the ring to become ready before it gets a 503.
READY_WAIT_S = 10.0
# How long a parked request waits for the re-planned ring (detection, survivors loading their
# extra layers, its own re-prefill) before it gets a 504; a "no capacity" verdict ends it sooner.
REPLAY_WAIT_S = 120.0
# Failed or unanswered steps in a row after which a sequence fails instead of replaying again:
# one is a blip, three on the same ring is a node that cannot run it.
MAX_REPLAYS = 3
# Sequences admitted to wait for KV room (the ring holds the rest): each waits its turn, and
# one more gets a 429 at once rather than a queue nobody is served from.
MAX_QUEUED = 32


def groups(n_devices: int) -> int:
    """Micro-batch groups for a ring over `n_devices` devices. Stages on one machine share its
    cores, so splitting their batch only costs: they get one group, as batch_generate has."""
    return 1 if n_devices <= 1 else n_devices + SPARE_GROUPS
