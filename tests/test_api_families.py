"""/v1/completions (with fill-in-the-middle), /v1/embeddings, /tokenize, /detokenize and /metrics through
the official openai package and httpx, against a real server on the default model."""

from __future__ import annotations

import httpx
import pytest

pytestmark = pytest.mark.slow


def test_completion_and_stream(client):
    # A continuation with no near-tie: the streamed request finds the prompt cached, and a cached
    # prefix may move a logprob by a few hundredths (batched vs single prefill numerics).
    prompt = "Counting: 1, 2, 3, 4, 5, 6, 7,"
    r = client.completions.create(model="qwen2.5", prompt=prompt, max_tokens=4, temperature=0)
    assert r.object == "text_completion" and r.choices[0].text.startswith(" 8,") and r.usage.completion_tokens <= 4
    parts = [c.choices[0].text for c in client.completions.create(
        model="qwen2.5", prompt=prompt, max_tokens=4, temperature=0, stream=True) if c.choices]
    assert "".join(parts) == r.choices[0].text


def test_fill_in_the_middle(client):
    r = client.completions.create(model="qwen2.5", prompt="def fib(n):\n    ", suffix="\n\nprint(fib(10))\n",
                                  max_tokens=30, temperature=0)
    assert "fib(n" in r.choices[0].text and "return" in r.choices[0].text


def test_fim_refused_for_a_model_without_it():
    from edge_qwen.serve.completions import fim_problem

    assert fim_problem("Qwen2.5 0.5B Instruct", [[151659], [151661], [151660]]) is not None
    assert "no fill-in-the-middle tokens" in fim_problem("Qwen2.5 Coder", [[27, 91], [1], [2]])
    assert fim_problem("Qwen2.5 Coder 0.5B Instruct", [[151659], [151661], [151660]]) is None


def test_embeddings(client):
    import base64

    import numpy as np

    e = client.embeddings.create(model="qwen2.5", input=["The cat sat on the mat.", "A cat is on a mat.",
                                                         "Stock markets fell sharply today."])
    v = np.array([d.embedding for d in e.data])
    assert v.shape == (3, 896) and np.allclose(np.linalg.norm(v, axis=1), 1, atol=1e-3)
    assert v[0] @ v[1] > v[0] @ v[2]  # the paraphrase is closer than the unrelated sentence
    b = client.embeddings.create(model="qwen2.5", input="The cat sat on the mat.", encoding_format="base64")
    raw = b.data[0].embedding
    got = np.frombuffer(base64.b64decode(raw), dtype="<f4") if isinstance(raw, str) else np.asarray(raw)
    assert np.allclose(got, v[0], atol=1e-5)


def test_tokenize_detokenize_metrics(server):
    t = httpx.post(f"{server}/tokenize", json={"content": "你好, world"}).json()
    assert t["count"] == len(t["tokens"]) > 0
    assert httpx.post(f"{server}/detokenize", json={"tokens": t["tokens"]}).json()["content"] == "你好, world"
    m = httpx.post(f"{server}/tokenize", json={"messages": [{"role": "user", "content": "hi"}]}).json()
    assert m["count"] > t["count"] - 5
    bad = httpx.post(f"{server}/detokenize", json={"tokens": [10**9]})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens"
    text = httpx.get(f"{server}/metrics").text
    assert 'edge_qwen_http_requests_total{method="POST",route="/tokenize",status="200"}' in text
    assert "edge_qwen_generations_total" in text


def test_family_errors_are_openai_shaped(server):
    r = httpx.post(f"{server}/v1/completions", json={"model": "qwen2.5", "prompt": "x", "echo": True})
    assert r.status_code == 400 and set(r.json()["error"]) == {"message", "type", "param", "code"}
    r = httpx.post(f"{server}/v1/embeddings", json={"model": "nope", "input": "x"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


def test_responses(client):
    tools = [{"type": "function", "name": "get_weather", "description": "Get the weather in a city",
              "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}]
    r = client.responses.create(model="qwen2.5", input="Say hi.", max_output_tokens=8, temperature=0)
    assert r.output_text and r.usage.output_tokens <= 8
    r = client.responses.create(model="qwen2.5", input="Weather in Paris?", tools=tools, tool_choice="required",
                                temperature=0, max_output_tokens=40)
    call = r.output[0]
    assert call.type == "function_call" and call.name == "get_weather" and "city" in call.arguments
    kinds = [e.type for e in client.responses.create(model="qwen2.5", input="Say hi.", max_output_tokens=4,
                                                     temperature=0, stream=True)]
    assert kinds[0] == "response.created" and "response.output_text.delta" in kinds
    assert kinds[-1] in ("response.completed", "response.incomplete")
    import openai

    with pytest.raises(openai.BadRequestError):
        client.responses.create(model="qwen2.5", input="x", previous_response_id="resp_1")
