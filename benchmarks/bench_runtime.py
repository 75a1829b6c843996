"""Wrapper overhead: EdgeQwen's streaming chat vs llama-cpp-python's own create_chat_completion.

Both run on the same loaded model (EdgeQwen.llama is the llama_cpp.Llama), the same prompt,
greedy, 128 tokens, with the KV cache emptied before every run so both pay the same prompt
evaluation. Runs alternate (ours, theirs, theirs, ours, ...) so load on a shared machine hits
both sides alike; the ratio is ours/theirs in tokens per second (target >= 0.98).

    pytest benchmarks/bench_runtime.py --benchmark-only -s     # pytest-benchmark
    python benchmarks/bench_runtime.py [rounds]                 # the same measurement, printed
"""

from __future__ import annotations

import os
import statistics
import sys
import time

import pytest

MESSAGES = [{"role": "user", "content": "Write a detailed essay about the history of computing, "
                                        "from the abacus to modern GPUs."}]
N_TOKENS = int(os.environ.get("EDGE_QWEN_BENCH_TOKENS", "128"))  # lower only for a smoke run
ROUNDS = int(os.environ.get("EDGE_QWEN_BENCH_ROUNDS", "4"))


def ours(llm) -> tuple[str, int]:
    """Stream a greedy reply through EdgeQwen.chat(stream=True); return (text, completion tokens)."""
    llm.llama.reset()  # no KV reuse: both sides evaluate the whole prompt
    parts, usage = [], None
    for chunk in llm.chat(MESSAGES, temperature=0, max_tokens=N_TOKENS, stream=True):
        parts.append(chunk["choices"][0]["delta"].get("content", ""))
        usage = chunk.get("usage", usage)
    return "".join(parts), usage["completion_tokens"]


def theirs(llm) -> tuple[str, int]:
    """The same request through llama-cpp-python's create_chat_completion(stream=True)."""
    llm.llama.reset()
    parts = []
    for chunk in llm.llama.create_chat_completion(MESSAGES, temperature=0, max_tokens=N_TOKENS, stream=True):
        parts.append(chunk["choices"][0]["delta"].get("content") or "")
    text = "".join(parts)
    return text, len(llm.tokenize(text, special=False))


class DecodeClock:
    """Times every llama_decode call, so the wrapper's own cost (everything else) can be read apart.

    On a busy machine the model's compute time swings; the time outside llama_decode (Python,
    sampling, detokenizing) is the part a wrapper adds and is what differs between the two sides.
    """

    def __enter__(self):
        import llama_cpp.llama_cpp as lib

        self.lib, self.real, self.seconds = lib, lib.llama_decode, 0.0

        def timed(ctx, batch):
            t = time.perf_counter()
            try:
                return self.real(ctx, batch)
            finally:
                self.seconds += time.perf_counter() - t

        lib.llama_decode = timed
        return self

    def __exit__(self, *exc):
        self.lib.llama_decode = self.real


def compare(llm, rounds: int = ROUNDS) -> dict:
    """Alternate both sides `rounds` times each; return tokens/s medians, their ratio and overheads."""
    times: dict[str, list[float]] = {"ours": [], "theirs": []}
    outside: dict[str, list[float]] = {"ours": [], "theirs": []}
    texts: dict[str, str] = {}
    tokens = {}
    ours(llm), theirs(llm)  # warm-up: page in weights, build caches
    for i in range(rounds):
        order = (("ours", ours), ("theirs", theirs)) if i % 2 == 0 else (("theirs", theirs), ("ours", ours))
        for name, fn in order:
            with DecodeClock() as clock:
                t = time.perf_counter()
                texts[name], tokens[name] = fn(llm)
                elapsed = time.perf_counter() - t
            times[name].append(elapsed)
            outside[name].append(elapsed - clock.seconds)
    n = tokens["ours"]
    tps = {k: n / statistics.median(v) for k, v in times.items()}
    over = {k: 1000 * statistics.median(v) / n for k, v in outside.items()}
    return {"ours_tps": tps["ours"], "theirs_tps": tps["theirs"], "ratio": tps["ours"] / tps["theirs"],
            "ours_overhead_ms": over["ours"], "theirs_overhead_ms": over["theirs"],
            "tokens": n, "same_text": texts["ours"] == texts["theirs"], "rounds": rounds,
            "ours_s": times["ours"], "theirs_s": times["theirs"]}


def report(r: dict) -> str:
    return (f"streaming chat, greedy, {r['tokens']} tokens, {r['rounds']} alternating rounds: "
            f"edge-qwen {r['ours_tps']:.1f} tok/s, llama-cpp-python create_chat_completion "
            f"{r['theirs_tps']:.1f} tok/s, ratio {r['ratio']:.3f} (target >= 0.98); "
            f"time outside llama_decode per token: edge-qwen {r['ours_overhead_ms']:.2f} ms, "
            f"llama-cpp-python {r['theirs_overhead_ms']:.2f} ms; same text: {r['same_text']}; "
            f"run seconds ours {[round(x, 1) for x in r['ours_s']]} theirs {[round(x, 1) for x in r['theirs_s']]}")


@pytest.fixture(scope="module")
def llm():
    from edge_qwen import EdgeQwen

    with EdgeQwen(n_ctx=2048) as model:
        yield model


def test_stream_chat_ours(benchmark, llm):
    benchmark.group = "runtime-stream-128"
    _text, n = benchmark.pedantic(ours, args=(llm,), rounds=ROUNDS, warmup_rounds=1)
    benchmark.extra_info["tokens"] = n
    assert n == N_TOKENS


def test_stream_chat_llama_cpp_python(benchmark, llm):
    benchmark.group = "runtime-stream-128"
    text, _ = benchmark.pedantic(theirs, args=(llm,), rounds=ROUNDS, warmup_rounds=1)
    assert text == ours(llm)[0]  # same greedy text: our loop decodes exactly like llama.cpp's


def test_stream_ratio(benchmark, llm):
    benchmark.group = "runtime-ratio"
    r = benchmark.pedantic(compare, args=(llm,), rounds=1, iterations=1)
    benchmark.extra_info.update({k: r[k] for k in ("ours_tps", "theirs_tps", "ratio", "ours_overhead_ms",
                                                   "theirs_overhead_ms", "same_text")})
    print("\n" + report(r))
    assert r["same_text"] and r["tokens"] == N_TOKENS


if __name__ == "__main__":
    from edge_qwen import EdgeQwen

    with EdgeQwen(n_ctx=2048) as model:
        print(report(compare(model, int(sys.argv[1]) if len(sys.argv) > 1 else ROUNDS)))
