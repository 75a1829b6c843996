"""What POST /v1/messages accepts: the Messages request models, and Anthropic blocks as chat messages.

Anthropic's `system`, `messages` (text, image, tool_use, tool_result and thinking blocks), `tools` and
`tool_choice`, `thinking` and `output_config`, in the forms EdgeQwen.chat takes. Every refusal is a
RequestError naming the block (`messages[2].content[0]`) and what to send instead.
"""

from __future__ import annotations

import inspect
import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from ..errors import RequestError


class _Strict(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True, allow_inf_nan=False)


class Thinking(BaseModel):
    """`thinking`: {"type": "enabled", "budget_tokens": N}, "adaptive", "between_tools" or "disabled"."""

    model_config = ConfigDict(extra="ignore", strict=True)
    type: Literal["enabled", "disabled", "adaptive", "between_tools"]
    budget_tokens: int | None = Field(default=None, ge=1)
    display: Literal["summarized", "omitted"] | None = None


class OutputConfig(BaseModel):
    """`output_config`: `format` {"type": "json_schema", "schema"} constrains the answer; `effort` is not served."""

    model_config = ConfigDict(extra="ignore", strict=True)
    format: dict[str, Any] | None = None
    effort: str | None = None


class MessagesRequest(_Strict):
    """POST /v1/messages (Anthropic's Messages API)."""

    model: str = Field(description="A served model name, or a name mapped to one by `serve --alias`.")
    max_tokens: int = Field(ge=1, description="Most tokens to generate; the reply also ends at the context window.")
    messages: list[dict[str, Any]] = Field(min_length=1)
    system: str | list[dict[str, Any]] | None = None
    stop_sequences: list[str] | None = Field(default=None, max_length=16)
    # Sampling fields older SDKs send (the 2026 SDK passes them through extra_body).
    temperature: float | None = Field(default=None, ge=0.0, le=1.0, description="Default 1.0 (Anthropic's).")
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=0)
    stream: bool | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: dict[str, Any] | None = None
    thinking: Thinking | None = None
    output_config: OutputConfig | None = None
    metadata: dict[str, Any] | None = Field(default=None, description="Accepted; changes nothing.")
    mcp_servers: list[Any] | None = Field(default=None, description=(
        "edge-qwen extension (with `serve --mcp`): names of configured MCP servers whose tools the server runs."))


    @field_validator("stop_sequences")
    @classmethod
    def _stops(cls, v: Any) -> Any:
        from .protocol import _check_stop

        return _check_stop(v)


class CountTokensRequest(MessagesRequest):
    """POST /v1/messages/count_tokens: a Messages request without max_tokens."""

    max_tokens: int = Field(default=1, ge=1)


# -- request: Anthropic blocks -> chat messages -----------------------------------------------------

def _blocks(content: Any, where: str) -> list[dict[str, Any]]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if not isinstance(content, list):
        raise RequestError(f"{where}.content must be a string or a list of content blocks", param=f"{where}.content")
    for i, b in enumerate(content):
        if not isinstance(b, dict) or not isinstance(b.get("type"), str):
            raise RequestError(f"{where}.content[{i}] must be a block object with a \"type\"",
                               param=f"{where}.content.{i}")
    return content


def _text(block: dict[str, Any], where: str) -> str:
    text = block.get("text")
    if not isinstance(text, str):
        raise RequestError(f"{where}.text must be a string", param=f"{where}.text")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise RequestError(f"{where}.text contains a lone UTF-16 surrogate; send well-formed text",
                           param=f"{where}.text") from None
    return text


def _image(block: dict[str, Any], where: str) -> dict[str, Any]:
    src = block.get("source")
    if isinstance(src, dict) and src.get("type") == "base64" and isinstance(src.get("data"), str):
        return {"type": "image_url", "image_url": {"url": f"data:{src.get('media_type', 'image/png')};base64,"
                                                          f"{src['data']}"}}
    if isinstance(src, dict) and src.get("type") == "url" and isinstance(src.get("url"), str):
        return {"type": "image_url", "image_url": {"url": src["url"]}}
    raise RequestError(f"{where}.source must be {{\"type\": \"base64\", \"media_type\", \"data\"}} or "
                       "{\"type\": \"url\", \"url\"}", param=f"{where}.source")


def _tool_result_text(block: dict[str, Any], where: str) -> str:
    content = block.get("content", "")
    if isinstance(content, str):
        text = content
    elif isinstance(content, list):
        parts = []
        for i, b in enumerate(content):
            if not isinstance(b, dict) or b.get("type") != "text":
                raise RequestError(f"{where}.content[{i}]: a tool_result is passed to the model as text; send text "
                                   "blocks only", param=f"{where}.content.{i}")
            parts.append(_text(b, f"{where}.content[{i}]"))
        text = "\n".join(parts)
    else:
        raise RequestError(f"{where}.content must be a string or text blocks", param=f"{where}.content")
    # Qwen's template has no error flag: the model reads it in the result itself.
    return f"Error: {text}" if block.get("is_error") else text


def to_messages(body: MessagesRequest) -> list[dict[str, Any]]:
    """The request's system prompt and messages as the chat messages EdgeQwen.chat takes."""
    out: list[dict[str, Any]] = []
    if body.system:
        system = _text({"text": body.system}, "system") if isinstance(body.system, str) else "\n\n".join(
            _text(b, f"system[{i}]") for i, b in enumerate(_blocks(body.system, "system")))
        out.append({"role": "system", "content": system})
    for i, m in enumerate(body.messages):
        where = f"messages[{i}]"
        role = m.get("role")
        if role not in ("user", "assistant"):
            raise RequestError(f"{where}.role must be \"user\" or \"assistant\" (the system prompt goes in the "
                               f"top-level \"system\"), got {json.dumps(role)[:40]}", param=f"{where}.role")
        parts: list[dict[str, Any]] = []
        calls: list[dict[str, Any]] = []
        results: list[dict[str, Any]] = []
        for j, b in enumerate(_blocks(m.get("content"), where)):
            bw = f"{where}.content[{j}]"
            kind = b["type"]
            if kind == "text":
                parts.append({"type": "text", "text": _text(b, bw)})
            elif kind == "image" and role == "user":
                parts.append(_image(b, bw))
            elif kind == "tool_use" and role == "assistant":
                if not isinstance(b.get("name"), str) or not isinstance(b.get("id"), str):
                    raise RequestError(f"{bw} (tool_use) needs \"id\" and \"name\"", param=bw)
                calls.append({"id": b["id"], "type": "function",
                              "function": {"name": b["name"], "arguments": b.get("input") or {}}})
            elif kind == "tool_result" and role == "user":
                if not isinstance(b.get("tool_use_id"), str):
                    raise RequestError(f"{bw} (tool_result) needs \"tool_use_id\"", param=bw)
                results.append({"role": "tool", "tool_call_id": b["tool_use_id"], "content": _tool_result_text(b, bw)})
            elif kind in ("thinking", "redacted_thinking") and role == "assistant":
                continue  # earlier reasoning: Qwen's templates drop it from the history too
            else:
                raise RequestError(f"{bw} has type {kind!r}, which a {role} message cannot carry here; send text, "
                                   "image (user), tool_use (assistant) or tool_result (user) blocks", param=bw)
        out.extend(results)  # the results answer the previous turn's calls: they come first
        if any(p["type"] != "text" for p in parts):
            content: Any = parts
        else:
            content = "".join(p["text"] for p in parts)
        if role == "assistant":
            msg: dict[str, Any] = {"role": "assistant", "content": content}
            if calls:
                msg["tool_calls"] = calls
            out.append(msg)
        elif parts or not results:
            out.append({"role": "user", "content": content})
    return out


def tools_of(body: MessagesRequest) -> tuple[list[dict[str, Any]] | None, Any, bool | None]:
    """(OpenAI-shaped tools, tool_choice, parallel_tool_calls) for EdgeQwen.chat."""
    tools = None
    if body.tools:
        tools = []
        for i, t in enumerate(body.tools):
            if t.get("type") not in (None, "custom"):
                raise RequestError(f"tools[{i}].type {t.get('type')!r} is a server tool of Anthropic's, not served "
                                   "here; send client tools ({\"name\", \"description\", \"input_schema\"})",
                                   param=f"tools.{i}.type")
            fn = {"name": t.get("name"), "parameters": t.get("input_schema", {"type": "object"})}
            if t.get("description"):
                fn["description"] = t["description"]
            tools.append({"type": "function", "function": fn})
    choice, parallel = None, None
    tc = body.tool_choice
    if tc is not None:
        kind = tc.get("type")
        if kind == "auto":
            choice = "auto"
        elif kind == "any":
            choice = "required"
        elif kind == "none":
            choice = "none"
        elif kind == "tool":
            choice = {"type": "function", "function": {"name": tc.get("name")}}
        else:
            raise RequestError(f"tool_choice.type must be auto, any, tool or none, got {json.dumps(kind)[:40]}",
                               param="tool_choice.type")
        if tc.get("disable_parallel_tool_use"):
            parallel = False
    return tools, choice, parallel


def thinking_of(body: MessagesRequest, llm: Any, ignored: list[str]) -> dict[str, Any]:
    t = body.thinking
    if t is None:
        return {}
    if t.type == "disabled":
        return {"enable_thinking": False}
    out: dict[str, Any] = {"enable_thinking": True}
    if t.display == "omitted":
        ignored.append("thinking.display")  # the reasoning is returned as written
    if t.budget_tokens is not None:
        if "thinking_budget" in inspect.signature(llm.chat).parameters:
            out["thinking_budget"] = t.budget_tokens
        else:  # no budget in this runtime: said so, never dropped silently
            ignored.append("thinking.budget_tokens")
    return out


def format_of(body: MessagesRequest, ignored: list[str]) -> dict[str, Any] | None:
    """output_config.format as the runtime's response_format (the answer is JSON valid against the schema)."""
    cfg = body.output_config
    if cfg is None:
        return None
    if cfg.effort is not None:
        ignored.append("output_config.effort")
    fmt = cfg.format
    if fmt is None:
        return None
    if fmt.get("type") != "json_schema" or not isinstance(fmt.get("schema"), dict):
        raise RequestError('output_config.format must be {"type": "json_schema", "schema": {...}}',
                           param="output_config.format")
    return {"type": "json_schema", "json_schema": {"name": "output", "schema": fmt["schema"], "strict": True}}
