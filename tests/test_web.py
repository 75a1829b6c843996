"""The chat page at / in a real browser: Debian's Chromium driven by Playwright against real
`edge-qwen serve` processes on the default model.

Every page the tests open records each request it makes and each console error: at the end of
each test, every request must have gone to the server's own origin and nothing may have broken
the Content-Security-Policy. A missing Chromium fails these tests (the README's test command
installs it); it never skips them.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import zipfile
from importlib.resources import files
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import jsonschema
import pytest

CHROMIUM = os.environ.get("EDGE_QWEN_CHROMIUM", "/usr/bin/chromium")
# As root on a machine without a display or a network: no sandbox, no GPU, and none of
# Chromium's own background connections (they would be requests to other origins).
CHROMIUM_ARGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-default-apps", "--disable-extensions", "--no-default-browser-check"]
KEY = "web-test-key-7d1f"
WAIT_MS = 180_000  # generous: the CI machine's 2 cores may be shared
STATIC = files("edge_qwen.web") / "static"


# --- servers and browser -------------------------------------------------------------------------

class Serve:
    """A real `edge-qwen serve` process on a free port, stopped with Ctrl-C (SIGINT)."""

    def __init__(self, *args: str):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        exe = shutil.which("edge-qwen")
        cmd = [exe] if exe else [sys.executable, "-c", "from edge_qwen.cli import main; main()"]
        self.proc = subprocess.Popen([*cmd, "serve", *args, "--port", str(self.port), "--quiet"],
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     env={**os.environ, "HF_HUB_OFFLINE": "1"})
        deadline = time.monotonic() + 180
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"edge-qwen serve exited: {self.proc.communicate()[0]}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("edge-qwen serve did not answer /health within 180 s")
            time.sleep(0.2)

    def health(self) -> dict:
        return httpx.get(f"{self.url}/health", timeout=10).json()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def busy_slots(health: dict) -> int:
    """Generations running, whatever shape /health's per-model entry has (one slot or an engine's many)."""
    total = 0
    for entry in health.get("models", {}).values():
        if "busy" in entry:
            total += int(entry["busy"])
        elif "running" in entry:
            total += int(entry["running"])
        else:
            total += int(bool(entry.get("generating")))
    return total


def cancelled_count(health: dict) -> int:
    return sum(int(e.get("cancelled", 0)) for e in health.get("models", {}).values())


@pytest.fixture(scope="module")
def server(default_model):
    srv = Serve("--ctx", "2048")  # no model argument: the default model, served as "qwen2.5"
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def keyed_server(default_model):
    srv = Serve("--model", f"alpha={default_model}", "--model", f"beta={default_model}", "--ctx", "1024",
                "--api-key", KEY)
    yield srv
    srv.stop()


def launch_browser(playwright):
    """Debian's Chromium under Playwright; fails (never skips) when it is not installed."""
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} not found: the browser tests need Debian's chromium package "
                    "(`apt-get install -y chromium`, part of the README's test command), or set EDGE_QWEN_CHROMIUM")
    return playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = launch_browser(p)
        yield b
        b.close()


class Pages:
    """Opens pages in fresh browser contexts and checks, when the test ends, that each one
    called only its own server and hit no CSP violation or script error."""

    def __init__(self, browser):
        self.browser = browser
        self.contexts: list = []
        self.requests: list[tuple[str, str]] = []  # (page origin, request url)
        self.errors: list[str] = []

    def open(self, srv: Serve, path: str = "/", **context_options):
        context_options.setdefault("viewport", {"width": 1100, "height": 760})
        context_options.setdefault("locale", "en-US")
        ctx = self.browser.new_context(**context_options)
        self.contexts.append(ctx)
        page = ctx.new_page()
        page.set_default_timeout(30_000)  # finding an element; waits for answers use WAIT_MS
        origin = srv.url
        page.on("request", lambda r: self.requests.append((origin, r.url)))
        page.on("pageerror", lambda e: self.errors.append(f"page error: {e}"))
        page.on("console", self._console)
        page.goto(srv.url + path)
        wait_until(page, "document.querySelector('#conversations li') !== null")
        return page

    def _console(self, message) -> None:
        # Chromium logs every 401 as "Failed to load resource"; the key test provokes them on purpose.
        if message.type == "error" and "status of 401" not in message.text:
            self.errors.append(f"console: {message.text}")

    def check(self) -> None:
        others = [url for origin, url in self.requests
                  if not url.startswith(("data:", "blob:")) and
                  urlsplit(url)._replace(path="", query="", fragment="").geturl() != origin]
        assert not others, f"requests to other origins: {others}"
        assert self.requests, "no request was recorded"
        assert not self.errors, self.errors

    def close(self) -> None:
        for ctx in self.contexts:
            ctx.close()


@pytest.fixture()
def pages(browser):
    p = Pages(browser)
    yield p
    p.close()
    p.check()


# --- page helpers ---------------------------------------------------------------------------------

def record_posts(page) -> list:
    posts: list = []
    page.on("request", lambda r: r.method == "POST" and r.url.endswith("/v1/chat/completions") and posts.append(r))
    return posts


def set_settings(page, **values) -> None:
    """Fill the settings dialog the way a user does, then close it with Done."""
    page.click("#open-settings")
    page.wait_for_selector("#settings[open]")
    for name, value in values.items():
        if name == "json_mode":
            page.set_checked("#json-mode", bool(value))
        else:
            page.fill(f"#{name}", str(value))
    page.click("#settings button[type=submit]")
    page.wait_for_selector("#settings", state="hidden")


def wait_until(page, expression: str, timeout_s: float = WAIT_MS / 1000) -> None:
    """Poll a JS expression from here: Playwright's wait_for_function evaluates strings with eval(),
    which the page's CSP (rightly) forbids."""
    deadline = time.monotonic() + timeout_s
    while not page.evaluate(expression):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {expression}")
        time.sleep(0.05)


def wait_done(page) -> None:
    page.wait_for_selector("#send", state="visible", timeout=WAIT_MS)


def send_and_watch(page, text: str) -> list[int]:
    """Type `text`, press Enter and poll the answer until it is done; returns the lengths seen."""
    page.fill("#prompt", "")
    page.locator("#prompt").press_sequentially(text)  # key by key; CJK characters arrive as text input
    page.press("#prompt", "Enter")
    seen: list[int] = []
    deadline = time.monotonic() + WAIT_MS / 1000
    while page.is_visible("#stop") and time.monotonic() < deadline:
        n = page.evaluate("(document.querySelector('.msg.assistant:last-of-type .content') || {}).textContent?.length || 0")
        if not seen or n != seen[-1]:
            seen.append(n)
        time.sleep(0.03)
    wait_done(page)
    return seen


def last_answer(page):
    return page.locator(".msg.assistant").last


def stored(page) -> dict:
    return page.evaluate("JSON.parse(localStorage.getItem('edge-qwen.conversations.v1'))")


# --- tests ----------------------------------------------------------------------------------------

def test_page_served_with_csp_and_packaged_assets(server):
    """/ and every asset it names come with the CSP and their content type; nothing else is served."""
    r = httpx.get(server.url + "/", headers={"Accept": "text/html"})  # a browser; others get Ollama's answer
    assert r.status_code == 200 and r.headers["content-type"] == "text/html; charset=utf-8"
    csp = r.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "connect-src 'self'" in csp and "script-src 'self'" in csp
    assert "http" not in csp and "*" not in csp and "unsafe" not in csp
    refs = re.findall(r'(?:src|href)="([^"#]+)"', r.text)
    assert refs and all(ref.startswith("/web/") for ref in refs), refs
    kinds = {".js": "text/javascript; charset=utf-8", ".css": "text/css; charset=utf-8", ".svg": "image/svg+xml"}
    for ref in refs:
        a = httpx.get(server.url + ref)
        assert a.status_code == 200, ref
        assert a.headers["content-type"] == kinds[Path(ref).suffix], ref
        assert a.headers["content-security-policy"] == csp and a.headers["x-content-type-options"] == "nosniff"
        again = httpx.get(server.url + ref, headers={"If-None-Match": a.headers["etag"]})
        assert again.status_code == 304
    for bad in ("/web/../routes.py", "/web/%2e%2e/routes.py", "/web/missing.js", "/web/vendor/README.py"):
        miss = httpx.get(server.url + bad)
        assert miss.status_code == 404 and "error" in miss.json(), bad
    # The vendored libraries are the pinned npm files, byte for byte, with their licenses beside them.
    table = (STATIC / "vendor" / "README.md").read_text()
    rows = re.findall(r"^\| (\S+) \| (\S+@[\d.]+) \| .* \| ([0-9a-f]{64}) \|$", table, re.M)
    assert len(rows) == 5
    for name, _, digest in rows:
        assert hashlib.sha256((STATIC / "vendor" / name).read_bytes()).hexdigest() == digest, name
    for lic in ("marked.LICENSE.txt", "dompurify.LICENSE.txt", "dompurify.LICENSE-MPL.txt", "highlight.js.LICENSE.txt"):
        assert (STATIC / "vendor" / lic).is_file()


def test_wheel_ships_every_asset(tmp_path):
    """A wheel built from the source holds every file of edge_qwen/web/static (the page works offline)."""
    root = Path(__file__).resolve().parents[1]
    src = tmp_path / "src"
    shutil.copytree(root / "edge_qwen", src / "edge_qwen", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(root / name, src / name)
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                          "-w", str(tmp_path / "dist"), str(src)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    wheel = next((tmp_path / "dist").glob("edge_qwen-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    static = root / "edge_qwen" / "web" / "static"
    wanted = {p.relative_to(root).as_posix() for p in static.rglob("*") if p.is_file()}
    assert wanted and wanted <= names, sorted(wanted - names)
    size = sum(p.stat().st_size for p in static.rglob("*") if p.is_file())
    assert size < 400_000, f"the page's assets grew to {size} bytes"


def test_english_and_chinese_streamed(server, pages):
    """Type an English and a Chinese message: both answers stream in, Markdown code is highlighted,
    and the request carries the settings chosen in the dialog."""
    page = pages.open(server)
    posts = record_posts(page)
    set_settings(page, temperature=0, top_p=0.8, max_tokens=40)
    seen = send_and_watch(page, "Write a Python function add(a, b) in a code block.")
    assert len([n for n in seen if n > 0]) >= 3, f"the answer did not stream: lengths seen {seen}"
    answer = last_answer(page)
    assert answer.locator("pre code.hljs .hljs-keyword").count() >= 1, answer.inner_html()
    assert "def" in answer.inner_text()
    body = posts[-1].post_data_json
    assert body["stream"] is True and body["temperature"] == 0 and body["top_p"] == 0.8 and body["max_tokens"] == 40

    seen = send_and_watch(page, "用一句话介绍北京。")
    assert len([n for n in seen if n > 0]) >= 3, f"the answer did not stream: lengths seen {seen}"
    assert page.locator(".msg.user .content").last.inner_text() == "用一句话介绍北京。"
    text = last_answer(page).locator(".content").inner_text()
    assert re.search(r"[\u4e00-\u9fff]", text), text
    assert "\ufffd" not in text
    body = posts[-1].post_data_json
    assert [m["content"] for m in body["messages"] if m["role"] == "user"][-1] == "用一句话介绍北京。"
    assert len(body["messages"]) == 3  # the first turn, its answer, the new question
    assert page.locator("#status").inner_text()  # "N tokens · T s"


def test_stop_frees_the_slot_then_regenerate_and_edit(server, pages):
    """Stop a long answer: the server's slot is freed and counted as cancelled; then regenerate the
    answer and edit the question and resend."""
    page = pages.open(server)
    posts = record_posts(page)
    set_settings(page, temperature=0, max_tokens=1500)
    before = cancelled_count(server.health())
    page.fill("#prompt", "Count from 1 to 1000, one number per line.")
    page.press("#prompt", "Enter")
    wait_until(page, "(document.querySelector('.msg.assistant .content')?.textContent.length || 0) > 12")
    assert busy_slots(server.health()) >= 1
    page.click("#stop")
    wait_done(page)
    deadline = time.monotonic() + 30
    while busy_slots(h := server.health()) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert busy_slots(h) == 0, h
    assert cancelled_count(h) == before + 1, h
    stopped = last_answer(page)
    assert stopped.locator(".note").inner_text() == "Stopped."
    stopped_text = stopped.locator(".content").inner_text()
    assert 0 < len(stopped_text) < 2000
    assert stored(page)["conversations"][page.evaluate("localStorage.getItem('edge-qwen.current')")][
        "messages"][-1]["meta"]["finish"] == "stopped"

    set_settings(page, max_tokens=12)
    page.click(".msg.assistant [data-action=regenerate]")
    wait_done(page)
    assert page.locator(".msg.assistant").count() == 1 and page.locator(".msg.user").count() == 1
    assert last_answer(page).locator(".note").inner_text() == "Cut short at max tokens."
    assert len(posts) == 2 and posts[1].post_data_json["messages"] == posts[0].post_data_json["messages"]

    page.click(".msg.user [data-action=edit]")
    page.fill(".msg.user .edit-box", "Say hello.")
    page.press(".msg.user .edit-box", "Enter")
    wait_done(page)
    assert page.locator(".msg.user .content").all_inner_texts() == ["Say hello."]
    assert page.locator(".msg.assistant").count() == 1
    assert posts[-1].post_data_json["messages"] == [{"role": "user", "content": "Say hello."}]


def test_reload_finds_the_conversations(server, pages):
    """Conversations live in localStorage: after a reload both are listed and each opens its turns."""
    page = pages.open(server)
    set_settings(page, max_tokens=6, temperature=0)
    send_and_watch(page, "First conversation: say one.")
    page.click("#new-chat")
    send_and_watch(page, "Second conversation: say two.")
    page.reload()
    wait_until(page, "document.querySelectorAll('#conversations li').length === 2")
    titles = page.locator("#conversations .open-conv").all_inner_texts()
    assert titles == ["Second conversation: say two.", "First conversation: say one."]
    assert page.locator(".msg.user .content").inner_text() == ("Second conversation: say two.")
    assert page.locator(".msg.assistant .content").inner_text().strip()
    page.click("#conversations .open-conv >> nth=1")
    assert page.locator(".msg.user .content").inner_text() == ("First conversation: say one.")
    assert page.locator("#conversations [aria-current=true]").inner_text() == "First conversation: say one."
    page.reload()  # the open conversation is remembered too
    page.wait_for_selector(".msg.user")
    assert page.locator(".msg.user .content").inner_text() == ("First conversation: say one.")
    page.click("#conversations li:nth-child(2) .delete")
    assert page.locator("#conversations li").count() == 1
    assert len(stored(page)["conversations"]) == 1


def test_json_schema_mode_shows_the_validated_object(server, pages):
    page = pages.open(server)
    posts = record_posts(page)
    schema = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"},
                                               "city": {"type": "string"}},
              "required": ["name", "age", "city"], "additionalProperties": False}
    set_settings(page, json_mode=True, schema=json.dumps(schema), temperature=0, max_tokens=120)
    page.wait_for_selector("#json-badge", state="visible", timeout=WAIT_MS)  # shown once the settings apply
    send_and_watch(page, "Describe the student Li Lei: 20 years old, lives in Beijing.")
    result = last_answer(page).locator(".json-result[data-valid=true]")
    assert result.locator(".ok").inner_text().startswith("✓")
    value = json.loads(result.locator("code").inner_text())
    jsonschema.validate(value, schema)
    assert value["age"] == 20
    fmt = posts[-1].post_data_json["response_format"]
    assert fmt["type"] == "json_schema" and fmt["json_schema"]["schema"] == schema
    # A schema that is not JSON keeps the dialog open with the reason.
    page.click("#open-settings")
    page.fill("#schema", "{not json")
    page.click("#settings button[type=submit]")
    assert page.is_visible("#settings[open]") and "not valid JSON" in page.inner_text("#schema-error")
    page.fill("#schema", json.dumps(schema))
    page.click("#settings button[type=submit]")
    page.wait_for_selector("#settings", state="hidden")


def test_key_protected_server_asks_for_the_key_once(keyed_server, pages):
    """A server with --api-key: the page asks for the key (again when it is wrong), keeps it for the
    tab's session, sends it on every call, and offers the served models in a picker."""
    page = pages.open(keyed_server)
    posts = record_posts(page)
    page.wait_for_selector("#key-dialog[open]")
    page.fill("#api-key", "not-the-key")
    page.press("#api-key", "Enter")
    wait_until(page, "document.querySelector('#key-error').textContent.length > 0")
    assert page.is_visible("#key-dialog[open]")
    assert "did not accept" in page.inner_text("#key-error")
    page.fill("#api-key", KEY)
    page.press("#api-key", "Enter")
    page.wait_for_selector("#model-pick", state="visible")
    assert page.locator("#model option").all_inner_texts() == ["alpha", "beta"]
    assert page.evaluate("sessionStorage.getItem('edge-qwen.api-key')") == KEY
    assert page.evaluate("localStorage.getItem('edge-qwen.conversations.v1')").find(KEY) < 0
    page.select_option("#model", "beta")
    set_settings(page, max_tokens=6)
    send_and_watch(page, "Hi")
    assert last_answer(page).locator(".content").inner_text().strip()
    assert posts[-1].post_data_json["model"] == "beta"
    assert posts[-1].headers["authorization"] == f"Bearer {KEY}"
    page.reload()  # same tab: not asked again
    page.wait_for_selector("#model-pick", state="visible")
    assert not page.is_visible("#key-dialog[open]")
    assert page.input_value("#model") == "beta"
    other = pages.open(keyed_server)  # a new session: asked again
    other.wait_for_selector("#key-dialog[open]")


def test_chinese_page_and_ime_enter(server, pages):
    """A Chinese browser gets the Chinese page; Enter while an input method composes picks the
    candidate and does not send."""
    page = pages.open(server, locale="zh-CN")
    assert page.evaluate("document.documentElement.lang") == "zh-CN"
    assert page.inner_text("#send") == "发送" and page.inner_text("#new-chat") == "新对话"
    assert "Enter 发送" in page.get_attribute("#prompt", "placeholder")
    assert page.evaluate("getComputedStyle(document.body).backgroundColor") == "rgb(255, 255, 255)"
    posts = record_posts(page)
    page.focus("#prompt")
    cdp = page.context.new_cdp_session(page)
    cdp.send("Input.imeSetComposition", {"text": "bei", "selectionStart": 3, "selectionEnd": 3})
    assert page.evaluate("document.querySelector('#prompt').value") == "bei"
    page.keyboard.press("Enter")  # the keydown an IME sees: isComposing is true
    cdp.send("Input.insertText", {"text": "北京"})  # the candidate is committed
    page.wait_for_timeout(200)
    # Nothing was sent (CDP's simulated IME lets the Enter add a line break; a real one swallows it).
    assert page.input_value("#prompt").strip() == "北京" and not posts and page.locator(".msg").count() == 0
    set_settings(page, max_tokens=4)
    page.focus("#prompt")
    page.keyboard.press("Enter")  # now Enter sends
    wait_done(page)
    assert page.locator(".msg.user .content").inner_text() == "北京" and len(posts) == 1
    assert page.locator(".msg.user .who").inner_text() == "你"


def test_phone_width_keyboard_only_dark(server, pages):
    """At phone width in dark mode, with the keyboard alone: open the list, change the settings,
    send a message and read the answer; nothing overflows sideways."""
    page = pages.open(server, viewport={"width": 390, "height": 780}, color_scheme="dark", is_mobile=True,
                      has_touch=True)
    assert page.evaluate("getComputedStyle(document.body).backgroundColor") == "rgb(13, 17, 23)"
    assert page.evaluate("document.documentElement.scrollWidth <= innerWidth")
    assert not page.is_visible("#sidebar")
    posts = record_posts(page)

    def tab_to(selector: str, back: bool = False) -> None:
        for _ in range(40):
            if page.evaluate("(s) => document.activeElement?.matches(s)", selector):
                return
            page.keyboard.press("Shift+Tab" if back else "Tab")
        raise AssertionError(f"Tab never reached {selector}")

    assert page.evaluate("document.activeElement.id") == "prompt"  # focus starts in the message box
    tab_to("#toggle-list")
    page.keyboard.press("Enter")
    page.wait_for_selector("#sidebar.open")
    assert page.evaluate("document.activeElement.closest('#sidebar') !== null")
    tab_to("#toggle-list", back=True)
    page.keyboard.press("Enter")
    tab_to("#open-settings")
    page.keyboard.press("Enter")
    page.wait_for_selector("#settings[open]")
    page.keyboard.type("Answer in one short sentence.")  # focus is in the system prompt
    tab_to("#max_tokens")
    page.keyboard.press("Control+A")
    page.keyboard.type("8")
    page.keyboard.press("Escape")
    page.wait_for_selector("#settings", state="hidden")
    tab_to("#prompt")
    page.keyboard.type("Hello!")
    page.keyboard.press("Enter")
    wait_done(page)
    assert last_answer(page).locator(".content").inner_text().strip()
    body = posts[-1].post_data_json
    assert body["messages"][0] == {"role": "system", "content": "Answer in one short sentence."}
    assert body["max_tokens"] == 8
    assert page.evaluate("document.documentElement.scrollWidth <= innerWidth")
    assert page.evaluate("document.activeElement.id") == "prompt"  # back in the box for the next turn
