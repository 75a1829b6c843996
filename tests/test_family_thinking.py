"""Qwen3 thinking in EdgeQwen.chat and the server: reasoning_content apart from content, on and off.

No real Qwen3 model is available here (no Hub, and none ships on PyPI), so these tests run a
tiny Qwen3 GGUF converted by edge-qwen whose greedy reply is fixed by hand-set weights
(tests/family_models.make_scripted_qwen3): after the generation prompt it writes
"<think>Let me see</think>\n\nHello", after Qwen3's empty think block it writes "Hello".
They test the plumbing (template switch, splitting, streaming, the JSON constraint held back
until the answer), not a real model's reasoning.
"""

from __future__ import annotations

import json
import warnings

import pytest

from family_models import THINKING_SCRIPT, make_scripted_qwen3

from edge_qwen.errors import RequestError

HI = [{"role": "user", "content": "hi"}]
GREEDY = {"temperature": 0.0, "max_tokens": 24}
SCHEMA = {"type": "json_schema", "json_schema": {"name": "a", "schema": {
    "type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"], "additionalProperties": False}}}


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory):
    from edge_qwen import EdgeQwen
    from edge_qwen.convert.writer import convert

    root = tmp_path_factory.mktemp("scripted")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path = convert(make_scripted_qwen3(root / "qwen3-scripted", THINKING_SCRIPT), root / "qwen3.gguf",
                       outtype="f16", quiet=True)
    model = EdgeQwen(path, n_ctx=512)
    yield model
    model.close()


def _message(model, messages, **kw) -> dict:
    return model.chat(messages, **GREEDY, **kw)["choices"][0]["message"]


def test_thinking_on_by_default_and_off(qwen3):
    assert _message(qwen3, HI) == {"role": "assistant", "content": "Hello", "reasoning_content": "Let me see"}
    assert _message(qwen3, HI, enable_thinking=False) == {"role": "assistant", "content": "Hello"}
    assert _message(qwen3, HI, enable_thinking=True)["reasoning_content"] == "Let me see"


def test_soft_switches(qwen3):
    assert "reasoning_content" not in _message(qwen3, [{"role": "user", "content": "hi /no_think"}])
    sys_off = [{"role": "system", "content": "Be brief. /no_think"}, {"role": "user", "content": "hi /think"}]
    assert _message(qwen3, sys_off)["reasoning_content"] == "Let me see"  # the latest instruction wins
    assert "reasoning_content" not in _message(qwen3, [{"role": "system", "content": "/no_think"}, *HI])
    # the hard switch beats the soft one, as in Qwen3's template
    assert "reasoning_content" not in _message(qwen3, [{"role": "user", "content": "hi /think"}],
                                               enable_thinking=False)


def test_stream_reasoning_then_content(qwen3):
    deltas = [c["choices"][0]["delta"] for c in qwen3.chat(HI, stream=True, **GREEDY) if c["choices"]]
    kinds = [k for d in deltas for k in d if k in ("reasoning_content", "content") and d[k]]
    assert kinds == ["reasoning_content"] * 3 + ["content"]
    assert "".join(d.get("reasoning_content", "") for d in deltas) == "Let me see"
    assert "".join(d.get("content") or "" for d in deltas) == "Hello"
    off = [c["choices"][0]["delta"] for c in qwen3.chat(HI, stream=True, enable_thinking=False, **GREEDY)
           if c["choices"]]
    assert not any("reasoning_content" in d for d in off) and "".join(d.get("content") or "" for d in off) == "Hello"


def test_json_schema_constrains_the_answer_not_the_reasoning(qwen3):
    msg = _message(qwen3, HI, response_format=SCHEMA)
    assert msg["reasoning_content"] == "Let me see"  # free text: a schema from the first token would forbid it
    assert set(json.loads(msg["content"])) == {"a"}
    off = _message(qwen3, HI, response_format=SCHEMA, enable_thinking=False)
    assert "reasoning_content" not in off and set(json.loads(off["content"])) == {"a"}


def test_enable_thinking_on_a_model_without_thinking(tiny_checkpoint, tmp_path):
    from edge_qwen import EdgeQwen
    from edge_qwen.convert.writer import convert

    m = EdgeQwen(convert(tiny_checkpoint, tmp_path / "q2.gguf", outtype="q8_0", quiet=True), n_ctx=256)
    try:
        with pytest.raises(RequestError, match="no thinking mode"):
            m.chat(HI, enable_thinking=True, max_tokens=2)
        with pytest.raises(RequestError, match="true or false"):
            m.chat(HI, enable_thinking="yes", max_tokens=2)
        assert "reasoning_content" not in m.chat(HI, enable_thinking=False, **GREEDY)["choices"][0]["message"]
    finally:
        m.close()


def test_server_thinking(qwen3):
    import httpx
    import openai

    from edge_qwen.serve.app import ServerThread, create_app

    with ServerThread(create_app({"qwen3": qwen3})) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)
        r = client.chat.completions.create(model="qwen3", messages=HI, **GREEDY)
        msg = r.choices[0].message
        assert msg.content == "Hello" and msg.model_extra["reasoning_content"] == "Let me see"
        off = client.chat.completions.create(model="qwen3", messages=HI, **GREEDY,
                                             extra_body={"chat_template_kwargs": {"enable_thinking": False}})
        assert off.choices[0].message.content == "Hello" and not (off.choices[0].message.model_extra or {}).get(
            "reasoning_content")
        kinds = []
        for chunk in client.chat.completions.create(model="qwen3", messages=HI, stream=True, **GREEDY):
            if chunk.choices:
                d = chunk.choices[0].delta
                kinds += ["reasoning"] * bool((d.model_extra or {}).get("reasoning_content")) + ["content"] * bool(d.content)
        assert kinds == ["reasoning"] * 3 + ["content"]
        with httpx.Client(base_url=url, timeout=120) as http:
            q = http.post("/api/v1/qwen/predict", json={"input": {"messages": HI},
                                                        "parameters": {**GREEDY, "enable_thinking": False}})
            assert q.status_code == 200 and q.json()["choices"][0]["message"] == {"role": "assistant",
                                                                                  "content": "Hello"}
            bad = http.post("/v1/chat/completions", json={"messages": HI, "enable_thinking": "on"})
            assert bad.status_code == 400 and "enable_thinking" in bad.json()["error"]["message"]
