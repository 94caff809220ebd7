"""The gateway's prefix trie (issue 22): longest match, scopes kept apart, LRU eviction under the
KV budget before any request waits, and what rides on the Release to the stages."""

from __future__ import annotations

from contextvars import copy_context

from zmqinfer.gateway.admission import Lanes
from zmqinfer.gateway.kvroom import KVRoom
from zmqinfer.gateway.prefixes import MIN_PREFIX_TOKENS, PrefixCache, enter
from zmqinfer.gateway.sequences import Seq
from zmqinfer.protocol.wire import Epoch, Keep, SamplingParams, SeqId

EPOCH = Epoch(1)
SYSTEM = list(range(100, 140))  # a 40-token system prompt


def finished(cache: PrefixCache, sid: int, history: list[int], key: str = "") -> Seq:
    """A sequence that ran on EPOCH and sampled its last token of `history`."""
    seq = Seq(SeqId(sid), EPOCH, 8, SamplingParams(), list(history), generated=1)

    def run() -> None:
        enter(key)
        cache.finished(seq, EPOCH)

    copy_context().run(run)
    return seq


def started(cache: PrefixCache, sid: int, prompt: list[int], key: str = "") -> tuple[Seq, int]:
    seq = Seq(SeqId(sid), EPOCH, 8, SamplingParams(), list(prompt))
    seq.restart(EPOCH)

    def run() -> int:
        scope = enter(key)
        cache.start(seq)
        return scope.cached_tokens

    return seq, copy_context().run(run)


def test_the_longest_agreeing_prefix_is_used_and_only_the_rest_prefilled() -> None:
    cache = PrefixCache()
    finished(cache, 1, SYSTEM + [1, 2, 3, 4, 5, 9])  # held: all but the last sampled token
    finished(cache, 2, SYSTEM + [7, 7, 7, 7, 7, 7, 7, 9])
    keep, drop = cache.take((SeqId(1), SeqId(2)))
    assert [(k.seq, k.length) for k in keep] == [(1, 45), (2, 47)] and drop == ()
    # Agrees with sequence 2 for 40 + 3 tokens, then differs: 43 positions from prefix 2.
    seq, cached = started(cache, 3, SYSTEM + [7, 7, 7, 1, 1, 1, 1])
    assert (seq.prefix, cached) == (keep[1].prefix, 43)
    assert [a for a, _ in seq.prefill] == [43] and seq.prefill[0][1] == [1, 1, 1]
    # Shares only the system prompt: either entry serves its 40 tokens.
    seq, cached = started(cache, 4, SYSTEM + [8] * 10)
    assert cached == 40 and seq.prefix in {k.prefix for k in keep}
    # Never the whole prompt: one token to prefill, one to decode.
    seq, cached = started(cache, 5, SYSTEM + [1, 2, 3, 4, 5])
    assert cached == 43 and seq.prefill[0] == (43, [4])
    # Too short a match is not used.
    seq, cached = started(cache, 6, SYSTEM[: MIN_PREFIX_TOKENS - 1] + [0] * 30)
    assert (seq.prefix, cached) == (None, 0) and seq.prefill[0][0] == 0
    assert (cache.stats.lookups, cache.stats.hits, cache.stats.tokens_saved) == (4, 3, 43 + 40 + 43)


def test_scopes_never_share() -> None:
    cache = PrefixCache()
    finished(cache, 1, SYSTEM + [1, 2], key="key:alice")
    assert started(cache, 2, SYSTEM + [1, 2, 3], key="key:bob")[1] == 0
    assert started(cache, 3, SYSTEM + [1, 2, 3])[1] == 0  # keys off is a scope of its own too
    assert started(cache, 4, SYSTEM + [1, 2, 3], key="key:alice")[1] == 41


def test_a_conversation_keeps_only_its_longest_turn() -> None:
    cache = PrefixCache()
    finished(cache, 1, SYSTEM + [1, 2])
    finished(cache, 2, SYSTEM + [1, 2, 3, 4])  # turn 2 covers turn 1: turn 1's prefix goes
    assert cache.entries == 1 and cache.tokens == 43
    keep, drop = cache.take((SeqId(1), SeqId(2)))
    assert [k.seq for k in keep] == [2] and len(drop) == 1  # turn 1's was never kept: dropped
    finished(cache, 3, SYSTEM + [1, 2, 3, 4])  # the same tokens again: nothing new
    assert cache.entries == 1 and cache.take((SeqId(3),)) == ((), ())
    finished(cache, 4, SYSTEM + [1, 2])  # inside the held prefix: nothing new either
    assert cache.entries == 1 and cache.take((SeqId(4),)) == ((), ())


def test_unfinished_or_replayed_sequences_are_not_kept() -> None:
    cache = PrefixCache()
    seq = Seq(SeqId(1), EPOCH, 8, SamplingParams(), SYSTEM + [1, 2])  # never sampled: caches partial
    cache.finished(seq, EPOCH)
    seq.generated, seq.replays = 1, 1  # replaying: its caches are being rebuilt
    cache.finished(seq, EPOCH)
    seq.replays = 0
    cache.finished(seq, Epoch(2))  # the ring changed under it
    assert cache.entries == 0
    assert PrefixCache(enabled=False).entries == 0
    off = PrefixCache(enabled=False)
    finished(off, 2, SYSTEM + [1, 2])
    assert off.entries == 0 and started(off, 3, SYSTEM + [1, 2, 3])[1] == 0


def test_a_failed_start_forgets_its_prefix_and_a_new_ring_forgets_all() -> None:
    cache = PrefixCache()
    finished(cache, 1, SYSTEM + [1, 2])
    (k,), _ = cache.take((SeqId(1),))
    seq, cached = started(cache, 2, SYSTEM + [1, 2, 3])
    assert cached == 41
    cache.failed(seq)
    assert seq.prefix is None and cache.entries == 0 and cache.take(()) == ((), (k.prefix,))
    finished(cache, 3, SYSTEM + [5, 6])
    cache.forget_all()
    assert cache.entries == 0 and cache.tokens == 0 and not cache.pending
    assert cache.take((SeqId(3),)) == ((), ())


class _Ring:
    n_devices = 1
    kv: KVRoom | None = KVRoom.of_tokens(256)


def test_prefixes_are_evicted_lru_before_a_request_waits() -> None:
    cache = PrefixCache()
    for sid in range(3):  # 3 x 42 = 126 positions held
        finished(cache, sid + 1, [sid] + SYSTEM + [1, 2])
    started(cache, 9, [0] + SYSTEM + [1, 2, 3])  # prefix of sequence 1 used: now the most recent
    cache.take((SeqId(1), SeqId(2), SeqId(3)))
    lanes = Lanes(_Ring(), {}, lambda: None, cache)
    seq = Seq(SeqId(10), EPOCH, 64, SamplingParams(), [5] * 100, bound=200)
    assert lanes.fits(seq)  # 200 + 126 > 256: two prefixes go, the least recently used first
    assert cache.entries == 1 and cache.tokens == 42 and cache.stats.evictions == 2
    assert started(cache, 11, [0] + SYSTEM + [1, 2, 3])[1] == 42  # the recent one stayed
    _, drop = cache.take(())
    assert len(drop) == 2
    big = Seq(SeqId(12), EPOCH, 64, SamplingParams(), [5] * 100, bound=256)
    assert lanes.fits(big) and cache.entries == 0  # every prefix gives way before a refusal
    assert not lanes.fits(Seq(SeqId(13), EPOCH, 64, SamplingParams(), [5], bound=257))


def test_keep_rides_only_with_its_own_release() -> None:
    cache = PrefixCache()
    finished(cache, 1, SYSTEM + [1, 2])
    assert cache.take((SeqId(5),)) == ((), ())
    keep, _ = cache.take((SeqId(1),))
    assert keep == (Keep(SeqId(1), keep[0].prefix, 41),)


def test_status_and_the_status_line_report_entries_bytes_and_hit_rate() -> None:
    from typing import cast

    from zmqinfer.cli.status import prefix_summary
    from zmqinfer.clusterstatus import ClusterStatus

    cache = PrefixCache()
    finished(cache, 1, SYSTEM + [1, 2])
    started(cache, 2, SYSTEM + [1, 2, 3])
    started(cache, 3, [9] * 50)
    st = cache.status(bytes_per_token=1000)
    assert st == {"enabled": True, "exact": False, "entries": 1, "tokens": 41, "bytes": 41000, "lookups": 2, "hits": 1,
                  "hit_rate": 0.5, "tokens_saved": 41, "evictions": 0}
    line = prefix_summary(cast(ClusterStatus, {"prefix_cache": st}))
    assert line == ["prefix cache: 1 entries, 41 tokens, 0 MiB; hit rate 50% (1 of 2), 41 tokens saved, 0 evicted"]
    off = cast(ClusterStatus, {"prefix_cache": PrefixCache(enabled=False).status(1)})
    assert prefix_summary(off) == ["prefix cache: off"] and prefix_summary(cast(ClusterStatus, {})) == []


def test_a_ring_that_keeps_no_prefix_turns_the_cache_off_after_three_failed_starts() -> None:
    from zmqinfer.gateway.prefixes import FAILURES_BEFORE_OFF

    cache = PrefixCache()
    for i in range(FAILURES_BEFORE_OFF):
        finished(cache, 10 * i + 1, SYSTEM + [i, 1])
        seq, cached = started(cache, 10 * i + 2, SYSTEM + [i, 1, 2])
        assert cached == 41 and cache.enabled
        cache.failed(seq)  # the stage did not hold it (it could not keep it)
    assert not cache.enabled and cache.entries == 0
    assert started(cache, 99, SYSTEM + [0, 1, 2])[1] == 0


def test_a_cache_that_ever_served_a_start_stays_on_through_failures() -> None:
    cache = PrefixCache()
    finished(cache, 1, SYSTEM + [1, 2])
    seq, _ = started(cache, 2, SYSTEM + [1, 2, 3])
    seq.generated = 1
    copy_context().run(lambda: cache.finished(seq, EPOCH))  # it finished: prefixes work here
    for i in range(5):  # e.g. a stage evicted them for room: each forgotten, the cache stays on
        finished(cache, 10 * i + 3, SYSTEM + [i + 10, 9])
        s, cached = started(cache, 10 * i + 4, SYSTEM + [i + 10, 9, 9])
        assert cached > 0
        cache.failed(s)
    assert cache.enabled and cache.stats.started_ok == 1 and cache.stats.start_failures == 5


def test_a_failed_start_from_part_of_a_prefix_turns_the_cache_to_whole_prefixes() -> None:
    """A stage whose caches cannot be cut (node/prefixes.py) holds only whole snapshots: once a
    start from a part fails (none having worked), only whole prefixes are used, and a
    conversation's next turn, which starts with all of the last one, still hits."""
    cache = PrefixCache()
    finished(cache, 1, SYSTEM + [1, 2])  # held: SYSTEM + [1]
    seq, cached = started(cache, 2, SYSTEM + [7, 7, 7])
    assert cached == 40  # a part of it
    cache.failed(seq)
    assert cache.exact and cache.enabled and cache.entries == 1 and cache.stats.start_failures == 0
    assert started(cache, 3, SYSTEM + [7, 7, 7])[1] == 0  # no part of a prefix any more
    seq, cached = started(cache, 4, SYSTEM + [1, 5, 6])
    assert cached == 41 and seq.prefix is not None  # the whole of it
    # A shorter prefix stays beside a longer one: only whole prefixes serve, so it still does.
    finished(cache, 5, SYSTEM + [1, 5, 6, 8])
    assert cache.entries == 2
    assert started(cache, 6, SYSTEM + [1, 9, 9])[1] == 41 and started(cache, 7, SYSTEM + [1, 5, 6, 9, 9])[1] == 43
    assert cache.status(1)["exact"]


def test_a_cache_whose_partial_starts_worked_never_turns_to_whole_prefixes() -> None:
    cache = PrefixCache()
    finished(cache, 1, SYSTEM + [1, 2])
    seq, cached = started(cache, 2, SYSTEM + [7, 7, 7])
    assert cached == 40
    seq.generated = 1
    copy_context().run(lambda: cache.finished(seq, EPOCH))  # a part served: cuttable caches
    finished(cache, 3, SYSTEM + [3, 2])
    seq, cached = started(cache, 4, SYSTEM + [8, 8, 8])
    cache.failed(seq)  # e.g. evicted for room on a stage
    assert not cache.exact and started(cache, 5, SYSTEM + [9, 9, 9])[1] == 40
