"""The chat template stored in the GGUF, rendered like transformers renders it; message validation."""

from __future__ import annotations

import pytest

from edge_qwen.chat_template import render_chat, validate_messages
from edge_qwen.errors import RequestError
from edge_qwen.gguf_file import read_header

DEFAULT_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."


@pytest.fixture(scope="module")
def template(default_model) -> str:
    meta, _, _ = read_header(default_model)
    return meta["tokenizer.chat_template"]


CONVERSATIONS = [
    [{"role": "user", "content": "hi"}],
    [{"role": "system", "content": "Answer in French."}, {"role": "user", "content": "Hello"}],
    [{"role": "user", "content": "写一首关于春天的诗。"}, {"role": "assistant", "content": "春风拂面 🌸"},
     {"role": "user", "content": "再写一首。"}],
    [{"role": "system", "content": "s"}, {"role": "user", "content": "weather?"},
     {"role": "assistant", "content": "calling"}, {"role": "tool", "content": '{"t": 21}'},
     {"role": "tool", "content": '{"h": 40}'}, {"role": "user", "content": "thanks"}],
    [{"role": "user", "content": "a\n\n  indented {{ not jinja }} {% raw %}"}],
]


def test_chatml_exact_text(template):
    text = render_chat(template, [{"role": "user", "content": "hi"}])
    assert text == (f"<|im_start|>system\n{DEFAULT_SYSTEM}<|im_end|>\n"
                    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    text = render_chat(template, [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
                                  {"role": "assistant", "content": "Hello!"}], add_generation_prompt=False)
    assert text == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n"
                    "<|im_start|>assistant\nHello!<|im_end|>\n")


@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_same_text_as_transformers(template, messages):
    from transformers.utils.chat_template_utils import render_jinja_template

    theirs = render_jinja_template([messages], chat_template=template, add_generation_prompt=True)
    while isinstance(theirs, (list, tuple)):  # (rendered conversations, generation indices)
        theirs = theirs[0]
    assert render_chat(template, messages) == theirs


def test_tools_are_rendered_with_tojson(template):
    tools = [{"type": "function", "function": {"name": "天气", "parameters": {"type": "object"}}}]
    text = render_chat(template, [{"role": "user", "content": "hi"}], tools=tools)
    assert '"name": "天气"' in text and "<tools>" in text


def test_no_template_falls_back_to_chatml():
    assert render_chat(None, [{"role": "user", "content": "x"}]) == (
        "<|im_start|>user\nx<|im_end|>\n<|im_start|>assistant\n")


def test_template_is_sandboxed():
    from jinja2.exceptions import SecurityError

    evil = "{{ messages.__class__.__mro__[1].__subclasses__() }}"
    with pytest.raises(SecurityError):
        render_chat(evil, [{"role": "user", "content": "x"}])


def test_raise_exception_becomes_request_error():
    tpl = "{% if messages[0]['role'] != 'user' %}{{ raise_exception('first message must be the user') }}{% endif %}"
    with pytest.raises(RequestError, match="first message must be the user"):
        render_chat(tpl, [{"role": "assistant", "content": "x"}])


@pytest.mark.parametrize("messages, match, param", [
    ([], "empty", "messages"),
    ("hello", "list", "messages"),
    (None, "list", "messages"),
    ([{"role": "robot", "content": "x"}], "robot", "messages[0].role"),
    ([{"content": "x"}], "None", "messages[0].role"),
    ([{"role": "user", "content": 5}], "string", "messages[0].content"),
    ([{"role": "user", "content": "ok"}, {"role": "user", "content": [{"type": "text"}]}], "string",
     "messages[1].content"),
    (["hi"], "object", "messages[0]"),
])
def test_bad_messages(messages, match, param):
    with pytest.raises(RequestError, match=match) as e:
        validate_messages(messages)
    assert e.value.param == param
