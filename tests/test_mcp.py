"""MCP tool servers: the config, the hub (real stdio servers written with the `mcp` SDK), the tool loop in
`edge-qwen chat --mcp` and `serve --mcp` on the default model, and who the server offers them to.

The test server (tests/mcp_servers.py) logs every call it gets to a file: the tests read that log to
see, from the tool's own side, that the model's call arrived.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import httpx
import pytest

from mcp_servers import calls, start_http, write_config

from edge_qwen.mcp import MCPConfigError, MCPHub, load_config, mcp_chat

ASK_ALPHA = "Use the lookup_code tool to find the code word of project alpha, then tell me the code word."


def _cli(*args: str, stdin: str | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", "from edge_qwen.cli import main; main()", *args], input=stdin,
                          capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, "HF_HUB_OFFLINE": "1"})


# --- config and hub (no model) --------------------------------------------------------------------

def test_bad_configs_are_named(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"mcpServers": {"fs": {"command": "x",}}}')
    with pytest.raises(MCPConfigError, match=r"bad\.json is not valid JSON: .* line 1"):
        load_config(bad)
    missing = tmp_path / "missing.json"
    missing.write_text(json.dumps({"mcpServers": {"fs": {"command": "no-such-mcp-server-7f3", "args": []}}}))
    with pytest.raises(MCPConfigError, match=r'server "fs": command .no-such-mcp-server-7f3. is not found on PATH'):
        load_config(missing)
    for data, words in (([], "mcpServers"), ({"mcpServers": {"a b": {"command": "python"}}}, "server name"),
                        ({"mcpServers": {"x": {"url": "ftp://h"}}}, "http(s) URL"),
                        ({"mcpServers": {"x": {"command": "python", "url": "http://h"}}}, "not both"),
                        ({"mcpServers": {"x": {"command": "python", "args": "-m x"}}}, "list of strings")):
        with pytest.raises(MCPConfigError, match=words.replace("(", r"\(").replace(")", r"\)")):
            load_config(data)
    # The CLI: one line naming the problem, exit 1, no traceback, before any model loads.
    for path, words in ((bad, "is not valid JSON"), (missing, "is not found on PATH"),
                        (tmp_path / "absent.json", "does not exist")):
        out = _cli("chat", "--mcp", str(path), "-p", "hi", timeout=60)
        assert out.returncode == 1 and words in out.stderr and "Traceback" not in out.stderr, out.stderr


def test_hub_calls_crash_and_timeout(tmp_path):
    config, log = write_config(tmp_path, tools="lookup_code,crash,hang")
    with MCPHub.start(config, call_timeout=30) as hub:
        assert set(hub.tool_names()) == {"lookup_code", "crash", "hang"}
        spec = next(s for s in hub.specs_for() if s["function"]["name"] == "lookup_code")
        assert spec["function"]["parameters"]["properties"]["project"]["type"] == "string"
        ok = hub.call("lookup_code", {"project": "alpha"})
        assert not ok.is_error and "ZEBRA-4417" in ok.text
        assert calls(log) == [{"tool": "lookup_code", "arguments": {"project": "alpha"}}]
        started = time.monotonic()
        hung = hub.call("hang", {}, timeout=1.5)
        assert hung.is_error and "timed out" in hung.text and time.monotonic() - started < 10
        assert not hub.call("lookup_code", {"project": "beta"}).is_error  # a timed-out call spoils nothing
        crashed = hub.call("crash", {})
        assert crashed.is_error and "closed the connection" in crashed.text
        after = hub.call("lookup_code", {"project": "alpha"})
        assert after.is_error and "not running" in after.text
        assert hub.describe()["codes"]["running"] is False
        declined = MCPHub.call(hub, "lookup_code", {"project": "alpha"}, confirm=lambda *a: False)
        assert declined.is_error and "declined" in declined.text
    assert [c["tool"] for c in calls(log)] == ["lookup_code", "hang", "lookup_code", "crash"]


def test_hub_over_streamable_http(tmp_path):
    url, log, proc = start_http(tmp_path)
    try:
        with MCPHub.start({"mcpServers": {"remote": {"url": url}}}) as hub:
            assert hub.tool_names() == ["lookup_code"] and hub.describe()["remote"]["transport"] == "http"
            result = hub.call("lookup_code", {"project": "beta"})
            assert not result.is_error and "OTTER-2093" in result.text
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    assert calls(log) == [{"tool": "lookup_code", "arguments": {"project": "beta"}}]


# --- the tool loop on the default model -----------------------------------------------------------

@pytest.fixture(scope="module")
def codes(tmp_path_factory):
    return write_config(tmp_path_factory.mktemp("mcp-codes"))


@pytest.mark.slow
def test_chat_cli_calls_the_tool(default_model, codes, tmp_path):
    config, log = codes
    before = len(calls(log))
    out = _cli("chat", str(default_model), "--mcp", str(config), "--temperature", "0", "--max-tokens", "60",
               ASK_ALPHA)
    assert out.returncode == 0, out.stderr
    assert "ZEBRA-4417" in out.stdout  # the answer carries the tool's result
    assert calls(log)[before:] == [{"tool": "lookup_code", "arguments": {"project": "alpha"}}]
    assert '[mcp] codes.lookup_code {"project": "alpha"}' in out.stderr  # shown (and logged) as it happens
    assert "MCP call codes.lookup_code" in out.stderr

    # --mcp-confirm asks first; "n" declines, the tool never runs, and the chat still answers.
    out = _cli("chat", str(default_model), "--mcp", str(config), "--mcp-confirm", "--temperature", "0",
               "--max-tokens", "30", "--mcp-max-rounds", "1", ASK_ALPHA, stdin="n\n")
    assert out.returncode == 0, out.stderr
    assert "run codes.lookup_code" in out.stderr and "declined" in out.stderr
    assert len(calls(log)) == before + 1


@pytest.mark.slow
def test_crash_mid_call_in_the_loop(llm, tmp_path):
    """The server dies during the model's call: the model gets the error as the result and answers.
    (A hanging tool's timeout is tested on the hub above: in the loop it is the same error result.)"""
    config, log = write_config(tmp_path, tools="crash")
    with MCPHub.start(config) as hub:
        ask = [{"role": "user", "content": "Call the crash tool now."}]
        reply = mcp_chat(llm, hub, ask, temperature=0, max_tokens=16, max_rounds=1, tool_choice="required")
        message = reply["choices"][0]["message"]
        assert [c["name"] for c in message["mcp_calls"]] == ["crash"]
        assert message["mcp_calls"][0]["is_error"] and "closed the connection" in message["mcp_calls"][0]["output"]
        # The model got the error as the tool's result and answered: the chat goes on.
        assert reply["choices"][0]["finish_reason"] in ("stop", "length") and message["content"]
        assert reply["usage"]["completion_tokens"] > 0
    assert [c["tool"] for c in calls(log)] == ["crash"]


# --- on the server ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def mcp_server(llm, codes):
    from edge_qwen.serve.app import ServerThread, create_app

    hub = MCPHub.start(codes[0])
    app = create_app({"qwen2.5": llm}, mcp=hub)
    with ServerThread(app) as url:
        yield url, app
    hub.close()


@pytest.mark.slow
def test_serve_uses_mcp_only_when_asked(mcp_server, codes):
    import openai

    url, app = mcp_server
    log = codes[1]
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=300)
    listed = httpx.get(f"{url}/v1/mcp/tools").json()
    assert [t["name"] for t in listed["servers"]["codes"]["tools"]] == ["lookup_code"]

    before = len(calls(log))
    plain = client.chat.completions.create(model="qwen2.5", temperature=0, max_tokens=8,
                                           messages=[{"role": "user", "content": ASK_ALPHA}])
    assert "ZEBRA-4417" not in (plain.choices[0].message.content or "")
    assert len(calls(log)) == before  # not asked: no tool of the server's runs

    stream = client.chat.completions.create(model="qwen2.5", temperature=0, max_tokens=60, stream=True,
                                            messages=[{"role": "user", "content": ASK_ALPHA}],
                                            extra_body={"mcp_servers": ["codes"]})
    deltas = [c.choices[0].delta.model_dump() for c in stream if c.choices]
    call = next(d["mcp_call"] for d in deltas if d.get("mcp_call"))
    result = next(d["mcp_result"] for d in deltas if d.get("mcp_result"))
    assert call["name"] == "lookup_code" and call["arguments"] == {"project": "alpha"}
    assert "ZEBRA-4417" in result["output"] and not result["is_error"]
    assert "ZEBRA-4417" in "".join(d.get("content") or "" for d in deltas)
    assert calls(log)[before:] == [{"tool": "lookup_code", "arguments": {"project": "alpha"}}]

    # The Responses API's mcp tool type names a configured server by its label.
    resp = client.responses.create(model="qwen2.5", temperature=0, max_output_tokens=60, input=ASK_ALPHA,
                                   tools=[{"type": "mcp", "server_label": "codes", "require_approval": "never"}])
    items = [i.model_dump() for i in resp.output]
    mcp_item = next(i for i in items if i["type"] == "mcp_call")
    assert mcp_item["server_label"] == "codes" and "ZEBRA-4417" in mcp_item["output"]
    assert "ZEBRA-4417" in resp.output_text
    with pytest.raises(openai.BadRequestError, match="server_url"):
        client.responses.create(model="qwen2.5", input="hi", tools=[
            {"type": "mcp", "server_label": "x", "server_url": "https://example.com/mcp"}])
    with pytest.raises(openai.BadRequestError, match="not an MCP server of this server"):
        client.chat.completions.create(model="qwen2.5", messages=[{"role": "user", "content": "hi"}],
                                       extra_body={"mcp_servers": ["elsewhere"]})


@pytest.mark.slow
def test_anthropic_request_with_mcp_servers(mcp_server, codes):
    import anthropic

    url, _ = mcp_server
    msg = anthropic.Anthropic(base_url=url, api_key="unused", max_retries=0, timeout=300).messages.create(
        model="qwen2.5", max_tokens=60, messages=[{"role": "user", "content": ASK_ALPHA}],
        extra_body={"mcp_servers": ["codes"], "temperature": 0})
    kinds = [b.type for b in msg.content]
    assert kinds[:2] == ["mcp_tool_use", "mcp_tool_result"] and kinds[-1] == "text"
    assert "ZEBRA-4417" in msg.content[-1].text and msg.stop_reason == "end_turn"


@pytest.mark.slow
def test_mcp_never_offered_to_keyless_remote_clients(mcp_server, llm, codes):
    import anyio

    from edge_qwen.serve.app import create_app

    _, app = mcp_server
    body = {"model": "qwen2.5", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}],
            "mcp_servers": ["codes"]}

    async def post(application, path: str, payload: dict, headers: dict | None = None) -> httpx.Response:
        # In-process ASGI: the request looks as if it came from another machine; no network traffic.
        transport = httpx.ASGITransport(app=application, client=("203.0.113.9", 40000))
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as c:
            return await c.post(path, json=payload, headers=headers or {})

    r = anyio.run(post, app, "/v1/chat/completions", body)
    assert r.status_code == 403 and r.json()["error"]["code"] == "mcp_not_allowed"
    r = anyio.run(post, app, "/v1/messages", body)
    assert r.status_code == 403 and r.json()["error"]["type"] == "permission_error"
    keyed = create_app({"qwen2.5": llm}, mcp=app.state.mcp, api_key="k-9")
    r = anyio.run(post, keyed, "/v1/chat/completions", {**body, "max_tokens": 1}, {"Authorization": "Bearer k-9"})
    assert r.status_code == 200  # the key's holder may use them from anywhere
    # `serve --mcp` on a non-loopback address without a key is refused before anything listens.
    out = _cli("serve", "--host", "0.0.0.0", "--mcp", str(codes[0]), timeout=120)
    assert out.returncode == 1 and "needs --api-key" in out.stderr and "Traceback" not in out.stderr
