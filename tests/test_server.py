"""The HTTP server end to end: a real uvicorn on 127.0.0.1, the real default model, real clients.

Clients nobody here wrote: the official `openai` package and raw httpx. One server for the
module (greedy, short outputs); a second app on the same loaded model checks the API key.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import jsonschema
import pytest

from edge_qwen.serve.app import ServerThread, create_app, model_table

pytestmark = pytest.mark.slow

MAX_QUEUE = 3
SHORT = {"temperature": 0, "max_tokens": 8}


def ask(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


@pytest.fixture(scope="module")
def server(llm):
    # Two names on one loaded model: routing by name without loading the model twice.
    app = create_app({"qwen2.5": llm, "second": llm}, max_queue=MAX_QUEUE, max_body_bytes=20_000)
    with ServerThread(app) as url:
        yield url


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server, timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def openai_client(server):
    import openai

    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=120)


def wait_idle(http: httpx.Client, name: str = "qwen2.5", timeout: float = 120.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        state = http.get("/health").json()["models"][name]
        if not state["generating"] and state["waiting"] == 0:
            return state
        if time.monotonic() > deadline:
            raise AssertionError(f"server still busy after {timeout}s: {state}")
        time.sleep(0.05)


def assert_error(r: httpx.Response, status: int, code: str | None = None) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if code is not None:
        assert err["code"] == code, err
    return err


# -- the endpoints ----------------------------------------------------------------------------

def test_health_models_openapi(http):
    h = http.get("/health").json()
    assert h["status"] == "ok" and set(h["models"]) == {"qwen2.5", "second"}
    assert h["models"]["qwen2.5"]["loaded"] is True
    ids = [m["id"] for m in http.get("/v1/models").json()["data"]]
    assert ids == ["qwen2.5", "second"]
    spec = http.get("/openapi.json").json()
    assert {"/v1/chat/completions", "/api/v1/qwen/predict", "/v1/models", "/health"} <= set(spec["paths"])


def test_openai_package_chat_and_stream(openai_client, http):
    r = openai_client.chat.completions.create(model="qwen2.5", messages=ask("写一首关于春天的诗。"), **SHORT)
    text = r.choices[0].message.content
    assert r.model == "qwen2.5" and text and "\ufffd" not in text
    assert r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.completion_tokens <= SHORT["max_tokens"] and r.usage.prompt_tokens > 0
    # A request with a seed is evaluated afresh (no prompt cache), so it reproduces bit for bit.
    seeded = {**SHORT, "temperature": 0.7, "seed": 7}
    text = openai_client.chat.completions.create(model="qwen2.5", messages=ask("写一首关于春天的诗。"),
                                                 **seeded).choices[0].message.content
    pieces = [c.choices[0].delta.content or "" for c in
              openai_client.chat.completions.create(model="qwen2.5", messages=ask("写一首关于春天的诗。"),
                                                    stream=True, **seeded) if c.choices]
    assert "".join(pieces) == text  # the stream is the same answer, cut at whole characters
    assert all("\ufffd" not in p for p in pieces)


def test_prompt_cache_reuses_shared_prefix(http):
    system = {"role": "system", "content": "You are a careful assistant who answers in one short sentence."}
    first = http.post("/v1/chat/completions", json={"messages": [system] + ask("Name a colour."), **SHORT}).json()
    again = http.post("/v1/chat/completions", json={"messages": [system] + ask("Name a fruit."), **SHORT}).json()
    # The second prompt shares the system turn and the user turn's start with the first: only the rest is evaluated.
    assert first["usage"]["prompt_tokens_details"]["cached_tokens"] < again["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert 20 < again["usage"]["prompt_tokens_details"]["cached_tokens"] < again["usage"]["prompt_tokens"]
    seeded = http.post("/v1/chat/completions",
                       json={"messages": [system] + ask("Name a fruit."), "seed": 1, **SHORT}).json()
    assert seeded["usage"]["prompt_tokens_details"]["cached_tokens"] == 0  # a seeded request is evaluated afresh


def test_openai_package_json_schema(openai_client):
    schema = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
              "required": ["name", "age"], "additionalProperties": False}
    r = openai_client.chat.completions.create(
        model="qwen2.5", messages=ask("Invent a person with a name and an age."), temperature=0, max_tokens=40,
        response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": schema, "strict": True}})
    jsonschema.validate(json.loads(r.choices[0].message.content), schema)
    r = openai_client.chat.completions.create(model="qwen2.5", messages=ask("Describe a cat as JSON."),
                                              temperature=0, max_tokens=40, response_format={"type": "json_object"})
    if r.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(r.choices[0].message.content), dict)


def test_raw_http_sse(http):
    with http.stream("POST", "/v1/chat/completions",
                     json={"messages": ask("Say hello."), "stream": True, **SHORT}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    events = [json.loads(line[len("data: "):]) for line in lines[:-1]]
    assert all(e["object"] == "chat.completion.chunk" for e in events)
    assert events[0]["choices"][0]["delta"]["role"] == "assistant"
    assert events[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    assert events[-1]["usage"]["completion_tokens"] <= SHORT["max_tokens"]


def test_qwen_predict_shapes_and_defaults(http):
    exact = {**SHORT, "seed": 3}  # seeded: evaluated afresh, so the three answers must be identical
    plain = http.post("/v1/chat/completions", json={"model": "qwen2.5", "messages": ask("什么是深度学习？"), **exact})
    flat = http.post("/api/v1/qwen/predict", json={"model": "qwen2.5", "messages": ask("什么是深度学习？"), **exact})
    nested = http.post("/api/v1/qwen/predict", json={"model": "qwen2.5", "input": {"messages": ask("什么是深度学习？")},
                                                      "parameters": exact})
    texts = [r.json()["choices"][0]["message"]["content"] for r in (plain, flat, nested)]
    assert texts[0] and texts[0] == texts[1] == texts[2]
    assert flat.json()["object"] == "chat.completion" and nested.json()["model"] == "qwen2.5"
    # Qwen defaults: temperature 0.7, top_p 0.9, max_tokens 1024, no stream.
    from edge_qwen.serve.protocol import QwenPredictRequest

    d = QwenPredictRequest.model_validate({"messages": ask("x")}).to_chat()
    kw = d.runtime_kwargs()  # max_tokens None: 1024, or the room the prompt leaves if that is less
    assert (kw["temperature"], kw["top_p"], kw["max_tokens"], d.stream) == (0.7, 0.9, None, False)
    with http.stream("POST", "/api/v1/qwen/predict",
                     json={"input": {"messages": ask("Hi")}, "parameters": {**SHORT, "stream": True}}) as r:
        assert [line for line in r.iter_lines() if line][-1] == "data: [DONE]"


def test_models_by_name(http):
    for name in ("second", "default", "qwen2.5-coder-0.5b-instruct-q4_k_m", None):
        body = {"messages": ask("Hi"), "temperature": 0, "max_tokens": 2} | ({"model": name} if name else {})
        r = http.post("/v1/chat/completions", json=body)
        assert r.status_code == 200, r.text
        assert r.json()["model"] == ("second" if name == "second" else "qwen2.5")
    err = assert_error(http.post("/v1/chat/completions", json={"model": "gpt-4", "messages": ask("Hi")}), 404,
                       "model_not_found")
    assert "qwen2.5" in err["message"] and "second" in err["message"] and err["param"] == "model"


# -- robustness -------------------------------------------------------------------------------

BAD = [
    ("malformed json", b'{"messages": [', 400, "invalid_json"),
    ("not an object", b"[1, 2]", 400, "invalid_request"),
    ("wrong type", json.dumps({"messages": ask("x"), "temperature": "hot"}).encode(), 400, "invalid_request"),
    ("wrong role", json.dumps({"messages": [{"role": "wizard", "content": "x"}]}).encode(), 400, "invalid_request"),
    ("content type", json.dumps({"messages": [{"role": "user", "content": 5}]}).encode(), 400, "invalid_request"),
    ("empty messages", json.dumps({"messages": []}).encode(), 400, "invalid_request"),
    ("no messages", b"{}", 400, "invalid_request"),
    ("max_tokens beyond context", json.dumps({"messages": ask("x"), "max_tokens": 100_000}).encode(), 400,
     "context_length_exceeded"),
    ("negative max_tokens", json.dumps({"messages": ask("x"), "max_tokens": -3}).encode(), 400, "invalid_request"),
    ("lone surrogate", b'{"messages": [{"role": "user", "content": "\\ud800"}]}', 400, "invalid_request"),
    ("empty stop", json.dumps({"messages": ask("x"), "stop": [""]}).encode(), 400, "invalid_request"),
    ("bad schema", json.dumps({"messages": ask("x"), "response_format": {
        "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}}).encode(), 400, None),
    ("too big", json.dumps({"messages": ask("x" * 30_000)}).encode(), 413, "request_too_large"),
    ("not UTF-8", '{"messages": [{"role": "user", "content": "café"}]}'.encode("latin-1"), 400, "invalid_json"),
    ("image part", json.dumps({"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://x/a.png"}}]}]}).encode(), 400, "invalid_request"),
    ("number as string", json.dumps({"messages": ask("x"), "max_tokens": "2"}).encode(), 400, "invalid_request"),
    ("float max_tokens", json.dumps({"messages": ask("x"), "max_tokens": 2.0}).encode(), 400, "invalid_request"),
    ("bool as string", json.dumps({"messages": ask("x"), "stream": "yes"}).encode(), 400, "invalid_request"),
    ("NaN", b'{"messages": [{"role": "user", "content": "x"}], "temperature": NaN}', 400, "invalid_request"),
    ("schema $refs explode", json.dumps({"messages": ask("x"), "response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"$ref": "#/$defs/d0", "$defs": {
            **{f"d{i}": {"allOf": [{"$ref": f"#/$defs/d{i + 1}"}] * 2} for i in range(20)},
            "d20": {"type": "integer"}}}}}}).encode(), 400, "invalid_schema"),
    ("schema $ref chain", json.dumps({"messages": ask("x"), "response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"$ref": "#/$defs/d0", "$defs": {
            **{f"d{i}": {"$ref": f"#/$defs/d{i + 1}"} for i in range(150)}, "d150": {"type": "integer"}}}}}}).encode(),
     400, "invalid_schema"),
    ("schema beyond the engine", json.dumps({"messages": ask("x"), "response_format": {"type": "json_schema",
        "json_schema": {"name": "x", "schema": {"type": "string", "pattern": "^a{1000000}$"}}}}).encode(),
     400, "invalid_schema"),
    ("legacy functions", json.dumps({"messages": ask("x"), "functions": [{"name": "f"}]}).encode(), 400,
     "invalid_request"),
    ("lone surrogate in stop", b'{"messages": [{"role": "user", "content": "x"}], "stop": "a\\ud800"}', 400,
     "invalid_request"),
    ("logit_bias out of range", json.dumps({"messages": ask("x"), "logit_bias": {"1": 101}}).encode(), 400,
     "invalid_request"),
    ("logit_bias not a token", json.dumps({"messages": ask("x"), "logit_bias": {"x": 1}}).encode(), 400,
     "invalid_request"),
    ("penalty out of range", json.dumps({"messages": ask("x"), "presence_penalty": -2.5}).encode(), 400,
     "invalid_request"),
    ("repetition_penalty", json.dumps({"messages": ask("x"), "repetition_penalty": 1.2}).encode(), 400,
     "invalid_request"),
    ("top_logprobs without logprobs", json.dumps({"messages": ask("x"), "top_logprobs": 2}).encode(), 400,
     "invalid_request"),
    ("top_logprobs over 20", json.dumps({"messages": ask("x"), "logprobs": True, "top_logprobs": 21}).encode(), 400,
     "invalid_request"),
    ("nested too deep", b'{"messages": ' + b"[" * 5000 + b"]" * 5000 + b"}", 400, "invalid_json"),
    ("schema too deep", json.dumps({"messages": ask("x"), "response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": json.loads('{"type":"array","items":' * 200 + '{"type":"integer"}' + "}" * 200)}}}).encode(),
     400, "invalid_schema"),
]


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/api/v1/qwen/predict"])
def test_bad_requests_get_openai_errors(http, path):
    for what, body, status, code in BAD:
        r = http.post(path, content=body, headers={"Content-Type": "application/json"})
        err = assert_error(r, status, code)
        assert err["type"] in ("invalid_request_error",), (what, err)
    # Unknown fields are tolerated, and the server still answers normally after all of that.
    r = http.post(path, json={"messages": ask("Hi"), "frobnicate": True, "user": "me", "logit_bias": {}, **SHORT})
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"]
    assert_error(http.get("/no/such/endpoint"), 404, "not_found")
    assert_error(http.get("/v1/chat/completions"), 405, "method_not_allowed")


def test_body_is_json_whatever_its_content_type(http):
    # `curl -d '{...}'` without -H sends application/x-www-form-urlencoded; the body is still JSON.
    body = json.dumps({"messages": ask("你好"), **SHORT}, ensure_ascii=False).encode()
    for ctype in ("application/x-www-form-urlencoded", "text/plain", None):
        r = http.post("/v1/chat/completions", content=body, headers={"Content-Type": ctype} if ctype else {})
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"], r.text
    err = assert_error(http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": [
        {"type": "input_audio", "input_audio": {}}]}]}), 400, "invalid_request")
    assert "input_audio" in err["message"] and "text" in err["message"]


def test_openai_nulls_developer_role_and_model_lookup(http, openai_client):
    # OpenAI's API reads null as "the default"; "developer" is its newer name for the system role.
    r = http.post("/v1/chat/completions", json={
        "messages": [{"role": "developer", "content": "Answer in English."}] + ask("Hi"),
        "temperature": None, "top_p": None, "stream": None, "n": None, "max_tokens": 4})
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"], r.text
    assert openai_client.models.retrieve("qwen2.5").id == "qwen2.5"
    assert openai_client.models.retrieve("second").id == "second"
    assert_error(http.get("/v1/models/nope"), 404, "model_not_found")


def test_no_broken_character_when_max_tokens_cuts_one(http):
    # Many emoji take 2-3 tokens: a cut inside one must drop its bytes, never emit U+FFFD.
    for n in range(1, 7):
        body = {"messages": ask("Repeat exactly, nothing else: 🦩🪼🦩🪼"), "temperature": 0, "max_tokens": n}
        text = http.post("/v1/chat/completions", json=body).json()["choices"][0]["message"]["content"]
        with http.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as r:
            events = [json.loads(x[6:]) for x in r.iter_lines() if x.startswith("data: {")]
        pieces = [e["choices"][0]["delta"].get("content") or "" for e in events if e["choices"]]
        assert "\ufffd" not in text and all("\ufffd" not in p for p in pieces), (n, text, pieces)
        assert "".join(pieces) == text


def test_internal_error_is_openai_shaped_and_keeps_the_connection(llm):
    class Failing:  # a model whose runtime fails unexpectedly (a bug), the one thing a real model won't do
        model_path = llm.model_path

        def chat(self, *args, **kwargs):
            raise RuntimeError("boom")

    app = create_app({"broken": Failing(), "qwen2.5": llm})
    with ServerThread(app) as url, httpx.Client(base_url=url, timeout=60) as c:
        r = c.post("/v1/chat/completions", json={"model": "broken", "messages": ask("Hi"), **SHORT})
        assert r.status_code == 500 and r.json()["error"]["code"] == "internal_error"
        ok = c.post("/v1/chat/completions", json={"model": "qwen2.5", "messages": ask("Hi"), **SHORT})
        assert ok.status_code == 200  # on the same kept-alive connection


def test_left_out_max_tokens_fits_the_room_left(default_model):
    from edge_qwen import EdgeQwen

    with EdgeQwen(default_model, n_ctx=256) as small, \
            ServerThread(create_app({"qwen2.5": small, "Org/Qwen-0.5B": small}, max_tokens_limit=200)) as url, \
            httpx.Client(base_url=url, timeout=120) as c:
        msgs = ask("Continue this list: " + ", ".join(str(i) for i in range(1, 40)))
        room = small.n_ctx - len(small.prompt_tokens(msgs))
        assert 0 < room < 1024
        r = c.post("/v1/chat/completions", json={"messages": msgs, "temperature": 0})  # no max_tokens
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= room, r.text
        err = assert_error(c.post("/v1/chat/completions", json={"messages": msgs, "max_tokens": 1024}), 400,
                           "context_length_exceeded")
        assert "--ctx" in err["message"] and "truncate_middle" not in err["message"]
        assert c.head("/health").status_code == 200
        assert c.get("/v1/models/Org/Qwen-0.5B").json()["id"] == "Org/Qwen-0.5B"  # HF-style names with a slash
        long = ask("Continue this list: " + ", ".join(str(i) for i in range(1, 200)))
        err = assert_error(c.post("/v1/chat/completions", json={"messages": long}), 400, "context_length_exceeded")
        assert "the prompt alone is" in err["message"] and "max_tokens" not in err["message"]


def test_cors_origins(llm):
    app = create_app({"qwen2.5": llm}, cors_origins=["http://app.local"], api_key="k")
    with ServerThread(app) as url, httpx.Client(base_url=url, timeout=60) as c:
        pre = c.options("/v1/chat/completions", headers={
            "Origin": "http://app.local", "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type"})
        assert pre.status_code == 200 and pre.headers["access-control-allow-origin"] == "http://app.local"
        r = c.post("/v1/chat/completions", json={"messages": ask("Hi"), **SHORT},
                   headers={"Origin": "http://app.local", "Authorization": "Bearer k"})
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "http://app.local"
        denied = c.get("/v1/models", headers={"Origin": "http://app.local"})  # errors carry CORS headers too
        assert denied.status_code == 401 and denied.headers["access-control-allow-origin"] == "http://app.local"
        other = c.get("/health", headers={"Origin": "http://evil.example"})
        assert "access-control-allow-origin" not in other.headers


def test_docs_page_works_offline(http):
    page = http.get("/docs")
    assert page.status_code == 200 and "/docs-assets/swagger-ui-bundle.js" in page.text
    assert "cdn." not in page.text and "https://" not in page.text.split("<body>")[0]
    assert http.get("/docs-assets/swagger-ui-bundle.js").status_code == 200
    assert http.get("/redoc").status_code == 404


def test_stream_include_usage(openai_client):
    chunks = list(openai_client.chat.completions.create(model="qwen2.5", messages=ask("Hi"), stream=True,
                                                        stream_options={"include_usage": True}, **SHORT))
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == chunks[-2].usage.completion_tokens > 0
    assert chunks[-2].choices[0].finish_reason in ("stop", "length")


def test_chunked_body_over_limit(http):
    def body():
        for _ in range(30):
            yield b" " * 1000

    assert_error(http.post("/v1/chat/completions", content=body(), headers={"Content-Type": "application/json"}),
                 413, "request_too_large")


def test_concurrent_requests_never_mix(http, server):
    prompts = ["Name a fruit.", "Count to five.", "Say goodbye in French.", "What is 3 plus 4?"]
    exact = {**SHORT, "seed": 0}  # seeded: no prompt cache, so each answer is the same alone or concurrent
    alone = [http.post("/v1/chat/completions", json={"messages": ask(p), **exact}).json()["choices"][0]["message"]["content"]
             for p in prompts]
    assert len(set(alone)) == len(prompts)
    results: dict[int, str] = {}

    def one(i: int, stream: bool) -> None:
        with httpx.Client(base_url=server, timeout=120) as c:
            body = {"messages": ask(prompts[i]), "stream": stream, **exact}
            if not stream:
                results[i] = c.post("/v1/chat/completions", json=body).json()["choices"][0]["message"]["content"]
                return
            with c.stream("POST", "/v1/chat/completions", json=body) as r:
                events = [json.loads(x[6:]) for x in r.iter_lines() if x.startswith("data: {")]
            results[i] = "".join(e["choices"][0]["delta"].get("content", "") for e in events)

    threads = [threading.Thread(target=one, args=(i, i % 2 == 0)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert [results.get(i) for i in range(len(prompts))] == alone


def test_full_queue_is_503_with_retry_after(http, server):
    wait_idle(http)
    holder = httpx.Client(base_url=server, timeout=120)
    waiters: list[threading.Thread] = []
    codes: list[int] = []
    try:
        with holder.stream("POST", "/v1/chat/completions",
                           json={"messages": ask("Write a very long essay about rivers."), "stream": True,
                                 "temperature": 0, "max_tokens": 3000}) as r:
            lines = r.iter_lines()  # kept: dropping the iterator would close the connection
            next(lines)  # generating now

            def wait_in_queue() -> None:
                with httpx.Client(base_url=server, timeout=120) as c:
                    codes.append(c.post("/v1/chat/completions",
                                        json={"messages": ask("Hi"), "temperature": 0, "max_tokens": 2}).status_code)

            waiters = [threading.Thread(target=wait_in_queue) for _ in range(MAX_QUEUE)]
            for t in waiters:
                t.start()
            deadline = time.monotonic() + 120  # generous: the test machines are shared and loaded
            while http.get("/health").json()["models"]["qwen2.5"]["waiting"] < MAX_QUEUE:
                assert time.monotonic() < deadline
                time.sleep(0.05)
            r2 = http.post("/v1/chat/completions", json={"messages": ask("Hi"), **SHORT})
            assert_error(r2, 503, "queue_full")
            assert int(r2.headers["Retry-After"]) >= 1
            assert http.get("/health").status_code == 200  # the server keeps serving meanwhile
    finally:
        holder.close()
        for t in waiters:
            t.join(60)
    assert codes == [200] * MAX_QUEUE  # the queued requests ran once the stream was dropped


def test_client_disconnect_stops_generation(http, server):
    wait_idle(http)
    before = http.get("/health").json()["models"]["qwen2.5"]
    with httpx.Client(base_url=server, timeout=60) as c:
        with c.stream("POST", "/v1/chat/completions",
                      json={"messages": ask("Write a very long story about a dragon."), "stream": True,
                            "temperature": 0, "max_tokens": 2000}) as r:
            lines = r.iter_lines()
            got = [next(lines) for _ in range(8)]  # 4 events (with blank separators)
            assert sum(x.startswith("data: {") for x in got) >= 3
    state = wait_idle(http, timeout=60)
    assert state["cancelled"] == before["cancelled"] + 1
    # Stopped within a few tokens of the disconnect (3 read, some in flight), not after 2000.
    assert state["last_completion_tokens"] < 40
    r = http.post("/v1/chat/completions", json={"messages": ask("Hi"), **SHORT})
    assert r.status_code == 200


def test_queued_client_that_leaves_frees_its_place(http, server):
    wait_idle(http)
    holder = httpx.Client(base_url=server, timeout=120)
    try:
        with holder.stream("POST", "/v1/chat/completions",
                           json={"messages": ask("Write a very long essay about rivers."), "stream": True,
                                 "temperature": 0, "max_tokens": 3000}) as r:
            lines = r.iter_lines()
            next(lines)  # generating now
            before = http.get("/health").json()["models"]["qwen2.5"]
            with socket.create_connection(server.removeprefix("http://").split(":")) as raw:  # queue, then hang up
                body = json.dumps({"messages": ask("Hi"), **SHORT}).encode()
                raw.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                            b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
                deadline = time.monotonic() + 30
                while http.get("/health").json()["models"]["qwen2.5"]["waiting"] < 1:
                    assert time.monotonic() < deadline
                    time.sleep(0.05)
            deadline = time.monotonic() + 30
            while http.get("/health").json()["models"]["qwen2.5"]["waiting"] > 0:  # left the queue at once
                assert time.monotonic() < deadline, "the queued request kept its place after its client left"
                time.sleep(0.05)
            assert http.get("/health").json()["models"]["qwen2.5"]["requests"] == before["requests"]
    finally:
        holder.close()
    wait_idle(http)


def test_api_key(llm):
    from edge_qwen.errors import RequestError

    for bad in ("s3crét", "", " padded ", "tab\tkey"):
        with pytest.raises(RequestError, match="printable ASCII"):
            create_app({"qwen2.5": llm}, api_key=bad)
    app = create_app({"qwen2.5": llm}, api_key="s3cret")
    with ServerThread(app) as url, httpx.Client(base_url=url, timeout=60) as c:
        assert c.get("/health").status_code == 200  # health stays open for probes
        assert_error(c.get("/v1/models"), 401, "invalid_api_key")
        assert_error(c.post("/v1/chat/completions", json={"messages": ask("Hi")}), 401, "invalid_api_key")
        assert_error(c.post("/api/v1/qwen/predict", json={"messages": ask("Hi")},
                            headers={"Authorization": "Bearer wrong"}), 401, "invalid_api_key")
        ok = c.post("/v1/chat/completions", json={"messages": ask("Hi"), **SHORT},
                    headers={"Authorization": "Bearer s3cret"})
        assert ok.status_code == 200
        import openai

        r = openai.OpenAI(base_url=f"{url}/v1", api_key="s3cret", max_retries=0).chat.completions.create(
            model="qwen2.5", messages=ask("Hi"), **SHORT)
        assert r.choices[0].message.content
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{url}/v1", api_key="nope", max_retries=0).models.list()


# -- the command ------------------------------------------------------------------------------

def test_model_table(default_model, tmp_path):
    from edge_qwen.errors import EdgeQwenError

    assert model_table() == {"qwen2.5": default_model}
    t = model_table([str(default_model)], ["small=" + str(default_model)])
    assert list(t) == ["small", default_model.stem]
    with pytest.raises(EdgeQwenError, match="NAME=PATH"):
        model_table([], ["no-equals-sign"])
    with pytest.raises(EdgeQwenError, match="twice"):
        model_table([], [f"a={default_model}", f"a={default_model}"])
    with pytest.raises(EdgeQwenError, match="neither a file"):
        model_table([str(tmp_path / "missing.gguf")])


def test_serve_refuses_bad_model_and_busy_port(tmp_path):
    from click.testing import CliRunner

    from edge_qwen.cli import main

    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a model at all")
    r = CliRunner().invoke(main, ["serve", "--model", f"x={bad}", "--port", "1"])
    assert r.exit_code != 0 and "not a GGUF" in r.output and "Traceback" not in r.output
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        r = CliRunner().invoke(main, ["serve", "--port", str(s.getsockname()[1])])
        assert r.exit_code != 0 and "--port" in r.output


def test_serve_subprocess_ctrl_c(default_model, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "EDGE_QWEN_API_KEY": "k"}
    proc = subprocess.Popen([sys.executable, "-c", "from edge_qwen.cli import main; main()", "serve",
                             str(default_model), "--port", str(port), "--ctx", "1024", "--quiet"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, proc.communicate()
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "server did not come up"
            time.sleep(0.2)
        stem = default_model.stem
        assert httpx.get(f"{url}/v1/models", headers={"Authorization": "Bearer k"}).json()["data"][0]["id"] == stem
        assert httpx.get(f"{url}/v1/models").status_code == 401  # the key came from EDGE_QWEN_API_KEY
        # Ctrl-C while a stream runs: the stream ends properly (final chunk, [DONE]) right away.
        # The reply cannot end by itself (its end-of-turn tokens are banned), so only the Ctrl-C can
        # end it before max_tokens: a short answer must not race the signal.
        events: list[str] = []
        never_ends = {str(t): -100 for t in (151643, 151645)}  # <|endoftext|>, <|im_end|>
        with httpx.stream("POST", f"{url}/v1/chat/completions", headers={"Authorization": "Bearer k"}, timeout=60,
                          json={"messages": ask("Count from 1 to 1000."), "stream": True, "max_tokens": 900,
                                "temperature": 0, "logit_bias": never_ends}) as r:
            for line in r.iter_lines():
                if not line:
                    continue
                events.append(line)
                if len(events) == 3:  # once: a second Ctrl-C means "force quit"
                    proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert events[-1] == "data: [DONE]"
    assert json.loads(events[-2][6:])["choices"][0]["finish_reason"] == "cancelled"
    assert proc.returncode == 0, err
    assert "Traceback" not in err and "server stopped" in err, err
    assert "KV cache" in err and "host prompt cache up to 512 MiB" in err, err  # what memory it holds, at startup
