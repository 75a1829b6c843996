"""POST /api/v1/qwen/predict: the Qwen (DashScope) API shape, flat or nested, over the OpenAI chat handler.

The body (protocol.QwenPredictRequest) is converted to a ChatRequest and answered by
edge_qwen.serve.openai_chat.complete.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

from .openai_chat import complete
from .protocol import QwenPredictRequest


def router() -> APIRouter:
    """The /api/v1/qwen/predict route (added to the app by create_app)."""
    r = APIRouter(tags=["qwen"])

    @r.post("/api/v1/qwen/predict", summary="Qwen API chat (flat or DashScope-nested parameters)")
    async def qwen_predict(request: Request, body: QwenPredictRequest) -> Any:
        return await complete(request, body.to_chat())

    return r
