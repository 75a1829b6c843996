"""POST /v1/rerank (also /rerank, /reranking and /v1/reranking, as llama-server answers): a reranker
GGUF (Qwen3-Reranker) scores documents against a query.

The request and answer have the shape llama-server, Jina and Cohere use:
`{"model", "query", "documents": [str], "top_n"}` ->
`{"model", "object": "list", "usage": {"prompt_tokens", "total_tokens"}, "results": [{"index",
"relevance_score"}]}`, best first, `top_n` of them (all by default). `"return_documents": true`
adds each result's `"document": {"text"}` (Cohere's form). The scores are llama-server's: P("yes")
of the reranker's yes/no classifier (engine.pooled.Reranker); a model that is not a reranker is
refused with a 400 naming what it is.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field

from ..errors import RequestError
from . import runner

MAX_DOCUMENTS = 1000


class RerankRequest(BaseModel):
    """POST /v1/rerank."""

    model_config = ConfigDict(extra="ignore", strict=True)
    model: str | None = None
    query: str = Field(min_length=1, description="What the documents are ranked for.")
    documents: list[str] = Field(min_length=1, max_length=MAX_DOCUMENTS, description="The texts to rank.")
    top_n: int | None = Field(default=None, ge=1, description="How many results (best first); default: all.")
    return_documents: bool = Field(default=False, description="Add each result's document text.")


def router() -> APIRouter:
    """The rerank routes (added to the app by create_app)."""
    r = APIRouter(tags=["rerank"])

    async def rerank(request: Request, body: RerankRequest) -> Any:
        slot = runner.slot_for(request, body.model)
        if getattr(slot, "kind", "chat") != "rerank":
            from ..engine.pooled import describe_kind
            from ..gguf_file import check_gguf

            info = check_gguf(slot.path)
            what = "a chat model" if slot.kind == "chat" else describe_kind(info.metadata, info.architecture)
            raise RequestError(f"model {slot.name!r} is {what}, not a reranker; serve a reranker GGUF "
                               "(a Qwen3-Reranker converted with `edge-qwen convert`) and name it in \"model\"",
                               param="model", code="model_not_reranker")
        if any(not d for d in body.documents):
            i = next(i for i, d in enumerate(body.documents) if not d)
            raise RequestError(f"documents[{i}] is empty; give non-empty texts", param="documents")
        scores, n = await runner.run(request, slot, lambda model, cancel: model.score(body.query, body.documents))
        order = sorted(range(len(scores)), key=lambda i: -scores[i])[: body.top_n or len(scores)]
        results = []
        for i in order:
            item: dict[str, Any] = {"index": i, "relevance_score": scores[i]}
            if body.return_documents:
                item["document"] = {"text": body.documents[i]}
            results.append(item)
        return {"model": body.model or slot.name, "object": "list", "usage": {"prompt_tokens": n, "total_tokens": n},
                "results": results}

    for path in ("/v1/rerank", "/rerank", "/reranking", "/v1/reranking"):
        r.add_api_route(path, rerank, methods=["POST"], include_in_schema=path == "/v1/rerank",
                        summary="Rerank documents for a query (llama-server / Jina / Cohere shape)")
    return r
