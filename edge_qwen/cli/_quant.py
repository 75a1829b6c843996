"""`edge-qwen quantize` and `edge-qwen imatrix`: thin shells over edge_qwen.quant.quantize / .imatrix."""

from __future__ import annotations

import click

from . import main
from .options import (deprecated, force_option, model_option, model_path, pick_model, quiet_option,
                      short_threads_option)

MIB = 1024 * 1024


def _types_summary(types: dict[str, int]) -> str:
    return ", ".join(f"{t} x{n}" for t, n in sorted(types.items(), key=lambda kv: -kv[1]))


@main.command("quantize")
@click.argument("src", required=False)
@model_option
@click.option("--type", "--types", "qtype", default="Q4_K_M", show_default=True,
              help="Quantization type, or several separated by commas (Q8_0,Q4_K_M). See --list.")
@click.option("-o", "--out", help="Output file; a folder (or a name with {type}) for several types. "
                                  "Default: <src stem>-<type>.gguf beside SRC.")
@click.option("--imatrix", "imatrix_file", help="Importance matrix file (llama.cpp GGUF or legacy .dat).")
@click.option("--calibration", help="Compute an importance matrix first from this text file, or 'default' "
                                    "for the shipped corpus.")
@click.option("--chunks", type=click.IntRange(min=1), help="With --calibration: at most N chunks of 512 tokens.")
@click.option("--embedding-type", help="Tensor type for token_embd.weight (e.g. Q8_0, Q6_K, F16).")
@click.option("--output-type", help="Tensor type for output.weight (e.g. Q8_0, Q6_K).")
@click.option("--pure", is_flag=True, help="No k-quant mixture: every tensor gets the main type.")
@click.option("--override", "overrides", multiple=True, metavar="PATTERN=TYPE",
              help="Tensor type for tensors whose name matches the regex PATTERN (repeatable), e.g. attn_v=Q8_0.")
@click.option("--dry-run", is_flag=True, help="Print the resulting size and tensor types; write nothing.")
@click.option("--allow-requantize", is_flag=True, help="Accept an already-quantized input (loses quality).")
@click.option("--threads", type=click.IntRange(min=1), help="Threads (default: all cores).")
@short_threads_option("threads", legacy="qtype", legacy_read=str, legacy_flag="--type")
@click.option("--list", "list_types", is_flag=True, help="List every type with its bits per weight and exit.")
@force_option
@quiet_option
def quantize_cmd(src, model_opt, qtype, out, imatrix_file, calibration, chunks, embedding_type, output_type, pure,
                 overrides, dry_run, allow_requantize, threads, list_types, force, quiet):
    """Quantize the GGUF model SRC (f16/bf16/f32) to one or more llama.cpp types."""
    if list_types:
        from ..quant.types import format_table

        click.echo(format_table())
        return
    src = pick_model(src, model_opt)
    if not src:
        raise click.UsageError("give the GGUF model to quantize (SRC), or --list to see the types")
    from ..quant.quantize import quantize

    src = model_path(src)

    res = quantize(src, out, qtype, imatrix=imatrix_file, calibration=calibration,
                   embedding_type=embedding_type, output_type=output_type, pure=pure,
                   overrides=list(overrides), dry_run=dry_run, allow_requantize=allow_requantize,
                   n_threads=threads, force=force, quiet=quiet, chunks=chunks)
    if res.imatrix is not None:
        click.echo(f"imatrix: {res.imatrix} (sha256 {res.imatrix_sha256}, calibration: {res.calibration})")
    for f in res.files:
        if f.dry_run:
            note = "  (needs an importance matrix to run for real)" if f.needs_imatrix else ""
            click.echo(f"{f.qtype}: would be {f.size / MIB:.1f} MiB ({f.size} bytes, {f.bits_per_weight:.2f} bpw); "
                       f"tensors: {_types_summary(f.tensor_types)}; {f.fallbacks} fallbacks{note}")
        else:
            click.echo(f"wrote {f.path}  ({f.qtype}, {f.size / MIB:.1f} MiB, {f.bits_per_weight:.2f} bpw, "
                       f"{f.seconds:.1f} s; tensors: {_types_summary(f.tensor_types)})")


@main.command("imatrix")
@click.argument("src", required=False)
@model_option
@click.option("--calibration", default="default", show_default=True,
              help="UTF-8 text file to run the model over, or 'default' for the shipped corpus.")
@click.option("-o", "--out", help="Output file (GGUF imatrix; legacy format if it ends in .dat). "
                                  "Default: <src stem>.imatrix.gguf beside SRC.")
@click.option("--chunks", type=click.IntRange(min=1), help="Use at most N chunks.")
@click.option("--chunk-size", "n_ctx", type=click.IntRange(min=16), default=512, show_default=True,
              help="Tokens per chunk (each chunk is evaluated in a context of this size).")
@click.option("--ctx", "old_ctx", type=click.IntRange(min=16), default=None, hidden=True,
              help="Deprecated spelling of --chunk-size.")
@click.option("--threads", type=click.IntRange(min=1), help="Threads (default: all cores).")
@short_threads_option("threads")
@force_option
@quiet_option
def imatrix_cmd(src, model_opt, calibration, out, chunks, n_ctx, old_ctx, threads, force, quiet):
    """Compute an importance matrix for the GGUF model SRC from calibration text."""
    from ..quant.imatrix import imatrix

    if old_ctx is not None:
        deprecated(f"imatrix --ctx is now --chunk-size (--ctx means the context window everywhere else); "
                   f"read as --chunk-size {old_ctx} for this release")
        n_ctx = old_ctx
    src = model_path(pick_model(src, model_opt))

    r = imatrix(src, calibration, out, chunks=chunks, n_ctx=n_ctx, n_threads=threads, force=force, quiet=quiet)
    click.echo(f"wrote {r.path}  ({r.entries} tensors, {r.chunks} chunks = {r.tokens} tokens of "
               f"{r.calibration}, {r.seconds:.1f} s, sha256 {r.sha256})")
