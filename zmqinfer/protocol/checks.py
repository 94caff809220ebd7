"""What a well-typed message must also mean: ranges, and fields that must agree.

`check(msg)` raises WireError for a message `codec.decode` accepted but nobody should act on:
negative ports or sizes, NaN logprobs, tokens whose length is not the chunks' total, hidden
states of the wrong rank. What depends on the model (vocabulary, hidden width and dtype) is the
node's to check (node/inbound.py): only it knows the model it loaded.
"""

from __future__ import annotations

import math

from zmqinfer.protocol.limits import (
    GREEDY_TEMPERATURE,
    MAX_GRAMMAR_AFTER,
    MAX_GRAMMAR_BYTES,
    MAX_DRAFT_TOKENS,
    MAX_FORWARD_TOKENS,
    MAX_HIDDEN_SIZE,
    MAX_PENALTY_CONTEXT,
    MAX_TOKEN_ID,
    MAX_TOP_LOGPROBS,
)
from zmqinfer.protocol.wire import (
    Assign,
    Forward,
    GatewayBeat,
    Heartbeat,
    Loaded,
    Message,
    Release,
    Sampled,
    SamplingParams,
    StepFailed,
    WireError,
)

FLOAT_DTYPES = frozenset({"float16", "bfloat16", "float32"})  # what hidden states may be
MAX_PORT = 65535


def _need(ok: bool, where: str, what: str) -> None:
    if not ok:
        raise WireError(f"{where}: {what}")


def _in(value: float, lo: float, hi: float) -> bool:
    return math.isfinite(value) and lo <= value <= hi  # NaN and inf fail


def check(msg: Message) -> None:
    """WireError unless `msg` means something a receiver may act on."""
    k = msg.KIND
    if isinstance(msg, (Forward, Release, Sampled, StepFailed, Assign, Loaded, GatewayBeat, Heartbeat)):
        _need(msg.epoch >= 0, k, "epoch must be >= 0")
    if isinstance(msg, Forward):
        _check_forward(msg)
    elif isinstance(msg, Release):
        _need(bool(msg.seqs or msg.drop) and min(msg.seqs, default=0) >= 0 and min(msg.drop, default=0) >= 0,
              k, "seqs and drop must be ids >= 0, not both empty")
        _need(all(x.seq in msg.seqs and x.prefix >= 0 and x.length >= 1 for x in msg.keep), k,
              "keep must name released seqs, prefix ids >= 0 and lengths >= 1")
    elif isinstance(msg, Sampled):
        for s in msg.samples:
            _need(s.seq >= 0 and len(s.top) <= MAX_TOP_LOGPROBS, k, "bad sample")
            for t, lp in ((s.token, s.logprob), *((a.token, a.logprob) for a in s.top)):
                _need(0 <= t <= MAX_TOKEN_ID and _in(lp, -math.inf, 0.001), k,
                      "tokens must be ids >= 0 and logprobs finite and <= 0")
    elif isinstance(msg, Heartbeat):
        _need(1 <= msg.data_port <= MAX_PORT, k, f"data_port must be in 1..{MAX_PORT}")
        _need(min(msg.mem_total, msg.mem_free, msg.pid, msg.rss_bytes, msg.sequences) >= 0
              and _in(msg.busy_seconds, 0, math.inf), k, "memory, pid and counters must be >= 0")
    elif isinstance(msg, Assign):
        _need(0 <= msg.start < msg.end <= msg.n_layers, k, "layers must satisfy 0 <= start < end <= n_layers")
        _need(1 <= msg.result_port <= MAX_PORT, k, f"result_port must be in 1..{MAX_PORT}")
        _need(msg.next_hop is None or msg.next_hop.startswith("tcp://"), k, "next_hop must be tcp://")
    elif isinstance(msg, Loaded):
        _need(min(msg.shard_bytes, msg.rss_bytes) >= 0 and _in(msg.load_seconds, 0, math.inf), k,
              "sizes and seconds must be >= 0")
        kv = msg.kv  # its windows are at most MAX_ENTRIES (the codec's bound on any array)
        _need(kv is None or min(kv.token_bytes, kv.state_bytes, *(x for w in kv.windows for x in w)) >= 0,
              k, "kv sizes must be >= 0")


def _check_forward(msg: Forward) -> None:
    total, decoding = 0, set()
    for c in msg.chunks:
        _need(c.seq >= 0 and c.start >= 0 and c.length >= 1, "forward.chunks",
              "seq and start must be >= 0, length >= 1")
        if c.sample:
            _need(c.seq not in decoding, "forward.chunks", "a sequence decodes twice in one step")
            decoding.add(c.seq)
        _need(c.length <= 1 + MAX_DRAFT_TOKENS or not c.sample, "forward.chunks",
              f"a decode chunk carries at most {MAX_DRAFT_TOKENS} drafted tokens")
        _need(0 <= c.trim <= MAX_DRAFT_TOKENS and (c.trim == 0 or (c.sample and c.prefix is None)),
              "forward.chunks", f"trim must be 0..{MAX_DRAFT_TOKENS}, on decode chunks only")
        if c.params is not None:
            _check_params(c.params)
        _need(c.prefix is None or (c.prefix >= 0 and c.start >= 1), "forward.chunks",
              "a prefix must be an id >= 0 and its chunk start past 0")
        total += c.length
    _need(total <= MAX_FORWARD_TOKENS, "forward", f"more than {MAX_FORWARD_TOKENS} tokens")
    _need(msg.tokens.dtype == "int32" and msg.tokens.shape == (total,), "forward.tokens",
          f"must be int32 [{total}] (the chunks' total length)")
    h = msg.hidden
    if h is not None:
        _need(h.dtype in FLOAT_DTYPES and len(h.shape) == 2 and h.shape[0] == total
              and 1 <= h.shape[1] <= MAX_HIDDEN_SIZE, "forward.hidden",
              f"must be float [{total}, hidden_size <= {MAX_HIDDEN_SIZE}]")


def _check_params(p: SamplingParams) -> None:
    w = "forward.chunks.params"
    _need(p.temperature == 0 or _in(p.temperature, GREEDY_TEMPERATURE, 100), w, "temperature out of range")
    _need(_in(p.top_p, 0, 1) and p.top_p > 0 and _in(p.min_p, 0, 1), w, "top_p / min_p out of range")
    _need(0 <= p.top_k <= MAX_TOKEN_ID and 0 <= p.top_logprobs <= MAX_TOP_LOGPROBS, w,
          "top_k / top_logprobs out of range")
    _need(p.seed is None or 0 <= p.seed < 1 << 64, w, "seed must be a uint64")
    _need(0 <= p.penalty_context <= MAX_PENALTY_CONTEXT, w, "penalty_context out of range")
    for v, lo in ((p.repetition_penalty, 1e-6), (p.presence_penalty, -100), (p.frequency_penalty, -100)):
        _need(v is None or _in(v, lo, 100), w, "penalty out of range")
    _need(all(0 <= t <= MAX_TOKEN_ID and _in(b, -100, 100) for t, b in p.logit_bias), w,
          "logit_bias must map token ids to biases in [-100, 100]")
    _need(p.grammar is None or 0 < len(p.grammar) <= MAX_GRAMMAR_BYTES, w,
          f"grammar must be 1 to {MAX_GRAMMAR_BYTES} characters")
    _need(0 <= p.grammar_start <= MAX_TOKEN_ID, w, "grammar_start out of range")
    _need(len(p.grammar_after) <= MAX_GRAMMAR_AFTER and all(0 <= t <= MAX_TOKEN_ID for t in p.grammar_after),
          w, f"grammar_after must be at most {MAX_GRAMMAR_AFTER} token ids")
    _need(p.grammar_opener is None or 0 <= p.grammar_opener <= MAX_TOKEN_ID, w,
          "grammar_opener must be a token id")
