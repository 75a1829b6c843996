"""A hostile client against a real `edge-qwen serve` subprocess (issue 10's server points).

One server for the module, started with an API key and a short --read-timeout so the idle
connection test is quick. Every request here sends the key unless the test is about it.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time

import httpx
import pytest

pytestmark = pytest.mark.slow

KEY = "hardening-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
READ_TIMEOUT = 2.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(default_model, tmp_path_factory):
    port = _free_port()
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([shutil.which("edge-qwen") or "edge-qwen", "serve", str(default_model), "--port", str(port),
                                 "--api-key", KEY, "--read-timeout", str(READ_TIMEOUT), "--parallel", "1",
                                 "--ctx", "2048", "--quiet"], stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, "HF_HUB_OFFLINE": "1"})
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while True:
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"serve did not start: {log.read_text(errors='replace')[-3000:]}")
        time.sleep(0.3)
    yield url, port, log
    proc.terminate()
    proc.wait(timeout=30)


def chat(url: str, content: str = "Say hi", **extra) -> httpx.Response:
    body = {"messages": [{"role": "user", "content": content}], "temperature": 0, "max_tokens": 4, **extra}
    return httpx.post(f"{url}/v1/chat/completions", json=body, headers=AUTH, timeout=120)


def raw(port: int, data: bytes, wait: float = 10.0) -> bytes:
    """Send raw bytes; return everything the server answers until it closes (or `wait` passes)."""
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.settimeout(wait)
        s.sendall(data)
        got = b""
        try:
            while chunk := s.recv(65536):
                got += chunk
        except socket.timeout:
            got += b"<still open>"
        return got


def error_of(r: httpx.Response, status: int, code: str) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["code"] == code, err
    return err


def test_foreign_host_is_refused(served):
    url, port, _ = served
    r = httpx.get(f"{url}/v1/models", headers={**AUTH, "Host": "rebind.attacker.example"})
    assert "--allowed-host" in error_of(r, 403, "host_not_allowed")["message"]
    for host in (f"localhost:{port}", f"127.0.0.1:{port}"):
        assert httpx.get(f"{url}/v1/models", headers={**AUTH, "Host": host}).status_code == 200


def test_foreign_origin_text_plain_post_is_refused(served):
    url, port, _ = served
    body = json.dumps({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1})
    r = httpx.post(f"{url}/v1/chat/completions", content=body,
                   headers={**AUTH, "Content-Type": "text/plain", "Origin": "https://evil.example"})
    assert "--cors-origin" in error_of(r, 403, "origin_not_allowed")["message"]
    same = httpx.post(f"{url}/v1/chat/completions", content=body,
                      headers={**AUTH, "Content-Type": "text/plain", "Origin": f"http://127.0.0.1:{port}"}, timeout=120)
    assert same.status_code == 200, same.text  # a same-origin page (e.g. /docs) keeps working


def test_content_length_with_transfer_encoding_is_refused_and_closed(served):
    _, port, _ = served
    hidden = b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    req = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
           b"Content-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n" + hidden)
    got = raw(port, req)
    assert got.startswith(b"HTTP/1.1 400"), got[:200]
    assert b"ambiguous_framing" in got and got.count(b"HTTP/1.1 ") == 1  # the hidden request was not served
    assert not got.endswith(b"<still open>")


def test_idle_connection_is_closed_after_the_read_timeout(served):
    _, port, _ = served
    t0 = time.monotonic()
    got = raw(port, b"", wait=READ_TIMEOUT + 20)
    assert got.startswith(b"HTTP/1.1 408") and b"request_timeout" in got, got[:200]
    assert READ_TIMEOUT - 0.5 < time.monotonic() - t0 < READ_TIMEOUT + 15
    trickle = raw(port, b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 100\r\n\r\n{",
                  wait=READ_TIMEOUT + 20)
    assert trickle.startswith(b"HTTP/1.1 408"), trickle[:200]


def test_20000_empty_messages_refused_fast_and_server_free(served):
    url, _, _ = served
    body = {"messages": [{"role": "user", "content": ""}] * 20_000, "max_tokens": 1}
    t0 = time.monotonic()
    r = httpx.post(f"{url}/v1/chat/completions", json=body, headers=AUTH, timeout=60)
    assert time.monotonic() - t0 < 2.0
    assert "2048" in error_of(r, 400, "invalid_request")["message"]
    t0 = time.monotonic()
    assert chat(url, max_tokens=1).status_code == 200
    assert time.monotonic() - t0 < 30  # free at once: nothing of the refused request is still running


def test_sampling_fields_change_the_output(served):
    url, _, _ = served
    prompt = "Write the word cat ten times, separated by spaces."
    plain = chat(url, prompt, max_tokens=30).json()["choices"][0]["message"]["content"]
    assert plain.count("cat") >= 8
    out = chat(url, prompt, max_tokens=30, frequency_penalty=2.0).json()["choices"][0]["message"]["content"]
    assert out.count("cat") < plain.count("cat"), out
    # A presence penalty is subtracted once per token seen: it changes prose, where margins are small.
    prose = "Describe the sea in three sentences."
    base = chat(url, prose, max_tokens=40).json()["choices"][0]["message"]["content"]
    shy = chat(url, prose, max_tokens=40, presence_penalty=2.0).json()["choices"][0]["message"]["content"]
    assert shy != base and len(set(shy.split())) >= len(set(base.split())) - 2, (base, shy)
    ids = httpx.post(f"{url}/tokenize", json={"content": " dog"}, headers=AUTH, timeout=60).json()
    dog = ids["tokens"][0]
    biased = chat(url, prompt, max_tokens=3, logit_bias={str(dog): 100}).json()["choices"][0]["message"]["content"]
    assert biased.count("dog") == 3, biased
    error_of(chat(url, prompt, logit_bias={"1": 101}), 400, "invalid_request")
    error_of(chat(url, prompt, logit_bias={"99999999": 5}), 400, "invalid_request")
    error_of(chat(url, prompt, frequency_penalty=2.5), 400, "invalid_request")
    error_of(chat(url, prompt, repetition_penalty=1.3), 400, "invalid_request")


@pytest.mark.parametrize("schema", [{"type": "number", "multipleOf": 0.01},
                                    {"type": "object", "properties": {"d": {"type": "string", "format": "date"}},
                                     "required": ["d"]}])
def test_json_schemas_never_500(served, schema):
    url, _, _ = served
    r = chat(url, "A price in dollars, or a date in February 2023, as JSON.", max_tokens=40,
             response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": schema}})
    assert r.status_code < 500, r.text


def test_smaller_ones(served):
    url, _, _ = served
    error_of(httpx.get(f"{url}/v1/models/", headers=AUTH, timeout=60), 404, "model_not_found")
    long_name = "m" * 500_000
    r = httpx.post(f"{url}/v1/chat/completions", headers=AUTH, timeout=60,
                   json={"model": long_name, "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code in (404, 413) and len(r.content) < 2000, len(r.content)
    r = httpx.post(f"{url}/v1/chat/completions", headers=AUTH, timeout=60,
                   json={"model": "m" * 5000, "messages": [{"role": "user", "content": "hi"}]})
    assert len(error_of(r, 404, "model_not_found")["message"]) < 500
    body = b'{"messages": [{"role": "user", "content": "hi"}], "stop": ["a\\ud800"]}'
    r = httpx.post(f"{url}/v1/chat/completions", content=body, headers={**AUTH, "Content-Type": "application/json"}, timeout=60)
    assert error_of(r, 400, "invalid_request")["param"].startswith("stop")
    assert httpx.get(f"{url}/health", timeout=60).json() == {"status": "ok", "version": httpx.get(f"{url}/health", timeout=60).json()["version"]}
    assert set(httpx.get(f"{url}/health", timeout=60).json()) == {"status", "version"}
    assert "models" in httpx.get(f"{url}/health", headers=AUTH, timeout=60).json()


@pytest.mark.parametrize("path,body", [
    ("/v1/embeddings", {"input": [999_999]}),
    ("/v1/embeddings", {"input": [[1, 2], [-5]]}),
    ("/v1/completions", {"prompt": [151_936], "max_tokens": 1}),
    ("/detokenize", {"tokens": [2**31]}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1,
                              "logit_bias": {"999999": 5}}),
])
def test_token_ids_outside_the_vocabulary_are_refused(served, path, body):
    # llama.cpp aborts the whole process (std::out_of_range) on such an id: it must never get there.
    url, _, _ = served
    r = httpx.post(f"{url}{path}", json=body, headers=AUTH, timeout=120)
    assert r.status_code == 400, r.text
    assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    assert httpx.get(f"{url}/health", timeout=60).json()["status"] == "ok"  # still alive


def test_accept_errors_are_logged_once(caplog):
    import asyncio

    from edge_qwen.serve.security import log_accept_errors_once

    async def main() -> None:
        loop = asyncio.get_running_loop()
        log_accept_errors_once(loop)
        for _ in range(50):  # what a second of EMFILE retries used to log, each with a traceback
            loop.call_exception_handler({"message": "socket.accept() out of system resource",
                                         "exception": OSError(24, "Too many open files")})

    with caplog.at_level("WARNING"):
        asyncio.run(main())
    assert len([r for r in caplog.records if "cannot accept" in r.getMessage()]) == 1


def test_host_and_origin_rules():
    from edge_qwen.serve.security import HostOriginGuard

    local = HostOriginGuard(None)
    assert all(local.host_allowed(h) for h in ("localhost", "127.0.0.1", "::1", "app.localhost"))
    assert not any(local.host_allowed(h) for h in ("rebind.attacker.example", "192.168.1.5", "localhost.evil.com"))
    everywhere = HostOriginGuard(None, bind_host="0.0.0.0", allowed_hosts=["mylaptop.local"])
    assert everywhere.host_allowed("192.168.1.5") and everywhere.host_allowed("mylaptop.local")
    assert not everywhere.host_allowed("rebind.attacker.example")
    assert local.origin_allowed("http://127.0.0.1:8000", "127.0.0.1:8000", "http")
    assert local.origin_allowed("http://localhost", "localhost:80", "http")
    assert not local.origin_allowed("http://127.0.0.1:9999", "127.0.0.1:8000", "http")
    assert not local.origin_allowed("null", "127.0.0.1:8000", "http")
    assert HostOriginGuard(None, cors_origins=["http://app.local/"]).origin_allowed("http://app.local", "x", "http")
