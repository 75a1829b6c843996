"""Quantization wall time per type on the real 0.5B: edge-qwen's quantize() against llama.cpp's
quantizer called directly (llama_cpp.llama_model_quantize) in the same run.

Run:  pytest benchmarks/bench_quantize.py --benchmark-only -s
  or: python benchmarks/bench_quantize.py [TYPE ...]      (prints a table)

Each round runs llama.cpp directly (in the untimed pedantic setup, timed by hand) and then our
wrapper, so both see the same machine load; the ratio of medians is the wrapper's overhead. Our
source-hash cache is cleared before every round, so each of our runs pays for hashing the 1.2 GB
input (done on a thread while llama.cpp works) - the cost a first `edge-qwen quantize` pays.
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


@pytest.mark.parametrize("qtype", TYPES)
def test_quantize_overhead(benchmark, f16, qtype):
    from edge_qwen import quantize as qmod

    base: list[float] = []

    def setup():
        qmod._hash_cache.clear()
        base.append(direct(f16, f16.with_name(f"direct-{qtype}.gguf"), qtype))

    benchmark.pedantic(ours, args=(f16, f16.with_name(f"ours-{qtype}.gguf"), qtype), setup=setup,
                       rounds=ROUNDS, iterations=1)
    ours_median = statistics.median(benchmark.stats.stats.data)
    ratio = ours_median / statistics.median(base)
    benchmark.extra_info.update({"type": qtype, "direct_median_s": statistics.median(base),
                                 "ours_median_s": ours_median, "ratio": ratio})
    print(f"\n{qtype}: llama.cpp direct {statistics.median(base):.2f} s, edge-qwen {ours_median:.2f} s, "
          f"ratio {ratio:.3f}")


if __name__ == "__main__":
    import tempfile

    from edge_qwen import quantize as qmod

    types = sys.argv[1:] or TYPES
    with tempfile.TemporaryDirectory() as d:
        src = make_f16(Path(d))
        print(f"{'type':<8} {'direct s':>9} {'ours s':>9} {'ratio':>7}")
        for qt in types:
            a, b = [], []
            for _ in range(ROUNDS):
                qmod._hash_cache.clear()
                a.append(direct(src, Path(d) / "a.gguf", qt))
                t0 = time.perf_counter()
                ours(src, Path(d) / "b.gguf", qt)
                b.append(time.perf_counter() - t0)
            ma, mb = statistics.median(a), statistics.median(b)
            print(f"{qt:<8} {ma:>9.2f} {mb:>9.2f} {mb / ma:>7.3f}")
