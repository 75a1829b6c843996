"""Pooled models: GGUFs that llama.cpp runs to a vector, not to next-token logits.

A GGUF with `{arch}.pooling_type` is an embedding model (mean, cls or last-token pooling:
Qwen3-Embedding pools the last token) or, with pooling RANK, a reranker (Qwen3-Reranker: the
yes/no classifier on the last token, softmaxed, so the score is P("yes")). Neither chats: an
EdgeQwen refuses them (`refuse_chat`), and the server routes them to /v1/embeddings and
/v1/rerank. `Reranker` scores documents exactly as llama-server `--rerank` does: the GGUF's
"rerank" chat template with {query} and {document} replaced, tokenized with special tokens
parsed and nothing added, and the first classifier output of the last token.

Qwen3-Embedding embeds a query with an instruction and a document as it is
(`query_text`): "Instruct: {task}\\nQuery:{query}".
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

from ..errors import ModelFileError, RequestError

# llama.cpp's LLAMA_POOLING_TYPE values
POOLING_NAMES = {0: "none", 1: "mean", 2: "cls", 3: "last", 4: "rank"}
RANK = 4
# Qwen's documented default task for retrieval queries (Qwen3-Embedding model card)
DEFAULT_TASK = "Given a web search query, retrieve relevant passages that answer the query"


def query_text(query: str, task: str | None = None) -> str:
    """A retrieval query in the form Qwen3-Embedding was trained on: `Instruct: {task}\\nQuery:{query}`."""
    return f"Instruct: {task or DEFAULT_TASK}\nQuery:{query}"


def pooling_type(metadata: dict[str, Any], architecture: str | None) -> int | None:
    """The pooling a GGUF declares (`{arch}.pooling_type`), or None for a generating model."""
    value = metadata.get(f"{architecture}.pooling_type")
    return int(value) if isinstance(value, int) and value > 0 else None


def model_kind(metadata: dict[str, Any], architecture: str | None) -> str:
    """"chat", "embedding" or "rerank", from a GGUF's metadata."""
    pooling = pooling_type(metadata, architecture)
    if pooling is None:
        return "chat"
    return "rerank" if pooling == RANK else "embedding"


def describe_kind(metadata: dict[str, Any], architecture: str | None) -> str:
    """A phrase naming what a pooled model is, for messages."""
    pooling = pooling_type(metadata, architecture)
    if pooling == RANK:
        return "a reranker (pooling: rank, like Qwen3-Reranker)"
    return f"an embedding model (pooling: {POOLING_NAMES.get(pooling, pooling)}, like Qwen3-Embedding)"


def refuse_chat(path: Path, metadata: dict[str, Any], architecture: str | None) -> None:
    """Raise a RequestError (400) when the GGUF is a pooled model: it cannot chat or complete text."""
    kind = model_kind(metadata, architecture)
    if kind == "chat":
        return
    what = describe_kind(metadata, architecture)
    use = ("score documents with it through /v1/rerank or `edge-qwen ask --rerank-model`" if kind == "rerank"
           else "embed with it through /v1/embeddings or `edge-qwen index add --embed-model`")
    raise RequestError(f"{Path(path).name} is {what}, not a chat model: it cannot chat or complete text; {use}, "
                       "and chat with a chat model (e.g. the default: `edge-qwen chat`)", param="model",
                       code="model_not_chat")


def load_pooled(path: Path, n_ctx: int, n_threads: int | None, what: str) -> Any:
    """A llama.cpp context that pools as the GGUF says (one sequence at a time, one ubatch)."""
    import llama_cpp

    from ..device import guard_cpu_kernels, select_device

    guard_cpu_kernels()
    plan = select_device("auto", n_threads)
    try:
        return llama_cpp.Llama(model_path=str(path), embedding=True, n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx,
                               n_threads=plan.n_threads, n_threads_batch=plan.n_threads,
                               n_gpu_layers=plan.n_gpu_layers, pooling_type=llama_cpp.LLAMA_POOLING_TYPE_UNSPECIFIED,
                               flash_attn=True,  # as llama-server's "auto" on CPU and GPU: the same numbers
                               verbose=False)
    except (ValueError, RuntimeError, OSError) as e:
        raise ModelFileError(f"llama.cpp could not load {what} {path} ({e})", param="model") from None


def pooled_output(llama: Any, tokens: list[int], n_out: int) -> list[float]:
    """Decode `tokens` as one fresh sequence and read its pooled output (`n_out` floats)."""
    import llama_cpp

    llama._batch.reset()
    llama._ctx.kv_cache_clear()
    llama._batch.add_sequence(tokens, 0, True)  # every token an output, as llama.cpp wants in embedding mode
    llama._ctx.decode(llama._batch)
    llama._batch.reset()
    ptr = llama_cpp.llama_get_embeddings_seq(llama._ctx.ctx, 0)
    if not ptr:
        raise RuntimeError("llama.cpp returned no pooled output")
    out = [float(x) for x in ptr[:n_out]]
    llama._ctx.kv_cache_clear()
    return out


class Reranker:
    """A reranker GGUF (pooling RANK) loaded once; `score(query, documents)` as llama-server --rerank scores."""

    def __init__(self, path: str | os.PathLike, n_ctx: int = 2048, n_threads: int | None = None):
        from ..gguf_file import check_gguf

        p = Path(path).expanduser()
        if not p.is_file():
            raise ModelFileError(f"reranker {p} does not exist; give the path of a reranker GGUF "
                                 "(a Qwen3-Reranker converted with `edge-qwen convert`)", param="rerank_model")
        info = check_gguf(p)
        if pooling_type(info.metadata, info.architecture) != RANK:
            chat = model_kind(info.metadata, info.architecture) == "chat"
            what = "a chat model" if chat else describe_kind(info.metadata, info.architecture)
            raise ModelFileError(f"{p.name} is {what}, not a reranker (its GGUF has no pooling type rank); "
                                 "give a Qwen3-Reranker GGUF", param="rerank_model")
        self.template = info.metadata.get("tokenizer.chat_template.rerank")
        self.path, self.name, self.n_ctx = p, p.name, n_ctx
        self.llama = load_pooled(p, n_ctx, n_threads, "reranker")
        import llama_cpp

        self.n_out = max(1, int(llama_cpp.llama_model_n_cls_out(self.llama.model)))
        self.lock = threading.Lock()

    def prompt_tokens(self, query: str, document: str) -> list[int]:
        """The tokens llama-server evaluates for one (query, document) pair."""
        llama = self.llama
        if self.template:
            text = self.template.replace("{query}", query).replace("{document}", document)
            return llama.tokenize(text.encode("utf-8"), add_bos=False, special=True)
        # no template (BERT-style rerankers): [BOS] query [EOS] [SEP] document [EOS], as llama-server
        import llama_cpp

        vocab = llama_cpp.llama_model_get_vocab(llama.model)
        eos = llama_cpp.llama_vocab_eos(vocab)
        if eos == -1:
            eos = llama_cpp.llama_vocab_sep(vocab)
        out: list[int] = []
        if llama_cpp.llama_vocab_get_add_bos(vocab):
            out.append(llama_cpp.llama_vocab_bos(vocab))
        out += llama.tokenize(query.encode("utf-8"), add_bos=False, special=False)
        if llama_cpp.llama_vocab_get_add_eos(vocab):
            out.append(eos)
        if llama_cpp.llama_vocab_get_add_sep(vocab):
            out.append(llama_cpp.llama_vocab_sep(vocab))
        out += llama.tokenize(document.encode("utf-8"), add_bos=False, special=False)
        if llama_cpp.llama_vocab_get_add_eos(vocab):
            out.append(eos)
        return out

    def score(self, query: str, documents: list[str]) -> tuple[list[float], int]:
        """(relevance of each document to `query`, in order; the tokens evaluated)."""
        prompts = []
        for i, doc in enumerate(documents):
            tokens = self.prompt_tokens(query, doc)
            if len(tokens) > self.n_ctx:
                raise RequestError(f"documents[{i}] with the query is {len(tokens)} tokens, over the reranker's "
                                   f"context of {self.n_ctx}; shorten it (or split it into passages)",
                                   param="documents")
            prompts.append(tokens)
        with self.lock:
            scores = [pooled_output(self.llama, t, self.n_out)[0] for t in prompts]
        return scores, sum(len(t) for t in prompts)

    def rank(self, query: str, documents: list[str], top_n: int | None = None) -> list[tuple[int, float]]:
        """(index, score) of the documents, best first, at most `top_n`."""
        scores, _ = self.score(query, documents)
        order = sorted(range(len(scores)), key=lambda i: -scores[i])
        return [(i, scores[i]) for i in order[: top_n if top_n is not None else len(order)]]

    def close(self) -> None:
        self.llama.close()
