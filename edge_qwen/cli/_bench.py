"""`edge-qwen bench` and `edge-qwen recommend`: thin shells over edge_qwen.bench.sweep."""

from __future__ import annotations

import re

import click

from . import main
from .options import model_option, model_path, pick_model, quiet_option

_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3,
          "t": 1000**4, "tb": 1000**4, "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40}


def parse_size(text: str) -> int:
    """Bytes from a size like 1.5GB, 800MB, 2GiB or 1000000 (decimal units; KiB/MiB/GiB binary)."""
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    unit = m.group(2).lower() if m else None
    if not m or unit not in _UNITS:
        raise click.BadParameter(f"{text!r} is not a size; write it like 1.5GB, 800MB or 2GiB")
    n = int(float(m.group(1)) * _UNITS[unit])
    if n <= 0:
        raise click.BadParameter(f"{text!r} must be more than zero bytes")
    return n


class SizeType(click.ParamType):
    name = "SIZE"

    def convert(self, value, param, ctx):
        if isinstance(value, int):
            return value
        try:
            return parse_size(value)
        except click.BadParameter as e:
            self.fail(e.message, param, ctx)


@main.command("bench")
@click.argument("f16_gguf", type=click.Path(), required=False)
@model_option
@click.option("--types", "--type", "types", default=None, metavar="T1,T2,...",
              help="Quantization types to measure [default: Q8_0,Q6_K,Q5_K_M,Q4_K_M,Q4_0,Q3_K_M,Q2_K,IQ4_XS; "
                   "with --quick: Q8_0,Q4_K_M].")
@click.option("-o", "--out", "out_dir", default="bench", show_default=True, type=click.Path(),
              help="Folder for results.md/.csv/.json, the plots and per-type results.")
@click.option("--quick", is_flag=True, help="A small run for CI and smoke tests (2 chunks of 256 tokens, 3 tasks).")
@click.option("--imatrix", type=click.Path(), default=None,
              help="Importance matrix for the quantizer (needed by the low-bit IQ types).")
@click.option("--no-resume", is_flag=True, help="Measure every type again even if --out holds its result.")
@click.option("--keep-models", is_flag=True, help="Keep the quantized files in OUT/models.")
@click.option("--force", is_flag=True, help="Write into an --out folder that holds other files (not an earlier "
                                            "bench run, which is resumed).")
@quiet_option
def bench_cmd(f16_gguf, model_opt, types, out_dir, quick, imatrix, no_resume, keep_models, force, quiet):
    """Quantize F16_GGUF to each type and measure size, speed, memory and quality against it."""
    from pathlib import Path

    from ..bench.sweep import DEFAULT_TYPES, QUICK_TYPES, run_sweep
    from ..bench.report import markdown_table
    from ..errors import OutputExistsError
    from ..files import check_input_file

    # path mistakes are one line each, before any quantizing (paths are checked here, not by click)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"--out {out_dir} is a file; give a folder for the results")
    earlier_run = (out / "types").is_dir() or (out / "results.json").is_file()
    if out.is_dir() and any(out.iterdir()) and not earlier_run and not force:
        # results.md/.csv/.json and the plots would replace files of the same name there
        raise OutputExistsError(f"--out {out_dir} already exists and holds other files, not an earlier bench run; "
                                "choose another folder, or pass --force to write the results into it")
    if imatrix is not None:
        check_input_file(imatrix, "imatrix file", "make one with `edge-qwen imatrix MODEL`")

    chosen = types or ",".join(QUICK_TYPES if quick else DEFAULT_TYPES)
    f16_gguf = pick_model(f16_gguf, model_opt)
    if f16_gguf is None:
        raise click.UsageError("give the f16 GGUF to measure (F16_GGUF or -m)")
    rows = run_sweep(model_path(f16_gguf), chosen, out_dir, quick=quick, imatrix=imatrix, resume=not no_resume,
                     quiet=quiet, keep_models=keep_models)
    click.echo(markdown_table(rows))
    click.echo(f"Results in {out_dir}/ (results.md, results.csv, results.json, quality_vs_size.png, speed_vs_size.png)")


@main.command("recommend")
@click.argument("source", type=click.Path())
@click.option("--max-ram", required=True, type=SizeType(), help="RAM budget for model + KV cache, e.g. 1.5GB.")
@click.option("--ctx", "n_ctx", default=4096, show_default=True, type=click.IntRange(min=16),
              help="Context length the model will be loaded with.")
@click.option("--parallel", default=1, show_default=True, type=click.IntRange(min=1),
              help="Slots served at once (serve --parallel): each holds a KV cache of --ctx tokens and, on a "
                   "hybrid model (Qwen3.5, Qwen3-Next), its own recurrent state.")
@quiet_option
def recommend_cmd(source, max_ram, n_ctx, parallel, quiet):
    """The best-quality (lowest KL) type that fits --max-ram, from SOURCE: a bench folder or an f16 GGUF model."""
    from pathlib import Path

    from ..bench.sweep import recommend
    from ..errors import EdgeQwenError
    from ..files import missing_path_note

    if not Path(source).exists():
        source = model_path(source)  # a store name or pulled repo id of an f16 GGUF
    if not Path(source).exists():
        raise EdgeQwenError(f"{source} does not exist ({missing_path_note(source)}); give a bench --out folder or "
                            "an f16 GGUF")
    rec = recommend(source, max_ram, n_ctx=n_ctx, quiet=quiet, parallel=parallel)
    mb = lambda v: "-" if v is None else f"{v / 1e6:.0f}"  # noqa: E731
    click.echo("| Type | Size (MB) | KV cache (MB) | Compute (MB) | Need (MB) | Measured RSS (MB) | KL mean | PPL | Fits |")
    click.echo("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | :---: |")
    for c in rec["candidates"]:
        kl = "-" if c["kl_mean"] is None else f"{c['kl_mean']:.5f}"
        ppl = "-" if c["ppl"] is None else f"{c['ppl']:.3f}"
        mark = "**" if c["type"] == rec["choice"] else ""
        click.echo(f"| {mark}{c['type']}{' (ref)' if c['reference'] else ''}{mark} | {mb(c['size_bytes'])} | "
                   f"{mb(c['kv_bytes'])} | {mb(c['compute_bytes'])} | {mb(c['need_bytes'])} | "
                   f"{mb(c['peak_rss_bytes'])} | {kl} | {ppl} | {'yes' if c['fits'] else 'no'} |")
    if rec["recurrent_bytes"]:
        click.echo(f"\nKV cache includes the recurrent state of {parallel} slot(s): "
                   f"{rec['recurrent_bytes'] / 1e6:.1f} MB (per sequence, whatever its length)")
    click.echo(f"\nRecommended: {rec['choice']} (lowest KL divergence that fits {max_ram / 1e6:.0f} MB "
               f"with a {n_ctx}-token context{f' x {parallel} slots' if parallel > 1 else ''})")
