"""POST /v1/embeddings (and the engine behind Ollama's /api/embed): pooled, normalized embeddings.

An embedding model (a GGUF with a pooling type: Qwen3-Embedding pools the last token, after the
`<|endoftext|>` its tokenizer appends) is served as it is: rag.embed.Embedder, L2-normalized.
A query for retrieval is asked for with `"input_type": "query"` (Cohere's "search_query" also
works) and optionally `"instruction": TASK`; it is then embedded as Qwen3-Embedding was trained,
`Instruct: {TASK}\nQuery:{text}` (TASK defaults to Qwen's "Given a web search query, retrieve
relevant passages that answer the query"). Documents ("document", the default) are embedded as
given.

A chat model's GGUF is opened a second time as an embedding context (llama.cpp, mean pooling over
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
    from ..engine.pooled import Reranker
    from ..rag.embed import Embedder

    if isinstance(llm, Reranker):
        raise RequestError(f"{llm.name} is a reranker: it scores documents through /v1/rerank and makes no "
                           "embeddings; serve an embedding model (e.g. Qwen3-Embedding)", param="model",
                           code="model_not_embedding")
    if isinstance(llm, Embedder):  # a real embedding model (its own pooling)
        return _embed_pooled(llm, texts)
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


def _embed_pooled(model: Any, texts: list[Any]) -> tuple[list[list[float]], int]:
    n_vocab = model.llama.n_vocab()
    token_lists = []
    for i, t in enumerate(texts):
        ids = list(t) if isinstance(t, list) else model.tokens(t)
        bad = next((t for t in ids if not 0 <= t < n_vocab), None)
        if bad is not None:  # llama.cpp aborts the process on an id outside its vocabulary
            raise RequestError(f"input[{i}] has token id {bad}, not in this model's vocabulary "
                               f"(0 to {n_vocab - 1})", param="input")
        if not ids:
            raise RequestError(f"input[{i}] is empty; give non-empty text", param="input")
        if len(ids) > model.n_ctx:  # text was cut to fit by model.tokens(); token ids are not cut
            raise RequestError(f"input[{i}] is {len(ids)} tokens, over the embedding context of {model.n_ctx}; "
                               "shorten it", param="input")
        token_lists.append(ids)
    return model.embed_tokens(token_lists), sum(len(ids) for ids in token_lists)


QUERY_TYPES = ("query", "search_query")
DOCUMENT_TYPES = ("document", "search_document", "passage")


class EmbeddingRequest(BaseModel):
    """POST /v1/embeddings (OpenAI embeddings)."""

    model_config = ConfigDict(extra="ignore", strict=True)
    model: str | None = None
    input: str | list[str] | list[int] | list[list[int]] = Field(description="Text(s) or token ids.")
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(default=None, ge=1, description="Must be the model's size when given.")
    input_type: Literal["query", "search_query", "document", "search_document", "passage"] | None = Field(
        default=None, description="\"query\": a retrieval query, embedded with Qwen3-Embedding's instruction "
                                  "(Instruct: {instruction}\\nQuery:{text}); \"document\" (or none): as given.")
    instruction: str | None = Field(default=None, min_length=1, max_length=2000,
                                    description="The task of a query (implies input_type query); default: "
                                                "Qwen's web-search task.")


def router() -> APIRouter:
    """The /v1/embeddings route (added to the app by create_app)."""
    r = APIRouter(tags=["openai"])

    @r.post("/v1/embeddings", summary="OpenAI embeddings: mean-pooled, L2-normalized")
    async def embeddings(request: Request, body: EmbeddingRequest) -> Any:
        slot = runner.slot_for(request, body.model)
        if getattr(slot, "kind", "chat") == "rerank":
            raise RequestError(f"model {slot.name!r} is a reranker: it scores documents for a query through "
                               "/v1/rerank and makes no embeddings; serve an embedding model (e.g. Qwen3-Embedding)",
                               param="model", code="model_not_embedding")
        inp = body.input
        if isinstance(inp, str):
            texts: list[Any] = [inp]
        elif inp and all(isinstance(t, int) for t in inp):
            texts = [list(inp)]
        else:
            texts = list(inp)
        if not texts:
            raise RequestError("input is empty; give a string or a list of strings", param="input")
        if body.instruction is not None or body.input_type in QUERY_TYPES:
            if body.input_type in DOCUMENT_TYPES:
                raise RequestError(f"instruction is for queries, but input_type is {body.input_type!r}; leave "
                                   "instruction out for documents, or send input_type \"query\"", param="instruction")
            from ..engine.pooled import query_text

            if any(not isinstance(t, str) for t in texts):
                raise RequestError("input_type \"query\" needs text input, not token ids (the instruction is text); "
                                   "send the query as a string", param="input_type")
            texts = [query_text(t, body.instruction) for t in texts]
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
