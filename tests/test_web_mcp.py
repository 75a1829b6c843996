"""The chat page with `serve --mcp --mcp-confirm`, in Debian's Chromium (the helpers of tests/test_web.py):
the page lists the server's MCP tools, asks before the model's call runs, and shows the call and its
result in the conversation; the tool's own log shows the call arrived.
"""

from __future__ import annotations

import pytest

from mcp_servers import calls, write_config
from test_web import Serve, browser, pages, record_posts, set_settings, wait_done, wait_until  # noqa: F401


pytestmark = pytest.mark.slow  # a served default model runs the tool loop


@pytest.fixture(scope="module")
def mcp_setup(default_model, tmp_path_factory):
    config, log = write_config(tmp_path_factory.mktemp("web-mcp"))
    srv = Serve("--ctx", "2048", "--mcp", str(config), "--mcp-confirm")
    yield srv, log
    srv.stop()


def test_page_lists_tools_confirms_and_shows_the_call(mcp_setup, pages):  # noqa: F811
    srv, log = mcp_setup
    page = pages.open(srv)
    wait_until(page, "!document.getElementById('mcp-panel').hidden")
    listed = page.locator("#mcp-tools li").all_inner_texts()
    assert any(t.startswith("codes.lookup_code") for t in listed), listed
    posts = record_posts(page)
    set_settings(page, temperature=0, max_tokens=60)
    page.fill("#prompt", "Use the lookup_code tool to find the code word of project alpha, then tell me the code word.")
    page.press("#prompt", "Enter")
    wait_until(page, "document.querySelector('.mcp-call[data-name=lookup_code] .ask button') !== null")
    assert calls(log) == []  # nothing runs before the user allows it
    page.locator(".mcp-call .ask button[data-action=mcpAllow]").click()
    wait_done(page)
    call = page.locator(".msg.assistant .mcp-call[data-name=lookup_code]").last
    assert call.get_attribute("data-state") == "done"
    assert '"project":"alpha"' in call.locator(".mcp-args").inner_text()
    assert "ZEBRA-4417" in call.locator(".mcp-output").inner_text()
    assert "ZEBRA-4417" in page.locator(".msg.assistant .content").last.inner_text()
    assert calls(log) == [{"tool": "lookup_code", "arguments": {"project": "alpha"}}]
    assert posts[-1].post_data_json["mcp_servers"] == ["codes"]
