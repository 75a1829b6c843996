"""Fuzzing the served OpenAPI schema with schemathesis: no 5xx, no crash, errors always OpenAI-shaped.

The server runs with a 2-token cap on max_tokens so every accepted request generates fast;
examples are bounded so the whole module stays well under two minutes.
"""

from __future__ import annotations

import httpx
import pytest

from edge_qwen.serve.app import ServerThread, create_app

pytestmark = pytest.mark.slow

# Valid requests generate (2 tokens each, plus the fuzzed prompt); invalid ones are cheap 4xx.
EXAMPLES = {"positive": 6, "negative": 12}  # per operation (about 30 of them)


@pytest.fixture(scope="module")
def url(llm):
    app = create_app({"qwen2.5": llm}, max_tokens_limit=2, max_queue=4, max_body_bytes=50_000)
    with ServerThread(app) as url:
        yield url


@pytest.mark.parametrize("mode", list(EXAMPLES))
def test_fuzz_openapi_schema(url, mode):
    import schemathesis
    from hypothesis import HealthCheck, Phase, given, reject, settings
    from schemathesis.generation.modes import GenerationMode

    schema = schemathesis.openapi.from_url(f"{url}/openapi.json")
    documented = set(schema.raw_schema["paths"]["/v1/chat/completions"]["post"]["responses"])
    assert "422" not in documented
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {f"{op.method.upper()} {op.path}" for op in operations} >= {
        "POST /v1/chat/completions", "POST /api/v1/qwen/predict", "GET /v1/models", "GET /health"}
    seen: dict[int, int] = {}
    with httpx.Client(base_url=url, timeout=120) as session:
        for op in operations:
            if mode == "negative" and op.method.upper() == "GET":
                continue  # nothing to break there but the auth header, which HTTP itself refuses to send
            @settings(max_examples=EXAMPLES[mode], deadline=None, database=None, derandomize=True,
                      phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
            @given(case=op.as_strategy(generation_mode=GenerationMode(mode)))
            def run(case):
                kwargs = case.as_transport_kwargs(base_url=url)
                try:
                    r = session.request(kwargs["method"], kwargs["url"], headers=kwargs.get("headers"),
                                        params=kwargs.get("params"), json=kwargs.get("json"),
                                        content=kwargs.get("data"))
                except httpx.LocalProtocolError:  # e.g. a header value HTTP itself forbids: never sent
                    reject()
                seen[r.status_code] = seen.get(r.status_code, 0) + 1
                assert r.status_code < 500, (case.body, r.text)
                assert str(r.status_code) in documented, (case.body, r.status_code)  # 400, never FastAPI's 422
                if r.status_code >= 400 and op.path.startswith("/api/") and op.path != "/api/v1/qwen/predict":
                    assert isinstance(r.json()["error"], str), r.text  # Ollama's own shape: {"error": "..."}
                elif r.status_code >= 400 and op.path.startswith("/v1/messages"):  # Anthropic's own shape
                    assert r.json()["type"] == "error" and set(r.json()["error"]) == {"type", "message"}, r.text
                elif r.status_code >= 400:
                    assert set(r.json()["error"]) == {"message", "type", "param", "code"}, r.text
                elif r.headers["content-type"].startswith("application/json"):
                    body = r.json()
                    if body.get("object") == "chat.completion":
                        assert body["usage"]["completion_tokens"] <= 2 * len(body["choices"])  # n choices

            run()
        assert session.get("/health").json()["status"] == "ok"  # still serving after all of it
    assert any(200 <= s < 300 for s in seen), seen  # the fuzzer reached real generations, not just errors
