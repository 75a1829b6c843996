"""`python -m edge_qwen.cli`: the same as the `edge-qwen` command."""

from . import main

main(prog_name="edge-qwen")
