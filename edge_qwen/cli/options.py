"""Option decorators shared by several commands."""

from __future__ import annotations

import click

quiet_option = click.option("--quiet", "-q", is_flag=True, help="No progress bars or chatter.")
force_option = click.option("--force", is_flag=True, help="Overwrite an existing output file.")


def model_argument(required: bool = False):
    """A MODEL argument: a GGUF path or store name; $EDGE_QWEN_MODEL or the default model if omitted."""
    return click.argument("model", required=required, envvar="EDGE_QWEN_MODEL")


def sampling_options(f):
    """--temperature, --top-p, --max-tokens, --seed, --stop (repeatable) and --ctx, passed as keywords."""
    options = [
        click.option("--temperature", "-t", type=click.FloatRange(0.0, 2.0), default=0.7, show_default=True,
                     help="Sampling temperature; 0 is greedy (always the most likely token)."),
        click.option("--top-p", type=click.FloatRange(0.0, 1.0, min_open=True), default=0.9, show_default=True,
                     help="Nucleus sampling: keep the most likely tokens that together reach this probability."),
        click.option("--max-tokens", "-n", type=click.IntRange(min=1), default=1024, show_default=True,
                     help="Most tokens to generate per reply."),
        click.option("--seed", type=int, default=None, help="Random seed for reproducible sampling."),
        click.option("--stop", multiple=True, help="Stop before this text (repeatable)."),
        click.option("--ctx", "n_ctx", type=click.IntRange(16, 131072), default=4096, show_default=True,
                     help="Context window in tokens (past the trained 32768 of Qwen2.5: YaRN, up to 131072)."),
    ]
    for option in reversed(options):
        f = option(f)
    return f
