"""`edge-qwen chat` and `edge-qwen doctor`: thin shells over EdgeQwen and edge_qwen.device.

`one_shot` and `repl` are plain functions (an EdgeQwen, text in, a write callback out) so
desktop apps and tests drive the same code the command runs.
"""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import click

from . import main
from .options import model_argument, sampling_options

REPL_HELP = "Type a message and press Enter. /reset starts a new conversation, /exit (or Ctrl-D) quits."


def _stream_reply(llm, messages: list[dict], write: Callable[[str], None], **kw: Any) -> tuple[str, str]:
    """Stream one reply through `write`; return (text, finish_reason). Ctrl-C cancels the reply only."""
    parts, finish = [], "stop"
    stream = llm.generate(messages, **kw)
    try:
        for chunk in stream:
            if chunk.text:
                write(chunk.text)
                parts.append(chunk.text)
            if chunk.finish_reason:
                finish = chunk.finish_reason
    except KeyboardInterrupt:
        finish = "cancelled"
    finally:
        stream.close()  # releases the model even when interrupted
    return "".join(parts), finish


def one_shot(llm, prompt: str, write: Callable[[str], None], *, system: str | None = None,
             **kw: Any) -> tuple[str, str]:
    """Answer one prompt, streaming the text through `write`; return (text, finish_reason)."""
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    text, finish = _stream_reply(llm, messages, write, **kw)
    write("\n")
    return text, finish


def repl(llm, lines: Iterable[str], write: Callable[[str], None], *, system: str | None = None,
         prompt: Callable[[], None] | None = None, **kw: Any) -> list[dict]:
    """Multi-turn chat over input `lines`; return the final conversation.

    "/exit" ends, "/reset" forgets the conversation (keeping the system prompt). Each reply is
    streamed through `write` and appended to the history, so later turns see earlier ones.
    """
    head = [{"role": "system", "content": system}] if system else []
    history = list(head)
    if prompt:
        prompt()
    for raw in lines:
        line = raw.rstrip("\r\n")
        cmd = line.strip()
        if cmd in ("/exit", "/quit", "/bye"):
            break
        if cmd == "/reset":
            history = list(head)
            write("(conversation reset)\n")
        elif cmd:
            history.append({"role": "user", "content": line})
            text, finish = _stream_reply(llm, history, write, **kw)
            write("\n")
            if finish == "length":
                write("(reply cut at --max-tokens)\n")
            elif finish == "cancelled":
                write("(cancelled)\n")
            history.append({"role": "assistant", "content": text})
        if prompt:
            prompt()
    return history


def _response_format(as_json: bool, schema: str | None) -> dict | None:
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
    if as_json:
        return {"type": "json_object"}
    return None


def _split_model_prompt(model: str | None, prompt: str | None) -> tuple[str | None, str | None]:
    """With one positional argument, decide whether it names a model or is the prompt.

    It is a model when it ends in .gguf, contains a path separator, is an existing file or a
    name in the store; anything else is the prompt for the default model.
    """
    if model is None or prompt is not None:
        return model, prompt
    from ..store import models_dir

    p = Path(model).expanduser()
    looks_like_model = (model.endswith(".gguf") or "/" in model or "\\" in model or p.exists()
                        or (models_dir() / f"{model}.gguf").is_file() or (models_dir() / model).is_file())
    return (model, None) if looks_like_model else (None, model)


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


@main.command()
@model_argument()
@click.argument("prompt", required=False)
@click.option("--system", "-s", help="System prompt.")
@click.option("--json", "as_json", is_flag=True, help="Answer with a JSON object.")
@click.option("--schema", type=click.Path(), help="Answer with JSON valid against this schema file.")
@click.option("--device", type=click.Choice(["auto", "cpu", "metal", "cuda"]), default="auto", show_default=True,
              help="Where to run the model.")
@click.option("--mmproj", type=click.Path(), help="Vision tower GGUF of a Qwen2.5-VL MODEL "
              "(edge-qwen convert --mmproj); needed for --image.")
@click.option("--image", "images", multiple=True, metavar="FILE|URL", help="An image to ask about (repeatable).")
@click.option("--allow-http-images", is_flag=True, help="Let --image fetch http(s) URLs (offline otherwise).")
@click.option("--steps", is_flag=True, help="Reason step by step first (reasoning on stderr, the answer on stdout).")
@click.option("--kv-type", type=click.Choice(["f16", "q8_0", "q4_0"]), default="f16", show_default=True,
              help="KV cache type (q8_0/q4_0 about halve/quarter its memory; flash attention turns on).")
@sampling_options
def chat(model: str | None, prompt: str | None, system: str | None, as_json: bool, schema: str | None,
         device: str, mmproj: str | None, images: tuple[str, ...], allow_http_images: bool, steps: bool, kv_type: str,
         temperature: float, top_p: float, max_tokens: int, seed: int | None,
         stop: tuple[str, ...], n_ctx: int) -> None:
    """Chat with MODEL (default: the default model). One reply to PROMPT, or interactive without it.

    With --mmproj and --image: one reply about the images (Qwen2.5-VL).
    """
    from ..runtime import EdgeQwen

    model, prompt = _split_model_prompt(model, prompt)
    if images or mmproj:
        _image_chat(model, prompt, system, mmproj, images, allow_http_images, as_json or bool(schema) or bool(stop),
                    temperature=temperature, top_p=top_p, max_tokens=max_tokens, seed=seed, n_ctx=n_ctx)
        return
    fmt = _response_format(as_json, schema)
    kw = {"temperature": temperature, "top_p": top_p, "max_tokens": max_tokens, "seed": seed,
              "stop": list(stop) or None, "response_format": fmt}

    def write(text: str) -> None:
        click.echo(text, nl=False)

    # Interactive turns extend the previous prompt: reuse its KV cache there.
    with _schema_errors(schema, as_json), EdgeQwen(model, n_ctx=n_ctx, device=device, kv_type=kv_type,
                                                   reuse_prefix=prompt is None) as llm:
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
            _, finish = one_shot(llm, prompt, write, system=system, **kw)
            if finish == "length":
                click.echo(f"(reply cut at --max-tokens {max_tokens})", err=True)
            return
        stdin = sys.stdin
        interactive = stdin.isatty()
        if interactive:
            click.echo(f"{llm.model_name} on {llm.device}. {REPL_HELP}", err=True)
        repl(llm, stdin, write, system=system,
             prompt=(lambda: click.echo(">>> ", nl=False, err=True)) if interactive else None, **kw)


@contextlib.contextmanager
def _schema_errors(schema: str | None, as_json: bool):
    """JSON-engine errors worded for the CLI: the option and file the user gave, not `response_format`."""
    from ..errors import EdgeQwenError

    try:
        yield
    except EdgeQwenError as e:
        if e.param != "response_format" or not (schema or as_json):
            raise
        where = f"--schema {schema}" if schema else "--json"
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
