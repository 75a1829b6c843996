"""`edge-qwen chat`, `run` and `doctor`: thin shells over EdgeQwen, edge_qwen.chat_session and edge_qwen.device.

`one_shot` and `repl` are plain functions (an EdgeQwen, text in, a write callback out) so
desktop apps and tests drive the same code the command runs.
"""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Callable, Iterable
from typing import Any

import click

from . import main
from .options import (deprecated, gpu_layers_option, model_argument, model_option, pick_model, read_temperature,
                      sampling_options, short_threads_option)

REPL_HELP = 'Type a message and press Enter ("""  for several lines). /? for help, /bye (or Ctrl-D) quits.'


def one_shot(llm, prompt: str, write: Callable[[str], None], *, system: str | None = None,
             **kw: Any) -> tuple[str, str, Any]:
    """Answer one prompt, streaming the text through `write`; return (text, finish_reason, timings)."""
    from ..chat_session import stream_reply

    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    text, finish, timings = stream_reply(llm, messages, write, **kw)
    write("\n")
    return text, finish, timings


def repl(llm, lines: Iterable[str], write: Callable[[str], None], *, system: str | None = None,
         prompt: Callable[[], None] | None = None, verbose: bool = False,
         note: Callable[[str], None] | None = None, **kw: Any) -> list[dict]:
    """Multi-turn chat over input `lines` (edge_qwen.chat_session: /help, /set, /save ...); the final conversation."""
    from ..chat_session import ChatSession

    session = ChatSession(llm, write, system=system, verbose=verbose, note=note, info=lambda: _model_lines(llm),
                          **kw)
    return session.feed(lines, prompt)


def _model_lines(llm) -> list[str]:
    """`/show info` in a chat: the model's details, as `edge-qwen show` prints them."""
    from ..catalog import info_rows, model_info

    return [f"{k:<16}{v}" for k, v in info_rows(model_info(str(llm.model_path)))]


def _response_format(json_object: bool, schema: str | None) -> dict | None:
    if schema is not None:
        from ..files import check_input_file

        path = check_input_file(schema, "schema file (--schema)", "give a JSON schema file")  # one line, not usage
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except OSError as e:
            raise click.BadParameter(f"cannot read {path}: {e.strerror}", param_hint="--schema") from None
        except json.JSONDecodeError as e:
            raise click.BadParameter(f"{path} is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}; "
                                     "fix the file so it holds one JSON schema object", param_hint="--schema") from None
        except UnicodeDecodeError:
            raise click.BadParameter(f"{path} is not UTF-8 text; save the schema as UTF-8 JSON",
                                     param_hint="--schema") from None
        if not isinstance(data, dict):
            kind = {list: "array", str: "string", bool: "boolean", int: "number", float: "number"}.get(type(data), "null")
            raise click.BadParameter(f"{path} holds a JSON {kind}, not a schema object; the file must "
                                     'hold one object such as {"type": "object", "properties": {...}}',
                                     param_hint="--schema")
        from ..engine.json_normalize import plan_schema
        from ..errors import SchemaError

        try:  # before the model loads: every blocker named, with the file the user gave
            plan_schema(data, param=f"--schema {path}")
        except SchemaError as e:
            raise click.ClickException(e.message) from None
        return {"type": "json_schema", "json_schema": {"name": path.stem, "schema": data, "strict": True}}
    if json_object:
        return {"type": "json_object"}
    return None


def _split_model_prompt(model: str | None, prompt: str | None) -> tuple[str | None, str | None]:
    """With one positional argument, decide whether it names a model or is the prompt (store.model_or_prompt).

    A clear prompt goes to the default model; one plain word that names no model is refused with
    both readings spelled out.
    """
    if model is None or prompt is not None:
        return model, prompt
    from ..store import model_or_prompt

    kind = model_or_prompt(model)
    if kind == "ambiguous":
        raise click.UsageError(f"{model!r} is not a model in the store nor a file. To ask the default model, "
                               f"write: edge-qwen chat -p {model!r} (or chat default {model!r}); to use a model, "
                               "give its GGUF path or a name from `edge-qwen list`")
    return (model, None) if kind == "model" else (None, model)


def _image_chat(model: str | None, prompt: str | None, system: str | None, mmproj: str | None,
                images: tuple[str, ...], allow_http: bool, unsupported: bool, *, temperature: float, top_p: float,
                max_tokens: int, seed: int | None, n_ctx: int) -> None:
    """`chat --mmproj P --image F PROMPT`: one streamed reply through edge_qwen.vision."""
    from ..store import resolve_model
    from ..vision import VisionChat, image_messages

    if not mmproj:
        raise click.BadParameter("images need the model's vision tower: add --mmproj mmproj-....gguf",
                                 param_hint="--mmproj")
    if not images or prompt is None:
        raise click.BadParameter("give --image FILE and a PROMPT (image chat is one reply)", param_hint="--image")
    if unsupported:
        raise click.BadParameter("--json, --schema and --stop are not supported with images yet", param_hint="--image")
    from ..files import check_input_file

    check_input_file(mmproj, "vision tower (--mmproj)", "give the mmproj GGUF of the model (edge-qwen convert --mmproj)")
    with VisionChat(resolve_model(model), mmproj, n_ctx=n_ctx) as vc:
        for c in vc.chat(image_messages(prompt, list(images), system), stream=True, allow_files=True,
                         allow_http=allow_http, temperature=temperature, top_p=top_p, max_tokens=max_tokens,
                         seed=seed):
            text = c["choices"][0]["delta"].get("content")
            if text:
                click.echo(text, nl=False)
    click.echo()


def chat_options(f):
    """Every option of `chat` (and `run`, which is chat with MODEL first, as Ollama's run)."""
    for opt in reversed([
        model_option,
        click.option("-p", "--prompt", "prompt_opt", metavar="PROMPT", default=None,
                     help="The prompt (llama.cpp's -p); the same as giving PROMPT."),
        click.option("--system", "-s", help="System prompt."),
        click.option("--json", "as_json", is_flag=True,
                     help="Print the reply as machine-readable JSON (content, finish reason, token counts)."),
        click.option("--json-object", is_flag=True, help="Constrain the answer to a JSON object."),
        click.option("--schema", type=click.Path(), help="Answer with JSON valid against this schema file."),
        click.option("--device", type=click.Choice(["auto", "cpu", "metal", "cuda"]), default="auto",
                     show_default=True, help="Where to run the model."),
        gpu_layers_option,
        click.option("--threads", type=click.IntRange(min=1), default=None,
                     help="CPU threads (default: one per physical core)."),
        short_threads_option("threads", legacy="temperature", legacy_read=read_temperature,
                             legacy_flag="--temperature"),
        click.option("--mmproj", type=click.Path(), help="Vision tower GGUF of a Qwen2.5-VL, Qwen3-VL or Qwen3.5 MODEL "
                     "(edge-qwen convert --mmproj); needed for --image."),
        click.option("--image", "images", multiple=True, metavar="FILE|URL", help="An image to ask about (repeatable)."),
        click.option("--allow-http-images", is_flag=True, help="Let --image fetch http(s) URLs (offline otherwise)."),
        click.option("--steps", is_flag=True,
                     help="Reason step by step first (reasoning on stderr, the answer on stdout)."),
        click.option("--kv-type", type=click.Choice(["f16", "q8_0", "q4_0"]), default="f16", show_default=True,
                     help="KV cache type (q8_0/q4_0 about halve/quarter its memory; flash attention turns on)."),
        click.option("--verbose", is_flag=True, help="After each answer, print token counts and tokens per second "
                                                     "(prompt and generation) on stderr."),
        click.option("--mcp", "mcp_config", type=click.Path(), metavar="CONFIG",
                     help='MCP servers ({"mcpServers": ...}, as Claude Desktop/Cursor): their tools are offered to '
                          "the model and each call is shown (and logged) on stderr."),
        click.option("--mcp-confirm", is_flag=True, help="Ask before each MCP tool call."),
        click.option("--mcp-max-rounds", type=click.IntRange(1, 100), default=8, show_default=True,
                     help="Most rounds of MCP tool calls per reply; then the model answers without tools."),
        click.option("--mcp-timeout", type=click.FloatRange(0.1, 3600), default=60.0, show_default=True,
                     help="Seconds one MCP tool call may take; past it the model gets a timeout error as the result."),
        sampling_options,
    ]):
        f = opt(f)
    return f


@main.command()
@model_argument()
@click.argument("prompt", required=False)
@chat_options
def chat(model: str | None, prompt: str | None, **kw: Any) -> None:
    """Chat with MODEL (default: the default model). One reply to PROMPT, or interactive without it.

    MODEL may be left out: a single argument that is clearly a question is the PROMPT for the
    default model. With --mmproj and --image: one reply about the images (Qwen2.5-VL, Qwen3-VL, Qwen3.5).
    """
    model, prompt = _with_model_option(model, prompt, kw.pop("model_opt"))
    model, prompt = _split_model_prompt(model, prompt)
    _chat(model, prompt, **kw)


@main.command("run")
@click.argument("model", required=False)
@click.argument("prompt", required=False)
@chat_options
def run_command(model: str | None, prompt: str | None, **kw: Any) -> None:
    """Run MODEL: one reply to PROMPT, or an interactive chat without it (Ollama's `run`).

    MODEL is a GGUF path, a store name (edge-qwen list), a pulled repo id, or `default`.
    """
    model, prompt = _with_model_option(model, prompt, kw.pop("model_opt"))
    if model is None:
        raise click.UsageError("give the MODEL to run (a path, a name from `edge-qwen list`, or default)")
    _chat(model, prompt, **kw)


def _with_model_option(model: str | None, prompt: str | None, model_opt: str | None) -> tuple[str | None, str | None]:
    """With -m MODEL, a single positional argument is the prompt (`chat -m x.gguf "hi"`)."""
    if model_opt is not None and model is not None and prompt is None and model != model_opt:
        return model_opt, model
    return pick_model(model, model_opt), prompt


def _chat(model: str | None, prompt: str | None, *, prompt_opt: str | None, system: str | None, as_json: bool,
          json_object: bool, schema: str | None, device: str, n_gpu_layers: int | None, threads: int | None,
          mmproj: str | None, images: tuple[str, ...], allow_http_images: bool, steps: bool, kv_type: str,
          verbose: bool, temperature: float, top_p: float, top_k: int, max_tokens: int, seed: int | None,
          stop: tuple[str, ...], n_ctx: int, mcp_config: str | None = None, mcp_confirm: bool = False,
          mcp_max_rounds: int = 8, mcp_timeout: float = 60.0) -> None:
    from ..runtime import EdgeQwen

    if prompt_opt is not None:
        if prompt is not None and prompt != prompt_opt:
            raise click.UsageError(f"two prompts given: {prompt!r} and -p {prompt_opt!r}; give one")
        prompt = prompt_opt
    if as_json:
        deprecated("chat --json prints the reply as machine-readable JSON now, as --json does elsewhere; "
                   "to constrain the answer to a JSON object write --json-object")
        if prompt is None:
            raise click.UsageError("--json prints one reply: give a PROMPT")
    if images or mmproj:
        _image_chat(model, prompt, system, mmproj, images, allow_http_images, json_object or bool(schema) or bool(stop),
                    temperature=temperature, top_p=top_p, max_tokens=max_tokens, seed=seed, n_ctx=n_ctx)
        return
    fmt = _response_format(json_object, schema)
    kw = {"temperature": temperature, "top_p": top_p, "max_tokens": max_tokens, "seed": seed,
          "stop": list(stop) or None, "response_format": fmt, **({"top_k": top_k} if top_k else {})}
    hub = None
    if mcp_config is not None:
        if fmt is not None or steps or as_json:
            raise click.BadParameter("--mcp cannot be combined with --json, --json-object, --schema or --steps",
                                     param_hint="--mcp")
        from ._mcp import start_hub, stream_reply

        hub = start_hub(mcp_config, mcp_confirm, mcp_timeout)  # a bad config fails before the model loads
        kw = {**{k: v for k, v in kw.items() if k != "response_format"},
              "reply": lambda llm, messages, write, **rest: stream_reply(
                  llm, messages, write, mcp_max_rounds=mcp_max_rounds, mcp_timeout=mcp_timeout, **rest)}

    def write(text: str) -> None:
        click.echo(text, nl=False)

    def note(text: str) -> None:
        click.echo(text, nl=False, err=True)

    # Interactive turns extend the previous prompt: reuse its KV cache there.
    with _schema_errors(schema, json_object), EdgeQwen(model, n_ctx=n_ctx, device=device, kv_type=kv_type,
                                                       n_threads=threads, n_gpu_layers=n_gpu_layers,
                                                       reuse_prefix=prompt is None, mcp=hub) as llm:
        if steps:
            if prompt is None:
                raise click.UsageError("--steps answers one PROMPT; give it on the command line")
            messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
            for c in llm.chat(messages, stream=True, reasoning="step_by_step", **kw):
                delta = c["choices"][0]["delta"]
                if delta.get("reasoning_content"):
                    click.echo(delta["reasoning_content"], nl=False, err=True)
                if delta.get("content"):
                    write(delta["content"])
            click.echo()
            return
        if prompt is not None:
            _answer_once(llm, prompt, system, as_json, verbose, max_tokens, write, kw)
            return
        stdin = sys.stdin
        interactive = stdin.isatty()
        if interactive:
            click.echo(f"{llm.model_name} on {llm.device}. {REPL_HELP}", err=True)
        repl(llm, stdin, write, system=system, verbose=verbose, note=note,
             prompt=(lambda: click.echo(">>> ", nl=False, err=True)) if interactive else None, **kw)


def _answer_once(llm, prompt: str, system: str | None, as_json: bool, verbose: bool, max_tokens: int,
                 write: Callable[[str], None], kw: dict[str, Any]) -> None:
    """One reply: streamed as text, or (--json) one JSON object once it is complete."""
    import time

    from ..chat_session import timing_lines

    start = time.perf_counter()
    text, finish, timings = one_shot(llm, prompt, (lambda _t: None) if as_json else write, system=system, **kw)
    if as_json:
        out = {"model": llm.model_name, "content": text, "finish_reason": finish}
        if timings is not None:
            out["usage"] = {"prompt_tokens": timings.prompt_tokens, "completion_tokens": timings.completion_tokens,
                            "prompt_ms": round(timings.prompt_ms, 1), "generation_ms": round(timings.gen_ms, 1)}
        click.echo(json.dumps(out, ensure_ascii=False))
    elif finish == "length":
        click.echo(f"(reply cut at --max-tokens {max_tokens})", err=True)
    if verbose and timings is not None:
        click.echo("\n".join(timing_lines(timings, time.perf_counter() - start)), err=True)


@contextlib.contextmanager
def _schema_errors(schema: str | None, json_object: bool):
    """JSON-engine errors worded for the CLI: the option and file the user gave, not `response_format`."""
    from ..errors import EdgeQwenError

    try:
        yield
    except EdgeQwenError as e:
        if e.param != "response_format" or not (schema or json_object):
            raise
        where = f"--schema {schema}" if schema else "--json-object"
        raise click.ClickException(e.message.replace("response_format", where, 1)) from None


@main.command()
@click.option("--no-offload-check", is_flag=True, help="Skip loading the model on the GPU to prove offload.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--model", "model_path", type=click.Path(), default=None,
              help="Also size this GGUF's KV cache (and a hybrid model's recurrent state) for --parallel slots.")
@click.option("--parallel", default=None, type=click.IntRange(min=1),
              help="With --model: slots served at once (default: serve's default for this machine).")
def doctor(no_offload_check: bool, as_json: bool, model_path: str | None, parallel: int | None) -> None:
    """Report the llama.cpp build (CPU/Metal/CUDA), CPU features, threads and the default model."""
    from dataclasses import asdict

    from ..device import doctor as run_doctor

    report = run_doctor(check_offload=not no_offload_check)
    memory = _model_memory(model_path, parallel) if model_path else None
    if as_json:
        click.echo(json.dumps({**asdict(report), **({"model_memory": memory} if memory else {})}, indent=2))
    else:
        for line in report.lines():
            click.echo(line)
        _kv_lines(report.default_model if report.default_model_present else None)
        if memory:
            click.echo(f"{memory['model']}: {memory['describe']}")


def _model_memory(model: str, parallel: int | None) -> dict:
    """KV cache and recurrent state of `model` served with `parallel` slots of 4096 tokens."""
    from ..device import default_parallel, describe_kv, kv_cache_bytes, recurrent_state_bytes, select_device
    from ..gguf_file import check_gguf

    meta = check_gguf(model).metadata
    n = parallel or default_parallel(select_device("auto").device, 4096, meta)
    return {"model": model, "parallel": n, "n_ctx": 4096, "kv_bytes": kv_cache_bytes(meta, 4096 * n),
            "recurrent_state_bytes": recurrent_state_bytes(meta, n), "describe": describe_kv(meta, 4096, n)}


def _kv_lines(model: str | None) -> None:
    """KV cache memory of `model` per context length and kv_type (edge-qwen chat/serve --ctx, --kv-type)."""
    if model is None:
        return
    from ..gguf_file import check_gguf
    from ..long_context import kv_bytes_table

    meta = check_gguf(model).metadata
    for n_ctx in (4096, 16384, 32768, 131072):
        t = kv_bytes_table(meta, n_ctx)
        click.echo(f"KV cache {n_ctx:>6}  " + ", ".join(f"{k} {v / 2**20:.0f} MiB" for k, v in t.items())
                   + ("  (YaRN)" if n_ctx > 32768 else ""))
