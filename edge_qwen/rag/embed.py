"""Dense vectors from a local embedding GGUF (bge, nomic-embed, Qwen3-Embedding...), through llama.cpp.

Optional: retrieval works with BM25 alone. When the user has an embedding GGUF, `index add
--embed-model PATH` stores a normalized vector per chunk and `ask` fuses the cosine ranking
with BM25. The model's own pooling (from its GGUF) is used; a model without one (a plain
language model) is mean-pooled.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..errors import ModelFileError


class Embedder:
    """An embedding model loaded once; `embed(texts)` returns unit-length float vectors."""

    def __init__(self, path: str | os.PathLike, n_ctx: int = 2048, n_threads: int | None = None):
        from ..device import select_device
        from ..gguf_file import check_gguf

        p = Path(path).expanduser()
        if not p.is_file():
            raise ModelFileError(f"embedding model {p} does not exist; give the path of an embedding GGUF",
                                 param="embed_model")
        info = check_gguf(p)
        import llama_cpp

        has_pooling = f"{info.architecture}.pooling_type" in info.metadata
        plan = select_device("auto", n_threads)
        try:
            self.llama = llama_cpp.Llama(
                model_path=str(p), embedding=True, n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx,
                n_threads=plan.n_threads, n_threads_batch=plan.n_threads, n_gpu_layers=plan.n_gpu_layers,
                pooling_type=(llama_cpp.LLAMA_POOLING_TYPE_UNSPECIFIED if has_pooling
                              else llama_cpp.LLAMA_POOLING_TYPE_MEAN), verbose=False)
        except (ValueError, RuntimeError, OSError) as e:
            raise ModelFileError(f"llama.cpp could not load embedding model {p} ({e})", param="embed_model") from None
        self.path = p
        self.name = p.name
        self.n_ctx = n_ctx

    def embed(self, texts: list[str]) -> list[list[float]]:
        """One unit vector per text (texts longer than the model's window are truncated to it)."""
        import numpy as np

        out: list[list[float]] = []
        for t in texts:  # one at a time: llama-cpp-python batches by n_batch and would mix sequences' pooling
            v: Any = self.llama.embed(t, normalize=False, truncate=True)
            a = np.asarray(v, dtype=np.float32)
            if a.ndim == 2:  # per-token vectors (pooling NONE): mean-pool them
                a = a.mean(axis=0)
            norm = float(np.linalg.norm(a)) or 1.0
            out.append((a / norm).tolist())
        return out

    def close(self) -> None:
        self.llama.close()
