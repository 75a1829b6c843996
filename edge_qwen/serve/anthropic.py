"""POST /v1/messages and /v1/messages/count_tokens: Anthropic's Messages API over the same chat generation.

What coding agents built on the `anthropic` SDK (Claude Code and others) send: `system` as a
string or text blocks; `messages` with text, image, `tool_use` and `tool_result` blocks;
`max_tokens` (an upper bound: the reply also ends where the context window does), `stop_sequences`,
`temperature`, `top_p`, `top_k`; `tools` with `tool_choice` (auto, any, tool, none); `thinking`
(enabled / disabled / adaptive) on a thinking model. Streaming sends Anthropic's events:
message_start, content_block_start/delta/stop (text_delta, thinking_delta, input_json_delta),
message_delta with stop_reason and usage, message_stop.

Errors on these paths are Anthropic-shaped, `{"type": "error", "error": {"type", "message"}}`
(`anthropic_error_body`, used by the app's handlers), and `x-api-key` is accepted besides Bearer.
A client asking for a Claude model name reaches a served model through `serve --alias`.
Fields this server does not use are named back in the X-Edge-Qwen-Ignored-Fields header. The
request models and the block conversion are in anthropic_protocol.py.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse

from ..errors import EdgeQwenError
from . import runner
from .anthropic_protocol import CountTokensRequest, MessagesRequest, format_of, thinking_of, to_messages, tools_of
from .protocol import IGNORED_HEADER

PATH = "/v1/messages"
# Anthropic's error types by HTTP status (https://docs.anthropic.com/en/api/errors).
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 408: "timeout_error", 413: "request_too_large", 429: "rate_limit_error",
               500: "api_error", 503: "overloaded_error", 529: "overloaded_error"}
STOP_REASONS = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use", "cancelled": "end_turn"}


def is_anthropic_path(path: str) -> bool:
    """Whether a request path is served in Anthropic's shape (its errors included)."""
    return path == PATH or path.startswith(PATH + "/")


def anthropic_error_body(status: int, body: dict[str, Any]) -> dict[str, Any]:
    """An OpenAI-shaped error body in Anthropic's shape: {"type": "error", "error": {"type", "message"}}."""
    err = body.get("error") if isinstance(body, dict) else None
    message = err.get("message") if isinstance(err, dict) else str(body)
    return {"type": "error", "error": {"type": ERROR_TYPES.get(status, "api_error" if status >= 500
                                                                else "invalid_request_error"),
                                       "message": message}}


def _scope(request: Request) -> str:
    key = request.headers.get("authorization") or request.headers.get("x-api-key") or ""
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()


def _count(llm: Any, messages: list[dict[str, Any]], tools: Any, choice: Any) -> int:
    from ..engine.tool_calls import parse_tools, prepare_history

    checked = parse_tools(tools, choice)
    specs = checked.specs if checked is not None and checked.offered else None
    return len(llm.prompt_tokens(prepare_history(messages), specs))


# -- answer: chat results -> Anthropic content blocks -------------------------------------------

def _usage(u: dict[str, Any] | None) -> dict[str, Any]:
    u = u or {}
    cached = (u.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
    return {"input_tokens": u.get("prompt_tokens", 0) - cached, "output_tokens": u.get("completion_tokens", 0),
            "cache_creation_input_tokens": 0, "cache_read_input_tokens": cached}


def _stop(finish: str | None, stop: str | None) -> tuple[str, str | None]:
    if stop:
        return "stop_sequence", stop
    return STOP_REASONS.get(finish or "stop", "end_turn"), None


def _input_of(arguments: str) -> Any:
    try:
        return json.loads(arguments) if arguments.strip() else {}
    except ValueError:
        return {}


def _mcp_blocks(delta: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """The MCP tool loop's extension deltas as the blocks of Anthropic's MCP connector."""
    out = []
    if delta.get("mcp_call"):
        c = delta["mcp_call"]
        out.append(("mcp", {"type": "mcp_tool_use", "id": c["id"], "name": c["name"], "server_name": c["server"],
                            "input": c["arguments"]}))
    if delta.get("mcp_result"):
        r = delta["mcp_result"]
        out.append(("mcp", {"type": "mcp_tool_result", "tool_use_id": r["id"], "is_error": r["is_error"],
                            "content": [{"type": "text", "text": r["output"]}]}))
    return out


def message_of(result: dict[str, Any], model: str) -> dict[str, Any]:
    """A chat.completion as an Anthropic message."""
    choice = result["choices"][0]
    msg = choice["message"]
    content: list[dict[str, Any]] = []
    if msg.get("reasoning_content"):
        content.append({"type": "thinking", "thinking": msg["reasoning_content"], "signature": ""})
    for call in msg.get("mcp_calls") or []:
        content += [b for _, b in _mcp_blocks({"mcp_call": call, "mcp_result": {**call, "output": call.get("output", ""),
                                                                                 "is_error": call.get("is_error", True)}})]
    if msg.get("content"):
        content.append({"type": "text", "text": msg["content"]})
    for call in msg.get("tool_calls") or []:
        content.append({"type": "tool_use", "id": call["id"], "name": call["function"]["name"],
                        "input": _input_of(call["function"]["arguments"])})
    reason, seq = _stop(choice.get("finish_reason"), choice.get("stop_reason"))
    return {"id": f"msg_{uuid.uuid4().hex[:24]}", "type": "message", "role": "assistant", "model": model,
            "content": content, "stop_reason": reason, "stop_sequence": seq, "usage": _usage(result.get("usage"))}


def _event(kind: str, **data: Any) -> bytes:
    return (f"event: {kind}\ndata: " + json.dumps({"type": kind, **data}, ensure_ascii=False) + "\n\n").encode("utf-8")


class _Blocks:
    """Streamed chat chunks as Anthropic content-block events (one block open at a time)."""

    def __init__(self) -> None:
        self.index = -1
        self.open: str | None = None  # "thinking", "text" or "tool_use:<chunk index>"

    def _start(self, kind: str, block: dict[str, Any]) -> list[bytes]:
        out = self.close()
        self.index += 1
        self.open = kind
        return out + [_event("content_block_start", index=self.index, content_block=block)]

    def close(self) -> list[bytes]:
        if self.open is None:
            return []
        out = []
        if self.open == "thinking":
            out.append(_event("content_block_delta", index=self.index, delta={"type": "signature_delta",
                                                                               "signature": ""}))
        self.open = None
        return out + [_event("content_block_stop", index=self.index)]

    def feed(self, delta: dict[str, Any]) -> list[bytes]:
        out: list[bytes] = []
        if delta.get("reasoning_content"):
            if self.open != "thinking":
                out += self._start("thinking", {"type": "thinking", "thinking": "", "signature": ""})
            out.append(_event("content_block_delta", index=self.index,
                              delta={"type": "thinking_delta", "thinking": delta["reasoning_content"]}))
        if delta.get("content"):
            if self.open != "text":
                out += self._start("text", {"type": "text", "text": ""})
            out.append(_event("content_block_delta", index=self.index,
                              delta={"type": "text_delta", "text": delta["content"]}))
        for kind, block in _mcp_blocks(delta):  # the MCP tool loop's calls and results, as they happen
            out += self._start(kind, block) + self.close()
        for call in delta.get("tool_calls") or []:
            if call.get("id"):
                out += self._start(f"tool_use:{call['index']}", {"type": "tool_use", "id": call["id"],
                                                                  "name": call["function"]["name"], "input": {}})
            piece = (call.get("function") or {}).get("arguments")
            if piece:
                out.append(_event("content_block_delta", index=self.index,
                                  delta={"type": "input_json_delta", "partial_json": piece}))
        return out


# -- routes -----------------------------------------------------------------------------------------

def _chat_kwargs(request: Request, body: MessagesRequest, llm: Any, ignored: list[str]) -> dict[str, Any]:
    opts = runner.options(request)
    limit = opts.get("max_tokens_limit")
    tools, choice, parallel = tools_of(body)
    # max_tokens is an upper bound, as Anthropic's: the reply may also end where the context does
    # (Claude Code asks for 32,000 whatever the window), so it is the default, not a demand.
    wanted = body.max_tokens if limit is None else min(body.max_tokens, limit)
    return {"messages": to_messages(body), "tools": tools, "tool_choice": choice, "parallel_tool_calls": parallel,
            "temperature": 1.0 if body.temperature is None else body.temperature,
            "top_p": 1.0 if body.top_p is None else body.top_p, "top_k": body.top_k or 0,
            "max_tokens": None, "default_max_tokens": wanted, "stop": body.stop_sequences or None,
            "reuse_prefix": bool(opts.get("prompt_cache", True)), "cache_key": _scope(request),
            "response_format": format_of(body, ignored), **thinking_of(body, llm, ignored)}


def _headers(ignored: list[str]) -> dict[str, str] | None:
    if not ignored:
        return None
    shown = json.dumps(", ".join(sorted(ignored)))[1:-1]
    return {IGNORED_HEADER: "".join(c if 32 <= ord(c) < 127 else "?" for c in shown)[:1000]}


def router() -> APIRouter:
    """The /v1/messages routes (added to the app by create_app)."""
    r = APIRouter(tags=["anthropic"])

    @r.post(PATH, summary="Anthropic Messages (SSE events when stream=true)")
    async def messages(request: Request, body: MessagesRequest) -> Any:
        import anyio

        slot = runner.slot_for(request, body.model)
        llm = slot.llm if slot.llm is not None else await anyio.to_thread.run_sync(slot.model)
        ignored = [k for k in (body.model_extra or {})]
        kwargs = _chat_kwargs(request, body, llm, ignored)
        loop = None  # the MCP tool loop, when the request names MCP servers
        if body.mcp_servers:
            from .mcp_routes import mcp_runner

            loop = mcp_runner(request, body.mcp_servers)
        headers = _headers(ignored)

        def answer(llm: Any, cancel: Any, stream: bool) -> Any:
            if loop is not None:
                msgs = kwargs["messages"]
                return loop(llm, msgs, stream=stream, cancel=cancel, **{k: v for k, v in kwargs.items()
                                                                        if k != "messages"})
            return llm.chat(cancel=cancel, stream=stream, **kwargs)

        if not body.stream:
            def one(llm: Any, cancel: Any) -> dict[str, Any]:
                return answer(llm, cancel, False)

            result = await runner.run(request, slot, one)
            return JSONResponse(message_of(result, body.model), headers=headers)

        def chunks(llm: Any, cancel: Any) -> Any:
            replies = answer(llm, cancel, True)  # checks the request now: a bad one is a plain 400, not a stream
            try:
                yield {"input_tokens": _count(llm, kwargs["messages"], kwargs["tools"], kwargs["tool_choice"])}
                yield from replies
            finally:
                replies.close()

        items = await runner.stream(request, slot, chunks)

        async def events():
            mid = f"msg_{uuid.uuid4().hex[:24]}"
            blocks = _Blocks()
            usage, finish, stop = None, None, None
            async for item in items:
                if isinstance(item, Exception):
                    status = item.status if isinstance(item, EdgeQwenError) else 500
                    message = item.message if isinstance(item, EdgeQwenError) else \
                        f"internal server error ({type(item).__name__})"
                    yield _event("error", error=anthropic_error_body(status, {"error": {"message": message}})["error"])
                    return
                if "input_tokens" in item:
                    yield _event("message_start", message={
                        "id": mid, "type": "message", "role": "assistant", "model": body.model, "content": [],
                        "stop_reason": None, "stop_sequence": None,
                        "usage": {"input_tokens": item["input_tokens"], "output_tokens": 0}})
                    yield _event("ping")
                    continue
                usage = item.get("usage") or usage
                for ch in item.get("choices") or []:
                    finish = ch.get("finish_reason") or finish
                    stop = ch.get("stop_reason") or stop
                    for b in blocks.feed(ch.get("delta") or {}):
                        yield b
            for b in blocks.close():
                yield b
            reason, seq = _stop(finish, stop)
            yield _event("message_delta", delta={"stop_reason": reason, "stop_sequence": seq}, usage=_usage(usage))
            yield _event("message_stop")

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", **(headers or {})})

    @r.post(PATH + "/count_tokens", summary="Anthropic token count of a Messages request")
    async def count_tokens(request: Request, body: CountTokensRequest) -> Any:
        import anyio

        slot = runner.slot_for(request, body.model)
        llm = slot.llm if slot.llm is not None else await anyio.to_thread.run_sync(slot.model)
        tools, choice, _ = tools_of(body)
        messages = to_messages(body)
        n = await anyio.to_thread.run_sync(lambda: _count(llm, messages, tools, choice))
        return {"input_tokens": n}

    return r
