"""The documents extension: POST /v1/rag/ask (answers from an index, with citations), GET /v1/rag/indexes.

Indexes are the ones `edge-qwen index add` made in the server's model store. The answer is
edge_qwen.rag.answer's: `answer`, `found` (false: "not in the documents"), `citations`
[{n, path, location}], `sources` and, with `reasoning: "step_by_step"`, `reasoning_content`.
Errors are the server's usual OpenAI-shaped bodies (404 for an unknown index, 400 for an empty
one, one of another format, or a question longer than the window).
"""

from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field

from . import runner


class RagAskRequest(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    model: str | None = None
    index: str = Field(description="An index made with `edge-qwen index add NAME PATH...`.")
    question: str = Field(min_length=1)
    k: int = Field(default=3, ge=1, le=20, description="Chunks to retrieve.")
    max_tokens: int = Field(default=256, ge=16, le=4096)
    reasoning: Literal["step_by_step"] | None = None


def router() -> APIRouter:
    """The /v1/rag routes (added to the app by create_app)."""
    r = APIRouter(tags=["documents"])

    @r.post("/v1/rag/ask", summary="Answer a question from an index of your files, citing [1], [2]")
    async def rag_ask(request: Request, body: RagAskRequest) -> Any:
        import anyio

        from ..rag.answer import ask
        from ..rag.index import DocIndex

        DocIndex.open(body.index).close()  # 404 / version error before the model is touched
        llm = runner.slot_for(request, body.model).model()

        def run() -> dict[str, Any]:
            a = ask(llm, body.question, body.index, k=body.k, max_tokens=body.max_tokens, reasoning=body.reasoning)
            out = a.to_dict()
            out["object"] = "rag.answer"
            return out

        return await anyio.to_thread.run_sync(run)

    @r.get("/v1/rag/indexes", summary="The indexes in the model store")
    async def rag_indexes() -> Any:
        from ..rag.index import list_indexes

        return {"object": "list", "data": list_indexes()}

    return r
