"""The decode loop: the one place edge-qwen turns prompt tokens into generated text.

Everything that generates (EdgeQwen.chat, the CLI, the HTTP server, benchmarks) consumes
`decode()`, which yields `GenerationChunk`s. The loop drives llama.cpp directly: the prompt is
evaluated in n_batch chunks (reusing the KV-cache prefix shared with the previous call),
sampling runs in llama.cpp's own sampler chain (no Python pass over 151,936 logits), text is
detokenized incrementally and only complete UTF-8 characters and text that cannot be the
start of a stop string are released. An optional constraint (the JSON engine) masks the
logits in place before sampling and may force tokens, which are decoded in one batch.
"""

from __future__ import annotations

import codecs
import ctypes
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol


@dataclass
class Timings:
    """Where the time of one generation went (on the final chunk)."""

    prompt_tokens: int
    completion_tokens: int
    prompt_ms: float
    gen_ms: float
    cached_tokens: int = 0   # prompt tokens whose KV cache was reused from the previous call

    @property
    def tokens_per_s(self) -> float:
        return self.completion_tokens / (self.gen_ms / 1000.0) if self.gen_ms > 0 else 0.0


@dataclass
class GenerationChunk:
    """One step of a generation: new text (complete UTF-8 characters only) and the tokens behind it.

    `finish_reason` is set on the last chunk only: "stop" (end of turn, a stop string, or a
    closed JSON value), "length" (max_tokens reached) or "cancelled"; `timings` too.
    """

    text: str
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    timings: Timings | None = None


class Constraint(Protocol):
    """What the decode loop needs from a constraint engine (edge_qwen.engine.json_constraint)."""

    def mask_logits(self, logits: Any) -> None: ...
    def commit(self, token_id: int) -> list[int]: ...
    def is_finished(self) -> bool: ...
    def finalize(self, text: str, finish_reason: str) -> None: ...


@dataclass(frozen=True)
class SamplingParams:
    """Sampling settings of one request. temperature 0 means greedy (argmax)."""

    temperature: float = 0.7
    top_p: float = 0.9
    max_tokens: int = 1024
    stop: tuple[str, ...] = ()
    seed: int | None = None


class TokenPieces:
    """Token id -> bytes, cached per model (llama_token_to_piece through ctypes is the slow part)."""

    def __init__(self, llama):
        import llama_cpp

        self._llama_cpp = llama_cpp
        self.vocab = llama_cpp.llama_model_get_vocab(llama.model)
        self._buf = ctypes.create_string_buffer(256)
        self._cache: dict[int, bytes] = {}
        self._eog: dict[int, bool] = {}
        self._controls: tuple[str, ...] | None = None
        self._lock = threading.Lock()

    def piece(self, token: int) -> bytes:
        b = self._cache.get(token)
        if b is None:
            b = self._cache[token] = self._to_piece(token, special=False)
        return b

    def _to_piece(self, token: int, special: bool) -> bytes:
        with self._lock:  # the shared ctypes buffer must not be used by two threads at once
            n = self._llama_cpp.llama_token_to_piece(self.vocab, token, self._buf, len(self._buf), 0, special)
            if n < 0:  # piece longer than the buffer: ask again with the size llama.cpp gave
                big = ctypes.create_string_buffer(-n)
                n = self._llama_cpp.llama_token_to_piece(self.vocab, token, big, -n, 0, special)
                return big.raw[:n]
            return self._buf.raw[:n]

    def control_texts(self) -> tuple[str, ...]:
        """The texts of the vocabulary's control tokens (<|im_start|>, <|endoftext|>, ...), found once."""
        if self._controls is None:
            ids = (t for t in range(self._llama_cpp.llama_vocab_n_tokens(self.vocab))
                   if self._llama_cpp.llama_vocab_is_control(self.vocab, t))
            texts = {self._to_piece(t, special=True).decode("utf-8", errors="ignore") for t in ids}
            self._controls = tuple(sorted(t for t in texts if t))
        return self._controls

    def is_eog(self, token: int) -> bool:
        e = self._eog.get(token)
        if e is None:
            e = self._eog[token] = bool(self._llama_cpp.llama_vocab_is_eog(self.vocab, token))
        return e


class StopMatcher:
    """Holds back text that could be the beginning of a stop string; finds the first stop."""

    def __init__(self, stops: Sequence[str]):
        self.stops = [s for s in stops if s]
        self.pending = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """Add text; return (text safe to emit, whether a stop string was reached)."""
        if not self.stops:
            return text, False
        self.pending += text
        first = -1
        for s in self.stops:
            i = self.pending.find(s)
            if i >= 0 and (first < 0 or i < first):
                first = i
        if first >= 0:
            out, self.pending = self.pending[:first], ""
            return out, True
        hold = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(self.pending)), hold, -1):
                if self.pending.endswith(s[:k]):
                    hold = k
                    break
        cut = len(self.pending) - hold
        out, self.pending = self.pending[:cut], self.pending[cut:]
        return out, False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


def _sampler(params: SamplingParams):
    """llama.cpp's sampler chain for `params` (caller frees it)."""
    import llama_cpp

    chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
    if params.temperature == 0:
        llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_greedy())
        return chain
    # Temperature first, then nucleus on the tempered distribution (the order transformers
    # and the Qwen API use), then a seeded draw.
    llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_temp(float(params.temperature)))
    if params.top_p < 1.0:
        llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_top_p(float(params.top_p), 1))
    seed = llama_cpp.LLAMA_DEFAULT_SEED if params.seed is None else int(params.seed) & 0xFFFFFFFF
    llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_dist(seed))
    return chain


def _reuse_prefix(llama, prompt: Sequence[int], enabled: bool = True) -> int:
    """Keep the KV cache of the longest prefix shared with the last call; return its length.

    With `enabled` False the cache is cleared: a prompt evaluated afresh in one batch gives
    bit-identical logits every time, while a reused prefix (built from other batch shapes)
    can tip a near-tie and change a greedy answer to the same request.
    """
    import llama_cpp
    import numpy as np

    n_cached = int(llama.n_tokens)
    m = min(n_cached, len(prompt) - 1)  # at least one prompt token must be evaluated for logits
    common = 0
    if m > 0 and enabled:
        diff = np.nonzero(llama.input_ids[:m] != np.asarray(prompt[:m], dtype=np.intc))[0]
        common = int(diff[0]) if len(diff) else m
    mem = llama_cpp.llama_get_memory(llama.ctx)
    if not llama_cpp.llama_memory_seq_rm(mem, -1, common, -1):
        llama_cpp.llama_memory_clear(mem, True)  # partial removal unsupported: start afresh
        common = 0
    llama.n_tokens = common
    return common


def _eval(llama, tokens: Sequence[int]) -> None:
    try:
        llama.eval(tokens)
    except RuntimeError as e:  # llama_decode failed: KV cache full or a backend error
        from ..errors import EdgeQwenError

        llama.n_tokens = 0  # the cache state is unknown: never reuse it
        raise EdgeQwenError(f"llama.cpp could not evaluate {len(tokens)} tokens ({e}); "
                            "try a smaller request or a larger n_ctx") from None


def decode(llama, prompt: Sequence[int], params: SamplingParams, *, pieces: TokenPieces,
           constraint: Constraint | None = None, cancel: threading.Event | None = None,
           n_batch: int | None = None, reuse_prefix: bool = False) -> Iterator[GenerationChunk]:
    """Generate from `prompt` token ids on a llama_cpp.Llama; yield GenerationChunks.

    The caller owns the Llama for the whole iteration (EdgeQwen holds its lock). Closing the
    generator stops generation; the KV cache stays consistent with `llama.n_tokens`.
    """
    import llama_cpp
    import numpy as np

    ctx = llama.ctx
    n_vocab = llama.n_vocab()
    batch = n_batch or llama.n_batch
    stopper = StopMatcher(params.stop)
    utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
    emitted: list[str] = []
    n_completion = 0
    finish: str | None = None
    t0 = time.perf_counter()
    cached = _reuse_prefix(llama, prompt, reuse_prefix)
    rest = list(prompt[cached:])
    for i in range(0, len(rest), batch):
        if cancel is not None and cancel.is_set():
            finish = "cancelled"
            break
        _eval(llama, rest[i:i + batch])
    t1 = time.perf_counter()

    def final(text: str, ids: list[int], reason: str, stop_hit: bool = False) -> GenerationChunk:
        if not stop_hit:  # release what was held back: an unfinished stop-string prefix
            # The bytes of a character cut off by max_tokens or a cancel stay in the decoder and
            # are dropped: a half character would come out as U+FFFD.
            text += stopper.flush()
        emitted.append(text)
        if constraint is not None:
            constraint.finalize("".join(emitted), reason)
        t2 = time.perf_counter()
        return GenerationChunk(text, ids, reason, Timings(len(prompt), n_completion, (t1 - t0) * 1e3,
                                                          (t2 - t1) * 1e3, cached))

    if finish is not None:
        yield final("", [], finish)
        return
    smpl = _sampler(params)
    try:
        while True:
            if constraint is not None:
                logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, -1), shape=(n_vocab,))
                constraint.mask_logits(logits)
            tok = int(llama_cpp.llama_sampler_sample(smpl, ctx, -1))
            if pieces.is_eog(tok):
                # End of turn. An EOG token is not content; under a constraint the mask only
                # lets it through where the grammar may end.
                yield final("", [], "stop")
                return
            new = [tok]
            if constraint is not None:
                new += constraint.commit(tok)
            room = params.max_tokens - n_completion
            cut = len(new) > room
            if cut:  # forced tokens past max_tokens are cut: the output is unfinished, "length"
                new = new[:room]
            n_completion += len(new)
            text, stopped = stopper.feed(utf8.decode(b"".join(pieces.piece(t) for t in new)))
            if stopped:
                yield final(text, new, "stop", stop_hit=True)
                return
            if not cut and constraint is not None and constraint.is_finished():
                yield final(text, new, "stop")
                return
            if n_completion >= params.max_tokens:
                yield final(text, new, "length")
                return
            if cancel is not None and cancel.is_set():
                yield final(text, new, "cancelled")
                return
            emitted.append(text)
            yield GenerationChunk(text, new)
            _eval(llama, new)
    finally:
        llama_cpp.llama_sampler_free(smpl)
