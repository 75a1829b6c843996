"""What every generation is made of: the streaming chunk, sampling settings and chain, stop strings,
UTF-8-safe token pieces, the constraint protocol, and `decode()`.

Everything that generates (EdgeQwen.chat, the CLI, the HTTP server, benchmarks) consumes
GenerationChunks from the one decode loop, the batched engine (edge_qwen.engine.scheduler);
`decode()` is its entry point for a bare llama_cpp.Llama. Sampling runs in llama.cpp's own
sampler chain (`_sampler`, one per sequence: no Python pass over 151,936 logits), text is
detokenized incrementally and only complete UTF-8 characters and text that cannot be the start
of a stop string are released. An optional constraint (the JSON engine) masks the logits in
place before sampling and may force tokens, which are decoded in the same batch.
"""

from __future__ import annotations

import ctypes
import threading
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


MAX_TOP_LOGPROBS = 20  # alternatives per token one request may ask for (OpenAI's limit)


@dataclass(frozen=True)
class TokenLogprob:
    """The model's log-probability of one generated token, and of the `top` most likely tokens there.

    Taken from the raw logits row the token was chosen from (log-softmax over the whole
    vocabulary): the model's own distribution, before temperature, top-p/top-k, penalties,
    logit_bias and any constraint, as OpenAI and vLLM report it.
    """

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


def token_logprob(logits: Any, token: int, top: int) -> TokenLogprob:
    """TokenLogprob of `token` from one raw logits row (a float32 array of n_vocab), with `top` alternatives."""
    import numpy as np

    row = np.asarray(logits, dtype=np.float32)
    m = float(row.max())
    lse = m + float(np.log(np.exp(row - m, dtype=np.float32).sum(dtype=np.float64)))
    best: tuple[tuple[int, float], ...] = ()
    if top > 0:
        idx = np.argpartition(row, -top)[-top:]
        idx = idx[np.argsort(-row[idx], kind="stable")]
        best = tuple((int(i), float(row[i]) - lse) for i in idx)
    return TokenLogprob(int(token), float(row[token]) - lse, best)


@dataclass
class GenerationChunk:
    """One step of a generation: new text (complete UTF-8 characters only) and the tokens behind it.

    `finish_reason` is set on the last chunk only: "stop" (end of turn, a stop string, or a
    closed JSON value), "length" (max_tokens reached) or "cancelled"; `timings` too.
    `logprobs` (only when SamplingParams.logprobs asks for them) has one TokenLogprob per id in
    `token_ids`, in order.
    """

    text: str
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    timings: Timings | None = None
    logprobs: list[TokenLogprob] | None = None
    stop: str | None = None  # on the last chunk: the stop string that ended the generation, if one did


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
    # OpenAI's penalties (-2..2, over the tokens generated so far), a top-k cut (0: off) and
    # logit_bias as ((token id, bias -100..100), ...): all applied by llama.cpp's own samplers.
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    top_k: int = 0
    logit_bias: tuple[tuple[int, float], ...] = ()
    # None: no log-probabilities (nothing is computed). 0..MAX_TOP_LOGPROBS: each generated token's
    # logprob with that many most likely alternatives (GenerationChunk.logprobs).
    logprobs: int | None = None
    # Tokens that end the generation like end-of-turn (not part of the text): fill-in-the-middle's
    # own control tokens, which are not end-of-generation tokens in the vocabulary.
    stop_tokens: tuple[int, ...] = ()


class TokenPieces:
    """Token id -> bytes, cached per model (llama_token_to_piece through ctypes is the slow part)."""

    def __init__(self, llama):
        import llama_cpp

        self._llama_cpp = llama_cpp
        self.vocab = llama_cpp.llama_model_get_vocab(llama.model)
        self._buf = ctypes.create_string_buffer(256)
        self._cache: dict[int, bytes] = {}
        self._shown: dict[int, bytes] = {}
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

    def display(self, token: int) -> bytes:
        """The bytes a token stands for, control tokens spelled out (`<|im_end|>`): for logprobs."""
        b = self._shown.get(token)
        if b is None:
            b = self._shown[token] = self._to_piece(token, special=True)
        return b

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
        self.hit: str | None = None  # the stop string found

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
            self.hit = min((s for s in self.stops if self.pending.find(s) == first), key=len)
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


def _sampler(params: SamplingParams, n_vocab: int = 0):
    """llama.cpp's sampler chain for `params` (caller frees it). `n_vocab` (0: unknown) only sizes
    llama.cpp's backend-sampling buffers; the CPU samplers give the same result without it."""
    import llama_cpp

    chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
    # Bias and penalties change the logits before any choice, greedy included (llama.cpp's order).
    if params.logit_bias:
        biases = (llama_cpp.llama_logit_bias * len(params.logit_bias))(*params.logit_bias)
        llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_logit_bias(
            n_vocab, len(params.logit_bias), biases))
    if params.frequency_penalty or params.presence_penalty:
        # The window covers the whole completion: OpenAI counts every token generated so far
        # (the prompt is not fed to the chain, so only generated and forced tokens count).
        llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_penalties(
            n_vocab, max(int(params.max_tokens), 1), 1.0, float(params.frequency_penalty), float(params.presence_penalty)))
    if params.temperature == 0:
        llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_greedy())
        return chain
    # Temperature first, then nucleus on the tempered distribution (the order transformers
    # and the Qwen API use), then a seeded draw.
    if params.top_k > 0:
        llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_top_k(int(params.top_k)))
    llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_temp(float(params.temperature)))
    if params.top_p < 1.0:
        llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_top_p(float(params.top_p), 1))
    seed = llama_cpp.LLAMA_DEFAULT_SEED if params.seed is None else int(params.seed) & 0xFFFFFFFF
    llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_dist(seed))
    return chain


def decode(llama, prompt: Sequence[int], params: SamplingParams, *, pieces: TokenPieces | None = None,
           constraint: Constraint | None = None, cancel: threading.Event | None = None,
           n_batch: int | None = None, reuse_prefix: bool = False, cache_key: str = "",
           blocking: bool = True) -> Iterator[GenerationChunk]:
    """Generate from `prompt` token ids on a llama_cpp.Llama; yield GenerationChunks.

    The generation runs on the batched engine that owns `llama` (edge_qwen.engine.scheduler),
    beside whatever else that engine is generating; a Llama without one gets an engine with a
    single slot. Closing the generator stops the generation and frees its slot.
    """
    from .scheduler import Engine, engine_of

    engine = engine_of(llama) or Engine(llama, parallel=1, n_batch=n_batch, pieces=pieces)
    yield from engine.generate(prompt, params, constraint=constraint, cancel=cancel, reuse_prefix=reuse_prefix,
                               cache_key=cache_key, blocking=blocking)


class _Either(threading.Event):
    """A cancel event that is also set whenever `parent` is (the engine only asks `is_set()`)."""

    def __init__(self, parent: threading.Event | None):
        super().__init__()
        self.parent = parent

    def is_set(self) -> bool:
        return super().is_set() or (self.parent is not None and self.parent.is_set())


def fan_out(n: int, start: Any, cancel: threading.Event | None = None) -> Iterator[tuple[int, Any]]:
    """Run n generations of one prompt together; yield (index, item) as each produces an item.

    `start(i, cancel_i, prefilled)` returns the i-th iterator (it runs in its own thread, so
    the engine batches the n sequences). Choice 0 starts first and the others once its prompt
    is evaluated (it sets `prefilled`), so they copy the prompt's KV cells from its slot
    through the prefix cache instead of evaluating it again. `cancel_i` is set when `cancel` is
    or when the consumer closes this iterator: every generation stops at its next token. The
    first error of any generation is raised here (the others are cancelled).
    """
    import queue

    done_marker = object()
    out: queue.SimpleQueue = queue.SimpleQueue()
    stop = _Either(cancel)
    prefilled = threading.Event()

    def work(i: int) -> None:
        try:
            if i > 0:
                prefilled.wait()
                if stop.is_set():
                    return
            gen = start(i, stop, prefilled if i == 0 else None)
            try:
                for item in gen:
                    out.put((i, item))
                    if threading.Event.is_set(stop):  # the consumer left
                        break
            finally:
                close = getattr(gen, "close", None)
                if close is not None:
                    close()
        except BaseException as e:  # noqa: BLE001 -- handed to the consumer
            out.put((i, e))
        finally:
            if i == 0:
                prefilled.set()
            out.put((i, done_marker))

    for i in range(n):
        threading.Thread(target=work, args=(i,), name=f"edge-qwen-choice-{i}", daemon=True).start()
    left = n
    try:
        while left:
            i, item = out.get()
            if item is done_marker:
                left -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield i, item
    finally:
        stop.set()
