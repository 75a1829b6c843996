"""POST /v1/completions: OpenAI's legacy completions, prompt in and text out, and fill-in-the-middle.

No chat template: the prompt's tokens are continued as they are. With `suffix`, a Qwen2.5-Coder
model fills the middle through its own tokens, `<|fim_prefix|>PREFIX<|fim_suffix|>SUFFIX<|fim_middle|>`,
which is what editor plugins send; a model that was not trained for it is refused (Qwen2.5
models other than Coder carry the tokens in their vocabulary but never learned them).
"""

from __future__ import annotations

import copy
import json
import re
import time
import uuid
from codecs import getincrementaldecoder
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator

from ..errors import EdgeQwenError, RequestError
from ..runtime import MAX_N, MAX_TOP_LOGPROBS
from . import runner

FIM_TOKENS = ("<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>")
DEFAULT_MAX_TOKENS = 16  # OpenAI's default for completions
SUFFIX_STOP_CHARS = 6  # non-space characters the suffix's opening must have to end a middle that repeats it
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
    return fill_in(llm, prefix, suffix).tokens


def suffix_stop(suffix: str) -> str | None:
    """The opening of `suffix` that ends a middle re-emitting it: its first lines up to SUFFIX_STOP_CHARS
    non-space characters (at most 200 characters), or None when the suffix is too short to tell
    apart from code (`}`, `end`)."""
    body = suffix.strip()
    for m in re.finditer(r"\n|$", body):
        head = body[:m.start()]
        if len(re.sub(r"\s", "", head)) >= SUFFIX_STOP_CHARS:
            return head[:200]
    return None


@dataclass(frozen=True)
class FillIn:
    """Fill-in-the-middle of one prefix and suffix: the prompt and what ends and trims the middle.

    Qwen2.5-Coder often writes the middle and then the suffix again (and goes on). The suffix's
    opening (`stop`) is a stop string, and the whitespace before it that the suffix itself
    starts with (`lead`) is trimmed (FimTrim); the FIM control tokens end the middle too.
    """

    tokens: list[int]
    stop: str | None
    lead: str
    stop_tokens: tuple[int, ...]


def fill_in(llm: Any, prefix: str, suffix: str) -> FillIn:
    """The FillIn for `prefix` and `suffix` (RequestError, code fim_not_supported, if the model can't)."""
    md = getattr(llm.llama, "metadata", {}) or {}
    name = f"{md.get('general.name', '')} {md.get('general.basename', '')} {llm.model_name}"
    ids = [llm.tokenize(t, special=True) for t in FIM_TOKENS]
    problem = fim_problem(name.strip(), ids)
    if problem:
        raise RequestError(problem, param="suffix", code="fim_not_supported")
    pre, suf, mid = (i[0] for i in ids)
    # Content is text: it cannot spell a control token into the prompt.
    tokens = [pre, *llm.tokenize(prefix, special=False), suf, *llm.tokenize(suffix, special=False), mid]
    return FillIn(tokens, suffix_stop(suffix), suffix[:len(suffix) - len(suffix.lstrip())], (pre, suf, mid))


class FimTrim:
    """Streams a middle, holding back trailing whitespace until it is known not to be the suffix's own."""

    def __init__(self, fim: FillIn):
        self.fim, self.held = fim, ""

    def feed(self, text: str) -> str:
        out = self.held + text
        keep = len(out.rstrip())
        self.held = out[keep:]
        return out[:keep]

    def finish(self, stopped_by: str | None) -> str:
        """What is still held, less the suffix's leading whitespace when the suffix's opening ended the middle."""
        held, lead = self.held, self.fim.lead
        self.held = ""
        if stopped_by is not None and stopped_by == self.fim.stop and lead:
            k = next((k for k in range(min(len(held), len(lead)), 0, -1) if lead.endswith(held[-k:])), 0)
            held = held[:len(held) - k]
        return held


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
    n: int | None = Field(default=None, ge=1, le=MAX_N, description=(
        f"Choices per prompt, 1 to {MAX_N} (default 1), generated together; identical with temperature 0."))
    echo: bool | None = None
    logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS, description=(
        f"Each token's log-probability with this many (0 to {MAX_TOP_LOGPROBS}) most likely alternatives: "
        "choices[].logprobs {tokens, token_logprobs, top_logprobs, text_offset}."))
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)

    @field_validator("echo")
    @classmethod
    def _echo(cls, v: Any) -> Any:
        if v:
            raise ValueError("echo is not supported; leave it out or false")
        return v

    @field_validator("stop")
    @classmethod
    def _stop(cls, v: Any) -> Any:
        items = [v] if isinstance(v, str) else (v or [])
        if any(s == "" for s in items) or len(items) > 16:
            raise ValueError("stop must be up to 16 non-empty strings")
        return v


def _prompts(llm: Any, body: CompletionRequest) -> list[tuple[list[int], FillIn | None]]:
    p = body.prompt
    if isinstance(p, str):
        texts: list[Any] = [p]
    elif p and all(isinstance(t, int) for t in p):
        texts = [list(p)]
    else:
        texts = list(p)
    if not texts:
        raise RequestError("prompt is empty; give a string, a list of strings or token ids", param="prompt")
    if body.suffix is not None and (len(texts) != 1 or not isinstance(texts[0], str)):
        raise RequestError("suffix works with one prompt string (not token ids or a list)", param="suffix")
    out: list[tuple[list[int], FillIn | None]] = []
    for t in texts:
        if isinstance(t, list):
            if any(not 0 <= i < llm.llama.n_vocab() for i in t):
                raise RequestError("prompt token ids must be ids of this model's vocabulary", param="prompt")
            out.append((t, None))
        elif body.suffix is not None:
            fim = fill_in(llm, t, body.suffix)
            out.append((fim.tokens, fim))
        else:
            out.append((llm.tokenize(t, special=False), None))
    return out


class _Choice:
    """One choice's text as it goes out: fill-in-the-middle trimming and legacy logprobs with text offsets."""

    def __init__(self, llm: Any, fim: FillIn | None, logprobs: bool):
        self.llm, self.trim = llm, (FimTrim(fim) if fim is not None else None)
        self.logprobs = logprobs
        self.offset = 0  # characters of this choice's text so far (text_offset of the next token)
        self.utf8 = getincrementaldecoder("utf-8")(errors="replace")

    def text(self, chunk: Any) -> str:
        text = chunk.text
        if self.trim is not None:
            text = self.trim.feed(text)
            if chunk.finish_reason is not None:
                text += self.trim.finish(chunk.stop)
        return text

    def legacy(self, entries: list[Any]) -> dict[str, Any] | None:
        """OpenAI's legacy logprobs object for these tokens, or None when not asked."""
        if not self.logprobs:
            return None
        rows = self.llm.openai_logprobs(entries)
        offsets = []
        for e in entries:
            offsets.append(self.offset)
            self.offset += len(self.utf8.decode(self.llm._pieces.piece(e.token)))
        return {"tokens": [r["token"] for r in rows], "token_logprobs": [r["logprob"] for r in rows],
                "top_logprobs": [{t["token"]: t["logprob"] for t in r["top_logprobs"]} for r in rows],
                "text_offset": offsets}


def _merge_legacy(parts: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for part in parts:
        for key in out:
            out[key] += part[key]
    return out


def router() -> APIRouter:
    """The /v1/completions route (added to the app by create_app)."""
    r = APIRouter(tags=["openai"])

    @r.post("/v1/completions", summary="OpenAI completions: raw prompt continuation, suffix for fill-in-the-middle")
    async def completions(request: Request, body: CompletionRequest) -> Any:
        from ..engine.generate import fan_out

        slot = runner.slot_for(request, body.model)
        llm = slot.model()
        prompts = _prompts(llm, body)
        n = body.n or 1
        limit = runner.options(request).get("max_tokens_limit")
        max_tokens = body.max_tokens or DEFAULT_MAX_TOKENS
        if limit is not None:
            max_tokens = min(max_tokens, limit)
        stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        temperature = 1.0 if body.temperature is None else body.temperature
        kwargs: dict[str, Any] = {
            "temperature": temperature,
            "top_p": 1.0 if body.top_p is None else body.top_p, "max_tokens": max_tokens,
            "frequency_penalty": body.frequency_penalty or 0.0,
            "presence_penalty": body.presence_penalty or 0.0, "logprobs": body.logprobs,
            "reuse_prefix": runner.options(request).get("prompt_cache", True) and body.seed is None}
        for tokens, _ in prompts:  # fits before anything runs: a clear 400 rather than a failed stream
            if len(tokens) + max_tokens > llm.n_ctx:
                from ..errors import ContextOverflowError

                raise ContextOverflowError(
                    f"the prompt is {len(tokens)} tokens and max_tokens is {max_tokens}: more than this server's "
                    f"context window of {llm.n_ctx} tokens; shorten the prompt or lower max_tokens",
                    param="max_tokens")
        cid, created = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        # A greedy request has one answer per prompt: generated once, given n times.
        runs = 1 if temperature == 0 else n

        def envelope(choices: list[dict[str, Any]], usage: dict[str, int] | None = None) -> dict[str, Any]:
            out: dict[str, Any] = {"id": cid, "object": "text_completion", "created": created, "model": slot.name,
                                   "choices": choices}
            if usage is not None:
                out["usage"] = usage
            return out

        def work(model: Any, cancel: Any):
            used = [0, 0]
            for p, (tokens, fim) in enumerate(prompts):
                extra = {"stop": stops + ([fim.stop] if fim is not None and fim.stop else []) or None,
                         "stop_tokens": fim.stop_tokens if fim is not None else ()}

                def start(j: int, cancel_j: Any, prefilled: Any, tokens: list[int] = tokens, extra: dict = extra):
                    seed = None if body.seed is None else (body.seed + j) & 0xFFFFFFFF
                    kw = kwargs if j == 0 else {**kwargs, "reuse_prefix": True}  # the prompt's KV from choice 0
                    return model.generate_tokens(tokens, cancel=cancel_j, seed=seed, prefilled=prefilled,
                                                 **kw, **extra)

                choices = [_Choice(model, fim, body.logprobs is not None) for _ in range(runs)]
                prompt_counted = False
                for j, c in fan_out(runs, start, cancel):
                    if c.timings is not None:
                        if not prompt_counted:
                            used[0] += c.timings.prompt_tokens
                            prompt_counted = True
                        used[1] += c.timings.completion_tokens * (n if runs == 1 else 1)
                    text = choices[j].text(c)
                    if text or c.finish_reason or c.logprobs:
                        finish = None if c.finish_reason is None else (
                            "stop" if c.finish_reason == "cancelled" else c.finish_reason)
                        lp = choices[j].legacy(c.logprobs or [])
                        for k in (range(n) if runs == 1 else (j,)):
                            yield p * n + k, text, finish, copy.deepcopy(lp) if k else lp
            yield None, used, None, None

        def usage(used: list[int]) -> dict[str, int]:
            return {"prompt_tokens": used[0], "completion_tokens": used[1], "total_tokens": used[0] + used[1]}

        total = len(prompts) * n
        if not body.stream:
            items = await runner.run(request, slot, lambda m, cancel: list(work(m, cancel)))
            texts = ["" for _ in range(total)]
            finishes: list[str | None] = [None for _ in range(total)]
            lps: list[list[dict[str, Any]]] = [[] for _ in range(total)]
            for i, text, finish, lp in items[:-1]:
                texts[i] += text
                finishes[i] = finish or finishes[i]
                if lp is not None:
                    lps[i].append(lp)
            choices = [{"text": t, "index": i, "logprobs": _merge_legacy(lps[i]) if body.logprobs is not None else None,
                        "finish_reason": finishes[i] or "stop"} for i, t in enumerate(texts)]
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
                i, payload, finish, lp = item
                if i is None:
                    yield _sse(envelope([], usage(payload)))
                    continue
                yield _sse(envelope([{"text": payload, "index": i, "logprobs": lp, "finish_reason": finish}]))
            yield b"data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    return r


def _sse(obj: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False).encode("utf-8") + b"\n\n"
