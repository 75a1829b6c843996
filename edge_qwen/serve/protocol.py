"""What the HTTP server accepts and how it refuses: request bodies and bad-request answers.

Request bodies: the OpenAI chat shape and the Qwen API shape. Refusals: a body over the size
limit is 413 before parsing (BodyLimit); a body that fails validation is 400 (never
FastAPI's 422), with an OpenAI-shaped error naming the first bad field.

These pydantic models are what FastAPI validates requests against and what the served
OpenAPI schema describes. No field is ignored silently: every field of the OpenAI and Qwen
chat shapes is served, refused with a 400 naming it, or (metadata that cannot change an answer:
`user`, `metadata`, `service_tier`...) accepted as documented. Fields neither API has are
tolerated, as clients send their own, but named back in the `X-Edge-Qwen-Ignored-Fields`
response header (`ignored_fields`). Bounds here are the ones the runtime can honour, so a value
that passes validation never reaches llama.cpp as something it cannot take.
"""

from __future__ import annotations

import json
import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from .api_errors import error_body
from ..runtime import DEFAULT_MAX_TOKENS, MAX_N, MAX_TOP_LOGPROBS

# The Qwen API's defaults (also used for /v1/chat/completions when a field is left out).
DEFAULT_TEMPERATURE = 0.7
DEFAULT_TOP_P = 0.9

# Unknown fields are ignored; known fields take their JSON type only ("2" is not a number, 1 is not
# true, 2.0 is not an integer), and NaN/Infinity are refused.
_LAX = ConfigDict(extra="ignore", strict=True, allow_inf_nan=False)
# The top level of a chat request keeps unknown fields, so the answer can name them (ignored_fields).
_TOP = ConfigDict(extra="allow", strict=True, allow_inf_nan=False)
IGNORED_HEADER = "X-Edge-Qwen-Ignored-Fields"
# Roles other APIs send, as the chat template knows them.
ROLE_ALIASES = {"developer": "system", "function": "tool"}


def _check_text(text: str) -> str:
    # JSON may carry lone surrogates ("\ud800"); they cannot be encoded to UTF-8 for the tokenizer.
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("text contains a lone UTF-16 surrogate, which is not valid Unicode; "
                         "send well-formed UTF-8 text") from None
    return text


class TextPart(BaseModel):
    """One part of a multi-part message content (only text parts are supported)."""

    model_config = _LAX
    type: Literal["text"]
    text: str

    @field_validator("text")
    @classmethod
    def _text(cls, v: str) -> str:
        return _check_text(v)


class ImagePart(BaseModel):
    """An image part: OpenAI's {"type": "image_url", "image_url": {"url"}} or the Qwen API's {"image": url}.

    Only a model served with its vision tower (edge_qwen.vision) reads them; the URL is checked there.
    """

    model_config = _LAX
    type: Literal["image_url", "image"] | None = None
    image_url: str | dict[str, Any] | None = None
    image: str | None = None

    def plain(self) -> dict[str, Any]:
        url = self.image_url.get("url") if isinstance(self.image_url, dict) else self.image_url
        return {"type": "image_url", "image_url": {"url": url if url is not None else self.image}}


class Message(BaseModel):
    """One chat message."""

    model_config = _LAX
    role: Literal["system", "user", "assistant", "tool", "developer", "function"] = Field(
        description='"developer" is read as "system" and "function" as "tool".')
    content: str | list[TextPart | ImagePart] | None = None
    name: str | None = Field(default=None, max_length=256, description=(
        "The speaker's name: passed to the chat template where it has a place for one, refused otherwise (a tool "
        "message's name, the called function's, is redundant with tool_call_id and accepted)."))
    tool_calls: list[dict[str, Any]] | None = Field(default=None, description="An assistant message's calls.")
    tool_call_id: str | None = Field(default=None, description="A tool message: the id of the call it answers.")

    @field_validator("content", mode="before")
    @classmethod
    def _parts(cls, v: Any) -> Any:
        # Name an image/audio part plainly instead of pydantic's "not a valid string" for each union member.
        if isinstance(v, list):
            for i, part in enumerate(v):
                kind = part.get("type") if isinstance(part, dict) else None
                if isinstance(part, dict) and kind is None and ("text" in part or "image" in part):
                    v[i] = {"type": "text" if "text" in part else "image", **part}  # the Qwen API's parts
                elif isinstance(kind, str) and kind not in ("text", "image_url", "image"):
                    raise ValueError(f"content part {i} has type {kind!r}: edge-qwen serves text-only Qwen2.5 "
                                     "models; send the content as a string or as parts like "
                                     "{'type': 'text', 'text': '...'}")
        return v

    @field_validator("content")
    @classmethod
    def _content(cls, v: Any) -> Any:
        if isinstance(v, str):
            return _check_text(v)
        return v

    def plain(self) -> dict[str, str]:
        """The message as the runtime takes it: {"role", "content"} with the parts joined."""
        c = self.content
        if c is None:
            text = ""
        elif isinstance(c, str):
            text = c
        elif any(isinstance(p, ImagePart) for p in c):  # parts kept for a vision model (edge_qwen.vision)
            text = [p.plain() if isinstance(p, ImagePart) else {"type": "text", "text": p.text} for p in c]
        else:
            text = "".join(p.text for p in c)
        out: dict[str, Any] = {"role": ROLE_ALIASES.get(self.role, self.role), "content": text}
        if self.tool_calls:
            out["tool_calls"] = self.tool_calls
        if self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        if self.name is not None:
            out["name"] = self.name
        return out


class JSONSchemaSpec(BaseModel):
    """The `json_schema` member of an OpenAI `response_format`."""

    model_config = _LAX
    name: str = "response"
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    """`response_format`: text (the default), any JSON object, or JSON matching a schema."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True, strict=True)
    type: Literal["text", "json_object", "json_schema"] = "text"
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    json_schema: JSONSchemaSpec | None = None

    def runtime_form(self) -> dict[str, Any] | None:
        """The dict EdgeQwen.generate takes, or None for plain text."""
        if self.type == "text":
            return None
        if self.type == "json_object":
            out: dict[str, Any] = {"type": "json_object"}
            if self.schema_ is not None:
                out["schema"] = self.schema_
            return out
        if self.json_schema is None:
            from ..errors import RequestError

            raise RequestError('response_format type "json_schema" needs a "json_schema" object with a "schema"',
                               param="response_format.json_schema")
        spec = {"name": self.json_schema.name}
        if self.json_schema.schema_ is not None:
            spec["schema"] = self.json_schema.schema_
        if self.json_schema.strict is not None:
            spec["strict"] = self.json_schema.strict
        return {"type": "json_schema", "json_schema": spec}


class StreamOptions(BaseModel):
    model_config = _LAX
    include_usage: bool = False


Stop = str | list[str] | None
Seed = Field(default=None, ge=0, le=2**32 - 1, description="Sampling seed (0 to 2**32-1).")


def _check_stop(v: Stop) -> Stop:
    items = [v] if isinstance(v, str) else (v or [])
    if any(s == "" for s in items):
        raise ValueError("stop strings must not be empty")
    if len(items) > 16:
        raise ValueError("at most 16 stop strings are supported")
    for s in items:
        _check_text(s)  # a lone surrogate is refused here as it is in content
    return v


def _check_count(v: Any) -> Any:
    # Before item validation, so a body of 20,000 messages is refused without looking at each one.
    from ..chat_template import MAX_MESSAGES

    if isinstance(v, list) and len(v) > MAX_MESSAGES:
        raise ValueError(f"{len(v)} messages is over this server's limit of {MAX_MESSAGES} per request; send "
                         "fewer (drop or summarize old turns)")
    return v


class _Sampling(BaseModel):
    """Sampling fields beyond temperature/top_p, each applied by a llama.cpp sampler (never ignored)."""

    model_config = _LAX
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0, description=(
        "OpenAI's: -2 to 2 (default 0), subtracted from a token's logit once per time it was generated so far."))
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0, description=(
        "OpenAI's: -2 to 2 (default 0), subtracted from the logit of every token generated so far."))
    logit_bias: dict[str, Annotated[int, Field(ge=-100, le=100)]] | None = Field(
        default=None, max_length=1024, description="OpenAI's: token id (as a string) -> bias from -100 to 100 added "
        "to its logit (-100 bans it, 100 all but forces it); at most 1024 entries.")
    top_k: int | None = Field(default=None, ge=0, description="Sample among the k most likely tokens (0 or null: "
                              "no cut; the Qwen API's and vLLM's field).")
    repetition_penalty: float | None = Field(default=None, description=(
        "Not supported: only null or 1.0; use presence_penalty / frequency_penalty."))
    logprobs: bool | None = Field(default=None, description=(
        "OpenAI's: each generated token's log-probability (choices[].logprobs.content), from the model's raw "
        "distribution (before temperature, penalties, bias and constraints)."))
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS, description=(
        f"0 to {MAX_TOP_LOGPROBS} most likely alternatives per token (needs logprobs: true)."))

    @field_validator("repetition_penalty")
    @classmethod
    def _repetition(cls, v: Any) -> Any:
        if v is not None and v != 1.0:
            raise ValueError("repetition_penalty is not supported by edge-qwen; leave it out (or 1.0) and use "
                             "presence_penalty or frequency_penalty (-2 to 2)")
        return v

    def sampling_kwargs(self) -> dict[str, Any]:
        """The EdgeQwen.chat keywords for these fields (defaults where left out)."""
        return {"frequency_penalty": self.frequency_penalty or 0.0, "presence_penalty": self.presence_penalty or 0.0,
                "top_k": self.top_k or 0, "logit_bias": self.logit_bias or None,
                "logprobs": bool(self.logprobs), "top_logprobs": self.top_logprobs}


class _Unsupported(BaseModel):
    """Fields of the OpenAI and Qwen APIs this server does not serve: refused rather than ignored, so
    an agent framework learns at once that they are not served."""

    model_config = _LAX
    functions: list[dict[str, Any]] | None = Field(default=None, description="Legacy function calling: not supported.")
    function_call: Any = Field(default=None, description='Legacy function calling: not supported (absent or "none").')

    @field_validator("functions")
    @classmethod
    def _tools(cls, v: Any) -> Any:
        if v:
            raise ValueError("legacy `functions` are not served; send them as tools: "
                             "[{\"type\": \"function\", \"function\": {...}}]")
        return v

    @field_validator("function_call")
    @classmethod
    def _tool_choice(cls, v: Any) -> Any:
        if v not in (None, "none"):
            raise ValueError('legacy `function_call` is not served; use tool_choice')
        return v



class _OpenAIFields(BaseModel):
    """The OpenAI chat fields that are not sampling: metadata accepted as it changes no answer, and
    features refused because they are not served here."""

    model_config = _LAX
    user: str | None = Field(default=None, description="Accepted; changes nothing (OpenAI's end-user id).")
    safety_identifier: str | None = Field(default=None, description="Accepted; changes nothing.")
    metadata: dict[str, Any] | None = Field(default=None, description="Accepted; changes nothing.")
    service_tier: str | None = Field(default=None, description="Accepted; changes nothing (one tier here).")
    prediction: dict[str, Any] | None = Field(default=None, description=(
        "Accepted; changes nothing (OpenAI's predicted outputs only speed an answer up)."))
    prompt_cache_key: str | None = Field(default=None, max_length=256, description=(
        "OpenAI's name for the prefix-cache scope: the same as cache_salt."))
    store: bool | None = Field(default=None, description="Not served: false or absent (nothing is stored).")
    modalities: list[str] | None = Field(default=None, description='Only ["text"].')
    audio: dict[str, Any] | None = Field(default=None, description="Not served: absent.")
    web_search_options: dict[str, Any] | None = Field(default=None, description="Not served (offline): absent.")
    reasoning_effort: str | None = Field(default=None, description=(
        "Not served: absent (use enable_thinking, or reasoning: \"step_by_step\")."))
    verbosity: str | None = Field(default=None, description="Not served: absent.")

    @field_validator("store")
    @classmethod
    def _store(cls, v: Any) -> Any:
        if v:
            raise ValueError("store=true is not served: edge-qwen keeps no completions; leave store out or false")
        return v

    @field_validator("modalities")
    @classmethod
    def _modalities(cls, v: Any) -> Any:
        if v is not None and v != ["text"]:
            raise ValueError('only text is generated here; send modalities ["text"] or leave it out')
        return v

    @field_validator("audio", "web_search_options", "reasoning_effort", "verbosity")
    @classmethod
    def _refused(cls, v: Any, info: Any) -> Any:
        if v is not None:
            why = {"audio": "no audio output", "web_search_options": "no web search offline",
                   "reasoning_effort": "use enable_thinking (Qwen3) or reasoning: \"step_by_step\"",
                   "verbosity": "say how long the answer should be in the prompt, or set max_tokens"}[info.field_name]
            raise ValueError(f"{info.field_name} is not served by edge-qwen ({why}); leave it out")
        return v


class _Tooling(_Unsupported):
    """Function calling (checked in depth by engine.tool_calls.parse_tools)."""

    tools: list[dict[str, Any]] | None = Field(default=None, description='[{"type": "function", "function": '
                                               '{"name", "description", "parameters"}}]')
    tool_choice: str | dict[str, Any] | None = Field(default=None, description='"none", "auto" (default with '
                                                     'tools), "required" or {"type": "function", "function": '
                                                     '{"name": ...}}.')
    parallel_tool_calls: bool | None = Field(default=None, description="Default true: several calls per reply.")

    def tool_kwargs(self) -> dict[str, Any]:
        return {"tools": self.tools, "tool_choice": self.tool_choice, "parallel_tool_calls": self.parallel_tool_calls}


class ChatRequest(_OpenAIFields, _Tooling, _Sampling):
    """POST /v1/chat/completions (OpenAI chat completions)."""

    model_config = _TOP
    model: str | None = Field(default=None, description="Served model name; omitted means the first (default) model.")
    messages: list[Message] = Field(min_length=1)
    # null means the default, as in OpenAI's API.
    temperature: float | None = Field(default=None, ge=0.0, le=2.0, description=f"Default {DEFAULT_TEMPERATURE}.")
    top_p: float | None = Field(default=None, gt=0.0, le=1.0, description=f"Default {DEFAULT_TOP_P}.")
    max_tokens: int | None = Field(default=None, ge=1, description=f"Default {DEFAULT_MAX_TOKENS}, or the room the "
                                   "prompt leaves in the context window when that is less.")
    max_completion_tokens: int | None = Field(default=None, ge=1, description="Alias of max_tokens.")
    stream: bool | None = Field(default=None, description="Default false.")
    stream_options: StreamOptions | None = None
    stop: Stop = None
    seed: int | None = Seed
    n: int | None = Field(default=None, ge=1, le=MAX_N, description=(
        f"Choices to generate, 1 to {MAX_N} (default 1), together on the batched engine; with temperature 0 they "
        "are identical."))
    response_format: ResponseFormat | None = None
    enable_thinking: bool | None = Field(default=None, description=(
        "Qwen3 thinking (vLLM's chat_template_kwargs.enable_thinking, the Qwen API's enable_thinking): null = the "
        "model's default (on) unless the last user message says /no_think; the reasoning comes back apart as "
        "reasoning_content."))
    chat_template_kwargs: dict[str, Any] | None = Field(default=None, description=(
        "vLLM's template arguments: only enable_thinking (others are refused)."))
    reasoning: Literal["step_by_step"] | None = Field(default=None, description=(
        "edge-qwen extension: \"step_by_step\" makes any model reason first; the reasoning comes back apart as "
        "reasoning_content and a response_format constrains the answer only."))
    cache_salt: str | None = Field(default=None, max_length=256, description=(
        "Prefix-cache scope (vLLM's name): a prompt reuses cached KV only from requests with the same API key "
        "and the same cache_salt."))
    mcp_servers: list[str | dict[str, Any]] | None = Field(default=None, description=(
        "edge-qwen extension (serve --mcp): names of the server's MCP servers whose tools the model may call; the "
        "server runs the tool loop, and a stream shows each call (delta.mcp_call) and result (delta.mcp_result)."))

    @field_validator("stop")
    @classmethod
    def _stop(cls, v: Stop) -> Stop:
        return _check_stop(v)

    @field_validator("messages", mode="before")
    @classmethod
    def _count(cls, v: Any) -> Any:
        return _check_count(v)

    @field_validator("chat_template_kwargs")
    @classmethod
    def _template_kwargs(cls, v: Any) -> Any:
        other = sorted(k for k in (v or {}) if k != "enable_thinking")
        if other:
            raise ValueError(f"only enable_thinking is served here, not {', '.join(other)[:200]}; leave them out")
        return v

    def ignored_fields(self) -> list[str]:
        """Top-level fields neither the OpenAI nor the Qwen API has, tolerated and named back to the client."""
        return sorted(self.model_extra or ())

    def limit(self) -> int | None:
        """max_tokens as given; None when left out (the runtime then takes the default, 1024, or the
        room the prompt leaves in the context, whichever is less)."""
        return self.max_tokens or self.max_completion_tokens

    def runtime_kwargs(self) -> dict[str, Any]:
        """What EdgeQwen.chat takes for this request (defaults filled in), without `stream`."""
        from ..engine.tool_calls import check_tool_ids

        messages = [m.plain() for m in self.messages]
        check_tool_ids(messages)
        return {"messages": messages, **self.tool_kwargs(),
                "temperature": DEFAULT_TEMPERATURE if self.temperature is None else self.temperature,
                "top_p": DEFAULT_TOP_P if self.top_p is None else self.top_p,
                "max_tokens": self.limit(), "stop": self.stop, "seed": self.seed, **self.sampling_kwargs(),
                "n": self.n or 1,
                "response_format": self.response_format.runtime_form() if self.response_format else None,
                **self._thinking(), **({"reasoning": self.reasoning} if self.reasoning else {})}

    def _thinking(self) -> dict[str, Any]:
        """enable_thinking for EdgeQwen.chat, from the field or chat_template_kwargs (left out when unset)."""
        on = self.enable_thinking
        if on is None and self.chat_template_kwargs:
            on = self.chat_template_kwargs.get("enable_thinking")
        return {} if on is None else {"enable_thinking": on}


class QwenParameters(_Tooling, _Sampling):
    """The `parameters` object of the Qwen (DashScope) request shape."""

    model_config = _TOP
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    max_tokens: int | None = Field(default=None, ge=1)
    stream: bool | None = None
    stop: Stop = None
    seed: int | None = Seed
    response_format: ResponseFormat | None = None
    enable_thinking: bool | None = Field(default=None, description=(
        "Qwen3 thinking (vLLM's chat_template_kwargs.enable_thinking, the Qwen API's enable_thinking): null = the "
        "model's default (on) unless the last user message says /no_think; the reasoning comes back apart as "
        "reasoning_content."))
    n: int | None = Field(default=None, ge=1, le=MAX_N, description=f"Choices to generate, 1 to {MAX_N}.")
    result_format: Literal["text", "message"] | None = Field(default=None, description=(
        'DashScope\'s answer shape: "text" ({"output": {"text", "finish_reason"}}) or "message" ({"output": '
        '{"choices": [{"message", "finish_reason"}]}}), with DashScope usage (input_tokens, output_tokens). '
        "Left out: the OpenAI chat.completion shape."))
    incremental_output: bool | None = Field(default=None, description=(
        "DashScope streaming: true sends each event's new text only, false (DashScope's default) the whole text "
        "so far. Cumulative events need a result_format; the OpenAI-shaped stream is incremental."))
    enable_search: bool | None = Field(default=None, description="Not served (no web search offline): false or absent.")

    @field_validator("enable_search")
    @classmethod
    def _search(cls, v: Any) -> Any:
        if v:
            raise ValueError("enable_search=true is not served: edge-qwen runs offline and searches nothing; leave "
                             "it out or false (the /v1/rag endpoints answer from your own documents)")
        return v

    @field_validator("stop")
    @classmethod
    def _stop(cls, v: Stop) -> Stop:
        return _check_stop(v)

    @field_validator("messages", mode="before", check_fields=False)  # QwenPredictRequest's messages
    @classmethod
    def _count(cls, v: Any) -> Any:
        return _check_count(v)


class QwenInput(BaseModel):
    """DashScope's `input`: `messages`, or a single `prompt` (one user message)."""

    model_config = _TOP
    messages: list[Message] | None = Field(default=None, min_length=1)
    prompt: str | None = Field(default=None, description="Instead of messages: the text of one user message.")

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v: Any) -> Any:
        return v if v is None else _check_text(v)

    @field_validator("messages", mode="before")
    @classmethod
    def _count(cls, v: Any) -> Any:
        return _check_count(v)


class QwenPredictRequest(QwenParameters):
    """POST /api/v1/qwen/predict: the Qwen API parameters, flat or DashScope-nested.

    Either `messages` or `input.messages`; parameters at the top level (the fields inherited
    from QwenParameters, with its `stop` check) or under `parameters` (top level wins).
    Defaults are the Qwen API's: temperature 0.7, top_p 0.9, max_tokens 1024, stream false.
    """

    model_config = _TOP
    model: str | None = None
    messages: list[Message] | None = Field(default=None, min_length=1)
    input: QwenInput | None = None
    parameters: QwenParameters | None = None

    def pick(self, name: str, default: Any = None) -> Any:
        """A parameter's value: the top level's, else the nested `parameters`' one, else `default`."""
        top = getattr(self, name)
        if top is not None:
            return top
        nested = getattr(self.parameters, name, None) if self.parameters is not None else None
        return default if nested is None else nested

    def to_chat(self) -> ChatRequest:
        """The same request in the OpenAI shape (raises RequestError without messages)."""
        from ..errors import RequestError

        messages = self.messages or (self.input.messages if self.input else None)
        if not messages and self.input is not None and self.input.prompt is not None:
            messages = [Message(role="user", content=self.input.prompt)]
        if not messages:
            raise RequestError('no messages: give "messages" (or "input": {"messages": [...]} or {"prompt": "..."}) '
                               "with at least one message", param="messages")
        pick = self.pick
        chat = ChatRequest.model_construct(
            model=self.model, messages=messages,
            temperature=pick("temperature", DEFAULT_TEMPERATURE), top_p=pick("top_p", DEFAULT_TOP_P),
            max_tokens=pick("max_tokens", None), max_completion_tokens=None,
            stream=pick("stream", False), stream_options=None, stop=pick("stop", None),
            seed=pick("seed", None), n=pick("n", 1), response_format=pick("response_format", None),
            enable_thinking=pick("enable_thinking", None), chat_template_kwargs=None,
            tools=pick("tools", None), tool_choice=pick("tool_choice", None),
            parallel_tool_calls=pick("parallel_tool_calls", None),
            **{name: pick(name, None) for name in _Sampling.model_fields},
            **{name: None for name in _OpenAIFields.model_fields})
        extra = dict(self.model_extra or {})
        if self.input is not None:  # the unknown fields under input and parameters count too
            extra.update({f"input.{k}": v for k, v in (self.input.model_extra or {}).items()})
        if self.parameters is not None:
            extra.update({f"parameters.{k}": v for k, v in (self.parameters.model_extra or {}).items()})
        chat.__pydantic_extra__ = extra
        return chat


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorBody(BaseModel):
    """Every error the server answers: {"error": {"message", "type", "param", "code"}}."""

    error: ErrorDetail


async def send_error(send: Any, status: int, body: dict[str, Any], close: bool = False, scope: Any = None) -> None:
    """Answer an error body as JSON straight through ASGI `send` (for middleware, below the app's handlers).
    With `close` the answer says `Connection: close` and the server closes the connection after it. With the
    request's `scope`, an Anthropic API path gets Anthropic's error shape (serve/anthropic.py)."""
    if scope is not None:
        from .anthropic import anthropic_error_body, is_anthropic_path

        if is_anthropic_path(scope.get("path", "")):
            body = anthropic_error_body(status, body)
    data = json.dumps(body).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
    await send({"type": "http.response.start", "status": status,
                "headers": headers + ([(b"connection", b"close")] if close else [])})
    await send({"type": "http.response.body", "body": data})


class BodyLimit:
    """ASGI middleware in front of every POST: a body over `limit` bytes is answered 413 before
    any parsing, a body that is not UTF-8 is 400, and the body is read as JSON whatever its
    Content-Type says (`curl -d` sends application/x-www-form-urlencoded)."""

    def __init__(self, app: Any, limit: int):
        self.app, self.limit = app, limit

    async def _reject(self, send: Any, size: str, scope: Any = None) -> None:
        await send_error(send, 413, error_body(f"request body of {size} bytes is over this server's limit of "
                                               f"{self.limit} bytes (serve --max-body); send a shorter request",
                                               code="request_too_large"), scope=scope)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            return await self.app(scope, receive, send)
        for key, value in scope.get("headers", []):
            if key == b"content-length" and value.isdigit() and int(value) > self.limit:
                return await self._reject(send, value.decode(), scope)
        parts, total = [], 0
        while True:  # buffer the body (it is small by definition) so chunked uploads are counted too
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            total += len(chunk)
            if total > self.limit:
                return await self._reject(send, f"more than {self.limit}", scope)
            parts.append(chunk)
            if not message.get("more_body"):
                break
        data = b"".join(parts)
        try:
            data.decode("utf-8")
        except UnicodeDecodeError as e:
            return await send_error(send, 400, error_body(f"request body is not UTF-8 (bad byte at offset {e.start}); "
                                                          "send JSON encoded as UTF-8", code="invalid_json"), scope=scope)
        headers = [(k, v) for k, v in scope.get("headers", []) if k != b"content-type"]
        scope = {**scope, "headers": headers + [(b"content-type", b"application/json")]}
        replayed = False

        async def replay() -> dict[str, Any]:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": data, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


_UNION_TAG = re.compile(r"^(str|int|float|bool|list|dict|none|[a-z_-]+\[.*\])$")


def validation_error(exc: Any) -> Any:
    """A FastAPI RequestValidationError as a 400 OpenAI-shaped error naming the first bad field."""
    from fastapi.responses import JSONResponse

    return JSONResponse(validation_error_body(exc.errors()), status_code=400)


def validation_error_body(errors: list[dict[str, Any]]) -> dict[str, Any]:
    """The OpenAI-shaped error body for pydantic validation `errors` (ValidationError.errors())."""
    first = errors[0] if errors else {"loc": (), "msg": "invalid request", "type": "value_error"}
    # Drop "body" and pydantic's union-member tags ("str", "list[TextPart]") from the location.
    loc = [str(p) for p in first.get("loc", ()) if p != "body" and not _UNION_TAG.match(str(p))]
    param = ".".join(loc) or None
    if first.get("type") == "json_invalid":
        message = f"request body is not valid JSON ({first.get('msg')}); send a JSON object"
        param, code = None, "invalid_json"
    else:
        msg = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
        message = f"{param or 'body'}: {msg}"
        if len(errors) > 1:
            message += f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})"
        code = "invalid_request"
    return error_body(message, param=param, code=code)
