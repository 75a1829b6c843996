"""What lockstep KL evaluation costs on top of decoding: compare vs decode-only, same run.

Both sides decode the same chunks of the evaluation corpus on the same two loaded contexts
(the default model twice: the timing does not depend on the quantization); the lockstep side
also computes NLL, KL and top-token agreement of every scored position in float64. Rounds
alternate so load on a shared machine hits both alike. The ratio is lockstep / decode-only
time (the price of never writing a logits file; lower is better).

    pytest benchmarks/bench_lockstep.py --benchmark-only -s
    python benchmarks/bench_lockstep.py [rounds]
"""

from __future__ import annotations

import os
import statistics
import sys
import time

import pytest

N_CTX = 256
N_CHUNKS = 2
ROUNDS = int(os.environ.get("EDGE_QWEN_BENCH_ROUNDS", "3"))


def load(path):
    from edge_qwen.bench.evaluate import LogitsModel, chunk_tokens, default_corpus

    ref, test = LogitsModel(path, N_CTX), LogitsModel(path, N_CTX)
    chunks = chunk_tokens(ref.tokenize(default_corpus()), N_CTX, N_CHUNKS)
    return ref, test, chunks


def decode_only(ref, test, chunks) -> None:
    for c in chunks:
        ref.logits(c, N_CTX // 2)
        test.logits(c, N_CTX // 2)


def lockstep(ref, test, chunks) -> None:
    from edge_qwen.bench.evaluate import compare_logits

    for c in chunks:
        lr = ref.logits(c, N_CTX // 2)[:-1]
        lq = test.logits(c, N_CTX // 2)[:-1]
        compare_logits(lr, lq, c[N_CTX // 2 + 1:])


def measure(path, rounds: int = ROUNDS) -> dict[str, float]:
    ref, test, chunks = load(path)
    times: dict[str, list[float]] = {"decode": [], "lockstep": []}
    try:
        decode_only(ref, test, chunks)  # warm-up
        for i in range(rounds):
            order = (("decode", decode_only), ("lockstep", lockstep))
            for name, fn in (order if i % 2 == 0 else order[::-1]):
                t = time.perf_counter()
                fn(ref, test, chunks)
                times[name].append(time.perf_counter() - t)
    finally:
        ref.close()
        test.close()
    d, k = statistics.median(times["decode"]), statistics.median(times["lockstep"])
    return {"decode_s": d, "lockstep_s": k, "ratio": k / d}


@pytest.fixture(scope="module")
def models():
    from edge_qwen.store import default_model_path

    ref, test, chunks = load(default_model_path())
    yield ref, test, chunks
    ref.close()
    test.close()


@pytest.mark.benchmark(group="lockstep")
def test_decode_only(benchmark, models):
    benchmark.pedantic(decode_only, args=models, rounds=ROUNDS, warmup_rounds=1)


@pytest.mark.benchmark(group="lockstep")
def test_lockstep_compare(benchmark, models):
    benchmark.pedantic(lockstep, args=models, rounds=ROUNDS, warmup_rounds=1)


if __name__ == "__main__":
    from edge_qwen.store import default_model_path

    r = measure(default_model_path(), int(sys.argv[1]) if len(sys.argv) > 1 else ROUNDS)
    print(f"decode only {r['decode_s']:.2f} s, lockstep {r['lockstep_s']:.2f} s, ratio {r['ratio']:.3f} "
          f"({N_CHUNKS} chunks of {N_CTX} tokens, two contexts)")
