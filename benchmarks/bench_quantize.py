"""Quantization wall time per type on the real 0.5B: edge-qwen's quantize() against llama.cpp's
quantizer called directly (llama_cpp.llama_model_quantize) in the same run.

Run:  pytest benchmarks/bench_quantize.py --benchmark-only -s
  or: python benchmarks/bench_quantize.py [TYPE ...]      (prints a table)

Each round runs, back to back on the same f16 input: llama.cpp directly, our quantize() "cold"
(the source-hash cache cleared, so it also hashes the 1.2 GB input, on a low-priority thread
while llama.cpp works: what a first `edge-qwen quantize` pays) and our quantize() "warm" (hash
known: every further type of a multi-type call). The pytest-benchmark timing is the warm run;
ratios of medians against the direct call are in extra_info and printed.
"""

from __future__ import annotations

import ctypes
import os
import statistics
import sys
import time
from pathlib import Path

import pytest

TYPES = ["Q8_0", "Q4_K_M", "Q3_K_S"]
ROUNDS = 3


def make_f16(folder: Path) -> Path:
    """The default model as an f16 GGUF (dequantized by llama.cpp), the input both sides quantize."""
    import llama_cpp

    from edge_qwen.store import default_model_path

    out = folder / "qwen2.5-coder-0.5b-instruct-f16.gguf"
    if not out.exists():
        p = llama_cpp.llama_model_quantize_default_params()
        p.ftype, p.allow_requantize, p.nthread = llama_cpp.LLAMA_FTYPE_MOSTLY_F16, True, os.cpu_count() or 1
        assert llama_cpp.llama_model_quantize(str(default_model_path()).encode(), str(out).encode(),
                                              ctypes.byref(p)) == 0
    return out


def direct(src: Path, dest: Path, qtype: str) -> float:
    """llama.cpp's quantizer as a user of llama-cpp-python calls it; returns seconds."""
    import llama_cpp

    from edge_qwen.quant_types import quant_type

    p = llama_cpp.llama_model_quantize_default_params()
    p.ftype, p.nthread = quant_type(qtype).ftype, os.cpu_count() or 1
    t0 = time.perf_counter()
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dest).encode(), ctypes.byref(p))
    dt = time.perf_counter() - t0
    assert rc == 0
    dest.unlink()
    return dt


def ours(src: Path, dest: Path, qtype: str) -> None:
    from edge_qwen.quantize import quantize

    quantize(src, dest, qtype, quiet=True, force=True)
    dest.unlink()


@pytest.fixture(scope="module")
def f16(tmp_path_factory) -> Path:
    path = make_f16(tmp_path_factory.mktemp("benchq"))
    yield path
    path.unlink(missing_ok=True)


def one_round(src: Path, qtype: str) -> tuple[float, float]:
    """(direct seconds, cold ours seconds); leaves the hash cached for a warm run."""
    from edge_qwen import quantize as qmod

    d = direct(src, src.with_name(f"direct-{qtype}.gguf"), qtype)
    qmod._hash_cache.clear()
    t0 = time.perf_counter()
    ours(src, src.with_name(f"cold-{qtype}.gguf"), qtype)
    return d, time.perf_counter() - t0


@pytest.mark.parametrize("qtype", TYPES)
def test_quantize_overhead(benchmark, f16, qtype):
    base: list[float] = []
    cold: list[float] = []

    def setup():
        d, c = one_round(f16, qtype)
        base.append(d)
        cold.append(c)

    benchmark.pedantic(ours, args=(f16, f16.with_name(f"ours-{qtype}.gguf"), qtype), setup=setup,
                       rounds=ROUNDS, iterations=1)
    md, mc, mw = statistics.median(base), statistics.median(cold), statistics.median(benchmark.stats.stats.data)
    benchmark.extra_info.update({"type": qtype, "direct_median_s": md, "cold_median_s": mc, "warm_median_s": mw,
                                 "cold_ratio": mc / md, "warm_ratio": mw / md})
    print(f"\n{qtype}: llama.cpp direct {md:.2f} s; edge-qwen cold {mc:.2f} s (x{mc / md:.3f}), "
          f"warm {mw:.2f} s (x{mw / md:.3f})")


if __name__ == "__main__":
    import tempfile

    types = sys.argv[1:] or TYPES
    with tempfile.TemporaryDirectory() as d:
        src = make_f16(Path(d))
        print(f"{'type':<8} {'direct s':>9} {'cold s':>8} {'ratio':>6} {'warm s':>8} {'ratio':>6}")
        for qt in types:
            a, b, c = [], [], []
            for _ in range(ROUNDS):
                x, y = one_round(src, qt)
                a.append(x)
                b.append(y)
                t0 = time.perf_counter()
                ours(src, Path(d) / "w.gguf", qt)
                c.append(time.perf_counter() - t0)
            ma, mb, mc = statistics.median(a), statistics.median(b), statistics.median(c)
            print(f"{qt:<8} {ma:>9.2f} {mb:>8.2f} {mb / ma:>6.3f} {mc:>8.2f} {mc / ma:>6.3f}", flush=True)
