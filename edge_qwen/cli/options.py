"""Option decorators shared by several commands, and the small helpers their bodies call.

llama.cpp's common flags are aliases of ours where they mean the same thing (`-m`, `-c/--ctx-size`,
`-n/--n-predict`, `-t/--threads`, `-ngl/--n-gpu-layers`, `--temp`, `--top-k`, `--top-p`, `--seed`,
`-p/--prompt`), so a llama.cpp or Ollama habit works as typed. Where a short flag meant something
else before (`-t`), `short_threads_option` keeps the old reading for one release, with a notice.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import click

quiet_option = click.option("--quiet", "-q", is_flag=True, help="No progress bars or chatter.")
force_option = click.option("--force", is_flag=True, help="Overwrite an existing output file.")

MODEL_HELP = ("GGUF path, store name (edge-qwen list), pulled repo id, or 'default' "
              "[env: EDGE_QWEN_MODEL].")


def model_argument(required: bool = False):
    """A MODEL argument: a GGUF path or store name; $EDGE_QWEN_MODEL or the default model if omitted.

    The variable is read by store.resolve_model (not by click), so an error about it names it.
    """
    return click.argument("model", required=required)


def model_option(f):
    """-m/--model MODEL, the llama.cpp spelling of a command's positional MODEL (passed as `model_opt`)."""
    return click.option("-m", "--model", "model_opt", metavar="MODEL", default=None, help=MODEL_HELP)(f)


def pick_model(positional: str | None, option: str | None) -> str | None:
    """The one model a command was given, positionally or with -m; both and different is a usage error."""
    if positional is not None and option is not None and positional != option:
        raise click.UsageError(f"two models given: {positional!r} and -m {option!r}; give one")
    return option if option is not None else positional


def gpu_layers_option(f):
    """-ngl/--n-gpu-layers N (llama.cpp's flag), passed as `n_gpu_layers`."""
    return click.option("-ngl", "--n-gpu-layers", "n_gpu_layers", type=click.IntRange(min=-1), default=None,
                        metavar="N", help="Layers to offload to the GPU (-1: all; default: all when the build "
                                          "can offload, as --device auto decides).")(f)


def deprecated(message: str) -> None:
    """One line on stderr for a flag whose meaning changes (kept one release)."""
    click.echo(f"note: {message}", err=True)


def short_threads_option(threads_param: str, legacy: str | None = None,
                         legacy_read: Callable[[str], Any] | None = None, legacy_flag: str | None = None):
    """`-t N`: threads, as in llama.cpp, stored in `threads_param`.

    Where `-t` meant another option before (`legacy`: chat's --temperature, quantize's --type), a
    value that cannot be a thread count is still read the old way (`legacy_read`) for one release,
    and every use of `-t` there prints a one-line notice saying which meaning it took.
    """
    old = f" (before: {legacy_flag}; a value that is not a thread count is still read that way)" if legacy else ""

    def deco(f):
        @functools.wraps(f)
        def wrapper(*args: Any, t_flag: str | None = None, **kw: Any) -> Any:
            if t_flag is not None:
                ctx = click.get_current_context()
                given_threads = kw.get(threads_param)
                try:
                    n = int(t_flag)
                except ValueError:
                    n = None
                if n is not None and n >= 1:
                    if given_threads is not None and given_threads != n:
                        raise click.UsageError(f"-t {t_flag} and --threads {given_threads} disagree; give one")
                    kw[threads_param] = n
                    if legacy:
                        deprecated(f"-t {t_flag} means --threads {n} now, as in llama.cpp (it meant {legacy_flag} "
                                   f"before); for {legacy_flag} write {legacy_flag} {t_flag}")
                elif legacy and legacy_read is not None:
                    source = ctx.get_parameter_source(legacy)
                    if source is not None and source.name == "COMMANDLINE":
                        raise click.UsageError(f"-t {t_flag} and {legacy_flag} both given; -t means --threads now")
                    try:
                        kw[legacy] = legacy_read(t_flag)
                    except (ValueError, click.BadParameter) as e:
                        raise click.BadParameter(f"{t_flag!r} is neither a thread count nor a valid {legacy_flag} "
                                                 f"value ({e})", param_hint="-t") from None
                    deprecated(f"-t {t_flag} is read as {legacy_flag} {t_flag} for this release only: -t means "
                               f"--threads now, as in llama.cpp; write {legacy_flag} {t_flag}")
                else:
                    raise click.BadParameter(f"{t_flag!r} is not a thread count (a whole number, 1 or more)",
                                             param_hint="-t")
            return f(*args, **kw)

        return click.option("-t", "t_flag", metavar="N", default=None,
                            help=f"CPU threads, as llama.cpp's -t{old}.")(wrapper)

    return deco


def read_temperature(text: str) -> float:
    """A --temperature value, checked as the option checks it (0 to 2)."""
    value = float(text)
    if not 0.0 <= value <= 2.0:
        raise ValueError("a temperature is between 0 and 2")
    return value


def sampling_options(f):
    """--temperature, --top-p, --top-k, --max-tokens, --seed, --stop (repeatable) and --ctx, passed as keywords.

    Each also answers to its llama.cpp name: --temp, -n/--n-predict, -c/--ctx-size.
    """
    options = [
        click.option("--temperature", "--temp", type=click.FloatRange(0.0, 2.0), default=0.7, show_default=True,
                     help="Sampling temperature; 0 is greedy (always the most likely token)."),
        click.option("--top-p", type=click.FloatRange(0.0, 1.0, min_open=True), default=0.9, show_default=True,
                     help="Nucleus sampling: keep the most likely tokens that together reach this probability."),
        click.option("--top-k", type=click.IntRange(min=0), default=0, show_default=True,
                     help="Keep only the K most likely tokens (0: no cut)."),
        click.option("--max-tokens", "-n", "--n-predict", "max_tokens", type=click.IntRange(min=1), default=1024,
                     show_default=True, help="Most tokens to generate per reply."),
        click.option("--seed", type=int, default=None, help="Random seed for reproducible sampling."),
        click.option("--stop", multiple=True, help="Stop before this text (repeatable)."),
        click.option("--ctx", "-c", "--ctx-size", "n_ctx", type=click.IntRange(16, 131072), default=4096,
                     show_default=True,
                     help="Context window in tokens (past the trained 32768 of Qwen2.5: YaRN, up to 131072)."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def model_path(value: str | None) -> str:
    """A model argument as a path: an existing path as given (its own checks name it), else resolved as a
    store name, pulled repo id or `default` (store.resolve_model). Something that looks like a file path
    and is missing is returned as given, for the command's own "does not exist" message."""
    from pathlib import Path

    if value is not None and value != "default" and Path(value).expanduser().exists():
        return value
    from ..errors import ModelNotFoundError
    from ..store import resolve_model

    try:
        return str(resolve_model(value))
    except ModelNotFoundError:
        looks_like_a_file = value is not None and (
            value.endswith(".gguf") or "\\" in value or value.startswith((".", "/", "~")) or value.count("/") > 1)
        if looks_like_a_file:
            return value
        raise
