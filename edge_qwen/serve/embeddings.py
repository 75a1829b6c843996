"""POST /v1/embeddings (and the engine behind Ollama's /api/embed): pooled, normalized embeddings.

The served GGUF is opened a second time as an embedding context (llama.cpp, mean pooling over
the last hidden states, L2-normalized), on first use, and kept. The weights are memory-mapped,
so the second context shares their pages; it costs its own KV cache and compute buffers.

A chat model's embeddings are not those of a trained embedding model: good enough for rough
similarity, clustering and deduplication of short texts in one language, weaker than a
dedicated model (bge, e5, Qwen3-Embedding) for retrieval ranking. See docs/server.md.
"""

from __future__ import annotations

import base64
import threading
from typing import Any, Literal

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field

from ..errors import RequestError
from . import runner

EMBED_CTX = 2048  # tokens per input; longer inputs are cut (truncate) or refused
_contexts: dict[str, tuple[Any, threading.Lock]] = {}
_contexts_lock = threading.Lock()


def _context(llm: Any) -> tuple[Any, threading.Lock]:
    key = str(llm.model_path)
    with _contexts_lock:
        found = _contexts.get(key)
        if found is None:
            import llama_cpp

            from ..device import guard_cpu_kernels

            guard_cpu_kernels()
            ctx = llama_cpp.Llama(model_path=key, embedding=True, n_ctx=EMBED_CTX, n_batch=EMBED_CTX,
                                  n_ubatch=EMBED_CTX, pooling_type=llama_cpp.LLAMA_POOLING_TYPE_MEAN,
                                  n_threads=getattr(llm, "n_threads", None), n_gpu_layers=getattr(llm, "n_gpu_layers", 0),
                                  verbose=False)
            found = _contexts[key] = (ctx, threading.Lock())
        return found


def embed_texts(llm: Any, texts: list[Any], truncate: bool = True) -> tuple[list[list[float]], int]:
    """Normalized mean-pooled embeddings of `texts` (strings or token-id lists) and the tokens they took.

    A text longer than EMBED_CTX tokens is cut to fit when `truncate`, else refused.
    """
    n_vocab = llm.llama.n_vocab()
    token_lists = []
    for i, t in enumerate(texts):
        ids = list(t) if isinstance(t, list) else llm.tokenize(t, special=False)
        bad = next((t for t in ids if not 0 <= t < n_vocab), None)
        if bad is not None:  # llama.cpp aborts the process on an id outside its vocabulary
            raise RequestError(f"input[{i}] has token id {bad}, not in this model's vocabulary "
                               f"(0 to {n_vocab - 1})", param="input")
        if not ids:
            raise RequestError(f"input[{i}] is empty; give non-empty text", param="input")
        if len(ids) > EMBED_CTX:
            if not truncate:
                raise RequestError(f"input[{i}] is {len(ids)} tokens, over the embedding context of {EMBED_CTX}; "
                                   "shorten it or allow truncation", param="input")
            ids = ids[:EMBED_CTX]
        token_lists.append(ids)
    import numpy as np

    ctx, lock = _context(llm)
    out = []
    with lock:
        for ids in token_lists:
            ctx.reset()
            vec = np.asarray(ctx.embed(ctx.detokenize(ids).decode("utf-8", errors="ignore") or " ",
                                       normalize=False, truncate=True), dtype=np.float64)
            if vec.ndim == 2:  # per-token rows (no pooling in this build): mean-pool them here
                vec = vec.mean(axis=0)
            norm = float(np.linalg.norm(vec))
            out.append((vec / norm if norm > 0 else vec).astype(np.float32).tolist())
    return out, sum(len(ids) for ids in token_lists)


class EmbeddingRequest(BaseModel):
    """POST /v1/embeddings (OpenAI embeddings)."""

    model_config = ConfigDict(extra="ignore", strict=True)
    model: str | None = None
    input: str | list[str] | list[int] | list[list[int]] = Field(description="Text(s) or token ids.")
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(default=None, ge=1, description="Must be the model's size when given.")


def router() -> APIRouter:
    """The /v1/embeddings route (added to the app by create_app)."""
    r = APIRouter(tags=["openai"])

    @r.post("/v1/embeddings", summary="OpenAI embeddings: mean-pooled, L2-normalized")
    async def embeddings(request: Request, body: EmbeddingRequest) -> Any:
        slot = runner.slot_for(request, body.model)
        inp = body.input
        if isinstance(inp, str):
            texts: list[Any] = [inp]
        elif inp and all(isinstance(t, int) for t in inp):
            texts = [list(inp)]
        else:
            texts = list(inp)
        if not texts:
            raise RequestError("input is empty; give a string or a list of strings", param="input")
        vectors, n = await runner.run(request, slot, lambda llm, cancel: embed_texts(llm, texts))
        if body.dimensions is not None and body.dimensions != len(vectors[0]):
            raise RequestError(f"dimensions={body.dimensions}: this model's embeddings have {len(vectors[0])} "
                               "dimensions and cannot be shortened; leave dimensions out", param="dimensions")
        import numpy as np

        data = []
        for i, v in enumerate(vectors):
            emb: Any = v if body.encoding_format == "float" else base64.b64encode(
                np.asarray(v, dtype="<f4").tobytes()).decode("ascii")
            data.append({"object": "embedding", "index": i, "embedding": emb})
        return {"object": "list", "data": data, "model": slot.name, "usage": {"prompt_tokens": n, "total_tokens": n}}

    return r
