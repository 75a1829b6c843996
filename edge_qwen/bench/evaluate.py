"""The lockstep evaluator: a reference model and a quantized model fed the same chunks.

Both models run as llama.cpp contexts side by side. Each chunk of the evaluation corpus is
decoded by both, the logits of the scored positions are compared at once (NLL, KL
divergence, same top token) and thrown away, so KL against the reference never needs the
multi-gigabyte logits file that llama.cpp's `--kl-divergence-base` writes.

Scoring follows llama.cpp's perplexity tool: in each chunk of `n_ctx` tokens only the
second half is scored, so every scored token sees at least n_ctx/2 tokens of context.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from ..errors import EdgeQwenError, ModelFileError

# Rows of (rows, 151936) float64 per metric call: bounds temporary memory to ~100 MB.
_ROW_BLOCK = 32


def default_corpus() -> str:
    """The evaluation corpus shipped with edge-qwen (English, Chinese and code, written for it)."""
    return resources.files("edge_qwen").joinpath("data/eval_corpus.txt").read_text(encoding="utf-8")


def default_threads() -> int:
    """Threads for llama.cpp: the physical-ish core count, at least 1."""
    return max(1, min(os.cpu_count() or 1, 8))


class LogitsModel:
    """One GGUF loaded into a llama.cpp context that returns logits for chosen positions.

    A thin layer over the C API: the high-level `Llama.eval` asks for logits of either
    every position or the last one, while lockstep evaluation wants exactly the scored half
    of each chunk.
    """

    def __init__(self, path: str | os.PathLike, n_ctx: int = 512, n_threads: int | None = None):
        from llama_cpp import Llama

        from ..device import guard_cpu_kernels
        from ..gguf_file import check_gguf

        check_gguf(path)
        guard_cpu_kernels()
        self.path = Path(path)
        self.n_ctx = n_ctx
        try:
            self.llm = Llama(str(path), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx,
                             n_threads=n_threads or default_threads(),
                             n_threads_batch=n_threads or default_threads(),
                             verbose=False, seed=0)
        except ValueError as e:
            raise ModelFileError(f"llama.cpp could not load {path}: {e}") from None
        import llama_cpp

        self._lc = llama_cpp
        self.n_vocab = self.llm.n_vocab()
        self._batch = llama_cpp.llama_batch_init(n_ctx, 0, 1)

    def tokenize(self, text: str) -> list[int]:
        """Token ids of plain text (no BOS, special-token syntax not parsed)."""
        return self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)

    def logits(self, tokens: Sequence[int], first: int) -> Any:
        """Decode `tokens` from an empty cache; return float32 logits of positions first..end-1."""
        import numpy as np

        lc = self._lc
        n = len(tokens)
        if not 0 <= first < n <= self.n_ctx:
            raise ValueError(f"chunk of {n} tokens (first scored {first}) does not fit n_ctx={self.n_ctx}")
        lc.llama_memory_clear(lc.llama_get_memory(self.llm.ctx), True)
        b = self._batch
        b.n_tokens = n
        for i, t in enumerate(tokens):
            b.token[i] = t
            b.pos[i] = i
            b.n_seq_id[i] = 1
            b.seq_id[i][0] = 0
            b.logits[i] = 1 if i >= first else 0
        rc = lc.llama_decode(self.llm.ctx, b)
        if rc != 0:
            raise EdgeQwenError(f"llama.cpp failed to decode a chunk of {self.path} (code {rc})")
        ptr = lc.llama_get_logits(self.llm.ctx)
        return np.ctypeslib.as_array(ptr, shape=(n - first, self.n_vocab)).copy()

    def close(self) -> None:
        """Free the batch and the llama.cpp context."""
        if self._batch is not None:
            self._lc.llama_batch_free(self._batch)
            self._batch = None
        self.llm.close()

    def __enter__(self) -> "LogitsModel":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def chunk_tokens(tokens: Sequence[int], n_ctx: int, n_chunks: int | None = None) -> list[list[int]]:
    """Cut `tokens` into chunks of n_ctx; with `n_chunks`, pick that many spread evenly.

    Spreading (rather than taking the first chunks) keeps a small sample representative of
    a corpus whose English, Chinese and code sections follow one another.
    """
    total = len(tokens) // n_ctx
    if total == 0:
        raise EdgeQwenError(f"the evaluation text has {len(tokens)} tokens, fewer than one chunk of {n_ctx}; "
                            "give a longer corpus or a smaller n_ctx")
    if n_chunks is None or n_chunks >= total:
        picks = list(range(total))
    else:
        if n_chunks < 1:
            raise EdgeQwenError(f"n_chunks must be at least 1, got {n_chunks}")
        picks = sorted({round(i * (total - 1) / max(n_chunks - 1, 1)) for i in range(n_chunks)})
    return [list(tokens[i * n_ctx:(i + 1) * n_ctx]) for i in picks]


@dataclass
class ChunkResult:
    """Per-position measurements of one chunk (NLLs in nats)."""

    index: int
    nll_ref: Any
    nll_test: Any
    kl: Any
    top_agree: Any


def compare_logits(ref: Any, test: Any, targets: Sequence[int]) -> tuple[Any, Any, Any, Any]:
    """(nll_ref, nll_test, kl, top_agree) for aligned logit rows, in blocks to bound memory."""
    import numpy as np

    from . import metrics

    t = np.asarray(targets, dtype=np.int64)
    parts: list[list[Any]] = [[], [], [], []]
    for s in range(0, ref.shape[0], _ROW_BLOCK):
        r, q, tt = ref[s:s + _ROW_BLOCK], test[s:s + _ROW_BLOCK], t[s:s + _ROW_BLOCK]
        parts[0].append(metrics.token_nll(r, tt))
        parts[1].append(metrics.token_nll(q, tt))
        parts[2].append(metrics.kl_divergence(r, q))
        parts[3].append(metrics.top_token_agreement(r, q))
    return tuple(np.concatenate(p) for p in parts)  # type: ignore[return-value]


def lockstep(ref_path: str | os.PathLike, test_path: str | os.PathLike, text: str | None = None,
             n_ctx: int = 512, n_chunks: int | None = None, n_threads: int | None = None,
             ) -> Iterator[ChunkResult]:
    """Yield one ChunkResult per chunk, the reference and test models decoding in lockstep.

    `text` defaults to the shipped evaluation corpus; it is tokenized with the reference
    model's vocabulary, which the quantized model shares.
    """
    text = default_corpus() if text is None else text
    first = n_ctx // 2
    with LogitsModel(ref_path, n_ctx, n_threads) as ref, LogitsModel(test_path, n_ctx, n_threads) as test:
        if ref.n_vocab != test.n_vocab:
            raise ModelFileError(f"{test_path} has a vocabulary of {test.n_vocab} tokens but the reference "
                                 f"{ref_path} has {ref.n_vocab}; compare quantizations of the same model")
        for i, chunk in enumerate(chunk_tokens(ref.tokenize(text), n_ctx, n_chunks)):
            # logits at position j predict token j+1: score positions first..n-2
            lr = ref.logits(chunk, first)[:-1]
            lq = test.logits(chunk, first)[:-1]
            nr, nq, kl, agree = compare_logits(lr, lq, chunk[first + 1:])
            yield ChunkResult(i, nr, nq, kl, agree)


def summarize(chunks: Sequence[ChunkResult]) -> dict[str, Any]:
    """Perplexities, KL statistics and same-top-token rate over all scored positions."""
    import numpy as np

    from . import metrics

    if not chunks:
        raise EdgeQwenError("no chunks were evaluated")
    cat = lambda name: np.concatenate([getattr(c, name) for c in chunks])  # noqa: E731
    kl = metrics.summary_stats(cat("kl"))
    return {
        "ppl": metrics.perplexity_from_nll(cat("nll_test")),
        "ppl_ref": metrics.perplexity_from_nll(cat("nll_ref")),
        "kl_mean": kl["mean"], "kl_median": kl["median"], "kl_p99": kl["p99"], "kl_max": kl["max"],
        "same_top": float(np.mean(cat("top_agree"))),
        "n_chunks": len(chunks),
        "n_scored": int(cat("kl").size),
    }


def evaluate(ref_path: str | os.PathLike, test_path: str | os.PathLike, text: str | None = None,
             n_ctx: int = 512, n_chunks: int | None = None, n_threads: int | None = None,
             on_chunk: Any = None) -> dict[str, Any]:
    """Run `lockstep` to the end and summarize; `on_chunk(result)` is called as chunks finish."""
    results = []
    for r in lockstep(ref_path, test_path, text, n_ctx, n_chunks, n_threads):
        results.append(r)
        if on_chunk is not None:
            on_chunk(r)
    return summarize(results)
