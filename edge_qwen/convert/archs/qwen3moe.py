"""Qwen3-MoE (Qwen3MoeForCausalLM, GGUF architecture qwen3moe): Qwen3 attention (q/k norms, no
bias) and, in every layer, a router and `num_experts` experts stacked into `ffn_*_exps`; no
shared expert."""

from __future__ import annotations

from . import (ATTN_ROWS, EXPERT_ROWS, HEAD_ROWS, QK_NORM_ROWS, TEXT_SKIPPED, Architecture, check_moe, moe_hparams,
               text_sizes)


def _sizes(config, path):
    sizes = text_sizes(config, path)
    if "E" not in sizes:
        from ...errors import CheckpointError

        raise CheckpointError(f"{path / 'config.json'}: a Qwen3-MoE config needs num_experts and "
                              "moe_intermediate_size; fix config.json")
    return sizes


QWEN3MOE = Architecture(
    name="Qwen3MoeForCausalLM",
    model_types=("qwen3_moe",),
    gguf_arch="QWEN3MOE",
    tensors=HEAD_ROWS + ATTN_ROWS + QK_NORM_ROWS + EXPERT_ROWS,
    sizes=_sizes,
    hparams=moe_hparams,
    skipped=TEXT_SKIPPED,
    check=check_moe,
)
