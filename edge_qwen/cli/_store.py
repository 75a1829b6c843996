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


def _ago(ts: float) -> str:
    import time

    s = max(0, time.time() - ts)
    for unit, n in (("day", 86400), ("hour", 3600), ("minute", 60)):
        if s >= n:
            k = int(s // n)
            return f"{k} {unit}{'s' if k != 1 else ''} ago"
    return "just now"


@main.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
def list_cmd(as_json: bool) -> None:
    """List the runnable models in the store: name, type, size, modified (Ollama's `list`)."""
    from ..catalog import list_models

    rows = list_models()
    if as_json:
        click.echo(json.dumps([m.to_dict() for m in rows], ensure_ascii=False, indent=2))
        return
    if not rows:
        click.echo("no models in the store yet; `edge-qwen demo` assembles the default model, "
                   "`edge-qwen pull REPO --quant Q4_K_M` fetches one")
        return
    table = [[m.name, m.file_type or "?", m.architecture or "?", _size(m.size), _ago(m.modified),
              f"-> {m.alias_of}" if m.alias_of else (f"DAMAGED: {m.error}" if m.error else "")] for m in rows]
    click.echo(_table(table, ["NAME", "TYPE", "ARCH", "SIZE", "MODIFIED", ""]))


main.add_command(list_cmd, "ls")


@main.command("show")
@click.argument("model", required=False)
@click.option("-m", "--model", "model_opt", metavar="MODEL", default=None,
              help="The model (same as MODEL): a path, store name, pulled repo id, or 'default'.")
@click.option("--template", is_flag=True, help="Print only the chat template.")
@click.option("--parameters", is_flag=True, help="Print only the default parameters (as in a Modelfile).")
@click.option("--modelfile", is_flag=True, help="Print an Ollama Modelfile for the model.")
@click.option("--license", "license_", is_flag=True, help="Print only the license.")
@click.option("--json", "as_json", is_flag=True, help="Print everything as JSON.")
def show_cmd(model, model_opt, template, parameters, modelfile, license_, as_json) -> None:
    """Show a model: architecture, parameters, context, quantization, license (Ollama's `show`)."""
    from ..catalog import info_rows, model_info
    from .options import pick_model

    info = model_info(pick_model(model, model_opt))
    params = "\n".join(f"{k:<12}{json.dumps(v, ensure_ascii=False) if isinstance(v, str) else v}"
                       for k, v in info["defaults"].items())
    if as_json:
        click.echo(json.dumps(info, ensure_ascii=False, indent=2))
    elif template:
        click.echo(info["template"] or "(the file has no chat template)")
    elif parameters:
        click.echo(params)
    elif license_:
        click.echo(info["license"] or "(no license recorded in the file)")
    elif modelfile:
        click.echo(f"FROM {info['path']}")
        if info["template"]:
            click.echo(f'TEMPLATE """{info["template"]}"""')
        for line in params.splitlines():
            click.echo(f"PARAMETER {line}")
    else:
        click.echo("\n".join(f"  {k:<18}{v}" for k, v in info_rows(info)))


@main.command("cp")
@click.argument("src")
@click.argument("name")
@click.option("--force", is_flag=True, help="Replace a store model already named NAME.")
def cp_cmd(src: str, name: str, force: bool) -> None:
    """Give the model SRC a second name NAME in the store (an alias, no copy of the file)."""
    from ..catalog import copy_model

    dest = copy_model(src, name, force=force)
    click.echo(f"copied {src} to {name} ({dest})")


@main.command("rm")
@click.argument("names", nargs=-1, required=True, metavar="NAME...")
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
def rm_cmd(names: tuple[str, ...], yes: bool) -> None:
    """Delete models from the store (an alias: only the alias; files outside the store: never)."""
    from ..catalog import remove_model

    for name in names:
        path = remove_model(name, None if yes else
                            (lambda p: click.confirm(f"delete {name} ({p}) from the store?", err=True)))
        click.echo(f"deleted {name} ({path})" if path else f"kept {name}")
