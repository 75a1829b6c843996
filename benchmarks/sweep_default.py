"""The full quantization sweep of the default model, as reported in benchmarks/RESULTS.md.

    python benchmarks/sweep_default.py [--work DIR] [--out benchmarks/results] [--quick]

1. rebuilds the default model (Qwen2.5-Coder-0.5B-Instruct, Q4_K_M GGUF) as an f16 Hugging
   Face checkpoint and converts it back to an f16 GGUF with edge-qwen's own converter;
2. runs `run_sweep` over the eight types of RESULTS.md, writing md/csv/json/png to --out.

Everything is reused when present: the checkpoint, the f16 GGUF, and finished types
(the sweep resumes). Takes about 20 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from edge_qwen.bench.sweep import DEFAULT_TYPES, run_sweep
from edge_qwen.convert.writer import convert
from edge_qwen.convert.rebuild import rebuild_checkpoint
from edge_qwen.store import default_model_path

NAME = "qwen2.5-coder-0.5b-instruct"


def reference_f16(work: Path, quiet: bool) -> Path:
    """The default model rebuilt as a checkpoint and converted to f16 (made once in `work`)."""
    f16 = work / f"{NAME}-f16.gguf"
    if f16.is_file():
        return f16
    ckpt = work / NAME
    if not (ckpt / "config.json").is_file():
        rebuild_checkpoint(default_model_path(), ckpt, dtype="f16", quiet=quiet)
    return convert(ckpt, f16, outtype="f16", quiet=quiet)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/edge-qwen-sweep"), help="scratch folder for the f16 files")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    ap.add_argument("--types", default=",".join(DEFAULT_TYPES))
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    f16 = reference_f16(args.work, args.quiet)
    print(f"reference: {f16} ({time.perf_counter() - t0:.0f} s)", flush=True)
    rows = run_sweep(f16, args.types, args.out, quick=args.quick, quiet=args.quiet, models_dir=args.work / "models")
    print(f"{len(rows)} rows in {args.out} ({time.perf_counter() - t0:.0f} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
