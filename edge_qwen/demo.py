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
    result = {"default_model": str(path)}

    # Rebuild a Hugging Face checkpoint from it and convert that back with edge-qwen (once, reused).
    from .convert import default_f16_gguf
    from .rebuild import default_checkpoint

    ckpt = default_checkpoint(quiet=quiet)
    echo(f"checkpoint rebuilt from it: {ckpt} (f16 safetensors, config, tokenizer)")
    f16 = default_f16_gguf(quiet=quiet)
    f16_info = check_gguf(f16)
    echo(f"converted by edge-qwen: {f16} ({f16_info.size / 1e6:.1f} MB, {f16_info.n_tensors} tensors, "
         f"{f16_info.bits_per_weight:.2f} bits/weight)")
    result.update(checkpoint=str(ckpt), f16_gguf=str(f16))
    return result
