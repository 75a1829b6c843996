"""Qwen2-MoE / Qwen1.5-MoE (Qwen2MoeForCausalLM, GGUF architecture qwen2moe).

Every layer: a router (`mlp.gate`), `num_experts` SwiGLU experts stacked into one 3-D tensor
per projection (`ffn_*_exps`, expert 0 first), and one shared expert with its own sigmoid gate.
Attention as Qwen2 (q/k/v biases).
"""

from __future__ import annotations

from . import (ATTN_ROWS, EXPERT_ROWS, HEAD_ROWS, QKV_BIAS_ROWS, TEXT_SKIPPED, Architecture, Row, check_moe,
               moe_hparams, text_sizes)

SHARED_EXPERT_ROWS: tuple[Row, ...] = (
    Row("model.layers.{bid}.mlp.shared_expert_gate.weight", "FFN_GATE_INP_SHEXP", "weight", "1,H"),
    Row("model.layers.{bid}.mlp.shared_expert.gate_proj.weight", "FFN_GATE_SHEXP", "weight", "IS,H"),
    Row("model.layers.{bid}.mlp.shared_expert.up_proj.weight", "FFN_UP_SHEXP", "weight", "IS,H"),
    Row("model.layers.{bid}.mlp.shared_expert.down_proj.weight", "FFN_DOWN_SHEXP", "weight", "H,IS"),
)


def _sizes(config, path):
    sizes = text_sizes(config, path)
    sizes["1"] = 1
    if "E" not in sizes or "IS" not in sizes:
        from ...errors import CheckpointError

        raise CheckpointError(f"{path / 'config.json'}: a Qwen2-MoE config needs num_experts, moe_intermediate_size "
                              "and shared_expert_intermediate_size; fix config.json")
    return sizes


QWEN2MOE = Architecture(
    name="Qwen2MoeForCausalLM",
    model_types=("qwen2_moe",),
    gguf_arch="QWEN2MOE",
    tensors=HEAD_ROWS + ATTN_ROWS + QKV_BIAS_ROWS + EXPERT_ROWS + SHARED_EXPERT_ROWS,
    sizes=_sizes,
    hparams=moe_hparams,
    skipped=TEXT_SKIPPED,
    check=check_moe,
)
