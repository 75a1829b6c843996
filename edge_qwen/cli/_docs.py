"""`edge-qwen summarize`, `edge-qwen ask` and `edge-qwen index add|ls|rm`: thin shells over edge_qwen.rag."""

from __future__ import annotations

import json
import os

import click

from . import SuggestingGroup, main
from .options import quiet_option

KV_TYPES = ["f16", "q8_0", "q4_0"]


def _model_options(f):
    for opt in reversed([
        click.option("--model", "-m", envvar="EDGE_QWEN_MODEL", default=None, help="GGUF path or store name."),
        click.option("--ctx", "n_ctx", type=click.IntRange(256, 131072), default=4096, show_default=True,
                     help="Context window (past 32768: YaRN)."),
        click.option("--kv-type", type=click.Choice(KV_TYPES), default="f16", show_default=True,
                     help="KV cache type (q8_0/q4_0 turn on flash attention)."),
    ]):
        f = opt(f)
    return f


def _check_embed_model(path: str) -> None:
    from ..files import check_input_file

    check_input_file(path, "embedding model (--embed-model)", "give an embedding GGUF file")


def _load(model, n_ctx, kv_type):
    from ..runtime import EdgeQwen

    return EdgeQwen(model, n_ctx=n_ctx, kv_type=kv_type)


@main.command("summarize")
@click.argument("files", nargs=-1, required=True, type=click.Path())
@_model_options
@click.option("--max-tokens", "-n", type=click.IntRange(16), default=400, show_default=True,
              help="Length of the summary in tokens.")
@click.option("--map-tokens", type=click.IntRange(16), default=200, show_default=True,
              help="Length of each chunk's partial summary.")
@quiet_option
def summarize_cmd(files, model, n_ctx, kv_type, max_tokens, map_tokens, quiet):
    """Summarize FILES (txt, md, html, pdf, code) of any length within the context window."""
    from ..rag.documents import load_document
    from ..rag.summarize import summarize_files

    for f in files:  # every file checked before the model loads
        load_document(f)
    with _load(model, n_ctx, kv_type) as llm:
        s = summarize_files(llm, list(files), max_tokens=max_tokens, map_tokens=map_tokens, quiet=quiet)
    click.echo(s.text)
    if not quiet:
        click.echo(f"({s.input_tokens} tokens in {s.chunks} chunks, {s.levels} merge levels, {s.calls} model calls)",
                   err=True)


@main.command("ask")
@click.argument("args", nargs=-1, required=True, metavar="[FILE]... QUESTION")
@click.option("--index", "-i", "index_name", default=None, help="Answer from this index (edge-qwen index add).")
@click.option("-k", "k", type=click.IntRange(1, 20), default=3, show_default=True, help="Chunks to retrieve.")
@click.option("--steps", is_flag=True, help="Reason step by step first (the reasoning goes to stderr).")
@click.option("--embed-model", type=click.Path(), default=None,
              help="The embedding GGUF the index was built with (dense + BM25 retrieval).")
@click.option("--rerank-model", type=click.Path(), default=None,
              help="A reranker GGUF (Qwen3-Reranker): reorder the retrieved chunks by relevance.")
@click.option("--max-tokens", "-n", type=click.IntRange(16), default=256, show_default=True,
              help="Length of the answer in tokens.")
@click.option("--json", "as_json", is_flag=True, help="Print answer, citations and sources as JSON.")
@_model_options
def ask_cmd(args, index_name, k, steps, embed_model, rerank_model, max_tokens, as_json, model, n_ctx, kv_type):
    """Answer QUESTION from FILES or from --index NAME, citing sources as [1], [2]."""
    from ..rag.answer import ask, ask_files
    from ..rag.documents import load_document
    from ..rag.index import DocIndex

    *files, question = args
    if not question.strip():
        raise click.BadParameter("the question is empty", param_hint="QUESTION")
    if bool(files) == bool(index_name):
        raise click.UsageError("give FILE... or --index NAME (one of them) before the QUESTION")
    kw = {"max_tokens": max_tokens, "reasoning": "step_by_step" if steps else None}
    if index_name:
        DocIndex.open(index_name).close()  # a missing or old index fails before the model loads
    else:
        for f in files:
            load_document(f)
    embedder = None
    if embed_model:
        from ..rag.embed import Embedder

        _check_embed_model(embed_model)
        embedder = Embedder(embed_model)
    if rerank_model:
        from ..engine.pooled import Reranker
        from ..files import check_input_file

        check_input_file(rerank_model, "reranker (--rerank-model)", "give a reranker GGUF file")
        kw["reranker"] = Reranker(rerank_model)
    with _load(model, n_ctx, kv_type) as llm:
        if index_name:
            r = ask(llm, question, index_name, k=k, embedder=embedder, **kw)
        else:
            r = ask_files(llm, list(files), question, k=k, **kw)
    if as_json:
        click.echo(json.dumps(r.to_dict(), ensure_ascii=False, indent=2))
        return
    if r.reasoning_content:
        click.echo(r.reasoning_content.strip() + "\n", err=True)
    click.echo(r.answer)
    for c in r.citations:
        click.echo(f"[{c['n']}] {c['path']} ({c['location']})")


@main.group("index", cls=SuggestingGroup)
def index_group():
    """Indexes of your files for `edge-qwen ask --index` (stored in $EDGE_QWEN_HOME/indexes)."""


@index_group.command("add")
@click.argument("name")
@click.argument("paths", nargs=-1, required=True, type=click.Path())
@click.option("--model", "-m", envvar="EDGE_QWEN_MODEL", default=None, help="Model whose tokenizer sizes the chunks.")
@click.option("--chunk-tokens", type=click.IntRange(32, 4000), default=300, show_default=True,
              help="Chunk size in tokens (new indexes only).")
@click.option("--embed-model", type=click.Path(), default=None,
              help="An embedding GGUF: store dense vectors too.")
@click.option("--skip-errors", is_flag=True, help="Index the readable files and list the others, instead of failing.")
@quiet_option
def index_add(name, paths, model, chunk_tokens, embed_model, skip_errors, quiet):
    """Add files and folders (txt, md, html, pdf, code) to index NAME; only changed files are read again."""
    from ..progress import progress
    from ..rag.index import build, check_name
    from ..rag.tokens import token_counter

    check_name(name)
    from ..rag.documents import DocumentError
    from ..files import missing_path_note

    for p in paths:  # before a model (or its tokenizer) loads
        if not os.path.lexists(p):
            raise DocumentError(f"{p} does not exist ({missing_path_note(p)}); check the path", param="paths")
    if embed_model:
        _check_embed_model(embed_model)
    count = token_counter(model)
    embedder = None
    if embed_model:
        from ..rag.embed import Embedder

        embedder = Embedder(embed_model)
    with progress(None, f"index {name}", "file", quiet=quiet) as bar:
        def step(done: int, total: int) -> None:
            bar.total = total
            bar.n = done
            bar.refresh()

        r = build(name, list(paths), count, chunk_tokens=chunk_tokens, embedder=embedder, skip_errors=skip_errors,
                  progress=step)
    for w in r.warnings:
        click.echo(f"warning: {w}", err=True)
    for s in r.skipped:
        if not quiet:
            click.echo(f"skipped: {s}", err=True)
    click.echo(f"index {name}: {len(r.added)} added, {len(r.updated)} updated, {len(r.unchanged)} unchanged, "
               f"{len(r.removed)} removed, {len(r.skipped)} skipped; {r.chunks} new chunks")


@index_group.command("ls")
@click.argument("name", required=False)
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
def index_ls(name, as_json):
    """List the indexes, or the files of index NAME."""
    from ..rag.index import DocIndex, list_indexes

    if name:
        with DocIndex.open(name) as ix:
            files = ix.files()
        if as_json:
            click.echo(json.dumps(files, ensure_ascii=False, indent=2))
        for f in files if not as_json else []:
            click.echo(f"{f['chunks']:5d} chunks  {f['size']:>10d} B  {f['path']}")
        return
    rows = list_indexes()
    if as_json:
        click.echo(json.dumps(rows, ensure_ascii=False, indent=2))
        return
    if not rows:
        click.echo("no indexes; make one with `edge-qwen index add NAME PATH...`")
    for r in rows:
        if "error" in r:
            click.echo(f"{r['name']}  UNUSABLE: {r['error']}")
        else:
            click.echo(f"{r['name']}  {r['files']} files, {r['chunks']} chunks, {r['bytes'] / 1e6:.1f} MB"
                       + (f", vectors from {r['embed_model']}" if r.get("embed_model") else ""))


@index_group.command("rm")
@click.argument("name")
def index_rm(name):
    """Delete index NAME (your files are not touched)."""
    from ..rag.index import remove_index

    click.echo(f"removed {remove_index(name)}")
