"""Qwen3 dense (Qwen3ForCausalLM, GGUF architecture qwen3): per-head RMS norms on q and k, no q/k/v bias."""

from __future__ import annotations

from . import ATTN_ROWS, DENSE_FFN_ROWS, HEAD_ROWS, QK_NORM_ROWS, TEXT_SKIPPED, Architecture, text_hparams, text_sizes

QWEN3 = Architecture(
    name="Qwen3ForCausalLM",
    model_types=("qwen3",),
    gguf_arch="QWEN3",
    tensors=HEAD_ROWS + ATTN_ROWS + QK_NORM_ROWS + DENSE_FFN_ROWS,
    # transformers' Qwen3Config defaults head_dim to 128, not hidden_size / heads
    sizes=lambda config, path: text_sizes(config, path, default_head_dim=128),
    hparams=text_hparams,
    skipped=TEXT_SKIPPED,
)
