"""Quantization wall time per type on the real 0.5B: edge-qwen's quantize() against llama.cpp's
quantizer called directly (llama_cpp.llama_model_quantize) in the same run.

Run:  pytest benchmarks/bench_quantize.py --benchmark-only -s
  or: python benchmarks/bench_quantize.py [TYPE ...]      (prints a table)

Each round runs, back to back on the same f16 input: llama.cpp directly, our quantize() "cold"
(the remembered source hash forgotten, so it also hashes the 1.2 GB input, on a low-priority
thread while llama.cpp works: what the first quantization of a file pays) and our quantize()
"warm" (hash remembered: every later run on that file, in this process or a new one). The
pytest-benchmark timing is the warm run; ratios of medians against the direct call are in
extra_info and printed, for wall time and for CPU time of the process (all threads; steadier
than wall time on a shared machine).
"""

from __future__ import annotations

import ctypes
import os
import resource
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


def _timed(fn, *args) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process, all threads) of one call."""
    r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    fn(*args)
    wall, r1 = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF)
    return wall, (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)


def direct(src: Path, dest: Path, qtype: str) -> None:
    """llama.cpp's quantizer as a user of llama-cpp-python calls it."""
    import llama_cpp

    from edge_qwen.quant.types import quant_type

    p = llama_cpp.llama_model_quantize_default_params()
    p.ftype, p.nthread = quant_type(qtype).ftype, os.cpu_count() or 1
    assert llama_cpp.llama_model_quantize(str(src).encode(), str(dest).encode(), ctypes.byref(p)) == 0
    dest.unlink()


def ours(src: Path, dest: Path, qtype: str) -> None:
    from edge_qwen.quant.quantize import quantize

    quantize(src, dest, qtype, quiet=True, force=True)
    dest.unlink()


def cold(src: Path, dest: Path, qtype: str) -> None:
    from edge_qwen.quant.provenance import forget_sha256

    forget_sha256(src)  # as the first time this file is quantized: the 1.2 GB source is hashed
    ours(src, dest, qtype)


@pytest.fixture(scope="module")
def f16(tmp_path_factory) -> Path:
    path = make_f16(tmp_path_factory.mktemp("benchq"))
    yield path
    path.unlink(missing_ok=True)


def _report(qtype: str, runs: dict[str, list[tuple[float, float]]]) -> dict[str, float]:
    med = {k: (statistics.median(w for w, _ in v), statistics.median(c for _, c in v)) for k, v in runs.items()}
    (dw, dc) = med["direct"]
    out = {"type": qtype}
    for k, (w, c) in med.items():
        out.update({f"{k}_wall_s": w, f"{k}_cpu_s": c, f"{k}_wall_ratio": w / dw, f"{k}_cpu_ratio": c / dc})
    return out


def _line(r: dict) -> str:
    cells = [f"{r['type']:<8} {r['direct_wall_s']:>7.2f} {r['direct_cpu_s']:>7.2f}"]
    for k in ("cold", "warm"):
        cells.append(f"{r[k + '_wall_s']:>7.2f} {r[k + '_wall_ratio']:>6.3f} "
                     f"{r[k + '_cpu_s']:>7.2f} {r[k + '_cpu_ratio']:>6.3f}")
    return " | ".join(cells)


HEADER = (f"{'type':<8} {'direct':>7} {'cpu':>7} | {'cold':>7} {'ratio':>6} {'cpu':>7} {'ratio':>6} | "
          f"{'warm':>7} {'ratio':>6} {'cpu':>7} {'ratio':>6}   (seconds; ratios against direct)")


@pytest.mark.parametrize("qtype", TYPES)
def test_quantize_overhead(benchmark, f16, qtype):
    runs: dict[str, list[tuple[float, float]]] = {"direct": [], "cold": [], "warm": []}

    def setup():
        runs["direct"].append(_timed(direct, f16, f16.with_name("d.gguf"), qtype))
        runs["cold"].append(_timed(cold, f16, f16.with_name("c.gguf"), qtype))

    def warm():
        runs["warm"].append(_timed(ours, f16, f16.with_name("w.gguf"), qtype))

    benchmark.pedantic(warm, setup=setup, rounds=ROUNDS, iterations=1)
    r = _report(qtype, runs)
    benchmark.extra_info.update(r)
    print("\n" + HEADER + "\n" + _line(r))


if __name__ == "__main__":
    import tempfile

    types = sys.argv[1:] or TYPES
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP")) as d:
        src = make_f16(Path(d))
        print(HEADER, flush=True)
        for qt in types:
            runs: dict[str, list[tuple[float, float]]] = {"direct": [], "cold": [], "warm": []}
            for _ in range(ROUNDS):  # interleaved, so all three see the same machine load
                runs["direct"].append(_timed(direct, src, Path(d) / "d.gguf", qt))
                runs["cold"].append(_timed(cold, src, Path(d) / "c.gguf", qt))
                runs["warm"].append(_timed(ours, src, Path(d) / "w.gguf", qt))
            print(_line(_report(qt, runs)), flush=True)
