"""Qwen2 / Qwen2.5 (Qwen2ForCausalLM, GGUF architecture qwen2): q/k/v with biases, dense SwiGLU FFN."""

from __future__ import annotations

from . import ATTN_ROWS, DENSE_FFN_ROWS, HEAD_ROWS, QKV_BIAS_ROWS, TEXT_SKIPPED, Architecture, text_hparams, text_sizes
from .pooled import with_pooling

QWEN2 = Architecture(
    name="Qwen2ForCausalLM",
    model_types=("qwen2",),
    gguf_arch="QWEN2",
    tensors=HEAD_ROWS + ATTN_ROWS + QKV_BIAS_ROWS + DENSE_FFN_ROWS,
    sizes=lambda config, path: text_sizes(config, path),
    hparams=with_pooling(text_hparams),  # sentence-transformers embedding models (gte-Qwen2)
    skipped=TEXT_SKIPPED,
)
