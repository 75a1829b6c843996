"""POST /v1/responses: OpenAI's Responses API, stateless, over the same chat generation.

Served: `input` as a string or items (messages with text parts, `function_call` and
`function_call_output` items), `instructions`, `text.format` (json_schema / json_object),
function `tools` with `tool_choice` and `parallel_tool_calls`, `max_output_tokens`, `temperature`,
`top_p`, and `stream` with the Responses event types. Nothing is stored: `previous_response_id`
and `store: true` are refused with a 400 that says so.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from ..errors import EdgeQwenError, RequestError
from . import runner


class ResponsesRequest(BaseModel):
    """POST /v1/responses."""

    model_config = ConfigDict(extra="ignore", strict=True, allow_inf_nan=False)
    model: str | None = None
    input: str | list[dict[str, Any]]
    instructions: str | None = None
    text: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    max_output_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    stream: bool | None = None
    store: bool | None = None
    previous_response_id: str | None = None
    metadata: dict[str, Any] | None = None


def _text_of(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for i, p in enumerate(content):
            kind = p.get("type") if isinstance(p, dict) else None
            if kind not in ("input_text", "output_text", "text"):
                raise RequestError(f"{where}.content[{i}] has type {kind!r}: only text parts are served "
                                   "(text-only Qwen2.5 models)", param=f"{where}.content")
            parts.append(p.get("text", ""))
        return "".join(parts)
    raise RequestError(f"{where}.content must be a string or a list of text parts", param=f"{where}.content")


def to_messages(body: ResponsesRequest) -> list[dict[str, Any]]:
    """The request's instructions and input as chat messages (function calls and their outputs included)."""
    msgs: list[dict[str, Any]] = []
    if body.instructions:
        msgs.append({"role": "system", "content": body.instructions})
    if isinstance(body.input, str):
        return msgs + [{"role": "user", "content": body.input}]
    for i, item in enumerate(body.input):
        where = f"input[{i}]"
        kind = item.get("type", "message")
        if kind == "message":
            role = {"developer": "system"}.get(item.get("role"), item.get("role"))
            if role not in ("system", "user", "assistant"):
                raise RequestError(f"{where}.role must be system, developer, user or assistant", param=f"{where}.role")
            msgs.append({"role": role, "content": _text_of(item.get("content", ""), where)})
        elif kind == "function_call":
            call = {"id": item.get("call_id"), "type": "function",
                    "function": {"name": item.get("name"), "arguments": item.get("arguments", "{}")}}
            if msgs and msgs[-1]["role"] == "assistant" and msgs[-1].get("tool_calls") is not None:
                msgs[-1]["tool_calls"].append(call)  # parallel calls: one assistant turn
            else:
                msgs.append({"role": "assistant", "content": "", "tool_calls": [call]})
        elif kind == "function_call_output":
            out = item.get("output", "")
            msgs.append({"role": "tool", "tool_call_id": item.get("call_id"),
                         "content": out if isinstance(out, str) else json.dumps(out, ensure_ascii=False)})
        elif kind == "reasoning":
            continue  # a client replaying another model's reasoning: nothing for Qwen2.5 to read
        else:
            raise RequestError(f"{where}.type {kind!r} is not served; send message, function_call or "
                               "function_call_output items", param=f"{where}.type")
    return msgs


def _tools(body: ResponsesRequest) -> list[dict[str, Any]] | None:
    if not body.tools:
        return None
    out = []
    for i, t in enumerate(body.tools):
        if t.get("type") == "mcp":
            continue  # the server's own MCP servers: see _mcp_servers
        if t.get("type") != "function":
            raise RequestError(f"tools[{i}].type {t.get('type')!r} is not served; only function and mcp tools",
                               param=f"tools[{i}].type")
        fn = {k: t[k] for k in ("name", "description", "parameters") if k in t}
        out.append({"type": "function", "function": fn})
    return out


def _mcp_servers(body: ResponsesRequest) -> list[str]:
    """The server_label of each `mcp` tool: MCP servers of this server's --mcp config (never a remote url)."""
    labels = []
    for i, t in enumerate(body.tools or []):
        if t.get("type") != "mcp":
            continue
        where = f"tools[{i}]"
        if t.get("server_url") or t.get("connector_id"):
            raise RequestError(f"{where}: this server connects only to the MCP servers of its own --mcp config; name "
                               "one by server_label and leave server_url out", param=f"{where}.server_url")
        if t.get("require_approval") not in (None, "never"):
            raise RequestError(f"{where}.require_approval: approval is the server's setting (serve --mcp-confirm); "
                               'leave it out or "never"', param=f"{where}.require_approval")
        if t.get("allowed_tools") is not None:
            raise RequestError(f"{where}.allowed_tools is not served: every tool of the named server is offered; "
                               "leave it out", param=f"{where}.allowed_tools")
        labels.append(t.get("server_label"))
    return labels


def _mcp_item(call: dict[str, Any]) -> dict[str, Any]:
    """An MCP call of the tool loop as a Responses `mcp_call` item."""
    failed = bool(call.get("is_error"))
    return {"type": "mcp_call", "id": f"mcp_{call['id']}", "server_label": call["server"], "name": call["name"],
            "arguments": json.dumps(call.get("arguments", {}), ensure_ascii=False),
            "output": None if failed else call.get("output"), "error": call.get("output") if failed else None,
            "status": "failed" if failed else "completed"}


def _tool_choice(choice: Any) -> Any:
    if isinstance(choice, dict) and choice.get("type") == "function" and "name" in choice:
        return {"type": "function", "function": {"name": choice["name"]}}
    return choice


def _format(text: dict[str, Any] | None) -> dict[str, Any] | None:
    fmt = (text or {}).get("format")
    if not fmt or fmt.get("type") == "text":
        return None
    if fmt.get("type") == "json_object":
        return {"type": "json_object"}
    if fmt.get("type") == "json_schema":
        spec = {k: fmt[k] for k in ("name", "schema", "strict", "description") if k in fmt}
        return {"type": "json_schema", "json_schema": spec}
    raise RequestError(f"text.format.type {fmt.get('type')!r}: use text, json_object or json_schema",
                       param="text.format")


def router() -> APIRouter:
    """The /v1/responses route (added to the app by create_app)."""
    r = APIRouter(tags=["openai"])

    @r.post("/v1/responses", summary="OpenAI Responses (stateless; SSE events when stream=true)")
    async def responses(request: Request, body: ResponsesRequest) -> Any:
        if body.previous_response_id is not None:
            raise RequestError("previous_response_id is not served: this server stores no responses; send the "
                               "whole conversation as input items", param="previous_response_id")
        if body.store:
            raise RequestError("store: true is not served: this server stores no responses; leave store out or "
                               "false", param="store")
        slot = runner.slot_for(request, body.model)
        limit = runner.options(request).get("max_tokens_limit")
        max_tokens = body.max_output_tokens
        if limit is not None and max_tokens is not None:
            max_tokens = min(max_tokens, limit)
        kwargs = {"messages": to_messages(body), "tools": _tools(body), "tool_choice": _tool_choice(body.tool_choice),
                  "parallel_tool_calls": body.parallel_tool_calls, "response_format": _format(body.text),
                  "temperature": 1.0 if body.temperature is None else body.temperature,
                  "top_p": 1.0 if body.top_p is None else body.top_p, "max_tokens": max_tokens}
        rid, created = f"resp_{uuid.uuid4().hex[:24]}", int(time.time())
        labels = _mcp_servers(body)
        loop = None  # the MCP tool loop, when the request has mcp tools
        if labels:
            from .mcp_routes import mcp_runner

            loop = mcp_runner(request, labels)

        def answer(llm: Any, cancel: Any, stream: bool) -> Any:
            if loop is None:
                return llm.chat(cancel=cancel, stream=stream, **kwargs)
            kw = {k: v for k, v in kwargs.items() if k != "messages"}
            return loop(llm, kwargs["messages"], cancel=cancel, stream=stream, **kw)

        def envelope(status: str, output: list[dict[str, Any]], usage: dict[str, Any] | None,
                     incomplete: bool = False) -> dict[str, Any]:
            return {"id": rid, "object": "response", "created_at": created, "status": status,
                    "model": slot.name, "output": output, "error": None,
                    "incomplete_details": {"reason": "max_output_tokens"} if incomplete else None,
                    "instructions": body.instructions, "metadata": body.metadata or {},
                    "parallel_tool_calls": body.parallel_tool_calls is not False,
                    "temperature": kwargs["temperature"], "top_p": kwargs["top_p"],
                    "tool_choice": body.tool_choice or "auto", "tools": body.tools or [],
                    "text": body.text or {"format": {"type": "text"}}, "usage": usage,
                    "max_output_tokens": body.max_output_tokens}

        def usage_of(u: dict[str, Any]) -> dict[str, Any]:
            return {"input_tokens": u["prompt_tokens"], "output_tokens": u["completion_tokens"],
                    "total_tokens": u["total_tokens"],
                    "input_tokens_details": {"cached_tokens": u.get("prompt_tokens_details", {}).get("cached_tokens", 0)},
                    "output_tokens_details": {"reasoning_tokens": 0}}

        def items_of(message: dict[str, Any]) -> list[dict[str, Any]]:
            out = [_mcp_item(c) for c in message.get("mcp_calls") or []]
            if message.get("content"):
                out.append({"type": "message", "id": f"msg_{uuid.uuid4().hex[:24]}", "status": "completed",
                            "role": "assistant",
                            "content": [{"type": "output_text", "text": message["content"], "annotations": []}]})
            for call in message.get("tool_calls") or []:
                out.append({"type": "function_call", "id": f"fc_{uuid.uuid4().hex[:24]}", "call_id": call["id"],
                            "name": call["function"]["name"], "arguments": call["function"]["arguments"],
                            "status": "completed"})
            return out

        if not body.stream:
            result = await runner.run(request, slot, lambda llm, cancel: answer(llm, cancel, False))
            choice = result["choices"][0]
            return JSONResponse(envelope("incomplete" if choice["finish_reason"] == "length" else "completed",
                                         items_of(choice["message"]), usage_of(result["usage"]),
                                         choice["finish_reason"] == "length"))

        chunks = await runner.stream(request, slot, lambda llm, cancel: answer(llm, cancel, True))

        async def events():
            seq = [0]

            def ev(kind: str, **data: Any) -> bytes:
                payload = {"type": kind, "sequence_number": seq[0], **data}
                seq[0] += 1
                return (f"event: {kind}\ndata: " + json.dumps(payload, ensure_ascii=False) + "\n\n").encode("utf-8")

            yield ev("response.created", response=envelope("in_progress", [], None))
            yield ev("response.in_progress", response=envelope("in_progress", [], None))
            output: list[dict[str, Any]] = []
            text_item: dict[str, Any] | None = None
            calls: dict[int, dict[str, Any]] = {}
            usage, finish = None, None
            pending_args: dict[str, Any] = {}

            def close_text() -> list[bytes]:
                nonlocal text_item
                if text_item is None:
                    return []
                i, item = len(output), text_item
                text = item["content"][0]["text"]
                out = [ev("response.output_text.done", item_id=item["id"], output_index=i, content_index=0, text=text),
                       ev("response.content_part.done", item_id=item["id"], output_index=i, content_index=0,
                          part=item["content"][0]),
                       ev("response.output_item.done", output_index=i, item={**item, "status": "completed"})]
                output.append({**item, "status": "completed"})
                text_item = None
                return out

            async for chunk in chunks:
                if isinstance(chunk, Exception):
                    msg = chunk.message if isinstance(chunk, EdgeQwenError) else f"internal error ({type(chunk).__name__})"
                    yield ev("error", code=getattr(chunk, "code", None), message=msg, param=getattr(chunk, "param", None))
                    return
                if chunk.get("usage"):
                    usage = chunk["usage"]
                if not chunk.get("choices"):
                    continue
                ch = chunk["choices"][0]
                delta = ch.get("delta", {})
                finish = ch.get("finish_reason") or finish
                if delta.get("mcp_call") or delta.get("mcp_result"):  # the MCP tool loop, as it happens
                    for b in close_text():
                        yield b
                    if delta.get("mcp_call"):
                        item = {**_mcp_item({**delta["mcp_call"], "output": None}), "status": "in_progress"}
                        yield ev("response.output_item.added", output_index=len(output), item=item)
                    else:
                        item = _mcp_item(delta["mcp_result"] | {"arguments": pending_args.get(delta["mcp_result"]["id"], {})})
                        yield ev("response.output_item.done", output_index=len(output), item=item)
                        output.append(item)
                    if delta.get("mcp_call"):
                        pending_args[delta["mcp_call"]["id"]] = delta["mcp_call"]["arguments"]
                    continue
                if delta.get("content"):
                    if text_item is None:
                        text_item = {"type": "message", "id": f"msg_{uuid.uuid4().hex[:24]}", "status": "in_progress",
                                     "role": "assistant", "content": [{"type": "output_text", "text": "",
                                                                       "annotations": []}]}
                        i = len(output)
                        yield ev("response.output_item.added", output_index=i,
                                 item={**text_item, "content": []})
                        yield ev("response.content_part.added", item_id=text_item["id"], output_index=i,
                                 content_index=0, part={"type": "output_text", "text": "", "annotations": []})
                    text_item["content"][0]["text"] += delta["content"]
                    yield ev("response.output_text.delta", item_id=text_item["id"], output_index=len(output),
                             content_index=0, delta=delta["content"])
                for d in delta.get("tool_calls") or []:
                    for b in close_text():
                        yield b
                    if d.get("id"):
                        item = {"type": "function_call", "id": f"fc_{uuid.uuid4().hex[:24]}", "call_id": d["id"],
                                "name": d["function"]["name"], "arguments": "", "status": "in_progress"}
                        calls[d["index"]] = {"item": item, "at": len(output) + len(calls)}
                        yield ev("response.output_item.added", output_index=calls[d["index"]]["at"], item=item)
                    piece = (d.get("function") or {}).get("arguments") or ""
                    if piece:
                        entry = calls[d["index"]]
                        entry["item"]["arguments"] += piece
                        yield ev("response.function_call_arguments.delta", item_id=entry["item"]["id"],
                                 output_index=entry["at"], delta=piece)
            for b in close_text():
                yield b
            for entry in calls.values():
                item = {**entry["item"], "status": "completed"}
                yield ev("response.function_call_arguments.done", item_id=item["id"], output_index=entry["at"],
                         arguments=item["arguments"])
                yield ev("response.output_item.done", output_index=entry["at"], item=item)
                output.append(item)
            final = envelope("incomplete" if finish == "length" else "completed", output,
                             usage_of(usage) if usage else None, finish == "length")
            yield ev("response.incomplete" if finish == "length" else "response.completed", response=final)

        return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    return r
