"""Per-sequence sampling: one llama.cpp sampler chain per generation, reading its own logits row.

The chain itself (temperature, top_p, the seeded draw and whatever other settings
SamplingParams carries) is built by `edge_qwen.engine.generate._sampler`, so every setting
added there applies to every sequence of the batched engine. This module applies it to one
row of a batch: the constraint masks that row in place, then llama.cpp samples from it.
When the request asks for logprobs, they are read from the raw row first (before the mask);
otherwise the row is never copied or scanned in Python.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .generate import Constraint, SamplingParams, TokenLogprob, _sampler, token_logprob


class SequenceSampler:
    """The sampler chain of one sequence (freed with `free()`; the engine thread is its only user)."""

    def __init__(self, params: SamplingParams, n_vocab: int):
        self.chain = _sampler(params)
        self.n_vocab = n_vocab

    def _row(self, ctx: Any, row: int) -> Any:
        import llama_cpp
        import numpy as np

        return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, row), shape=(self.n_vocab,))

    def sample(self, ctx: Any, row: int, constraint: Constraint | None = None,
               logprobs: int | None = None) -> tuple[int, TokenLogprob | None]:
        """Sample the next token from logits row `row` of the last llama_decode.

        The constraint masks that row in place (llama.cpp keeps the logits of the batch until
        the next decode), so the chain sees only the tokens the grammar allows. With `logprobs`
        (the number of alternatives, 0..20) the token's log-probability under the raw row comes
        back too; otherwise None.
        """
        import llama_cpp

        raw = None
        if logprobs is not None:
            raw = self._row(ctx, row)
            if constraint is not None:
                raw = raw.copy()  # the mask below changes the row in place
        if constraint is not None:
            constraint.mask_logits(self._row(ctx, row))
        # llama_sampler_sample also accepts the token into the chain (penalty history, grammar).
        tok = int(llama_cpp.llama_sampler_sample(self.chain, ctx, row))
        return tok, (None if raw is None else token_logprob(raw, tok, logprobs))

    def logprob(self, ctx: Any, row: int, token: int, top: int) -> TokenLogprob:
        """The log-probability of `token` (chosen elsewhere, e.g. forced by a constraint) under row `row`."""
        return token_logprob(self._row(ctx, row), token, top)

    def accept(self, tokens: Sequence[int]) -> None:
        """Tell the chain about tokens that were not sampled (forced by a constraint)."""
        import llama_cpp

        for t in tokens:
            llama_cpp.llama_sampler_accept(self.chain, int(t))

    def free(self) -> None:
        import llama_cpp

        if self.chain is not None:
            llama_cpp.llama_sampler_free(self.chain)
            self.chain = None
