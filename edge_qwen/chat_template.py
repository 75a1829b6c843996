"""Chat messages to prompt text, through the chat template stored in the GGUF file.

The template is Jinja2, rendered the way Hugging Face transformers renders it (sandboxed,
`trim_blocks`, `lstrip_blocks`, a `tojson` filter and `raise_exception`), so a prompt built
here is byte-for-byte the prompt the model was trained on. Messages are validated first so a
bad request fails with a RequestError naming the offending message, never inside Jinja.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from typing import Any

from .errors import RequestError

ROLES = ("system", "user", "assistant", "tool")
# Messages one request may carry (OpenAI's limit too). It bounds what one request costs to render and
# tokenize before it is refused: llama.cpp's special-token split grows with the square of the number of
# control tokens in a prompt (25,000 empty messages took 28 s to tokenize, 1,000 took 0.03 s).
MAX_MESSAGES = 2048

# ChatML, used only when a GGUF carries no template at all (Qwen2.5 files always do).
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def validate_messages(messages: Any) -> list[dict[str, Any]]:
    """Check an OpenAI-style message list; return it as a list of plain dicts.

    Raises RequestError (param="messages") for an empty or non-list value, a message that is
    not an object, an unknown role or a content that is not a string.
    """
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise RequestError(
            f"messages must be a list of {{'role': ..., 'content': ...}} objects, got {type(messages).__name__}",
            param="messages")
    if len(messages) == 0:
        raise RequestError("messages is empty; give at least one {'role': 'user', 'content': ...} message",
                           param="messages")
    if len(messages) > MAX_MESSAGES:
        raise RequestError(f"{len(messages)} messages is over the limit of {MAX_MESSAGES} per request; send fewer "
                           "(drop or summarize old turns)", param="messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise RequestError(f"messages[{i}] must be an object with 'role' and 'content', got {type(m).__name__}",
                               param=f"messages[{i}]")
        role = m.get("role")
        if role not in ROLES:
            raise RequestError(f"messages[{i}].role is {str(role)[:40]!r}; use one of {', '.join(ROLES)}",
                               param=f"messages[{i}].role")
        content = m.get("content")
        if not isinstance(content, str):
            raise RequestError(
                f"messages[{i}].content must be a string, got {type(content).__name__}; "
                "send text content (images and content parts are not supported)",
                param=f"messages[{i}].content")
        out.append(dict(m))
    return out


def _tojson(value: Any, indent: int | None = None, ensure_ascii: bool = False) -> str:
    # transformers' tojson keeps non-ASCII text as is (Chinese stays Chinese in tool schemas).
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent)


def _raise_exception(message: str):
    raise RequestError(f"the chat template refused the messages: {message}", param="messages")


@functools.lru_cache(maxsize=8)
def compile_template(source: str):
    """Compile a chat template once (cached by its text)."""
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    try:
        return env.from_string(source)
    except jinja2.TemplateError as e:
        from .errors import ModelFileError

        raise ModelFileError(f"the model's tokenizer.chat_template is not valid Jinja ({e}); "
                             "fix the GGUF metadata or reconvert the model") from None


def render_chat(template: str | None, messages: Any, *, add_generation_prompt: bool = True,
                tools: list[dict] | None = None, bos_token: str = "", eos_token: str = "") -> str:
    """Render validated `messages` with the model's chat `template` (ChatML when None)."""
    msgs = validate_messages(messages)
    compiled = compile_template(template or CHATML_TEMPLATE)
    return compiled.render(messages=msgs, add_generation_prompt=add_generation_prompt, tools=tools,
                           bos_token=bos_token, eos_token=eos_token)
