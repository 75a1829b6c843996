"""Dense vectors from a local embedding GGUF (bge, nomic-embed, Qwen3-Embedding...), through llama.cpp.

Optional: retrieval works with BM25 alone. When the user has an embedding GGUF, `index add
--embed-model PATH` stores a normalized vector per chunk and `ask` fuses the cosine ranking
with BM25. The model's own pooling (from its GGUF) is used; a model without one (a plain
language model) is mean-pooled. Queries to Qwen3-Embedding carry Qwen's instruction prefix.
"""

from __future__ import annotations

import os
from pathlib import Path
from ..errors import ModelFileError


class Embedder:
    """An embedding model loaded once; `embed(texts)` returns unit-length float vectors.

    Texts are tokenized as llama.cpp does for embeddings (special tokens as text, the model's
    BOS/EOS added: Qwen3-Embedding appends `<|endoftext|>` and pools it); a text longer than
    the window keeps its first tokens and that final token. `embed_query` adds the instruction
    Qwen3-Embedding expects on queries (engine.pooled.query_text).
    """

    def __init__(self, path: str | os.PathLike, n_ctx: int = 2048, n_threads: int | None = None):
        from ..engine.pooled import RANK, load_pooled, pooling_type
        from ..gguf_file import check_gguf

        p = Path(path).expanduser()
        if not p.is_file():
            raise ModelFileError(f"embedding model {p} does not exist; give the path of an embedding GGUF",
                                 param="embed_model")
        info = check_gguf(p)
        pooling = pooling_type(info.metadata, info.architecture)
        if pooling == RANK:
            raise ModelFileError(f"{p.name} is a reranker, not an embedding model; give it as --rerank-model "
                                 "and an embedding GGUF (e.g. Qwen3-Embedding) as --embed-model", param="embed_model")
        self.pooled = pooling is not None  # a real embedding model; else a chat model, mean-pooled
        if self.pooled:
            self.llama = load_pooled(p, n_ctx, n_threads, "embedding model")
        else:
            import llama_cpp

            from ..device import guard_cpu_kernels, select_device

            guard_cpu_kernels()
            plan = select_device("auto", n_threads)
            try:
                self.llama = llama_cpp.Llama(
                    model_path=str(p), embedding=True, n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx,
                    n_threads=plan.n_threads, n_threads_batch=plan.n_threads, n_gpu_layers=plan.n_gpu_layers,
                    pooling_type=llama_cpp.LLAMA_POOLING_TYPE_MEAN, verbose=False)
            except (ValueError, RuntimeError, OSError) as e:
                raise ModelFileError(f"llama.cpp could not load embedding model {p} ({e})",
                                     param="embed_model") from None
        # Qwen3-Embedding (qwen3, last-token pooling) is trained with instructions on queries
        self.query_instruction = info.architecture == "qwen3" and pooling == 3
        self.path = p
        self.name = p.name
        self.n_ctx = n_ctx
        self.dim = int(self.llama.n_embd())
        import threading

        self.lock = threading.Lock()  # one context: the server's requests take turns

    def tokens(self, text: str) -> list[int]:
        """The tokens `text` is embedded from (cut to the window, keeping an appended EOS)."""
        ids = self.llama.tokenize(text.encode("utf-8"), add_bos=True, special=False)
        if len(ids) > self.n_ctx:
            import llama_cpp

            vocab = llama_cpp.llama_model_get_vocab(self.llama.model)
            keep_last = llama_cpp.llama_vocab_get_add_eos(vocab) and ids[-1] == llama_cpp.llama_vocab_eos(vocab)
            ids = ids[: self.n_ctx - 1] + ids[-1:] if keep_last else ids[: self.n_ctx]
        return ids

    def embed_tokens(self, token_lists: list[list[int]]) -> list[list[float]]:
        """One unit vector per token list."""
        import numpy as np

        from ..engine.pooled import pooled_output

        out: list[list[float]] = []
        for ids in token_lists:  # one sequence at a time: each pools alone
            with self.lock:
                a = np.asarray(pooled_output(self.llama, ids, self.dim), dtype=np.float64)
            norm = float(np.linalg.norm(a)) or 1.0
            out.append((a / norm).astype(np.float32).tolist())
        return out

    def embed(self, texts: list[str]) -> list[list[float]]:
        """One unit vector per text (texts longer than the model's window are truncated to it)."""
        return self.embed_tokens([self.tokens(t) for t in texts])

    def embed_query(self, query: str, task: str | None = None) -> list[float]:
        """A search query's vector: with Qwen3-Embedding's instruction when the model is one."""
        from ..engine.pooled import query_text

        return self.embed([query_text(query, task) if self.query_instruction or task else query])[0]

    def close(self) -> None:
        self.llama.close()
