"""Every limit on what a peer may send over ZeroMQ, in one place (no imports: wire.py, sockets.py
and both processes read them). Each is a judgement with its reason; notes/boundaries.md tabulates
them, and tests/unit/test_boundaries_wire.py crosses each one.
"""

from __future__ import annotations

# A header is small: token ids and hidden states travel as tensor frames, so 1 MiB of msgpack
# is already generous (a logit_bias map of 300 entries is ~5 KiB, and rides once per request).
MAX_HEADER_BYTES = 1 << 20
MAX_ENTRIES = 4096  # sequences in one micro-batch, results in one Sampled, ids in one Release
# Rows (tokens) of one Forward: the scheduler's prefill chunk (PREFILL_CHUNK = 256) or one decode
# group (at most the API's concurrency, 64). Checked against both by a unit test.
MAX_FORWARD_TOKENS = 256
# The widest model a ring accepts: 16384 is Llama-3.1-405B's hidden size, the widest open model
# in the families stage.py supports. A wider model needs this raised (and the data frame limit
# below grows with it); a node refuses to load one.
MAX_HIDDEN_SIZE = 16384
MAX_DTYPE_BYTES = 4  # float32, int32: the widest dtype the ring ships
# Tensors are token ids (1-D) and hidden states (2-D); 4 leaves room without letting a peer hand
# us a shape whose product takes seconds (or a str() that overflows) to compute.
MAX_TENSOR_RANK = 4
# The largest tensor: one full prefill chunk of the widest model in float32 (16 MiB).
MAX_TENSOR_BYTES = MAX_FORWARD_TOKENS * MAX_HIDDEN_SIZE * MAX_DTYPE_BYTES
# Ids a message's fields may hold: token ids are int32 on the wire, so no vocabulary is larger.
MAX_TOKEN_ID = (1 << 31) - 1
MAX_TOP_LOGPROBS = 20  # OpenAI's chat limit; the API enforces the same
# A penalty looks back this many tokens at most (mlx-lm's default is 20; more is never useful
# and every step copies the window).
MAX_PENALTY_CONTEXT = 4096
# Below this a temperature means greedy: 1/T would overflow float32 logits to inf (and NaN).
GREEDY_TEMPERATURE = 1e-5

# Frames per message, by socket role (a ROUTER adds the routing id frame on top). libzmq's
# MAXMSGSIZE is per *frame*, so without a count a peer could send a million maximal frames.
MAX_DATA_FRAMES = 4  # version, header, tokens, hidden
MAX_CONTROL_FRAMES = 2  # version, header: control messages never carry a tensor
# Bytes per frame, by socket role (libzmq drops the connection of a peer that sends more).
# Control headers are a few hundred bytes; 64 KiB holds a StepFailed naming MAX_ENTRIES seqs.
MAX_CONTROL_FRAME_BYTES = 64 << 10
MAX_RESULT_FRAME_BYTES = MAX_HEADER_BYTES  # Sampled is a header only (tokens, top logprobs)
MAX_DATA_FRAME_BYTES = max(MAX_TENSOR_BYTES, MAX_HEADER_BYTES)
# The grammar a request may constrain its output with (llguidance's JSON, riding once in the
# first chunk's SamplingParams): 64 KiB holds hundreds of properties; OpenAI's own structured
# outputs cap a schema at 5000 properties and 10 levels. Compiling happens on the gateway first
# under a deadline, so a grammar that gets here is known to compile.
MAX_GRAMMAR_BYTES = 64 << 10
# Drafted tokens one decode chunk may carry (speculation, issue 23): acceptance of prompt-lookup
# drafts falls off quickly with length (mlx-lm's and vLLM's n-gram drafters stop around 5-10),
# and a verify forward of more positions only burns compute.
MAX_DRAFT_TOKENS = 16
MAX_GRAMMAR_AFTER = 16  # tokens of the marker that starts a grammar (</think> is 1 to a few)
