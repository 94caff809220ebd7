"""The gateway's prefix cache (issue 22): which token prefixes the stages hold KV for, as a trie.

A finished sequence's tokens (prompt + reply, as its caches hold them) are kept on every stage
under an id named here (node/prefixes.py), riding on the Release that frees its caches. A new
request whose prompt starts with the same tokens, as far as they agree (a template that
rewrites earlier turns agrees up to the rewrite), starts from that prefix: only the rest of its
prompt goes down the ring. Shared system prompts and a conversation's own history both hit.

Isolated: a request uses only prefixes of its own scope (its API key's name, "" with keys off):
a shared cache would tell one user, by its timing, what another asked. Bounded: the tokens held
count inside the KV budget admission respects (admission.py), and the least recently used
prefix is evicted before any request waits or is refused; the stages hear of it on the next
Release. A re-planned ring holds nothing: `forget_all`, and replays recompute from position 0.

Exact boundaries: a stage whose caches cannot be cut (a sliding window, an SSM state) keeps a
whole snapshot, which serves only a prompt that starts with all of its tokens (node/prefixes.py).
The first start from part of a prefix that fails, before any such start has succeeded, turns the
cache to `exact` matches: no stage is asked again for what it cannot give, and a conversation's
next turn (its prompt starts with the whole of the last turn) still hits.
"""

from __future__ import annotations

import itertools
from contextvars import ContextVar
from dataclasses import dataclass, field

import structlog

from zmqinfer.clusterstatus import PrefixCacheStatus
from zmqinfer.gateway.sequences import Seq
from zmqinfer.protocol.wire import Keep, SeqId

log = structlog.get_logger()

# Shorter matches are not used: a chat template's first tokens are shared by every conversation,
# and a hit of a few tokens saves less than the copy costs.
MIN_PREFIX_TOKENS = 16
# Prefixes held at most (below a stage's own cap, node/prefixes.py MAX_PREFIXES = 256).
MAX_ENTRIES = 128
# Sequences started from a prefix that failed, with none ever finishing, before the cache turns
# itself off: a ring whose stages keep no prefix at all would otherwise cost every hit a failed
# chunk and a replay.
FAILURES_BEFORE_OFF = 3


@dataclass
class Scope:
    """One request's view of the cache: whose prefixes it may use, and how many of its prompt
    tokens came from one (OpenAI's usage.prompt_tokens_details.cached_tokens)."""

    key: str = ""
    cached_tokens: int = 0


# Set by the API handler before it calls generate (an async generator runs in its task's
# context); a request without one (tests, probes) uses the shared scope "".
SCOPE: ContextVar[Scope | None] = ContextVar("zmqinfer_prefix_scope", default=None)


def enter(key: str | None) -> Scope:
    scope = Scope(key or "")
    SCOPE.set(scope)
    return scope


@dataclass
class _Node:
    children: dict[int, _Node] = field(default_factory=dict)
    ends: set[int] = field(default_factory=set)  # entries whose tokens end here
    below: int = 0  # entries ending here or deeper


@dataclass
class _Entry:
    scope: str
    tokens: tuple[int, ...]
    used: int  # LRU order: the cache's counter when last stored or hit


@dataclass
class Stats:
    lookups: int = 0  # requests that looked
    hits: int = 0  # ... and started from a prefix
    tokens_saved: int = 0  # prompt tokens not prefilled thanks to a hit
    evictions: int = 0
    started_ok: int = 0  # sequences started from a prefix that finished
    partial_ok: int = 0  # ... from a part of one
    start_failures: int = 0  # ... that failed (replayed from position 0)


class PrefixCache:
    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.exact = False  # only whole prefixes are used (see the module docstring)
        # Live sequences started from a prefix: their request's scope (a replay recomputes the
        # cached tokens: the usage must not count them) and whether they used a part of it.
        self._started: dict[SeqId, tuple[Scope, bool]] = {}
        self.stats = Stats()
        self._roots: dict[str, _Node] = {}
        self._entries: dict[int, _Entry] = {}
        self._ids = itertools.count(1)
        self._ticks = itertools.count(1)
        self._keep: list[Keep] = []  # to ride on the next Release
        self._drop: list[int] = []
        self.tokens = 0  # token positions the stages hold for the entries (each stage, its layers)

    @property
    def entries(self) -> int:
        return len(self._entries)

    @property
    def pending(self) -> bool:
        return bool(self._drop)

    def status(self, bytes_per_token: int) -> PrefixCacheStatus:
        st = self.stats
        return {"enabled": self.enabled, "exact": self.exact, "entries": self.entries, "tokens": self.tokens,
                "bytes": self.tokens * bytes_per_token, "lookups": st.lookups, "hits": st.hits,
                "hit_rate": round(st.hits / st.lookups, 4) if st.lookups else 0.0,
                "tokens_saved": st.tokens_saved, "evictions": st.evictions}

    # ---- the trie ---------------------------------------------------------------------------

    def match(self, scope: str, prompt: list[int]) -> tuple[int, int] | None:
        """(prefix id, positions to use) for the longest prefix of `prompt` held in `scope` (when
        `exact`, the longest whole one); None below MIN_PREFIX_TOKENS. At most len(prompt) - 2
        positions: a sequence starts with a prefill chunk (which names the prefix) and its last
        token is its first decode."""
        node, depth, limit = self._roots.get(scope), 0, len(prompt) - 2
        if node is None:
            return None
        whole: tuple[_Node, int] | None = None  # the deepest node on the path where an entry ends
        while depth < limit and (nxt := node.children.get(prompt[depth])) is not None:
            node, depth = nxt, depth + 1
            if node.ends:
                whole = node, depth
        if self.exact:
            if whole is None:
                return None
            node, depth = whole
        if depth < MIN_PREFIX_TOKENS:
            return None
        while not node.ends:  # any entry below agrees on these `depth` tokens
            node = next(c for c in node.children.values() if c.below)
        pid = max(node.ends, key=lambda p: self._entries[p].used)
        self._entries[pid].used = next(self._ticks)
        return pid, depth

    def _path(self, scope: str, tokens: tuple[int, ...]) -> list[_Node]:
        node = self._roots.setdefault(scope, _Node())
        path = [node]
        for t in tokens:
            node = node.children.setdefault(t, _Node())
            path.append(node)
        return path

    def _add(self, pid: int, entry: _Entry) -> None:
        path = self._path(entry.scope, entry.tokens)
        for n in path:
            n.below += 1
        path[-1].ends.add(pid)
        self._entries[pid] = entry
        self.tokens += len(entry.tokens)

    def _remove(self, pid: int) -> None:
        entry = self._entries.pop(pid)
        self.tokens -= len(entry.tokens)
        path = self._path(entry.scope, entry.tokens)
        path[-1].ends.discard(pid)
        for parent, t, n in zip(path, entry.tokens, path[1:]):
            n.below -= 1
            if n.below == 0:
                del parent.children[t]  # nothing below: the branch goes
                break
        path[0].below -= 1
        if path[0].below == 0:
            del self._roots[entry.scope]
        self._drop.append(pid)

    # ---- the scheduler's hooks --------------------------------------------------------------

    def start(self, seq: Seq, stages: int = 1) -> None:
        """A new request on a ring of `stages` stages: start it from the longest prefix its
        scope holds, if any."""
        scope = SCOPE.get() or Scope()
        if not self.enabled:
            return
        self.stats.lookups += 1
        hit = self.match(scope.key, seq.history)
        if hit is None:
            return
        pid, n = hit
        seq.restart(seq.epoch, cached=n, stages=stages)
        seq.prefix = pid
        self._started[seq.id] = (scope, n < len(self._entries[pid].tokens))
        scope.cached_tokens = n
        self.stats.hits += 1
        self.stats.tokens_saved += n

    def finished(self, seq: Seq, epoch: int) -> None:
        """A sequence ends: keep what its caches hold (every token but the last sampled one),
        when they hold it all: it has been answered since it last (re)started on this ring."""
        scope = SCOPE.get() or Scope()
        partial = self._started.pop(seq.id, (None, False))[1]
        if not self.enabled or seq.generated < 1 or seq.replays or seq.epoch != epoch or not epoch:
            return
        self.stats.started_ok += seq.prefix is not None
        self.stats.partial_ok += partial
        tokens = tuple(seq.history[:-1])
        if len(tokens) < MIN_PREFIX_TOKENS:
            return
        path = self._path(scope.key, tokens)
        # Held already, alone or (unless only whole prefixes serve) inside a longer one.
        if path[-1].ends or (path[-1].below and not self.exact):
            for pid in path[-1].ends:
                self._entries[pid].used = next(self._ticks)
            return
        for n in path[:-1] if not self.exact else ():  # shorter prefixes serve nothing it does not
            for pid in list(n.ends):
                self._remove(pid)
        while len(self._entries) >= MAX_ENTRIES and self.evict_lru():
            pass
        pid = next(self._ids)
        self._add(pid, _Entry(scope.key, tokens, next(self._ticks)))
        self._keep.append(Keep(seq.id, pid, len(tokens)))

    def failed(self, seq: Seq) -> None:
        """A sequence that started from a prefix replays: the prefix may be what failed (a stage
        that could not keep it, or evicted it for room), so it is no longer used."""
        scope, partial = self._started.pop(seq.id, (None, False))
        if scope is not None:
            scope.cached_tokens = 0  # recomputed from position 0 after all
        if seq.prefix is None:
            return
        if partial and not self.exact and not self.stats.partial_ok:
            log.info("prefix cache: whole prefixes only (a stage's caches cannot be cut: a "
                     "sliding window or an SSM state, docs/prefix-cache.md)")
            self.exact = True
            seq.prefix = None
            return  # the prefix itself may still serve whole: not counted against the cache
        if seq.prefix in self._entries:
            self._remove(seq.prefix)
        seq.prefix = None
        self.stats.start_failures += 1
        if self.stats.start_failures >= FAILURES_BEFORE_OFF and not self.stats.started_ok:
            log.warning("prefix cache off: the stages hold no prefix they are asked for "
                        "(a model family whose caches cannot be cut, docs/prefix-cache.md)")
            self.enabled = False
            while self.evict_lru():
                pass

    def evict_lru(self) -> bool:
        """Evict the least recently used prefix; False when none is held."""
        if not self._entries:
            return False
        self._remove(min(self._entries, key=lambda p: self._entries[p].used))
        self.stats.evictions += 1
        return True

    def take(self, released: tuple[SeqId, ...]) -> tuple[tuple[Keep, ...], tuple[int, ...]]:
        """What the next Release carries: keeps of the sequences it frees, and the drops."""
        keep = tuple(k for k in self._keep if k.seq in released and k.prefix in self._entries)
        self._keep = [k for k in self._keep if k.seq not in released and k.prefix in self._entries]
        drop, self._drop = tuple(self._drop), []
        return keep, drop

    def forget_all(self) -> None:
        """The ring is re-planned: the stages that held the prefixes start empty."""
        self._roots.clear()
        self._entries.clear()
        self._keep.clear()
        self._drop.clear()
        self._started.clear()
        self.tokens = 0
