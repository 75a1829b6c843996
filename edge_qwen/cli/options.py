"""Option decorators shared by several commands."""

from __future__ import annotations

import click

quiet_option = click.option("--quiet", "-q", is_flag=True, help="No progress bars or chatter.")
force_option = click.option("--force", is_flag=True, help="Overwrite an existing output file.")


def model_argument(required: bool = False):
    """A MODEL argument: a GGUF path or store name; $EDGE_QWEN_MODEL or the default model if omitted."""
    return click.argument("model", required=required, envvar="EDGE_QWEN_MODEL")
