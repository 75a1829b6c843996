"""Fields peers serve, through the official `openai` package (and httpx) against a real server on the
default model: logprobs / top_logprobs, n > 1, fill-in-the-middle trimming, Ollama's `GET /`, and the
Qwen API shape's result_format / incremental_output / enable_search / message names."""

from __future__ import annotations

import json
import math

import httpx
import pytest

pytestmark = pytest.mark.slow

HELLO = [{"role": "user", "content": "Say hello in Chinese."}]


def _check_entry(e, k: int) -> None:
    assert e.logprob <= 0 and bytes(e.bytes).decode("utf-8", errors="backslashreplace") == e.token
    assert len(e.top_logprobs) == k
    tops = [t.logprob for t in e.top_logprobs]
    assert tops == sorted(tops, reverse=True) and all(t <= 0 for t in tops)
    assert sum(math.exp(t) for t in tops) <= 1 + 1e-4  # a distribution's k largest parts


def test_chat_logprobs_and_stream(client):
    r = client.chat.completions.create(model="qwen2.5", messages=HELLO, max_tokens=6, temperature=0,
                                       logprobs=True, top_logprobs=3)
    choice = r.choices[0]
    content = choice.logprobs.content
    assert len(content) == r.usage.completion_tokens  # one entry per generated token (end of turn is not one)
    assert "".join(e.token for e in content) == choice.message.content
    for e in content:
        _check_entry(e, 3)
        assert e.top_logprobs[0].token == e.token and e.top_logprobs[0].logprob == pytest.approx(e.logprob)  # greedy
    streamed = [e for c in client.chat.completions.create(model="qwen2.5", messages=HELLO, max_tokens=6,
                                                          temperature=0, logprobs=True, top_logprobs=3, stream=True)
                if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [e.token for e in streamed] == [e.token for e in content]
    # The prompt cache reuses the first request's KV: llama.cpp's batch shapes differ, logprobs barely.
    assert [e.logprob for e in streamed] == pytest.approx([e.logprob for e in content], abs=0.05, rel=0.1)
    plain = client.chat.completions.create(model="qwen2.5", messages=HELLO, max_tokens=6, temperature=0)
    assert plain.choices[0].logprobs is None and plain.choices[0].message.content == choice.message.content


def test_logprobs_of_a_constrained_answer_cover_forced_tokens(client):
    schema = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
              "required": ["name", "age"], "additionalProperties": False}
    r = client.chat.completions.create(
        model="qwen2.5", messages=[{"role": "user", "content": "Ann is 30. Give her as JSON."}], max_tokens=40,
        temperature=0, logprobs=True, top_logprobs=1,
        response_format={"type": "json_schema", "json_schema": {"name": "p", "schema": schema}})
    content = r.choices[0].logprobs.content
    assert json.loads(r.choices[0].message.content) == {"name": "Ann", "age": 30}
    assert "".join(e.token for e in content) == r.choices[0].message.content
    assert len(content) == r.usage.completion_tokens and all(e.logprob <= 0 for e in content)


def test_logprobs_refusals(server):
    def post(body):
        return httpx.post(f"{server}/v1/chat/completions", json={"messages": HELLO, "max_tokens": 2, **body})

    for body, param in (({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
                        ({"top_logprobs": 2}, "top_logprobs"), ({"n": 9}, "n")):
        r = post(body)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


def test_completions_logprobs(client):
    # A continuation with no near-tie: the streamed request finds the prompt cached, and a cached
    # prefix may move a logprob by a few hundredths (batched vs single prefill numerics).
    prompt = "Counting: 1, 2, 3, 4, 5, 6, 7,"
    r = client.completions.create(model="qwen2.5", prompt=prompt, max_tokens=4, temperature=0, logprobs=2)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 4
    assert "".join(lp.tokens) == r.choices[0].text and lp.text_offset[0] == 0
    assert all(len(t) == 2 and max(t.values()) == pytest.approx(v) for t, v in zip(lp.top_logprobs, lp.token_logprobs))
    offsets = [0]
    for t in lp.tokens[:-1]:
        offsets.append(offsets[-1] + len(t))
    assert lp.text_offset == offsets
    parts = [c.choices[0] for c in client.completions.create(model="qwen2.5", prompt=prompt,
                                                             max_tokens=4, temperature=0, logprobs=2, stream=True)
             if c.choices]
    assert [t for p in parts if p.logprobs for t in p.logprobs.tokens] == lp.tokens
    assert [o for p in parts if p.logprobs for o in p.logprobs.text_offset] == lp.text_offset


def test_n_choices_chat_and_stream(client):
    r = client.chat.completions.create(model="qwen2.5", messages=HELLO, max_tokens=4, temperature=1.0, seed=7, n=2)
    assert [c.index for c in r.choices] == [0, 1] and all(c.message.content for c in r.choices)
    assert r.usage.completion_tokens >= 2 and r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    single = client.chat.completions.create(model="qwen2.5", messages=HELLO, max_tokens=4, temperature=0, logprobs=True)
    for temperature in (0, 0.8):  # greedy: one answer given twice; sampled: two generations
        texts, finished, usage = ["", ""], [None, None], None
        for c in client.chat.completions.create(model="qwen2.5", messages=HELLO, max_tokens=4, temperature=temperature,
                                                n=2, stream=True, stream_options={"include_usage": True}):
            if c.usage is not None:
                usage = c.usage
            for ch in c.choices:
                texts[ch.index] += ch.delta.content or ""
                finished[ch.index] = ch.finish_reason or finished[ch.index]
        assert all(texts) and all(f in ("stop", "length") for f in finished) and usage.completion_tokens >= 2
        if temperature == 0:
            assert texts == [single.choices[0].message.content] * 2
            assert usage.completion_tokens == 2 * len(single.choices[0].logprobs.content)


def test_n_choices_completions(client):
    r = client.completions.create(model="qwen2.5", prompt=["1, 2, 3,", "a, b, c,"], max_tokens=3, temperature=0.7,
                                  seed=1, n=2)
    assert [c.index for c in r.choices] == [0, 1, 2, 3] and all(c.text for c in r.choices)
    streamed = {}
    for c in client.completions.create(model="qwen2.5", prompt="1, 2, 3,", max_tokens=3, temperature=0, n=2,
                                       stream=True):
        for ch in c.choices:
            streamed[ch.index] = streamed.get(ch.index, "") + ch.text
    assert set(streamed) == {0, 1} and streamed[0] == streamed[1]


def test_fill_in_the_middle_does_not_repeat_the_suffix(client):
    suffix = "\n\nprint(fib(10))\n"
    r = client.completions.create(model="qwen2.5", prompt="def fib(n):\n    ", suffix=suffix, max_tokens=45,
                                  temperature=0)
    text = r.choices[0].text
    assert "return" in text and "print(fib(10))" not in text and not text.endswith("\n\n")
    assert r.choices[0].finish_reason == "stop"
    from edge_qwen.serve.completions import FillIn, FimTrim, suffix_stop

    assert suffix_stop("\n}\n") is None and suffix_stop("\n    return files\n") == "return files"
    trim = FimTrim(FillIn([], "return files", "\n    ", ()))
    assert trim.feed("files = []\n    ") == "files = []" and trim.finish("return files") == ""


def test_ollama_root(server):
    for method in ("GET", "HEAD"):
        r = httpx.request(method, f"{server}/")
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
        assert r.text == ("Ollama is running" if method == "GET" else "")
    page = httpx.get(f"{server}/", headers={"Accept": "text/html,application/xhtml+xml,*/*;q=0.8"})
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")


def _dashscope_events(text: str) -> list[dict]:
    events = []
    for block in text.strip().split("\n\n"):
        fields = dict(line.split(":", 1) for line in block.split("\n") if not line.startswith(":"))
        assert fields["event"] == "result" and int(fields["id"]) == len(events) + 1, block
        events.append(json.loads(fields["data"]))
    return events


def test_qwen_result_format_and_incremental_output(server):
    url = f"{server}/api/v1/qwen/predict"
    base = {"input": {"messages": HELLO}, "parameters": {"temperature": 0, "max_tokens": 4}}
    text = httpx.post(url, json={**base, "parameters": {**base["parameters"], "result_format": "text"}}, timeout=300)
    out = text.json()
    assert set(out) == {"output", "usage", "request_id"} and out["output"]["text"]
    assert out["output"]["finish_reason"] in ("stop", "length") and out["usage"]["output_tokens"] >= 1
    msg = httpx.post(url, json={"input": {"prompt": "Say hello in Chinese."},
                                "parameters": {"temperature": 0, "max_tokens": 4, "result_format": "message"}},
                     timeout=300).json()
    assert msg["output"]["choices"][0]["message"] == {"role": "assistant", "content": out["output"]["text"]}
    for incremental in (False, True):
        r = httpx.post(url, json={**base, "parameters": {**base["parameters"], "result_format": "message",
                                                         "incremental_output": incremental}},
                       headers={"X-DashScope-SSE": "enable"}, timeout=300)
        events = _dashscope_events(r.text)
        parts = [e["output"]["choices"][0]["message"]["content"] for e in events]
        assert [e["output"]["choices"][0]["finish_reason"] for e in events][:-1] == ["null"] * (len(events) - 1)
        assert events[-1]["usage"]["output_tokens"] == out["usage"]["output_tokens"]
        if incremental:
            assert "".join(parts) == out["output"]["text"]
        else:  # each event: the whole text so far
            assert parts[-1] == out["output"]["text"] and all(parts[k + 1].startswith(parts[k])
                                                               for k in range(len(parts) - 1))


def test_qwen_and_openai_fields_never_ignored_silently(server):
    def post(path, body):
        return httpx.post(f"{server}{path}", json={"messages": HELLO, "max_tokens": 2, "temperature": 0, **body},
                          timeout=300)

    qwen, chat = "/api/v1/qwen/predict", "/v1/chat/completions"
    for path, body, param in (
            (qwen, {"parameters": {"enable_search": True}}, "parameters.enable_search"),
            (qwen, {"enable_search": True}, "enable_search"),
            (qwen, {"stream": True, "incremental_output": False}, "incremental_output"),
            (qwen, {"result_format": "text", "n": 2}, "n"),
            (qwen, {"messages": [{"role": "user", "content": "hi", "name": "ann"}]}, "messages.0.name"),
            (chat, {"messages": [{"role": "user", "content": "hi", "name": "ann"}]}, "messages.0.name"),
            (chat, {"store": True}, "store"), (chat, {"web_search_options": {}}, "web_search_options"),
            (chat, {"chat_template_kwargs": {"add_vision_id": True}}, "chat_template_kwargs")):
        r = post(path, body)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, (path, body, r.text)
    ok = post(chat, {"user": "me", "metadata": {"k": "v"}, "frobnicate": 1})
    assert ok.status_code == 200 and ok.headers["x-edge-qwen-ignored-fields"] == "frobnicate"
    n2 = post(qwen, {"result_format": "message", "n": 2})
    assert [c["message"]["content"] for c in n2.json()["output"]["choices"]] == [
        n2.json()["output"]["choices"][0]["message"]["content"]] * 2  # greedy: identical choices
