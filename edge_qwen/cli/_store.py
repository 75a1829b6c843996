"""`edge-qwen pull` and `edge-qwen models`: thin shells over edge_qwen.hub."""

from __future__ import annotations

import json

import click

from . import main
from .options import quiet_option


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in [header, *rows]]
    return "\n".join(lines)


@main.command()
@click.argument("repo_id")
@click.option("--revision", "-r", default=None, help="Branch, tag or commit hash (default: main).")
@click.option("--token", default=None, envvar="HF_TOKEN", show_envvar=True,
              help="Hugging Face token for private or gated repos.")
@click.option("--quant", default=None, metavar="TYPE",
              help="For a GGUF repo (e.g. Qwen/Qwen2.5-7B-Instruct-GGUF): fetch only this quantization "
                   "(q4_k_m...), all its split parts if split.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.option("--force", is_flag=True, help="Download every file again, even those the store has "
                                            "(replaces a damaged or truncated file).")
@quiet_option
def pull(repo_id: str, revision: str | None, token: str | None, quant: str | None, as_json: bool,
         force: bool, quiet: bool) -> None:
    """Download a Hugging Face checkpoint (config, tokenizer, safetensors) into the model store.

    Only the files conversion needs are fetched; an interrupted pull resumes when run again,
    and files already in the store are kept (--force downloads them again).
    Honours HF_ENDPOINT, HF_TOKEN and HF_HUB_OFFLINE.
    """
    from huggingface_hub.utils import logging as hf_logging

    from ..hub import pull as pull_repo

    # huggingface_hub logs each retried request as a warning on stderr; our own error line says
    # what failed and what to do, so its per-attempt noise would only bury it.
    hf_logging.set_verbosity_error()
    if quant:
        from ..hub import pull_gguf

        r = pull_gguf(repo_id, quant, revision=revision, token=token, quiet=quiet or as_json, force=force)
    else:
        r = pull_repo(repo_id, revision=revision, token=token, quiet=quiet or as_json, force=force)
    for w in r.warnings:
        click.echo(f"warning: {w}", err=True)
    if as_json:
        click.echo(json.dumps({"repo": r.repo_id, "revision": r.revision, "commit": r.commit, "path": str(r.path),
                               "files": r.files, "fetched": r.fetched, "bytes_fetched": r.bytes_fetched,
                               "total_bytes": r.total_bytes, "architecture": r.architecture,
                               "offline": r.offline, "warnings": r.warnings,
                               "mmproj": str(r.mmproj) if r.mmproj else None}, indent=2))
        return
    how = "found in the store (offline)" if r.offline else "pulled"
    click.echo(f"{r.repo_id} @ {r.revision} (commit {r.commit}) {how}")
    click.echo(f"  fetched {len(r.fetched)} of {len(r.files)} files, {_size(r.bytes_fetched)} "
               f"(snapshot {_size(r.total_bytes)})")
    if r.fetched and not quiet:
        click.echo("  " + ", ".join(r.fetched))
    click.echo(f"  path: {r.path}")
    if r.mmproj:
        click.echo(f"  mmproj: {r.mmproj} (the vision tower, kept beside the model)")


@main.command()
@click.option("--known", is_flag=True, help="List the official Qwen repos (safetensors and GGUF) from the manifest instead.")
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
def models(known: bool, as_json: bool) -> None:
    """List the model store: pulled checkpoints, GGUF files and the default model."""
    if known:
        from ..hub import list_checkpoints
        from ..manifest import hub_models

        pulled = {c.repo_id.lower() for c in list_checkpoints()}
        entries = [{**m, "pulled": m["repo"].lower() in pulled} for m in hub_models()]
        if as_json:
            click.echo(json.dumps(entries, indent=2))
            return
        rows = [[m["repo"], m.get("variant", ""), m.get("kind", "chat"), m.get("format", "safetensors"),
                 f"{m['params_b']}B", m["license"], f"{m['f16_size_gb']} GB" + ("" if m.get("verified", True) else "*"),
                 "yes" if m["pulled"] else ""] for m in entries]
        click.echo(_table(rows, ["REPO", "VARIANT", "KIND", "FORMAT", "PARAMS", "LICENSE", "F16 SIZE", "PULLED"]))
        if any(not m.get("verified", True) for m in entries):
            click.echo("* estimated from the parameter count (2 bytes each); not checked against the Hub")
        click.echo("\nPull one with: edge-qwen pull REPO (a GGUF repo: edge-qwen pull REPO --quant Q4_K_M)")
        return
    from ..hub import store_summary

    s = store_summary()
    if as_json:
        click.echo(json.dumps(s, indent=2))
        return
    d = s["default_model"]
    click.echo(f"Model store: {s['home']}")
    state = f"assembled, {d['path']}" if d["assembled"] else "not assembled yet; `edge-qwen demo` assembles it"
    click.echo(f"Default model: {d['name']} ({state})")
    click.echo("\nCheckpoints (edge-qwen pull):")
    if s["checkpoints"]:
        rows = [[c["repo"], ",".join(c["revisions"]) or "-", c["commit"][:12], _size(c["size"]), str(c["files"]),
                 c["architecture"] or "?", c["path"] if c["complete"] else f"INCOMPLETE ({c['missing']}): pull again"]
                for c in s["checkpoints"]]
        click.echo(_table(rows, ["REPO", "REVISION", "COMMIT", "SIZE", "FILES", "ARCHITECTURE", "PATH"]))
    else:
        click.echo("  none (edge-qwen models --known lists the official repos)")
    click.echo("\nGGUF files:")
    if s["gguf"]:
        rows = [[g["name"], g["file_type"] or "?", g["architecture"] or "?", _size(g["size"]),
                 g["path"] if g["error"] is None else f"DAMAGED: {g['error']}"] for g in s["gguf"]]
        click.echo(_table(rows, ["NAME", "TYPE", "ARCH", "SIZE", "PATH"]))
    else:
        click.echo("  none")
