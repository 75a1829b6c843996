"""`edge-qwen convert`, `inspect` and `rebuild`: thin shells over edge_qwen.convert.writer / rebuild.

Paths are plain `click.Path()`: a folder given for a file, a missing or unreadable file is
reported by the library in one line naming the path, not as a click usage error.
"""

from __future__ import annotations

import click

from . import main
from .options import force_option, model_option, model_path, pick_model, quiet_option


@main.command()
@click.argument("src")
@click.option("-o", "--out", "out", type=click.Path(), default=None,
              help="Output GGUF file (default: <store>/models/<folder>-<outtype>.gguf).")
@click.option("--outtype", type=click.Choice(["f32", "f16", "bf16", "q8_0"]), default="f16", show_default=True,
              help="Type of the weight matrices (norms and biases stay f32).")
@click.option("--type", "qtype", default=None, metavar="T[,T...]",
              help="Also quantize to these llama.cpp types (e.g. Q4_K_M) in the same step; "
                   "the f16 intermediate is removed afterwards.")
@click.option("--imatrix", type=click.Path(), default=None,
              help="With --type: importance matrix file to quantize with.")
@click.option("--calibration", default=None, metavar="FILE|default",
              help="With --type: compute an importance matrix from this text first.")
@click.option("--mmproj", is_flag=True,
              help="Write the vision tower of a Qwen2.5-VL, Qwen3-VL or Qwen3.5 checkpoint (the mmproj GGUF for --mmproj) "
                   "instead of its text model.")
@click.option("--no-mtp", "no_mtp", is_flag=True,
              help="Leave out the multi-token-prediction block (mtp.*) of a Qwen3.5/3.6 or Qwen3-Next "
                   "checkpoint, as llama.cpp's --no-mtp.")
@force_option
@quiet_option
def convert(src: str, out: str | None, outtype: str, qtype: str | None, imatrix: str | None,
            calibration: str | None, mmproj: bool, no_mtp: bool, force: bool, quiet: bool) -> None:
    """Convert a Hugging Face Qwen checkpoint (folder or pulled repo id) to GGUF.

    Qwen2/2.5, Qwen3, Qwen2-MoE, Qwen3-MoE, Qwen2.5-VL and Qwen3-VL (text model; --mmproj for
    its vision tower, also of Qwen3.5), Qwen3.5/3.6 and Qwen3-Next (with their MTP block unless
    --no-mtp), Qwen3-Embedding and Qwen3-Reranker. With --type, quantize the converted model in the same step.
    """
    if mmproj and qtype is not None:
        raise click.BadParameter("a vision tower (--mmproj) is not quantized; use --outtype f16 or q8_0",
                                 param_hint="--type")
    if qtype is None:
        if imatrix or calibration:
            raise click.BadParameter("--imatrix and --calibration need --type", param_hint="--type")
        from ..convert.writer import convert as run_convert

        path = run_convert(src, out, outtype=outtype, force=force, quiet=quiet, mmproj=mmproj, mtp=not no_mtp)
        if not quiet:
            click.echo(f"wrote {path}")
        return
    from ..quant.quantize import convert_and_quantize

    res = convert_and_quantize(src, out, qtype=qtype, force=force, quiet=quiet,
                               imatrix=imatrix, calibration=calibration, mtp=not no_mtp)
    for f in res.files:
        click.echo(f"wrote {f.path}  ({f.qtype}, {f.size / 2**20:.1f} MiB, {f.bits_per_weight:.2f} bpw)")


@main.command()
@click.argument("file", type=click.Path(), required=False, metavar="MODEL")
@model_option
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def inspect(file: str | None, model_opt: str | None, as_json: bool) -> None:
    """Show a GGUF model's metadata, tensor types, size, bits per weight and provenance.

    MODEL is a GGUF path, a store name, a pulled repo id, or `default`.
    """
    import json

    from ..convert.writer import inspect_gguf

    info = inspect_gguf(model_path(pick_model(file, model_opt)))
    if as_json:
        click.echo(json.dumps(info, ensure_ascii=False, indent=2))
        return
    click.echo(f"{info['path']}: {info['architecture']}, {info['size_bytes'] / 1e6:.1f} MB, "
               f"{info['n_params'] / 1e6:.1f} M parameters, {info['bits_per_weight']:.2f} bits/weight")
    click.echo("tensors: " + ", ".join(f"{t} {n}" for t, n in info["tensor_types"].items())
               + f" ({info['n_tensors']} in all)")
    if info["layers"]:
        click.echo(f"layers: {len(info['layers'])} (" + ", ".join(
            f"{n} {k.replace('_', ' ').replace('+moe', ' + MoE')}" for k, n in info["layer_kinds"].items()) + ")")
    for title, section in (("provenance", info["provenance"]), ("metadata", info["metadata"])):
        click.echo(f"{title}:")
        for k, v in section.items():
            text = str(v).replace("\n", "\\n")
            click.echo(f"  {k} = {text[:100] + '…' if len(text) > 100 else text}")


@main.command()
@click.argument("gguf_file", metavar="GGUF", type=click.Path())
@click.argument("outdir", type=click.Path())
@click.option("--dtype", type=click.Choice(["f32", "f16", "bf16"]), default="f16", show_default=True,
              help="Type of the rebuilt weights.")
@click.option("--shard-size", type=int, default=None, metavar="BYTES", help="Split weights into shards of at most BYTES.")
@force_option
@quiet_option
def rebuild(gguf_file: str, outdir: str, dtype: str, shard_size: int | None, force: bool, quiet: bool) -> None:
    """Rebuild a Hugging Face checkpoint folder from a qwen2 GGUF (dequantized)."""
    from ..convert.rebuild import rebuild_checkpoint

    path = rebuild_checkpoint(model_path(gguf_file), outdir, dtype=dtype, max_shard_bytes=shard_size, force=force, quiet=quiet)
    if not quiet:
        click.echo(f"wrote {path}")
