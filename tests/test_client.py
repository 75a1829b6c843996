"""QwenClient: the Qwen SDK call shape over HTTP (a real uvicorn server) and in-process."""

from __future__ import annotations

import http.server
import json
import socket
import threading

import jsonschema
import pytest

from edge_qwen.client import QwenAPIError, QwenClient
from edge_qwen.serve.app import ServerThread, create_app

pytestmark = pytest.mark.slow

SHORT = {"temperature": 0, "max_tokens": 8}
SCHEMA = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"],
          "additionalProperties": False}


def ask(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


@pytest.fixture(scope="module")
def remote(llm):
    with ServerThread(create_app({"qwen2.5": llm}, api_key="k3y")) as url, \
            QwenClient(base_url=url, api_key="k3y", timeout=120) as client:
        yield client


@pytest.fixture(scope="module")
def local(default_model):
    with QwenClient(model_path=default_model, n_ctx=2048) as client:
        yield client


def test_issue_example_over_http(remote):
    r = remote.chat(model="qwen2.5", messages=ask("请解释深度学习是什么？"), temperature=0.2, max_tokens=8)
    assert r["object"] == "chat.completion" and r["model"] == "qwen2.5"
    text = r["choices"][0]["message"]["content"]
    assert text and "\ufffd" not in text
    assert r["usage"]["completion_tokens"] <= 8
    assert remote.models() == ["qwen2.5"] and remote.health()["status"] == "ok"


def test_stream_over_http(remote):
    chunks = list(remote.chat(model="qwen2.5", messages=ask("Count to three."), stream=True, **SHORT))
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)


def test_response_format_over_http_and_in_process(remote, local):
    fmt = {"type": "json_schema", "json_schema": {"name": "place", "schema": SCHEMA}}
    for client in (remote, local):
        r = client.chat(model="qwen2.5", messages=ask("Name a city in China as JSON."), temperature=0,
                        max_tokens=30, response_format=fmt)
        jsonschema.validate(json.loads(r["choices"][0]["message"]["content"]), SCHEMA)


def test_in_process_same_shape_as_http(remote, local):
    # Seeded: the server evaluates it afresh (no prompt cache), as in-process does, so the answers are equal.
    a = remote.chat(model="qwen2.5", messages=ask("Say hello in Chinese."), seed=5, **SHORT)
    b = local.chat(model="qwen2.5", messages=ask("Say hello in Chinese."), seed=5, **SHORT)
    assert set(a) == set(b) and a["model"] == b["model"] == "qwen2.5"
    assert a["choices"][0]["message"]["content"] == b["choices"][0]["message"]["content"]
    chunks = list(local.chat(model="default", messages=ask("Hi"), stream=True, **SHORT))
    # As the server does, an answer names the served model, whichever alias was asked for.
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length") and chunks[-1]["model"] == "qwen2.5"


def test_one_error_type_both_ways(remote, local):
    for client in (remote, local):
        with pytest.raises(QwenAPIError) as e:
            client.chat(model="qwen-max-nonexistent", messages=ask("Hi"))
        assert e.value.status == 404 and e.value.code == "model_not_found"
        assert set(e.value.body["error"]) == {"message", "type", "param", "code"}
        with pytest.raises(QwenAPIError) as e:
            client.chat(model="qwen2.5", messages=ask("Hi"), max_tokens=100_000)
        assert e.value.status == 400 and e.value.code == "context_length_exceeded"
        assert "max_tokens" in e.value.message
        with pytest.raises(QwenAPIError) as e:
            client.chat(model="qwen2.5", messages=[], max_tokens=4)
        assert e.value.status == 400
        with pytest.raises(QwenAPIError) as e:  # raised at the call, before any chunk is read
            client.chat(model="qwen2.5", messages=ask("Hi"), stream=True, temperature=5)
        assert e.value.status == 400 and "temperature" in e.value.message


def test_auth_and_no_server_errors(remote):
    with QwenClient(base_url=remote.base_url, api_key="wrong") as bad:
        with pytest.raises(QwenAPIError) as e:
            bad.chat(model="qwen2.5", messages=ask("Hi"), **SHORT)
        assert e.value.status == 401 and e.value.code == "invalid_api_key"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    with QwenClient(base_url=f"http://127.0.0.1:{port}", timeout=5) as gone:
        with pytest.raises(QwenAPIError) as e:
            gone.chat(model="qwen2.5", messages=ask("Hi"))
        assert e.value.status == 0 and "edge-qwen serve" in e.value.message


def test_closing_a_stream_early_frees_the_server(remote):
    stream = remote.chat(model="qwen2.5", messages=ask("Write a long story about the sea."), stream=True,
                         temperature=0, max_tokens=1000)
    for i, _ in enumerate(stream):
        if i == 3:
            break
    stream.close()
    import time

    deadline = time.monotonic() + 60
    while remote.health()["models"]["qwen2.5"]["generating"]:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    state = remote.health()["models"]["qwen2.5"]
    assert state["last_completion_tokens"] < 40 and state["cancelled"] >= 1


def test_bad_model_path_in_process(tmp_path):
    with pytest.raises(QwenAPIError) as e:
        QwenClient(model_path=tmp_path / "missing.gguf")
    assert e.value.status in (400, 404) and "missing.gguf" in e.value.message
    with pytest.raises(ValueError, match="not both"):
        QwenClient(base_url="http://localhost:8000", model_path="x.gguf")


# --- Both modes behave the same (each test runs over HTTP and in-process) ---

BOTH = pytest.mark.parametrize("mode", ["remote", "local"])


@pytest.fixture()
def client(request, mode):
    return request.getfixturevalue(mode)


@BOTH
@pytest.mark.parametrize("messages", [
    [{"role": "user", "content": [{"type": "text", "text": "Say "}, {"type": "text", "text": "hi."}]}],
    [{"role": "user", "content": None}],
    [{"role": "user", "content": "What is 2+2?"},
     {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function",
                                                           "function": {"name": "add", "arguments": "{}"}}]},
     {"role": "user", "content": "Answer in words."}],
], ids=["text-parts", "null-content", "assistant-tool-calls"])
def test_same_messages_accepted(client, messages):
    r = client.chat(model="qwen2.5", messages=messages, **SHORT)
    assert r["object"] == "chat.completion" and r["model"] == "qwen2.5"


@BOTH
@pytest.mark.parametrize("bad, param", [
    ({"temperature": "0.5"}, "temperature"), ({"max_tokens": 2.0}, "max_tokens"),
    ({"stop": [f"s{i}" for i in range(20)]}, "stop"), ({"seed": -1}, "seed"), ({"seed": 2**40}, "seed"),
])
def test_same_values_refused(client, bad, param):
    with pytest.raises(QwenAPIError) as e:
        client.chat(model="qwen2.5", messages=ask("Hi"), **{**SHORT, **bad})
    assert e.value.status == 400 and e.value.code == "invalid_request" and e.value.body["error"]["param"] == param


@BOTH
@pytest.mark.parametrize("kwargs, param, words", [
    ({"temperature": float("nan")}, "temperature", "NaN"),
    ({"messages": ask("\ud800")}, "messages.0.content", "surrogate"),
    ({"messages": [{"role": "user", "content": object()}]}, "messages.0.content", "'object'"),
])
def test_what_json_cannot_carry_is_a_400(client, kwargs, param, words):
    with pytest.raises(QwenAPIError) as e:
        client.chat(**{"model": "qwen2.5", "messages": ask("Hi"), **SHORT, **kwargs})
    assert e.value.status == 400 and e.value.code == "invalid_request"
    assert e.value.body["error"]["param"] == param and words in e.value.message


@BOTH
def test_aliases_answer_and_name_the_served_model(client):
    for name in ("default", None):
        r = client.chat(model=name, messages=ask("Hi"), **SHORT)
        assert r["model"] == "qwen2.5"


def test_models_and_health_agree(remote, local):
    assert remote.models() == local.models() == ["qwen2.5"]
    a, b = remote.health(), local.health()
    assert set(a) == set(b) == {"status", "version", "time", "models"}
    assert a["status"] == b["status"] == "ok" and a["version"] == b["version"]
    assert set(a["models"]) == set(b["models"]) == {"qwen2.5"}
    assert set(a["models"]["qwen2.5"]) == set(b["models"]["qwen2.5"])
    state = b["models"]["qwen2.5"]
    assert state["loaded"] and not state["generating"] and state["waiting"] == 0 and state["path"].endswith(".gguf")


def test_in_process_stream_counts_in_health(local):
    before = local.health()["models"]["qwen2.5"]
    stream = local.chat(messages=ask("Write a long story about the sea."), stream=True, temperature=0, max_tokens=50)
    assert local.health()["models"]["qwen2.5"]["generating"]  # the first chunk is already in hand
    next(stream)
    stream.close()
    after = local.health()["models"]["qwen2.5"]
    assert not after["generating"] and after["requests"] == before["requests"] + 1
    assert after["cancelled"] == before["cancelled"] + 1


def test_in_process_internal_errors_are_500(local, monkeypatch):
    def crash(messages, **kwargs):
        raise RecursionError("maximum recursion depth exceeded")

    monkeypatch.setattr(local._llm, "chat", crash)
    with pytest.raises(QwenAPIError) as e:
        local.chat(messages=ask("Hi"), **SHORT)
    assert e.value.status == 500 and e.value.code == "internal_error" and "RecursionError" in e.value.message
    assert isinstance(e.value.__cause__, RecursionError)

    def breaks_midway(messages, **kwargs):
        yield {"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": "a"}}]}
        raise UnicodeEncodeError("utf-8", "\ud800", 0, 1, "surrogates not allowed")

    monkeypatch.setattr(local._llm, "chat", breaks_midway)
    stream = local.chat(messages=ask("Hi"), stream=True, **SHORT)
    assert next(stream)["model"] == "qwen2.5"
    with pytest.raises(QwenAPIError) as e:
        next(stream)
    assert e.value.status == 500 and e.value.code == "internal_error"


@pytest.mark.parametrize("mode", ["remote", "local"])
def test_closed_client_refuses_every_call(mode, remote, default_model):
    fresh = (QwenClient(base_url=remote.base_url, api_key="k3y") if mode == "remote"
             else QwenClient(model_path=default_model, n_ctx=512))
    assert fresh.models() == ["qwen2.5"]
    with fresh:
        pass
    fresh.close()  # twice is harmless
    for call in (lambda: fresh.chat(messages=ask("Hi")), lambda: fresh.chat(messages=ask("Hi"), stream=True),
                 fresh.models, fresh.health):
        with pytest.raises(QwenAPIError) as e:
            call()
        assert e.value.status == 0 and e.value.code == "client_closed" and "new QwenClient" in e.value.message


@pytest.fixture()
def html_server():
    class Page(http.server.BaseHTTPRequestHandler):
        def answer(self):
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            body = b"<html><body>It works!</body></html>"
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_POST = answer

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Page)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_a_server_that_is_not_edge_qwen(html_server):
    with QwenClient(base_url=html_server, timeout=10) as client:
        for call in (client.health, client.models, lambda: client.chat(messages=ask("Hi")),
                     lambda: client.chat(messages=ask("Hi"), stream=True)):
            with pytest.raises(QwenAPIError) as e:
                call()
            assert e.value.status == 200 and e.value.code == "bad_response"
            assert "not an edge-qwen server" in e.value.message


def test_http_client_refuses_a_key_headers_cannot_carry():
    with pytest.raises(QwenAPIError) as e:
        QwenClient(base_url="http://127.0.0.1:9", api_key="s3crét")
    assert e.value.status == 400 and e.value.body["error"]["param"] == "api_key"
