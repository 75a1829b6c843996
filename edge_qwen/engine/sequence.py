"""One generation inside the batched engine: its request, its progress, and the chunks it hands back.

A Sequence is created by `Engine.submit` and driven only by the engine thread, except for the
two things a consumer may do from its own thread: read chunks from `out` and `abandon()`.
What happens to a token once sampled (end of turn, forced tokens, max_tokens, stop strings,
UTF-8 pieces, the constraint's end) lives here, so the scheduler only moves tokens in batches.
"""

from __future__ import annotations

import codecs
import queue
import threading
import time
from dataclasses import dataclass, field

from .generate import Constraint, GenerationChunk, SamplingParams, StopMatcher, Timings, TokenLogprob, TokenPieces
from .sampling import SequenceSampler

WAITING, RUNNING, DONE = "waiting", "running", "done"


@dataclass
class Request:
    """What a client asks the engine for.

    cache_key: the scope of the prefix cache. A prompt reuses KV cells only from slots that
        served the same key (the server derives it from the API key and `cache_salt`), so one
        client can never learn another's prompt from `cached_tokens` or timing.
    reuse_prefix: False evaluates the prompt afresh (no cached prefix), as for seeded requests.
    """

    prompt: list[int]
    params: SamplingParams
    constraint: Constraint | None = None
    cancel: threading.Event | None = None
    cache_key: str = ""
    reuse_prefix: bool = True


@dataclass
class Sequence:
    """The engine's state for one request (see module docstring for who touches what)."""

    req: Request
    pieces: TokenPieces
    out: queue.SimpleQueue = field(default_factory=queue.SimpleQueue)
    state: str = WAITING
    slot: int | None = None
    pending: list[int] = field(default_factory=list)   # tokens to feed to the model next
    prefilling: bool = True      # still evaluating the prompt
    cached: int = 0              # prompt tokens whose KV came from the prefix cache
    n_completion: int = 0
    sampler: SequenceSampler | None = None
    abandoned: bool = False      # the consumer closed its stream
    t_submit: float = field(default_factory=time.perf_counter)
    t_admit: float = 0.0
    t_first: float = 0.0

    def __post_init__(self) -> None:
        # With logprobs, tokens a constraint forces are fed one per step (each needs the logits
        # row before it); they wait here, already accepted by the constraint and the chain.
        self.forced: list[int] = []
        self.stopper = StopMatcher(self.req.params.stop)
        self.utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.emitted: list[str] = []

    # -- asked from any thread ------------------------------------------------------------------
    def cancelled(self) -> bool:
        return self.abandoned or (self.req.cancel is not None and self.req.cancel.is_set())

    @property
    def reservation(self) -> int:
        """KV cells this sequence may come to occupy: its prompt plus every token it may generate."""
        return len(self.req.prompt) + self.req.params.max_tokens

    # -- engine thread only -----------------------------------------------------------------------
    def start(self, slot: int, cached: int, n_vocab: int) -> None:
        self.state, self.slot, self.cached = RUNNING, slot, cached
        self.pending = list(self.req.prompt[cached:])
        self.sampler = SequenceSampler(self.req.params, n_vocab)
        self.t_admit = time.perf_counter()

    def finish(self, reason: str, text: str = "", ids: list[int] | None = None, stop_hit: bool = False,
               logprobs: list[TokenLogprob] | None = None) -> None:
        """Hand back the final chunk (finish_reason and timings) and release the sampler."""
        if self.state == DONE:
            return
        if not stop_hit:  # release what was held back: an unfinished stop-string prefix
            # The bytes of a character cut off by max_tokens or a cancel stay in the decoder and
            # are dropped: a half character would come out as U+FFFD.
            text += self.stopper.flush()
        self.emitted.append(text)
        self.state = DONE
        self.pending = []
        if self.sampler is not None:
            self.sampler.free()
            self.sampler = None
        now = time.perf_counter()
        t_admit = self.t_admit or now
        t_first = self.t_first or now
        timings = Timings(len(self.req.prompt), self.n_completion, (t_first - t_admit) * 1e3,
                          (now - t_first) * 1e3, self.cached)
        try:
            if self.req.constraint is not None:
                self.req.constraint.finalize("".join(self.emitted), reason)
        except Exception as e:  # an invalid JSON answer: the consumer gets the constraint's error
            self.out.put(e)
            return
        if logprobs is None and self.req.params.logprobs is not None:
            logprobs = []
        self.out.put(GenerationChunk(text, ids or [], reason, timings, logprobs,
                                     self.stopper.hit if stop_hit else None))

    def fail(self, error: BaseException) -> None:
        """End with an error the consumer raises (llama.cpp could not evaluate the batch)."""
        if self.state == DONE:
            return
        self.state = DONE
        self.pending = []
        if self.sampler is not None:
            self.sampler.free()
            self.sampler = None
        self.out.put(error)

    def on_logits(self, ctx, row: int) -> None:
        """Sample from logits row `row`, hand back the chunk, and set what to feed next (or finish)."""
        assert self.sampler is not None
        if self.prefilling:
            self.prefilling = False
            self.t_first = time.perf_counter()
        constraint = self.req.constraint
        params = self.req.params
        if self.forced:  # a forced token (logprobs asked): its logprob from the row before it
            tok = self.forced.pop(0)
            new = [tok]
            lps = [self.sampler.logprob(ctx, row, tok, params.logprobs)]
        else:
            tok, lp = self.sampler.sample(ctx, row, constraint, params.logprobs)
            if self.pieces.is_eog(tok) or tok in params.stop_tokens:
                # End of turn. An EOG token is not content; under a constraint the mask only lets
                # it through where the grammar may end.
                self.finish("stop")
                return
            new = [tok]
            lps = None if lp is None else [lp]
            if constraint is not None:
                forced = constraint.commit(tok)
                if forced:
                    self.sampler.accept(forced)
                    if lps is None:
                        new += forced  # decoded together in the next batch
                    else:
                        self.forced = list(forced)
        room = params.max_tokens - self.n_completion
        cut = len(new) > room
        if cut:  # forced tokens past max_tokens are cut: the output is unfinished, "length"
            new = new[:room]
        self.n_completion += len(new)
        text, stopped = self.stopper.feed(self.utf8.decode(b"".join(self.pieces.piece(t) for t in new)))
        if stopped:
            self.finish("stop", text, new, stop_hit=True, logprobs=lps)
        elif not cut and not self.forced and constraint is not None and constraint.is_finished():
            self.finish("stop", text, new, logprobs=lps)
        elif self.n_completion >= params.max_tokens:
            self.finish("length", text, new, logprobs=lps)
        elif self.cancelled():
            self.finish("cancelled", text, new, logprobs=lps)
        else:
            self.emitted.append(text)
            self.out.put(GenerationChunk(text, new, logprobs=lps))
            self.pending = list(new)  # the scheduler consumes pending; the chunk keeps its ids
