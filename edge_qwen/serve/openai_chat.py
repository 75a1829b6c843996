"""POST /v1/chat/completions: OpenAI chat completions over EdgeQwen.chat (SSE when stream=true).

`complete()` answers one ChatRequest; the Qwen API shape (serve/qwen.py) converts its body and
calls it too. A request takes a place in its model's queue (the app's _Slot), runs in a worker
thread (the event loop never waits on llama.cpp), and is cancelled when its client disconnects
or the server starts shutting down (`ChatRequests.begin_shutdown`). Streamed chunks cross from
the worker thread to the loop through an asyncio queue and go out as server-sent events.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import re
import threading
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from ..errors import BusyError, EdgeQwenError, RequestError
from . import runner
from .api_errors import error_body, error_body_of
from .protocol import DEFAULT_MAX_TOKENS, IGNORED_HEADER, ChatRequest

log = logging.getLogger("edge_qwen.serve.app")


class ShuttingDownError(BusyError):
    """The server is stopping: requests still waiting are turned away."""

    code = "shutting_down"

    def __init__(self) -> None:
        super().__init__("the server is shutting down; retry on another server or once it is back")


class ChatRequests:
    """The chat requests in flight (each one's cancel event and its wait for a place), for shutdown."""

    def __init__(self) -> None:
        self.live: dict[threading.Event, asyncio.Future] = {}
        self.closing = False

    def begin_shutdown(self) -> None:
        """Stop every running generation at its next token and turn away every waiting request.

        Called on the event loop when the server starts stopping (Ctrl-C, SIGTERM), so streams
        end with a final chunk and [DONE] instead of being cut when the grace period runs out.
        """
        self.closing = True
        for ev, waiter in list(self.live.items()):
            ev.set()
            if not waiter.done():
                waiter.cancel()


def _cache_scope(request: Request, salt: str | None) -> str:
    """The prefix-cache scope of a request: its bearer token and its cache_salt, hashed.

    Prompts share cached KV cells only within one scope, so a client cannot probe another's
    prompt through `cached_tokens` or timing. Requests without a key or salt share one scope.
    """
    auth = request.headers.get("authorization", "")
    return hashlib.sha256(f"{auth}\0{salt or ''}".encode("utf-8", "surrogatepass")).hexdigest()


def _sse(obj: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False).encode("utf-8") + b"\n\n"


class _EventStream(StreamingResponse):
    """An SSE response that runs `on_close` however it ends (finished, disconnected, cancelled)."""

    def __init__(self, content: Any, on_close: Any, headers: dict[str, str] | None = None):
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **(headers or {})})
        self._on_close = on_close

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()


async def _watch_disconnect(request: Request, cancel: threading.Event, waiter: asyncio.Future) -> None:
    # The body is already read, so the next ASGI message can only be the disconnect. A request
    # still waiting in the queue leaves it at once; a running one stops at the next token.
    while not cancel.is_set():
        message = await request.receive()
        if message["type"] == "http.disconnect":
            cancel.set()
            if not waiter.done():
                waiter.cancel()
            return


class OpenAIShape:
    """How a chat answer is written out: OpenAI's chat.completion, and its chunks as server-sent events.
    Another API shape (serve/qwen.py) overrides these."""

    def result(self, result: dict[str, Any]) -> dict[str, Any]:
        return result

    def events(self, chunk: dict[str, Any]) -> list[bytes]:
        return [_sse(chunk)]

    def error(self, body: dict[str, Any], status: int) -> bytes:
        return _sse({**body, "status": status})

    def end(self) -> bytes:
        return b"data: [DONE]\n\n"


_NAME_IN_TEMPLATE = re.compile(r"""message\s*(\.\s*name\b|\[\s*['"]name['"]\s*\])""")


def check_names(messages: list[Any], template: str | None) -> None:
    """Refuse a speaker's `name` the model's chat template has no place for (it would be dropped silently).

    A tool message's name (the called function's) is redundant with its tool_call_id and accepted.
    """
    if template is not None and _NAME_IN_TEMPLATE.search(template):
        return
    for i, m in enumerate(messages):
        if m.name is not None and m.role not in ("tool", "function"):
            raise RequestError(f"messages[{i}].name: this model's chat template has no place for a speaker's name, "
                               "so it would be ignored; put the name in the content (\"Ann: ...\") or leave it out",
                               param=f"messages.{i}.name")


async def complete(request: Request, body: ChatRequest, shape: OpenAIShape | None = None) -> Any:
    """Answer one chat request (either shape, as a ChatRequest): JSON, or SSE when `body.stream`.

    `shape` writes the answer (default: OpenAI's). Unknown top-level fields are named back in the
    X-Edge-Qwen-Ignored-Fields header.
    """
    shape = shape or OpenAIShape()
    state: ChatRequests = request.app.state.chat_requests
    slot = request.app.state.models.get(body.model)
    llm = slot.llm
    if llm is None:  # loaded on first use: not on the event loop
        import anyio

        llm = await anyio.to_thread.run_sync(slot.model)
    check_names(body.messages, getattr(llm, "chat_template", None))
    ignored = body.ignored_fields()
    # A header value is Latin-1 text without control characters: other characters of a client's
    # field names are sent as JSON escapes (\uXXXX), and the list is cut to 1,000 characters.
    shown = json.dumps(", ".join(ignored))[1:-1] if ignored else ""
    shown = "".join(c if 32 <= ord(c) < 127 else "?" for c in shown)[:1000]
    headers = {IGNORED_HEADER: shown} if ignored else None
    opts = runner.options(request)
    max_tokens_limit, prompt_cache = opts.get("max_tokens_limit"), opts.get("prompt_cache", True)
    max_tokens = body.limit()  # None: the default, within the room the prompt leaves
    default = DEFAULT_MAX_TOKENS
    if max_tokens_limit is not None:
        default = min(default, max_tokens_limit)
        if max_tokens is not None:
            max_tokens = min(max_tokens, max_tokens_limit)
    kwargs = body.runtime_kwargs()
    messages = kwargs.pop("messages")
    kwargs.update(max_tokens=max_tokens, default_max_tokens=default,
                  reuse_prefix=prompt_cache and body.seed is None,
                  cache_key=_cache_scope(request, "\0".join(filter(None, (body.cache_salt, body.prompt_cache_key)))))
    answer = None  # the model's chat, or the MCP tool loop around it when the request names MCP servers
    if getattr(body, "mcp_servers", None):
        from .mcp_routes import mcp_runner

        loop = mcp_runner(request, body.mcp_servers)

        def answer(messages: Any, **kw: Any) -> Any:
            return loop(slot.model(), messages, **kw)
    if state.closing:
        raise ShuttingDownError
    cancel = threading.Event()
    waiter = asyncio.ensure_future(slot.acquire())
    state.live[cancel] = waiter
    watcher = asyncio.create_task(_watch_disconnect(request, cancel, waiter))

    def done() -> None:
        cancel.set()
        watcher.cancel()
        state.live.pop(cancel, None)

    try:
        await waiter
    except asyncio.CancelledError:
        left = cancel.is_set()  # set by the disconnect watcher or by begin_shutdown, before they cancel
        done()
        if state.closing:
            raise ShuttingDownError from None
        if left:
            return Response(status_code=499)  # the client left while queued: no one reads this answer
        raise
    except BaseException:
        done()
        raise

    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return await _stream(slot, messages, kwargs, cancel, done, include_usage, shape, headers, answer)
    import anyio

    released = False
    try:
        def run() -> dict[str, Any]:
            return (answer or slot.model().chat)(messages, stream=False, cancel=cancel, **kwargs)

        result = await anyio.to_thread.run_sync(run)
        slot.release(int(result["usage"]["completion_tokens"]),
                     result["choices"][0]["finish_reason"] == "cancelled")
        released = True
    finally:
        if not released:
            slot.release(0, cancel.is_set())
        done()
    result["model"] = slot.name
    return JSONResponse(shape.result(result), headers=headers)


async def _stream(slot: Any, messages: list[dict[str, str]], kwargs: dict[str, Any],
                  cancel: threading.Event, done: Any, include_usage: bool, shape: OpenAIShape,
                  headers: dict[str, str] | None, answer: Any = None) -> Any:
    # The last chunk with choices always carries `usage` (as llama.cpp's server does); with
    # stream_options.include_usage an OpenAI-style extra chunk with `choices: []` follows it.
    state = {"n": 0, "cancelled": False}

    def chunks_of_reply() -> Any:
        chunks = (answer or slot.model().chat)(messages, stream=True, cancel=cancel, **kwargs)
        late = 0
        try:
            for chunk in chunks:
                usage = chunk.get("usage")
                if usage:  # the final chunk: the true token count and how it ended
                    state["n"] = usage.get("completion_tokens", state["n"])
                    state["cancelled"] = chunk["choices"][0].get("finish_reason") == "cancelled"
                chunk["model"] = slot.name
                yield chunk
                if usage and include_usage:
                    yield {**chunk, "choices": [], "usage": usage}
                # The runtime ends with a "cancelled" chunk at the next token once `cancel`
                # is set; this only guards against a loop that would not listen.
                late += cancel.is_set()
                if late > 4:
                    state["cancelled"] = True
                    return
        finally:
            close = getattr(chunks, "close", None)
            if close:
                close()

    queue = runner.in_thread(slot.name, cancel, chunks_of_reply, lambda: slot.release(state["n"], state["cancelled"]))
    kind, first = await queue.get()
    if kind == "error":  # failed before the first token: a plain HTTP error, not a broken stream
        done()
        raise first

    async def events():
        try:
            k, item = kind, first
            while k != "end":
                if k == "item":
                    for event in shape.events(item):
                        yield event
                else:
                    status = item.status if isinstance(item, EdgeQwenError) else 500
                    body = error_body_of(item) if isinstance(item, EdgeQwenError) else error_body(
                        f"internal server error ({type(item).__name__})", type="server_error", code="internal_error")
                    yield shape.error(body, status)
                k, item = await queue.get()
            yield shape.end()
        finally:
            cancel.set()

    return _EventStream(events(), done, headers)


def router() -> APIRouter:
    """The /v1/chat/completions route (added to the app by create_app)."""
    r = APIRouter(tags=["openai"])

    @r.post("/v1/chat/completions", summary="OpenAI chat completions (SSE when stream=true)")
    async def chat_completions(request: Request, body: ChatRequest) -> Any:
        return await complete(request, body)

    return r
