"""POST /api/v1/qwen/predict: the Qwen (DashScope) API shape, flat or nested, over the OpenAI chat handler.

The body (protocol.QwenPredictRequest) is converted to a ChatRequest and answered by
edge_qwen.serve.openai_chat.complete. Without `result_format` the answer is OpenAI-shaped (a
chat.completion, or its chunks as server-sent events). With `result_format` it is DashScope's:

    "text":    {"output": {"text", "finish_reason"}, "usage": {"input_tokens", "output_tokens",
               "total_tokens"}, "request_id"}
    "message": {"output": {"choices": [{"message": {"role", "content", ...}, "finish_reason"}]}, ...}

streamed as DashScope's events (`id:N`, `event:result`, `:HTTP_STATUS/200`, `data:{...}`; the
finish_reason is the string "null" until the last event), each carrying the whole text so far
(`incremental_output` false, DashScope's default) or only the new text (true). The header
`X-DashScope-SSE: enable` asks for the stream as DashScope's own endpoint does.
"""

from __future__ import annotations

import json
from typing import Any

from fastapi import APIRouter, Request

from ..errors import RequestError
from .openai_chat import OpenAIShape, complete
from .protocol import QwenPredictRequest


def _usage(u: dict[str, Any] | None) -> dict[str, Any] | None:
    if u is None:
        return None
    out = {"input_tokens": u["prompt_tokens"], "output_tokens": u["completion_tokens"],
           "total_tokens": u["total_tokens"]}
    cached = (u.get("prompt_tokens_details") or {}).get("cached_tokens")
    if cached:
        out["prompt_tokens_details"] = {"cached_tokens": cached}
    return out


class DashScopeShape(OpenAIShape):
    """DashScope's answer shapes (module docstring) for one request's chat.completion or chunks."""

    def __init__(self, result_format: str, incremental: bool, n: int = 1):
        self.format, self.incremental, self.n = result_format, incremental, n
        self.events_sent = 0
        self.so_far: dict[int, dict[str, Any]] = {}  # choice index -> the message so far

    def _output(self, message: dict[str, Any], finish: str | None, index: int, extra: dict[str, Any]) -> dict:
        if self.format == "text":
            out = {"text": message.get("content") or "", "finish_reason": finish or "null"}
            if message.get("reasoning_content"):
                out["reasoning_content"] = message["reasoning_content"]
            return out
        choice = {"finish_reason": finish or "null", "message": message, **extra}
        if self.n > 1:
            choice["index"] = index
        return {"choices": [choice]}

    def result(self, result: dict[str, Any]) -> dict[str, Any]:
        choices = result["choices"]
        if self.format == "text":
            output = self._output(choices[0]["message"], choices[0]["finish_reason"], 0, {})
        else:
            output = {"choices": [{"finish_reason": c["finish_reason"], "message": c["message"],
                                   **({"logprobs": c["logprobs"]} if c.get("logprobs") else {})} for c in choices]}
        return {"output": output, "usage": _usage(result.get("usage")), "request_id": result["id"]}

    def events(self, chunk: dict[str, Any]) -> list[bytes]:
        if not chunk.get("choices"):
            return []
        ch = chunk["choices"][0]
        index, delta, finish = ch.get("index", 0), ch.get("delta") or {}, ch.get("finish_reason")
        whole = self.so_far.setdefault(index, {"role": "assistant", "content": ""})
        new: dict[str, Any] = {"role": "assistant", "content": delta.get("content") or ""}
        whole["content"] += new["content"]
        if delta.get("reasoning_content"):
            new["reasoning_content"] = delta["reasoning_content"]
            whole["reasoning_content"] = whole.get("reasoning_content", "") + delta["reasoning_content"]
        if delta.get("tool_calls"):
            new["tool_calls"] = delta["tool_calls"]
            calls = whole.setdefault("tool_calls", [])
            for d in delta["tool_calls"]:
                while len(calls) <= d.get("index", 0):
                    calls.append({"id": "", "type": "function", "function": {"name": "", "arguments": ""}})
                call, fn = calls[d.get("index", 0)], d.get("function") or {}
                call["id"] = d.get("id") or call["id"]
                call["function"]["name"] += fn.get("name") or ""
                call["function"]["arguments"] += fn.get("arguments") or ""
        if finish is None and not (new["content"] or len(new) > 2):
            return []  # nothing new (the role chunk)
        message = new if self.incremental else json.loads(json.dumps(whole))
        extra = {"logprobs": ch["logprobs"]} if ch.get("logprobs") else {}
        body: dict[str, Any] = {"output": self._output(message, finish, index, extra), "request_id": chunk["id"]}
        usage = _usage(chunk.get("usage"))
        if usage is not None:
            body["usage"] = usage
        return [self._event("result", 200, body)]

    def _event(self, kind: str, status: int, body: dict[str, Any]) -> bytes:
        self.events_sent += 1
        data = json.dumps(body, ensure_ascii=False)
        return f"id:{self.events_sent}\nevent:{kind}\n:HTTP_STATUS/{status}\ndata:{data}\n\n".encode("utf-8")

    def error(self, body: dict[str, Any], status: int) -> bytes:
        err = body.get("error", {})
        return self._event("error", status, {"code": err.get("code") or err.get("type"), "message": err.get("message"),
                                             "request_id": ""})

    def end(self) -> bytes:
        return b""


def shape_for(body: QwenPredictRequest, stream: bool, n: int, tools: bool, logprobs: bool) -> DashScopeShape | None:
    """The answer shape the request asks for (None: OpenAI's); RequestError for a combination DashScope has not."""
    fmt, incremental = body.pick("result_format"), body.pick("incremental_output")
    if fmt is None:
        if stream and incremental is False:
            raise RequestError('incremental_output=false (each event the whole text so far) needs result_format "text" '
                               'or "message" (DashScope\'s shape); the OpenAI-shaped stream sends only new text',
                               param="incremental_output")
        return None
    if fmt == "text":
        for asked, what, param in ((n > 1, "n > 1", "n"), (tools, "tools", "tools"),
                                   (logprobs, "logprobs", "logprobs")):
            if asked:
                raise RequestError(f'{what} need result_format "message" (the "text" shape has one text and no '
                                   "calls or logprobs)", param=param)
    return DashScopeShape(fmt, bool(incremental), n)


def router() -> APIRouter:
    """The /api/v1/qwen/predict route (added to the app by create_app)."""
    r = APIRouter(tags=["qwen"])

    @r.post("/api/v1/qwen/predict", summary="Qwen API chat (flat or DashScope-nested parameters)")
    async def qwen_predict(request: Request, body: QwenPredictRequest) -> Any:
        chat = body.to_chat()
        if request.headers.get("x-dashscope-sse", "").lower() == "enable":
            chat.stream = True
        shape = shape_for(body, bool(chat.stream), chat.n or 1, bool(chat.tools) and chat.tool_choice != "none",
                          bool(chat.logprobs))
        return await complete(request, chat, shape)

    return r
