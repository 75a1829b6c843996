"""QwenClient: the Qwen SDK call shape over HTTP (a real uvicorn server) and in-process."""

from __future__ import annotations

import json
import socket

import jsonschema
import pytest

from edge_qwen.client import QwenAPIError, QwenClient
from edge_qwen.server import ServerThread, create_app

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
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length") and chunks[-1]["model"] == "default"


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
