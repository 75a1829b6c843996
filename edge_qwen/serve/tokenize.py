"""POST /tokenize and /detokenize, in the shapes of llama-server and vLLM.

/tokenize takes `content` (llama-server) or `prompt` (vLLM) as text, or `messages` (vLLM: the
chat template is applied, as a chat request would see it); it answers `tokens`, plus `count`
and `max_model_len` as vLLM does, and with `with_pieces` each token's text as llama-server does.
/detokenize takes `tokens` and answers `content` (llama-server) and `prompt` (vLLM).
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field

from ..errors import RequestError
from . import runner

_LAX = ConfigDict(extra="ignore", strict=True)


class TokenizeRequest(BaseModel):
    model_config = _LAX
    model: str | None = None
    content: str | None = None
    prompt: str | None = None
    messages: list[dict[str, Any]] | None = None
    add_special: bool | None = Field(default=None, description="Parse special-token text such as <|im_start|>.")
    add_special_tokens: bool | None = Field(default=None, description="vLLM's name for add_special.")
    with_pieces: bool = False


class DetokenizeRequest(BaseModel):
    model_config = _LAX
    model: str | None = None
    tokens: list[int]


def router() -> APIRouter:
    """The /tokenize and /detokenize routes (added to the app by create_app)."""
    r = APIRouter(tags=["tokens"])

    @r.post("/tokenize", summary="Token ids of a text or of chat messages")
    async def tokenize(request: Request, body: TokenizeRequest) -> Any:
        llm = runner.slot_for(request, body.model).model()
        given = [k for k in ("content", "prompt", "messages") if getattr(body, k) is not None]
        if len(given) != 1:
            raise RequestError("give exactly one of content, prompt or messages", param="content")
        if body.messages is not None:
            from ..engine.tool_calls import prepare_history

            ids = llm.fit_messages(prepare_history(body.messages), None)[1]
        else:
            special = body.add_special if body.add_special is not None else bool(body.add_special_tokens)
            ids = llm.tokenize(body.content if body.content is not None else body.prompt, special=special)
        out: dict[str, Any] = {"tokens": ids, "count": len(ids), "max_model_len": llm.n_ctx}
        if body.with_pieces:
            out["tokens"] = [{"id": t, "piece": llm._pieces.piece(t).decode("utf-8", errors="replace")} for t in ids]
        return out

    @r.post("/detokenize", summary="Text of token ids")
    async def detokenize(request: Request, body: DetokenizeRequest) -> Any:
        llm = runner.slot_for(request, body.model).model()
        n = llm.llama.n_vocab()
        bad = next((t for t in body.tokens if not 0 <= t < n), None)
        if bad is not None:
            raise RequestError(f"token id {bad} is not in this model's vocabulary (0 to {n - 1})", param="tokens")
        text = llm.detokenize(body.tokens)
        return {"content": text, "prompt": text}

    return r
