"""POST /v1/completions: OpenAI's legacy completions, prompt in and text out, and fill-in-the-middle.

No chat template: the prompt's tokens are continued as they are. With `suffix`, a Qwen2.5-Coder
model fills the middle through its own tokens, `<|fim_prefix|>PREFIX<|fim_suffix|>SUFFIX<|fim_middle|>`,
which is what editor plugins send; a model that was not trained for it is refused (Qwen2.5
models other than Coder carry the tokens in their vocabulary but never learned them).
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator

from ..errors import EdgeQwenError, RequestError
from . import runner

FIM_TOKENS = ("<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>")
DEFAULT_MAX_TOKENS = 16  # OpenAI's default for completions
_STRICT = ConfigDict(extra="ignore", strict=True, allow_inf_nan=False)


def fim_problem(model_name: str, token_ids: list[list[int]]) -> str | None:
    """Why a model cannot fill in the middle (None when it can): `token_ids` are the FIM tokens' ids."""
    if any(len(ids) != 1 for ids in token_ids):
        return (f"model {model_name!r} has no fill-in-the-middle tokens ({', '.join(FIM_TOKENS)}); suffix needs a "
                "Qwen2.5-Coder model")
    if "coder" not in model_name.lower():
        return (f"model {model_name!r} is not a Qwen2.5-Coder model: only Coder models are trained for "
                "fill-in-the-middle; leave suffix out or serve a Coder model")
    return None


def fim_tokens(llm: Any, prefix: str, suffix: str) -> list[int]:
    """The prompt token ids for filling in between `prefix` and `suffix` (RequestError if the model can't)."""
    md = getattr(llm.llama, "metadata", {}) or {}
    name = f"{md.get('general.name', '')} {md.get('general.basename', '')} {llm.model_name}"
    ids = [llm.tokenize(t, special=True) for t in FIM_TOKENS]
    problem = fim_problem(name.strip(), ids)
    if problem:
        raise RequestError(problem, param="suffix", code="fim_not_supported")
    pre, suf, mid = (i[0] for i in ids)
    # Content is text: it cannot spell a control token into the prompt.
    return [pre, *llm.tokenize(prefix, special=False), suf, *llm.tokenize(suffix, special=False), mid]


class CompletionRequest(BaseModel):
    """POST /v1/completions (OpenAI legacy completions)."""

    model_config = _STRICT
    model: str | None = None
    prompt: str | list[str] | list[int] = Field(description="Text, a list of texts (one choice each) or token ids.")
    suffix: str | None = Field(default=None, description="Text after the insertion point: fill-in-the-middle "
                                                         "(Qwen2.5-Coder models).")
    max_tokens: int | None = Field(default=None, ge=1, description=f"Default {DEFAULT_MAX_TOKENS}, as OpenAI's.")
    temperature: float | None = Field(default=None, ge=0.0, le=2.0, description="Default 1.")
    top_p: float | None = Field(default=None, gt=0.0, le=1.0, description="Default 1.")
    stream: bool | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=0, le=2**32 - 1)
    n: int | None = Field(default=None, ge=1, le=1, description="One choice per prompt.")
    echo: bool | None = None
    logprobs: int | None = Field(default=None, description="Not served: leave it out or null.")
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)

    @field_validator("echo")
    @classmethod
    def _echo(cls, v: Any) -> Any:
        if v:
            raise ValueError("echo is not supported; leave it out or false")
        return v

    @field_validator("logprobs")
    @classmethod
    def _logprobs(cls, v: Any) -> Any:
        if v:
            raise ValueError("logprobs are not served on /v1/completions yet; leave logprobs out")
        return v

    @field_validator("stop")
    @classmethod
    def _stop(cls, v: Any) -> Any:
        items = [v] if isinstance(v, str) else (v or [])
        if any(s == "" for s in items) or len(items) > 16:
            raise ValueError("stop must be up to 16 non-empty strings")
        return v


def _prompts(llm: Any, body: CompletionRequest) -> list[list[int]]:
    p = body.prompt
    if isinstance(p, str):
        texts: list[Any] = [p]
    elif p and all(isinstance(t, int) for t in p):
        texts = [list(p)]
    else:
        texts = list(p)
    if not texts:
        raise RequestError("prompt is empty; give a string, a list of strings or token ids", param="prompt")
    if body.suffix is not None and len(texts) != 1:
        raise RequestError("suffix works with one prompt string", param="suffix")
    out = []
    for t in texts:
        if isinstance(t, list):
            if any(not 0 <= i < llm.llama.n_vocab() for i in t):
                raise RequestError("prompt token ids must be ids of this model's vocabulary", param="prompt")
            out.append(t)
        elif body.suffix is not None:
            out.append(fim_tokens(llm, t, body.suffix))
        else:
            out.append(llm.tokenize(t, special=False))
    return out


def router() -> APIRouter:
    """The /v1/completions route (added to the app by create_app)."""
    r = APIRouter(tags=["openai"])

    @r.post("/v1/completions", summary="OpenAI completions: raw prompt continuation, suffix for fill-in-the-middle")
    async def completions(request: Request, body: CompletionRequest) -> Any:
        slot = runner.slot_for(request, body.model)
        llm = slot.model()
        prompts = _prompts(llm, body)
        limit = runner.options(request).get("max_tokens_limit")
        max_tokens = body.max_tokens or DEFAULT_MAX_TOKENS
        if limit is not None:
            max_tokens = min(max_tokens, limit)
        kwargs: dict[str, Any] = {
            "temperature": 1.0 if body.temperature is None else body.temperature,
            "top_p": 1.0 if body.top_p is None else body.top_p, "max_tokens": max_tokens, "stop": body.stop,
            "seed": body.seed, "frequency_penalty": body.frequency_penalty or 0.0,
            "presence_penalty": body.presence_penalty or 0.0,
            "reuse_prefix": runner.options(request).get("prompt_cache", True) and body.seed is None}
        for tokens in prompts:  # fits before anything runs: a clear 400 rather than a failed stream
            if len(tokens) + max_tokens > llm.n_ctx:
                from ..errors import ContextOverflowError

                raise ContextOverflowError(
                    f"the prompt is {len(tokens)} tokens and max_tokens is {max_tokens}: more than this server's "
                    f"context window of {llm.n_ctx} tokens; shorten the prompt or lower max_tokens",
                    param="max_tokens")
        cid, created = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())

        def envelope(choices: list[dict[str, Any]], usage: dict[str, int] | None = None) -> dict[str, Any]:
            out: dict[str, Any] = {"id": cid, "object": "text_completion", "created": created, "model": slot.name,
                                   "choices": choices}
            if usage is not None:
                out["usage"] = usage
            return out

        def work(model: Any, cancel: Any):
            used = [0, 0]
            for i, tokens in enumerate(prompts):
                for c in model.generate_tokens(tokens, cancel=cancel, **kwargs):
                    if c.timings is not None:
                        used[0] += c.timings.prompt_tokens
                        used[1] += c.timings.completion_tokens
                    if c.text or c.finish_reason:
                        finish = None if c.finish_reason is None else (
                            "stop" if c.finish_reason == "cancelled" else c.finish_reason)
                        yield i, c.text, finish
            yield None, used, None

        def usage(used: list[int]) -> dict[str, int]:
            return {"prompt_tokens": used[0], "completion_tokens": used[1], "total_tokens": used[0] + used[1]}

        if not body.stream:
            items = await runner.run(request, slot, lambda m, cancel: list(work(m, cancel)))
            texts = ["" for _ in prompts]
            finishes: list[str | None] = [None for _ in prompts]
            for i, text, finish in items[:-1]:
                texts[i] += text
                finishes[i] = finish or finishes[i]
            choices = [{"text": t, "index": i, "logprobs": None, "finish_reason": finishes[i] or "stop"}
                       for i, t in enumerate(texts)]
            return JSONResponse(envelope(choices, usage(items[-1][1])))

        items = await runner.stream(request, slot, work)

        async def events():
            async for item in items:
                if isinstance(item, Exception):
                    body = ({"error": {"message": item.message, "type": item.type, "param": item.param,
                                       "code": item.code}} if isinstance(item, EdgeQwenError) else
                            {"error": {"message": f"internal server error ({type(item).__name__})",
                                       "type": "server_error", "param": None, "code": "internal_error"}})
                    yield _sse(body)
                    break
                i, payload, finish = item
                if i is None:
                    yield _sse(envelope([], usage(payload)))
                    continue
                yield _sse(envelope([{"text": payload, "index": i, "logprobs": None, "finish_reason": finish}]))
            yield b"data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    return r


def _sse(obj: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False).encode("utf-8") + b"\n\n"
