"""The demo pipeline behind `edge-qwen demo` (library function, so apps and tests can call it)."""

from __future__ import annotations

from collections.abc import Callable


def run_demo(quiet: bool = False, echo: Callable[[str], None] = print) -> dict:
    """Assemble the default model and report it. Later steps are added as features land."""
    from .gguf_file import check_gguf
    from .store import default_model_path

    path = default_model_path(quiet=quiet)
    info = check_gguf(path)
    echo(f"default model: {path} ({info.size / 1e6:.1f} MB, {info.n_tensors} tensors, "
         f"{info.bits_per_weight:.2f} bits/weight)")
    return {"default_model": str(path)}
