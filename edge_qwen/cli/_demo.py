"""`edge-qwen demo`: the main job, offline, on the default model.

It grows as features land: assemble the default model, rebuild a Hugging Face checkpoint
from it, convert that checkpoint back to GGUF with edge-qwen, quantize, chat and answer in
JSON.
"""

from __future__ import annotations

import click

from . import main
from .options import quiet_option


@main.command()
@quiet_option
def demo(quiet: bool) -> None:
    """Run the whole pipeline offline on the default model and print what it made."""
    from ..demo import run_demo

    run_demo(quiet=quiet, echo=click.echo)
