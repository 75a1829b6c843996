"""`edge-qwen serve`: the OpenAI-compatible and Qwen-shaped HTTP server (edge_qwen.serve.app.serve)."""

from __future__ import annotations

import click

from . import main
from .options import gpu_layers_option, quiet_option, short_threads_option


@main.command("serve")
@click.argument("model_paths", nargs=-1, metavar="[MODEL]...")
@click.option("--model", "-m", "named", multiple=True, metavar="[NAME=]MODEL",
              help="Serve MODEL (a path, store name or pulled repo id) under NAME (repeatable); without NAME=, "
                   "as bare MODELs are: named by their file stem.")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind (0.0.0.0 exposes it to the network).")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(1, 65535), help="Port to listen on.")
@click.option("--api-key", envvar="EDGE_QWEN_API_KEY", default=None,
              help="Require `Authorization: Bearer KEY` on every endpoint but /health [env: EDGE_QWEN_API_KEY].")
@click.option("--api-key-file", type=click.Path(), default=None,
              help="Read the API key from the first line of this file (it stays out of `ps` and shell history).")
@click.option("--ctx", "-c", "--ctx-size", "n_ctx", default=4096, show_default=True, type=click.IntRange(256, 131072),
              help="Context window per model (tokens).")
@click.option("--max-queue", default=16, show_default=True, type=click.IntRange(0, 10_000),
              help="Requests that may wait per model behind the --parallel generating; beyond: 503 + Retry-After.")
@click.option("--parallel", "parallel", default=None, type=click.IntRange(1, 256),
              help="Generations decoded together per model (continuous batching). Default: 4 on a CPU, 8 on a "
                   "GPU, fewer when the KV cache for that many --ctx slots would exceed a quarter of the RAM.")
@click.option("--max-tokens-limit", default=None, type=click.IntRange(1), help="Cap on any request's max_tokens.")
@click.option("--threads", "n_threads", default=None, type=click.IntRange(1),
              help="CPU threads per model (default: one per physical core).")
@short_threads_option("n_threads")
@gpu_layers_option
@click.option("--max-body", default=1_000_000, show_default=True, type=click.IntRange(1024),
              help="Largest request body in bytes; larger is 413.")
@click.option("--prompt-cache/--no-prompt-cache", default=True, show_default=True,
              help="Reuse the KV cache of the longest cached prompt prefix (faster first token), only between requests "
                   "with the same API key and cache_salt. "
                   "Requests with a seed are always evaluated afresh and reproduce exactly; --no-prompt-cache "
                   "does that for every request.")
@click.option("--cache-ram", "cache_ram", default=512, show_default=True, type=click.IntRange(0, 1 << 20),
              metavar="MIB", help="Host memory per model for conversations cut from their slot, restored when a "
                                  "later prompt continues them (llama-server's --cache-ram); 0 turns it off.")
@click.option("--cors-origin", "cors_origins", multiple=True, metavar="ORIGIN",
              help="Let web pages from ORIGIN (e.g. http://localhost:5173; * for any) call the API from a browser. "
                   "Repeatable; none by default.")
@click.option("--allowed-host", "allowed_hosts", multiple=True, metavar="NAME",
              help="Also answer requests whose Host header is NAME (e.g. mylaptop.local; * for any). By default only "
                   "the loopback names and the --host address are answered (DNS-rebinding protection).")
@click.option("--read-timeout", default=10.0, show_default=True, type=click.FloatRange(0.1, 3600),
              help="Seconds a request (head and body) may take to arrive; an idle or trickling connection gets 408.")
@click.option("--kv-type", type=click.Choice(["f16", "q8_0", "q4_0"]), default="f16", show_default=True,
              help="KV cache type (q8_0/q4_0 about halve/quarter its memory; flash attention turns on).")
@click.option("--flash-attn/--no-flash-attn", default=True, show_default=True,
              help="Flash attention (as llama-server's default): faster batched decoding and long prompts; "
                   "--no-flash-attn needs --kv-type f16.")
@click.option("--alias", "aliases", multiple=True, metavar="PATTERN=NAME",
              help="Answer requests for model PATTERN (a name or a pattern like 'claude-*') with the served model NAME "
                   "(e.g. for Anthropic clients such as Claude Code). Repeatable.")
@click.option("--mcp", "mcp_config", type=click.Path(), metavar="CONFIG",
              help='MCP servers ({"mcpServers": ...}): their tools are used only by requests that name them '
                   "(mcp_servers, or a Responses mcp tool). Needs --api-key unless --host is loopback.")
@click.option("--mcp-confirm", is_flag=True, help="Each MCP call waits for a yes from the client (the web page asks).")
@click.option("--mcp-max-rounds", type=click.IntRange(1, 100), default=8, show_default=True,
              help="Most rounds of MCP tool calls per request.")
@click.option("--mcp-timeout", type=click.FloatRange(0.1, 3600), default=60.0, show_default=True,
              help="Seconds one MCP tool call may take.")
@quiet_option
def serve_command(model_paths: tuple[str, ...], named: tuple[str, ...], host: str, port: int, api_key: str | None,
                  n_ctx: int, max_queue: int, parallel: int | None, max_tokens_limit: int | None, n_threads: int | None, max_body: int,
                  prompt_cache: bool, cache_ram: int, cors_origins: tuple[str, ...], allowed_hosts: tuple[str, ...],
                  read_timeout: float, kv_type: str, flash_attn: bool | None, quiet: bool,
                  api_key_file: str | None = None, n_gpu_layers: int | None = None, aliases: tuple[str, ...] = (),
                  mcp_config: str | None = None, mcp_confirm: bool = False, mcp_max_rounds: int = 8,
                  mcp_timeout: float = 60.0) -> None:
    """Serve models over HTTP: the OpenAI, Ollama, Qwen and Anthropic APIs, the chat page, /health.

    With no model, serves the default model as "qwen2.5". Models are checked and loaded at
    startup, before the port opens. Ctrl-C stops the server cleanly.
    """
    from ..serve.app import model_table, serve
    from ..serve.security import exposure_warning, read_api_key_file

    if api_key_file:
        if api_key:
            raise click.UsageError("give the key once: --api-key (or EDGE_QWEN_API_KEY) or --api-key-file")
        api_key = read_api_key_file(api_key_file)
    warning = exposure_warning(host, api_key)
    if warning:
        click.echo(f"warning: {warning}", err=True)
    bare = tuple(m for m in named if "=" not in m)  # -m MODEL, llama.cpp's spelling of a bare MODEL
    model_paths, named = model_paths + bare, tuple(m for m in named if "=" in m)
    alias_table = {}
    for spec in aliases:
        pattern, sep, target = spec.partition("=")
        if not sep or not pattern.strip() or not target.strip():
            raise click.BadParameter(f"{spec!r}: give PATTERN=NAME, e.g. --alias 'claude-*=qwen2.5'",
                                     param_hint="--alias")
        alias_table[pattern.strip()] = target.strip()

    serve(model_table(model_paths, named), host=host, port=port, api_key=api_key or None, max_queue=max_queue,
          max_body_bytes=max_body, n_ctx=n_ctx, max_tokens_limit=max_tokens_limit, quiet=quiet,
          prompt_cache=prompt_cache, cors_origins=cors_origins, parallel=parallel, allowed_hosts=allowed_hosts,
          read_timeout=read_timeout,
          **({"n_threads": n_threads} if n_threads else {}), **({"kv_type": kv_type} if kv_type != "f16" else {}),
          **({"n_gpu_layers": n_gpu_layers} if n_gpu_layers is not None else {}),
          flash_attn=flash_attn, host_cache_mb=cache_ram if prompt_cache else 0, aliases=alias_table,
          mcp=mcp_config, mcp_options={"max_rounds": mcp_max_rounds, "timeout": mcp_timeout, "confirm": mcp_confirm})


def _server_options(f):
    for opt in reversed([
        click.option("--host", default="127.0.0.1", show_default=True, help="Address of the server."),
        click.option("--port", default=8000, show_default=True, type=click.IntRange(1, 65535),
                     help="Port of the server."),
        click.option("--api-key", envvar="EDGE_QWEN_API_KEY", default=None,
                     help="The server's API key, if it needs one [env: EDGE_QWEN_API_KEY]."),
    ]):
        f = opt(f)
    return f


@main.command("ps")
@_server_options
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
def ps_cmd(host: str, port: int, api_key: str | None, as_json: bool) -> None:
    """List the models a running `edge-qwen serve` has loaded (Ollama's `ps`)."""
    import json

    from ..serve.remote import base_url, loaded_models

    models = loaded_models(base_url(host, port), api_key)
    if as_json:
        click.echo(json.dumps(models, ensure_ascii=False, indent=2))
        return
    from ._store import _size, _table

    rows = [[m.get("name", "?"), (m.get("details") or {}).get("quantization_level", "?"), _size(m.get("size") or 0),
             str(m.get("context_length") or "?"), m.get("model") if m.get("model") != m.get("name") else ""]
            for m in models]
    if not rows:
        click.echo(f"no models loaded by the server at {base_url(host, port)}")
        return
    click.echo(_table(rows, ["NAME", "TYPE", "SIZE", "CONTEXT", ""]))


@main.command("stop")
@click.argument("model")
@_server_options
def stop_cmd(model: str, host: str, port: int, api_key: str | None) -> None:
    """Ask a running `edge-qwen serve` to unload MODEL (it loads again on the next request)."""
    from ..serve.remote import base_url, unload_model

    unload_model(base_url(host, port), model, api_key)
    click.echo(f"stopped {model}")
