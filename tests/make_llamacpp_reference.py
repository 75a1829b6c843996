"""Record llama.cpp's converter output for the tiny family checkpoints (tests/family_models.py).

    python tests/make_llamacpp_reference.py [--llama-cpp DIR] [--work DIR]

DIR is the `vendor/llama.cpp` folder of llama-cpp-python 0.3.36's sdist; without it the sdist
is fetched from PyPI (`pip download --no-binary :all: --no-deps llama-cpp-python==0.3.36`).
With --hybrid, the hybrid models of tests/family_hybrid.py (Qwen3.5, Qwen3.5-MoE, Qwen3-Next,
with and without their MTP block) in f16, bf16 and q8_0, recorded in
tests/data/llamacpp_reference_hybrid.json.
For every architecture and outtype the checkpoint is converted by llama.cpp's
convert_hf_to_gguf.py (run from DIR so it uses its own gguf-py) and by edge-qwen, each in a
child process timed and measured for peak memory; the digests of llama.cpp's files (tensor
types, shapes and sha256, and the hyper-parameter keys) are written to
tests/data/llamacpp_reference.json, and any difference from edge-qwen's file is printed.
Needs torch and transformers (the test extra).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))

from family_models import ARCHS, digest_diff, gguf_digest, make_family_checkpoint  # noqa: E402

OUTTYPES = ("f32", "f16", "bf16", "q8_0")
REFERENCE = HERE / "data" / "llamacpp_reference.json"
HYBRID_REFERENCE = HERE / "data" / "llamacpp_reference_hybrid.json"
# hybrid cases: name -> (architecture, checkpoint has the MTP block, converted with --no-mtp)
HYBRID_CASES = {"qwen35": ("qwen35", True, False), "qwen35-nomtp": ("qwen35", True, True),
                "qwen35moe": ("qwen35moe", True, False), "qwen3next": ("qwen3next", True, False),
                "qwen3next-nomtp": ("qwen3next", False, True)}
VERSION = "0.3.36"


def _llama_cpp_dir(work: Path) -> Path:
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps", "-q",
                    f"llama-cpp-python=={VERSION}", "-d", str(work)], check=True)
    subprocess.run(["tar", "xzf", str(work / f"llama_cpp_python-{VERSION}.tar.gz"), "-C", str(work)], check=True)
    return work / f"llama_cpp_python-{VERSION}" / "vendor" / "llama.cpp"


def _run(cmd: list[str], cwd: Path | None = None) -> tuple[float, int]:
    """(wall seconds, peak RSS in MiB) of one child process, measured by /usr/bin/time.

    Not by wait4's rusage: a child forked from this (large) process inherits its high-water
    mark, so every child would report at least this script's own memory.
    """
    with tempfile.NamedTemporaryFile("r", suffix=".rss") as rss:
        t = time.perf_counter()
        proc = subprocess.run(["/usr/bin/time", "-f", "%M", "-o", rss.name, *cmd], cwd=cwd,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        wall = time.perf_counter() - t
        if proc.returncode != 0:
            raise SystemExit(f"failed: {' '.join(cmd)}\n{proc.stderr[-3000:]}")
        return wall, int(rss.read().split()[-1]) // 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--llama-cpp", type=Path, help="vendor/llama.cpp of the llama-cpp-python sdist")
    ap.add_argument("--work", type=Path, help="scratch folder (default: a temporary one)")
    ap.add_argument("--archs", default=None)
    ap.add_argument("--hybrid", action="store_true", help="the hybrid models (tests/family_hybrid.py)")
    args = ap.parse_args()
    if args.hybrid:
        return _hybrid(args)
    args.archs = args.archs or ",".join(ARCHS)
    work = args.work or Path(tempfile.mkdtemp(prefix="llamacpp-ref-"))
    work.mkdir(parents=True, exist_ok=True)
    llama = args.llama_cpp or _llama_cpp_dir(work)
    converter = llama / "convert_hf_to_gguf.py"
    reference = json.loads(REFERENCE.read_text()) if REFERENCE.is_file() else {}
    reference["llama_cpp_python"] = VERSION
    reference.setdefault("files", {})
    timings = []
    failures = 0
    for arch in args.archs.split(","):
        ckpt = make_family_checkpoint(work / f"ckpt-{arch}", arch)
        parts = [("model", [])] + ([("mmproj", ["--mmproj"])] if arch == "qwen2vl" else [])
        for part, flag in parts:
            for outtype in OUTTYPES:
                key = f"{arch}{'-mmproj' if part == 'mmproj' else ''}-{outtype}"
                ref_out, our_out = work / f"ref-{key}.gguf", work / f"ours-{key}.gguf"
                ref_t, ref_mb = _run([sys.executable, str(converter), str(ckpt), "--outtype", outtype,
                                      "--outfile", str(ref_out), *flag], cwd=llama)
                code = ("import sys; from edge_qwen.convert.writer import convert; "
                        f"convert(sys.argv[1], sys.argv[2], outtype={outtype!r}, force=True, quiet=True, "
                        f"mmproj={part == 'mmproj'})")
                our_t, our_mb = _run([sys.executable, "-W", "ignore", "-c", code, str(ckpt), str(our_out)])
                ref_digest = gguf_digest(ref_out)
                diff = digest_diff(gguf_digest(our_out), ref_digest)
                reference["files"][key] = ref_digest
                timings.append((key, ref_t, ref_mb, our_t, our_mb))
                print(f"{key:24s} llama.cpp {ref_t:5.1f} s {ref_mb:5d} MiB | edge-qwen {our_t:5.1f} s {our_mb:5d} MiB"
                      f" | {len(ref_digest['tensors'])} tensors, {'identical' if not diff else f'{len(diff)} DIFFERENCES'}",
                      flush=True)
                for line in diff:
                    print("   ", line)
                failures += bool(diff)
                ref_out.unlink()
                our_out.unlink()
    REFERENCE.parent.mkdir(exist_ok=True)
    REFERENCE.write_text(json.dumps(reference, indent=1, sort_keys=True) + "\n")
    print(f"wrote {REFERENCE}; {failures} file(s) differ")


def _hybrid(args: argparse.Namespace) -> None:
    from family_hybrid import make_hybrid_checkpoint

    work = args.work or Path(tempfile.mkdtemp(prefix="llamacpp-ref-"))
    work.mkdir(parents=True, exist_ok=True)
    llama = args.llama_cpp or _llama_cpp_dir(work)
    converter = llama / "convert_hf_to_gguf.py"
    reference = json.loads(HYBRID_REFERENCE.read_text()) if HYBRID_REFERENCE.is_file() else {}
    reference["llama_cpp_python"] = VERSION
    reference.setdefault("files", {})
    failures = 0
    for case in (args.archs or ",".join(HYBRID_CASES)).split(","):
        arch, has_mtp, no_mtp = HYBRID_CASES[case]
        ckpt = make_hybrid_checkpoint(work / f"ckpt-{arch}{'' if has_mtp else '-nomtp'}", arch, mtp=has_mtp)
        for outtype in ("f16", "bf16", "q8_0"):
            key = f"{case}-{outtype}"
            ref_out, our_out = work / f"ref-{key}.gguf", work / f"ours-{key}.gguf"
            ref_t, ref_mb = _run([sys.executable, str(converter), str(ckpt), "--outtype", outtype,
                                  "--outfile", str(ref_out), *(["--no-mtp"] if no_mtp else [])], cwd=llama)
            code = ("import sys; from edge_qwen.convert.writer import convert; "
                    f"convert(sys.argv[1], sys.argv[2], outtype={outtype!r}, force=True, quiet=True, mtp={not no_mtp})")
            our_t, our_mb = _run([sys.executable, "-W", "ignore", "-c", code, str(ckpt), str(our_out)])
            ref_digest = gguf_digest(ref_out)
            diff = digest_diff(gguf_digest(our_out), ref_digest)
            reference["files"][key] = ref_digest
            print(f"{key:24s} llama.cpp {ref_t:5.1f} s {ref_mb:5d} MiB | edge-qwen {our_t:5.1f} s {our_mb:5d} MiB"
                  f" | {len(ref_digest['tensors'])} tensors, {'identical' if not diff else f'{len(diff)} DIFFERENCES'}",
                  flush=True)
            for line in diff:
                print("   ", line)
            failures += bool(diff)
            ref_out.unlink()
            our_out.unlink()
    HYBRID_REFERENCE.write_text(json.dumps(reference, indent=1, sort_keys=True) + "\n")
    print(f"wrote {HYBRID_REFERENCE}; {failures} file(s) differ")


if __name__ == "__main__":
    main()
