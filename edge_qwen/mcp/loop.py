"""The tool loop: the model calls MCP tools, each result goes back as a tool message, the model continues.

`mcp_chat` has EdgeQwen.chat's shape: streamed, OpenAI chat.completion chunks (the answer's text
as it comes, and per call two extension chunks, `delta.mcp_call` when the call is made and
`delta.mcp_result` when its result is in, so every consumer shows the calls as they happen);
not streamed, one chat.completion whose message carries the calls in `mcp_calls`. Usage counts
every round. The loop is bounded: at most `max_rounds` rounds of calls, each call within
`timeout` seconds; after the last round the model must answer without tools. A round whose calls
all repeat calls already answered in this reply (same tool, same arguments: small models do this
in a loop) is not run again: the model is told, in edge-qwen's own words, to answer from the
results it has, and answers without tools.

A tool result is data: it reaches the model as a tool message, never as instructions to
edge-qwen, and nothing in it changes what the loop does.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

from .hub import Confirm, MCPHub

DEFAULT_MAX_ROUNDS = 8
DEFAULT_TIMEOUT_S = 60.0
# edge-qwen's own note (never a tool's words) when the model repeats a call it has the result of.
ANSWER_NOW = ("The tool results above answer the request. Do not call a tool again: write the final answer "
              "for the user now, using those results.")


def _add_usage(total: dict[str, Any] | None, u: dict[str, Any] | None) -> dict[str, Any] | None:
    if u is None:
        return total
    if total is None:
        return json.loads(json.dumps(u))
    for k in ("prompt_tokens", "completion_tokens", "total_tokens"):
        total[k] = total.get(k, 0) + u.get(k, 0)
    cached = (u.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
    details = total.setdefault("prompt_tokens_details", {})
    details["cached_tokens"] = details.get("cached_tokens", 0) + cached
    return total


def mcp_chat_stream(llm: Any, hub: MCPHub, messages: list[dict[str, Any]], *, servers: list[str] | None = None,
                    max_rounds: int = DEFAULT_MAX_ROUNDS, timeout: float | None = None,
                    confirm: Confirm | None = None, cancel: threading.Event | None = None,
                    **chat_kwargs: Any) -> Iterator[dict[str, Any]]:
    """The tool loop, streamed as chat.completion chunks (see the module docstring)."""
    extra_tools = chat_kwargs.pop("tools", None) or []
    choice = chat_kwargs.pop("tool_choice", None)
    chat_kwargs.pop("stream", None)
    tools = hub.specs_for(servers) + list(extra_tools)
    mcp_names = set(hub.tool_names(servers))
    history = list(messages)
    usage: dict[str, Any] | None = None
    cid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())

    def chunk(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> dict[str, Any]:
        return {"id": cid, "object": "chat.completion.chunk", "created": created, "model": llm.model_name,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish, **extra}]}

    yield chunk({"role": "assistant", "content": ""})
    done: set[tuple[str, str]] = set()  # (tool, arguments) answered in this reply
    answer_now = False
    for rnd in range(max_rounds + 1):
        last = rnd == max_rounds or answer_now
        calls: dict[int, dict[str, Any]] = {}
        client_calls = False
        final: dict[str, Any] | None = None
        text = ""
        kw = dict(chat_kwargs)
        if rnd > 0 and kw.get("reuse_prefix") is not False:
            kw["reuse_prefix"] = True  # this round's prompt extends the last one: evaluate only what is new
        for c in llm.chat(history, stream=True, tools=tools or None,
                          tool_choice="none" if last else (choice if rnd == 0 else None), cancel=cancel, **kw):
            usage = _add_usage(usage, c.get("usage"))
            ch = (c.get("choices") or [{}])[0]
            delta = dict(ch.get("delta") or {})
            delta.pop("role", None)
            for d in delta.pop("tool_calls", None) or []:
                entry = calls.setdefault(d["index"], {"id": d.get("id"), "name": "", "arguments": ""})
                fn = d.get("function") or {}
                entry["name"] += fn.get("name") or ""
                entry["arguments"] += fn.get("arguments") or ""
            text += delta.get("content") or ""
            if any(v for v in delta.values()):
                yield chunk(delta)
            if ch.get("finish_reason") is not None:
                final = ch
        assert final is not None
        mine = [c for _, c in sorted(calls.items()) if c["name"] in mcp_names]
        others = [c for _, c in sorted(calls.items()) if c["name"] not in mcp_names]
        if mine and not others and all((c["name"], _canonical(c["arguments"])) in done for c in mine):
            answer_now = True  # the same calls again: answer from the results already in the history
            history.append({"role": "system", "content": ANSWER_NOW})
            continue
        if others:  # calls of the client's own tools: handed back to it, as without MCP
            client_calls = True
            for i, c in enumerate(others):
                yield chunk({"tool_calls": [{"index": i, "id": c["id"], "type": "function",
                                             "function": {"name": c["name"], "arguments": c["arguments"]}}]})
        if not mine or client_calls or (cancel is not None and cancel.is_set()):
            finish = final.get("finish_reason")
            if finish == "tool_calls" and not client_calls:
                finish = "stop"
            extra = {"stop_reason": final["stop_reason"]} if final.get("stop_reason") else {}
            out = chunk({}, finish, **extra)
            out["usage"] = usage
            yield out
            return
        history.append({"role": "assistant", "content": text,
                        "tool_calls": [{"id": c["id"], "type": "function",
                                        "function": {"name": c["name"], "arguments": c["arguments"]}} for c in mine]})
        for c in mine:
            try:
                args = json.loads(c["arguments"]) if c["arguments"].strip() else {}
            except ValueError:
                args = {}
            tool = hub.tools[c["name"]]
            done.add((c["name"], _canonical(c["arguments"])))
            asks = confirm is not None or hub.confirm is not None
            yield chunk({"mcp_call": {"id": c["id"], "server": tool.server, "name": c["name"], "arguments": args,
                                      **({"confirm": True} if asks else {})}})
            result = hub.call(c["name"], args, timeout=timeout, confirm=confirm, call_id=c["id"])
            yield chunk({"mcp_result": {"id": c["id"], "server": tool.server, "name": c["name"],
                                        "output": result.text, "is_error": result.is_error}})
            # Data for the model, never instructions to edge-qwen: a tool message and nothing else.
            history.append({"role": "tool", "tool_call_id": c["id"],
                            "content": f"Error: {result.text}" if result.is_error else result.text})
            if cancel is not None and cancel.is_set():
                break


def _canonical(arguments: str) -> str:
    try:
        return json.dumps(json.loads(arguments or "{}"), sort_keys=True)
    except ValueError:
        return arguments


def mcp_chat(llm: Any, hub: MCPHub, messages: list[dict[str, Any]], *, stream: bool = False,
             **kw: Any) -> dict[str, Any] | Iterator[dict[str, Any]]:
    """Chat with MCP tools: chunks when `stream`, else one chat.completion whose message has `mcp_calls`
    ([{id, server, name, arguments, output, is_error}]). Keywords: servers (None: all), max_rounds,
    timeout (per call, seconds), confirm(server, tool, arguments) -> bool, cancel, and EdgeQwen.chat's."""
    chunks = mcp_chat_stream(llm, hub, messages, **kw)
    if stream:
        return chunks
    content, reasoning, calls, tool_calls = "", "", [], []
    last: dict[str, Any] = {}
    for c in chunks:
        ch = c["choices"][0]
        d = ch["delta"]
        content += d.get("content") or ""
        reasoning += d.get("reasoning_content") or ""
        if d.get("mcp_call"):
            calls.append(dict(d["mcp_call"]))
        if d.get("mcp_result"):
            calls[-1].update(output=d["mcp_result"]["output"], is_error=d["mcp_result"]["is_error"])
        tool_calls += d.get("tool_calls") or []
        last = c
    ch = last["choices"][0]
    message: dict[str, Any] = {"role": "assistant", "content": content or (None if tool_calls else "")}
    if reasoning:
        message["reasoning_content"] = reasoning
    if tool_calls:
        message["tool_calls"] = [{k: v for k, v in t.items() if k != "index"} for t in tool_calls]
    message["mcp_calls"] = calls
    choice: dict[str, Any] = {"index": 0, "message": message, "finish_reason": ch["finish_reason"]}
    if ch.get("stop_reason"):
        choice["stop_reason"] = ch["stop_reason"]
    return {"id": last["id"], "object": "chat.completion", "created": last["created"], "model": last["model"],
            "choices": [choice], "usage": last.get("usage")}
