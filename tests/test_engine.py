"""The batched engine: concurrent generations never mix, caches never leak across scopes, cancelled
and abandoned sequences free their slots within a step, admission waits for slots and KV cells.

The real default model on the real llama.cpp; prompts have clear greedy margins (batched logits
are not bit-identical to single-sequence ones, see docs/runtime.md). One EdgeQwen with 4 slots
for the module, one server on it for the HTTP checks.
"""

from __future__ import annotations

import json
import threading
import time

import httpx
import jsonschema
import pytest

from edge_qwen.engine.generate import SamplingParams
from edge_qwen.errors import BusyError

pytestmark = pytest.mark.slow

PARALLEL = 4
GREEDY = {"temperature": 0, "max_tokens": 10}
FACTS = ["What is the capital of France? Answer with one word.", "What is 2 + 2? Answer with a number.",
         "What colour is the sky on a clear day? One word.", "Translate 'thank you' into French. Only the translation."]


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def text_of(llm, messages, **kw) -> str:
    return llm.chat(messages, **{**GREEDY, **kw})["choices"][0]["message"]["content"]


@pytest.fixture(scope="module")
def eq(default_model):
    from edge_qwen import EdgeQwen

    with EdgeQwen(default_model, n_ctx=1024, parallel=PARALLEL) as m:
        yield m


def run_threads(fn, n: int, timeout: float = 300) -> None:
    errors: list[BaseException] = []

    def wrap(i: int) -> None:
        try:
            fn(i)
        except BaseException as e:  # re-raised in the test thread
            errors.append(e)

    threads = [threading.Thread(target=wrap, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
    if errors:
        raise errors[0]


def wait_for(cond, timeout: float = 60.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


# -- the engine in process ------------------------------------------------------------------------

def test_concurrent_answers_equal_the_answers_alone(eq):
    alone = [text_of(eq, user(q)) for q in FACTS]
    assert "Paris" in alone[0] and "4" in alone[1]
    together: dict[int, str] = {}

    def one(i: int) -> None:
        together[i] = "".join(c["choices"][0]["delta"].get("content", "")
                              for c in eq.chat(user(FACTS[i]), stream=True, **GREEDY))

    before = eq.engine.status()["steps"]
    run_threads(one, len(FACTS))
    assert [together[i] for i in range(len(FACTS))] == alone
    # They really ran together: far fewer steps than one generation after another.
    steps = eq.engine.status()["steps"] - before
    assert steps < sum(len(eq.tokenize(a)) + 1 for a in alone)


def test_json_and_free_requests_in_one_batch(eq):
    schema = {"type": "object", "properties": {"city": {"type": "string"}, "population": {"type": "integer"}},
              "required": ["city", "population"], "additionalProperties": False}
    results: dict[int, dict] = {}

    def one(i: int) -> None:
        if i % 2 == 0:
            results[i] = eq.chat(user(f"Give a JSON object for the city number {i} in France."), temperature=0,
                                 max_tokens=60, response_format={"type": "json_schema",
                                                                 "json_schema": {"name": "c", "schema": schema}})
        else:
            results[i] = eq.chat(user(f"Write a sentence about the number {i}."), temperature=0, max_tokens=30)

    run_threads(one, PARALLEL)
    for i, r in results.items():
        content = r["choices"][0]["message"]["content"]
        if i % 2 == 0:
            assert r["choices"][0]["finish_reason"] == "stop", content
            jsonschema.validate(json.loads(content), schema)
        else:
            assert content and not content.lstrip().startswith("{")


def test_prefix_cache_is_scoped_by_cache_key(eq):
    secret = [{"role": "system", "content": "The PIN of the vault is 4821. Never reveal it."}]
    first = eq.chat(secret + user("Hello."), cache_key="alice", reuse_prefix=True, **GREEDY)
    again = eq.chat(secret + user("Hello."), cache_key="alice", reuse_prefix=True, **GREEDY)
    probe = eq.chat(secret + user("Hello."), cache_key="mallory", reuse_prefix=True, **GREEDY)
    cached = [r["usage"]["prompt_tokens_details"]["cached_tokens"] for r in (first, again, probe)]
    assert cached[1] >= 20  # alice's own prefix is reused
    assert cached[2] == 0   # but never across scopes, even for the identical prompt
    # The probe: another client's guess of the PIN learns nothing, right or wrong.
    for guess in ("4821", "1111"):
        wrong = [{"role": "system", "content": f"The PIN of the vault is {guess}. Never reveal it."}]
        r = eq.chat(wrong + user("Hello."), cache_key=f"mallory-{guess}", reuse_prefix=True, **GREEDY)
        assert r["usage"]["prompt_tokens_details"]["cached_tokens"] == 0


def test_running_conversation_shares_its_prefix(eq):
    system = [{"role": "system", "content": "You are a patient teacher of geography who answers in full sentences. "
                                            "Always mention one river in every answer you give."}]
    stream = eq.generate(system + user("Tell me about Europe."), temperature=0, max_tokens=200, cache_key="team",
                         reuse_prefix=True)
    try:
        next(stream)  # its prompt is in the KV cache now
        r = eq.chat(system + user("Tell me about Asia."), cache_key="team", reuse_prefix=True, **GREEDY)
        # The shared system prompt's cells are copied from the running sequence, not recomputed.
        assert r["usage"]["prompt_tokens_details"]["cached_tokens"] >= 30
    finally:
        stream.close()


def test_idle_slot_between_running_ones_gets_placeholders_and_keeps_its_cache(default_model):
    # Slots 0 and 2 generate while slot 1 sits idle with a cached conversation: llama.cpp would
    # split the batch in two passes at the gap, so slot 1 gets a placeholder token each step,
    # removed after the step (or the next step's placeholder would not fit its positions).
    from edge_qwen import EdgeQwen

    counts = [user(f"Count from {k} to {k + 30}, separated by commas. Only the numbers.") for k in (10, 40, 70)]
    kw = {"temperature": 0, "max_tokens": 24, "reuse_prefix": True}
    with EdgeQwen(default_model, n_ctx=512, parallel=3) as m:
        alone = [m.chat(c, **{**kw, "reuse_prefix": False}) for c in counts]  # empty slots first: 0, 1, 2
        assert all(a["usage"]["completion_tokens"] == 24 for a in alone)
        answers: dict[int, dict] = {}

        def again(i: int) -> None:
            answers[2 * i] = m.chat(counts[2 * i], **kw)  # slots 0 and 2, where their prompts are cached

        run_threads(again, 2)
        assert m.engine.stats["placeholders"] >= 10
        for i in (0, 2):
            assert answers[i]["choices"][0]["message"] == alone[i]["choices"][0]["message"]
        r = m.chat(counts[1], **kw)  # slot 1's cache survived its placeholders
        assert r["usage"]["prompt_tokens_details"]["cached_tokens"] == r["usage"]["prompt_tokens"] - 1
        assert r["choices"][0]["message"] == alone[1]["choices"][0]["message"]


def test_a_conversation_cut_from_its_slot_is_restored_from_host_memory(default_model):
    # One slot: B shares only the system prompt with A, so A's conversation is cut to make room;
    # it goes to the host cache first, and A's next request restores it instead of evaluating it
    # again (llama-server's RAM prompt cache), with the same answer. Never across cache keys.
    from edge_qwen import EdgeQwen

    system = [{"role": "system", "content": "You are a terse assistant for a hardware shop. Answer in one line."}]
    a, b = system + user("Do you sell hammers?"), system + user("When do you open on Sundays?")
    kw = {"temperature": 0, "max_tokens": 8, "reuse_prefix": True}
    with EdgeQwen(default_model, n_ctx=512, parallel=1) as m:
        first = m.chat(a, cache_key="shop", **kw)
        rb = m.chat(b, cache_key="shop", **kw)
        assert rb["usage"]["prompt_tokens_details"]["cached_tokens"] >= 20  # the system prompt, kept in the slot
        assert m.engine.stats["host_saves"] == 1 and m.engine.status()["host_cached"] == 1
        ra = m.chat(a, cache_key="shop", **kw)
        assert ra["usage"]["prompt_tokens_details"]["cached_tokens"] == ra["usage"]["prompt_tokens"] - 1
        assert m.engine.stats["host_restores"] == 1
        assert ra["choices"][0]["message"] == first["choices"][0]["message"]
        # B was cut in turn and saved; another key sees none of it, from a slot or from host memory.
        probe = m.chat(b, cache_key="mallory", **kw)
        assert probe["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
        assert m.engine.stats["host_restores"] == 1
    with EdgeQwen(default_model, n_ctx=512, parallel=1, host_cache_mb=0) as m:  # off: A is evaluated again
        for msgs in (a, b):
            m.chat(msgs, cache_key="shop", **kw)
        ra = m.chat(a, cache_key="shop", **kw)
        assert 20 <= ra["usage"]["prompt_tokens_details"]["cached_tokens"] < ra["usage"]["prompt_tokens"] - 1
        assert m.engine.stats["host_saves"] == m.engine.stats["host_restores"] == 0
    with EdgeQwen(default_model, n_ctx=512, parallel=2) as m:
        # Restored into another slot than the one it was cut from: slot 0 keeps generating B.
        first = m.chat(a, cache_key="shop", **kw)  # slot 0
        m.chat(b, cache_key="shop", **kw)          # slot 0 again (it shares the system prompt): A saved
        stream = m.generate(b, temperature=0, max_tokens=200, cache_key="shop", reuse_prefix=True)
        try:
            next(stream)  # B runs in slot 0
            ra = m.chat(a, cache_key="shop", **kw)  # the empty slot 1, restored from host memory
        finally:
            stream.close()
        assert ra["usage"]["prompt_tokens_details"]["cached_tokens"] == ra["usage"]["prompt_tokens"] - 1
        assert m.engine.stats["host_restores"] == 1
        assert ra["choices"][0]["message"] == first["choices"][0]["message"]


def test_cancelled_and_abandoned_sequences_free_slots_within_one_step(eq):
    prompt = eq.tokenize(eq.render(user("Write a very long essay about the history of bridges.")))
    eng = eq.engine
    assert eng.wait_idle(60)
    seqs = [eng.submit(prompt, SamplingParams(temperature=0, max_tokens=300), cancel=threading.Event(),
                       reuse_prefix=False) for _ in range(20)]
    wait_for(lambda: eng.status()["busy"] == PARALLEL and all(
        s.n_completion > 0 for s in seqs if s.state == "running"), what="4 generating")
    assert eng.status()["waiting"] == 20 - PARALLEL
    before = eng.status()["steps"]
    for k, s in enumerate(seqs):  # half cancelled by their event, half abandoned by their consumer
        s.req.cancel.set() if k % 2 else eng.abandon(s)
    wait_for(lambda: eng.status()["busy"] == 0 and eng.status()["waiting"] == 0, what="slots freed")
    assert eng.status()["steps"] - before <= 1  # the step in flight, at most
    finals = [list(eng.stream(s))[-1] for s in seqs]
    assert all(f.finish_reason == "cancelled" for f in finals)
    assert text_of(eq, user(FACTS[0])).strip()  # the engine serves on


def test_admission_waits_for_kv_cells(default_model):
    from llama_cpp import Llama

    from edge_qwen.engine.scheduler import Engine

    llama = Llama(model_path=str(default_model), n_ctx=256, n_threads=2, n_threads_batch=2, verbose=False)
    eng = Engine(llama, parallel=2, n_ctx=256, kv_cells=256)
    try:
        prompt = llama.tokenize(b"<|im_start|>user\nCount from one to fifty in words.<|im_end|>\n"
                                b"<|im_start|>assistant\n", add_bos=False, special=True)
        params = SamplingParams(temperature=0, max_tokens=150)  # two of these need more cells than there are
        a = eng.submit(prompt, params)
        b = eng.submit(prompt, params)
        wait_for(lambda: a.n_completion > 0, what="the first generating")
        st = eng.status()
        assert st["busy"] == 1 and st["waiting"] == 1 and st["free"] == 1  # a free slot, but no cells for b
        ra, rb = list(eng.stream(a)), list(eng.stream(b))
        assert ra[-1].finish_reason in ("stop", "length") and rb[-1].finish_reason in ("stop", "length")
        assert rb[-1].timings.completion_tokens > 0
    finally:
        eng.close()
        llama.close()


def test_thread_and_blocking_rules_with_parallel_slots(eq):
    streams = [eq.generate(user(f"Write a very long essay about {t}."), temperature=0, max_tokens=300)
               for t in ("rivers", "mountains", "deserts", "oceans")]
    try:
        for s in streams:
            next(s)  # this thread now holds all 4 slots
        with pytest.raises(BusyError, match="this thread"):
            next(eq.generate(user("hi"), max_tokens=2))
        errors: list[BusyError] = []

        def other() -> None:
            try:
                eq.chat(user("hi"), max_tokens=2, blocking=False)
            except BusyError as e:
                errors.append(e)

        t = threading.Thread(target=other)
        t.start()
        t.join()
        assert len(errors) == 1 and "slots are busy" in str(errors[0])
    finally:
        for s in streams:
            s.close()
    assert eq.chat(user("Say hi."), temperature=0, max_tokens=3, blocking=False)["choices"][0]["finish_reason"]


# -- the server on the engine ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def server(eq):
    from edge_qwen.serve.app import ServerThread, create_app

    with ServerThread(create_app({"qwen2.5": eq}, max_queue=16)) as url:
        yield url


def test_health_reports_slots(server):
    h = httpx.get(f"{server}/health").json()["models"]["qwen2.5"]
    assert h["slots"] == PARALLEL and h["free"] + h["busy"] == PARALLEL and h["waiting"] == 0
    assert h["kv_cache"]["cells"] >= 1024 * PARALLEL and h["kv_cache"]["mib"] > 0


def test_16_clients_x_5_requests_never_mix_or_get_lost(server):
    clients, per_client = 16, 5
    got: dict[tuple[int, int], str] = {}
    codes: list[int] = []

    def client(c: int) -> None:
        with httpx.Client(base_url=server, timeout=600) as http:
            for i in range(per_client):
                marker = f"{c * 7 + 100 + i * 31}"  # distinct numbers per request
                body = {"messages": user(f"Repeat this number exactly and nothing else: {marker}"),
                        "temperature": 0, "max_tokens": 8, "stream": (c + i) % 2 == 0}
                if body["stream"]:
                    with http.stream("POST", "/v1/chat/completions", json=body) as r:
                        codes.append(r.status_code)
                        events = [json.loads(x[6:]) for x in r.iter_lines() if x.startswith("data: {")]
                    got[c, i] = "".join(e["choices"][0]["delta"].get("content", "") for e in events if e["choices"])
                else:
                    r = http.post("/v1/chat/completions", json=body)
                    codes.append(r.status_code)
                    got[c, i] = r.json()["choices"][0]["message"]["content"]

    run_threads(client, clients, timeout=900)
    assert codes == [200] * (clients * per_client)  # 0 errors
    assert len(got) == clients * per_client  # 0 lost
    markers = {(c, i): f"{c * 7 + 100 + i * 31}" for c in range(clients) for i in range(per_client)}
    for key, text in got.items():
        assert markers[key] in text, (key, text)  # its own marker...
        others = {m for k, m in markers.items() if k != key and m != markers[key]}
        assert not any(m in text.replace(markers[key], "") for m in others), (key, text)  # ...and no one else's


def test_20_clients_that_disconnect_free_their_slots(server):
    import socket

    def health() -> dict:
        return httpx.get(f"{server}/health").json()["models"]["qwen2.5"]

    base = health()
    host, port = server.removeprefix("http://").split(":")
    socks = []
    try:
        for i in range(20):
            body = json.dumps({"messages": user(f"Write a very long story about the number {i}."), "stream": True,
                               "temperature": 0, "max_tokens": 600}).encode()
            s = socket.create_connection((host, int(port)))
            s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                      b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
            socks.append(s)
        wait_for(lambda: (lambda h: h["busy"] == PARALLEL and h["waiting"] == 20 - PARALLEL)(health()),
                 timeout=300, what="4 streaming, 16 queued")
        for s in socks[:PARALLEL]:  # wait until the running ones are mid-stream
            s.settimeout(300)
            assert b"data: {" in s.recv(65536) or b"data: {" in s.recv(65536)
    finally:
        for s in socks:  # every client hangs up: mid-stream or while queued
            s.close()
    wait_for(lambda: (lambda h: h["busy"] == 0 and h["waiting"] == 0)(health()), timeout=30, what="slots freed")
    h = health()
    assert h["free"] == PARALLEL and h["cancelled"] >= base["cancelled"] + PARALLEL
    r = httpx.post(f"{server}/v1/chat/completions", json={"messages": user(FACTS[1]), **GREEDY}, timeout=120)
    assert r.status_code == 200 and "4" in r.json()["choices"][0]["message"]["content"]
