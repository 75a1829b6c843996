"""Peak memory of `edge_qwen.convert.writer.convert`: it must stream, not load the model.

Two checkpoints: the real 0.5B model rebuilt as f16 (largest tensor: the 151936x896 embedding),
and a synthetic bf16 checkpoint with 7B-sized tensors (a 152064x3584 embedding, 18944x3584 FFN
matrices; one block, tied head) written to a tmp dir. Each conversion runs in a fresh
subprocess that reports its own peak RSS (ru_maxrss); the bound is 1.5x the largest tensor
+ 500 MB, and the ratio peak / largest tensor is the number to watch.

    pytest benchmarks/bench_convert_memory.py --benchmark-only -s
    python benchmarks/bench_convert_memory.py          # same, as a table
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

MB = 1 << 20
# VmHWM is the peak resident set of this process's own address space; ru_maxrss is not used
# because Linux carries it over from the parent across fork/exec.
_PEAK = "int(next(l for l in open('/proc/self/status') if l.startswith('VmHWM')).split()[1]) * 1024"
_CHILD = """
import json, sys, time
from edge_qwen.convert.writer import convert
from edge_qwen.convert.checkpoint import open_checkpoint
t = time.perf_counter()
convert(sys.argv[1], sys.argv[2], outtype=sys.argv[3], force=True, quiet=True)
seconds = time.perf_counter() - t
print(json.dumps({"peak_rss": PEAK, "seconds": seconds,
                  "largest": open_checkpoint(sys.argv[1]).largest_tensor_bytes}))
""".replace("PEAK", _PEAK)
_BASELINE = f"import json, numpy, gguf, edge_qwen.convert.writer; print(json.dumps({{'peak_rss': {_PEAK}}}))"


def measure(src: Path, out: Path, outtype: str = "f16") -> dict:
    """Convert in a fresh interpreter; its peak RSS, time and the checkpoint's largest tensor."""
    r = subprocess.run([sys.executable, "-c", _CHILD, str(src), str(out), outtype],
                       capture_output=True, text=True, check=True)
    result = json.loads(r.stdout.strip().splitlines()[-1])
    base = json.loads(subprocess.run([sys.executable, "-c", _BASELINE], capture_output=True, text=True,
                                     check=True).stdout)
    result["import_rss"] = base["peak_rss"]  # the same interpreter with the libraries loaded, converting nothing
    result["bound"] = 1.5 * result["largest"] + 500 * MB
    result["ratio"] = result["peak_rss"] / result["largest"]
    out.unlink(missing_ok=True)
    return result


def make_7b_sized(folder: Path, tokenizer_from: Path | None = None) -> Path:
    """A bf16 Qwen2 checkpoint with 7B-sized tensors (one block, tied embedding), ~1.6 GB on disk."""
    import numpy as np

    from edge_qwen.convert.checkpoint import expected_tensors

    folder.mkdir(parents=True, exist_ok=True)
    config = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 3584,
              "intermediate_size": 18944, "num_hidden_layers": 1, "num_attention_heads": 28,
              "num_key_value_heads": 4, "vocab_size": 152064, "max_position_embeddings": 32768,
              "rope_theta": 1000000.0, "rms_norm_eps": 1e-6, "tie_word_embeddings": True,
              "bos_token_id": 151643, "eos_token_id": 151645}
    (folder / "config.json").write_text(json.dumps(config))
    header, offset = {}, 0
    tensors = [(n, s) for n, (_g, s) in expected_tensors(config).items() if n != "lm_head.weight"]
    for name, shape in tensors:
        n = int(np.prod(shape)) * 2
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    rng = np.random.default_rng(0)
    pool = (rng.standard_normal(1 << 22).astype(np.float32) * 0.02).view(np.uint32) >> 16  # bf16 bits
    pool = pool.astype(np.uint16)
    with open(folder / "model.safetensors", "wb") as f:
        f.write(len(raw).to_bytes(8, "little") + raw)
        for _name, shape in tensors:
            left = int(np.prod(shape))
            while left:
                k = min(left, pool.size)
                pool[:k].tofile(f)
                left -= k
    src = tokenizer_from or Path(__file__)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        if (src / name).is_file():
            shutil.copy(src / name, folder / name)
    return folder


@pytest.fixture(scope="module")
def default_checkpoint():
    from edge_qwen.convert.rebuild import default_checkpoint

    return default_checkpoint(quiet=True)


@pytest.fixture(scope="module")
def big_checkpoint(default_checkpoint, tmp_path_factory):
    folder = make_7b_sized(tmp_path_factory.mktemp("big") / "qwen2-7b-sized", tokenizer_from=default_checkpoint)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def _report(benchmark, label: str, r: dict) -> None:
    benchmark.extra_info.update({k: r[k] for k in ("peak_rss", "largest", "bound", "ratio", "seconds", "import_rss")})
    print(f"\n{label}: peak RSS {r['peak_rss'] / MB:.0f} MB (imports alone {r['import_rss'] / MB:.0f} MB), "
          f"largest tensor {r['largest'] / MB:.0f} MB, ratio {r['ratio']:.2f}, bound {r['bound'] / MB:.0f} MB, "
          f"{r['seconds']:.1f} s")


def test_convert_memory_default(benchmark, default_checkpoint, tmp_path):
    r = benchmark.pedantic(measure, args=(default_checkpoint, tmp_path / "out.gguf"), rounds=1, iterations=1)
    _report(benchmark, "0.5B f16 -> f16", r)
    assert r["peak_rss"] < r["bound"]


def test_convert_memory_7b_sized(benchmark, big_checkpoint, tmp_path):
    r = benchmark.pedantic(measure, args=(big_checkpoint, tmp_path / "out.gguf"), rounds=1, iterations=1)
    _report(benchmark, "7B-sized bf16 -> f16", r)
    assert r["peak_rss"] < r["bound"]


if __name__ == "__main__":
    from edge_qwen.convert.rebuild import default_checkpoint as _default

    ckpt = _default(quiet=False)
    with tempfile.TemporaryDirectory() as tmp:
        rows = [("0.5B f16 -> f16", measure(ckpt, Path(tmp) / "a.gguf"))]
        rows.append(("0.5B f16 -> q8_0", measure(ckpt, Path(tmp) / "b.gguf", "q8_0")))
        big = make_7b_sized(Path(tmp) / "big", tokenizer_from=ckpt)
        rows.append(("7B-sized bf16 -> f16", measure(big, Path(tmp) / "c.gguf")))
        print(f"{'conversion':24} {'peak RSS':>9} {'imports':>8} {'largest':>8} {'ratio':>6} {'bound':>7} {'time':>6}")
        for label, r in rows:
            print(f"{label:24} {r['peak_rss'] / MB:8.0f}M {r['import_rss'] / MB:7.0f}M {r['largest'] / MB:7.0f}M "
                  f"{r['ratio']:6.2f} {r['bound'] / MB:6.0f}M {r['seconds']:5.1f}s")
