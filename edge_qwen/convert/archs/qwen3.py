"""Qwen3 dense (Qwen3ForCausalLM, GGUF architecture qwen3): per-head RMS norms on q and k, no q/k/v bias.

Also Qwen3-Embedding and Qwen3-Reranker, which are Qwen3 checkpoints (see pooled.py)."""

from __future__ import annotations

import dataclasses

from . import ATTN_ROWS, DENSE_FFN_ROWS, HEAD_ROWS, QK_NORM_ROWS, TEXT_SKIPPED, Architecture, text_hparams, text_sizes
from .pooled import reranker_variant, with_pooling

QWEN3 = Architecture(
    name="Qwen3ForCausalLM",
    model_types=("qwen3",),
    gguf_arch="QWEN3",
    tensors=HEAD_ROWS + ATTN_ROWS + QK_NORM_ROWS + DENSE_FFN_ROWS,
    # transformers' Qwen3Config defaults head_dim to 128, not hidden_size / heads
    sizes=lambda config, path: text_sizes(config, path, default_head_dim=128),
    hparams=with_pooling(text_hparams),  # Qwen3-Embedding's pooling, as llama.cpp writes it
    skipped=TEXT_SKIPPED,
    variant=reranker_variant,  # a Qwen3-Reranker: its head becomes the yes/no classifier
)
QWEN3_BASE = dataclasses.replace(QWEN3, name="Qwen3Model")
