"""The hybrid Qwen models: Gated DeltaNet linear attention interleaved with gated full attention.

- Qwen3-Next (Qwen3NextForCausalLM, GGUF qwen3next): MoE in every layer, the linear attention's
  q, k, v and output gate fused per K head in `in_proj_qkvz`, beta and alpha in `in_proj_ba`.
- Qwen3.5 / 3.6 (Qwen3_5ForConditionalGeneration, qwen35; Qwen3_5MoeForConditionalGeneration,
  qwen35moe): the same layers with separate in_proj_qkv / z / a / b, V heads reordered for
  ggml's broadcast, interleaved multimodal rope; the MoE variant stores its experts fused
  (`mlp.experts.gate_up_proj`, `mlp.experts.down_proj`). The vision tower is another part.

`layer_types` says which blocks are linear attention. Every full-attention q_proj is twice the
heads' size (query and output gate per head). The RMS norms (not the linear attention's own)
store w - 1, so the GGUF gets w + 1. Real checkpoints carry an MTP block (`mtp.*`: fc, two
pre-fc norms, one full-attention layer and a final norm) that transformers does not create;
it becomes blocks L..L+n-1 with the `nextn` tensors and `nextn_predict_layers`, as llama.cpp's
converter writes it, unless `mtp=False` (`--no-mtp`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ...errors import CheckpointError
from . import Architecture, Row, need_int, text_config, text_hparams

# GGUF keys newer than the gguf-py on PyPI: llama.cpp's names (gguf-py's Keys where it has them).
KEYS = {
    "nextn_predict_layers": "{arch}.nextn_predict_layers",
    "full_attention_interval": "{arch}.full_attention_interval",
    "recurrent_layers": "{arch}.attention.recurrent_layers",
    "ssm_conv_kernel": "{arch}.ssm.conv_kernel",
    "ssm_state_size": "{arch}.ssm.state_size",
    "ssm_group_count": "{arch}.ssm.group_count",
    "ssm_time_step_rank": "{arch}.ssm.time_step_rank",
    "ssm_inner_size": "{arch}.ssm.inner_size",
    "rope_dimension_count": "{arch}.rope.dimension_count",
    "rope_dimension_sections": "{arch}.rope.dimension_sections",
}
QWEN35_DEFAULT_MROPE_SECTION = [11, 11, 10, 0]  # llama.cpp writes it when a checkpoint omits it
LINEAR, FULL = "linear_attention", "full_attention"
PLUS1 = ("plus_one",)
L_ = "model.layers.{bid}."

HEAD_ROWS = (
    Row("model.embed_tokens.weight", "TOKEN_EMBD", "weight", "V,H"),
    Row("model.norm.weight", "OUTPUT_NORM", "weight", "H", fn=PLUS1),
    Row("lm_head.weight", "OUTPUT", "weight", "V,H"),
)
NORM_ROWS = (
    Row(L_ + "input_layernorm.weight", "ATTN_NORM", "weight", "H", fn=PLUS1),
    Row(L_ + "post_attention_layernorm.weight", "ATTN_POST_NORM", "weight", "H", fn=PLUS1),
)
FULL_ATTN_ROWS = (
    Row(L_ + "self_attn.q_proj.weight", "ATTN_Q", "weight", "Q2,H", only=FULL),  # query and gate per head
    Row(L_ + "self_attn.k_proj.weight", "ATTN_K", "weight", "KV,H", only=FULL),
    Row(L_ + "self_attn.v_proj.weight", "ATTN_V", "weight", "KV,H", only=FULL),
    Row(L_ + "self_attn.o_proj.weight", "ATTN_OUT", "weight", "H,Q", only=FULL),
    Row(L_ + "self_attn.q_norm.weight", "ATTN_Q_NORM", "weight", "HD", fn=PLUS1, only=FULL),
    Row(L_ + "self_attn.k_norm.weight", "ATTN_K_NORM", "weight", "HD", fn=PLUS1, only=FULL),
)
_LIN = L_ + "linear_attn."
LINEAR_COMMON_ROWS = (
    Row(_LIN + "norm.weight", "SSM_NORM", "weight", "DV", only=LINEAR),
)
QWEN3NEXT_LINEAR_ROWS = LINEAR_COMMON_ROWS + (
    Row(_LIN + "in_proj_qkvz.weight", "ATTN_QKV", "weight", "CONV,H", fn=("qkvz_qkv",), src_shape="QKVZ,H",
        only=LINEAR),
    Row(_LIN + "in_proj_qkvz.weight", "ATTN_GATE", "weight", "VD,H", fn=("qkvz_z",), src_shape="QKVZ,H",
        only=LINEAR),
    Row(_LIN + "in_proj_ba.weight", "SSM_BETA_ALPHA", "weight", "NV2,H", only=LINEAR),
    Row(_LIN + "conv1d.weight", "SSM_CONV1D", "weight", "CONV,CK", fn=("squeeze",), src_shape="CONV,1,CK",
        only=LINEAR),
    Row(_LIN + "dt_bias", "SSM_DT", "bias", "NV", only=LINEAR),
    Row(_LIN + "A_log", "SSM_A", "", "NV", fn=("neg_exp",), only=LINEAR),
    Row(_LIN + "out_proj.weight", "SSM_OUT", "weight", "H,VD", only=LINEAR),
)
QWEN35_LINEAR_ROWS = LINEAR_COMMON_ROWS + (
    Row(_LIN + "in_proj_qkv.weight", "ATTN_QKV", "weight", "CONV,H", fn=("v_after_qk",), only=LINEAR),
    Row(_LIN + "in_proj_z.weight", "ATTN_GATE", "weight", "VD,H", fn=("v_heads",), only=LINEAR),
    Row(_LIN + "in_proj_b.weight", "SSM_BETA", "weight", "NV,H", fn=("v_single",), only=LINEAR),
    Row(_LIN + "in_proj_a.weight", "SSM_ALPHA", "weight", "NV,H", fn=("v_single",), only=LINEAR),
    Row(_LIN + "conv1d.weight", "SSM_CONV1D", "weight", "CONV,CK", fn=("squeeze", "v_after_qk"),
        src_shape="CONV,1,CK", only=LINEAR),
    Row(_LIN + "dt_bias", "SSM_DT", "bias", "NV", fn=("v_single",), only=LINEAR),
    Row(_LIN + "A_log", "SSM_A", "", "NV", fn=("v_single", "neg_exp"), only=LINEAR),
    Row(_LIN + "out_proj.weight", "SSM_OUT", "weight", "H,VD", fn=("v_cols",), only=LINEAR),
)
DENSE_FFN_ROWS = (
    Row(L_ + "mlp.gate_proj.weight", "FFN_GATE", "weight", "I,H"),
    Row(L_ + "mlp.up_proj.weight", "FFN_UP", "weight", "I,H"),
    Row(L_ + "mlp.down_proj.weight", "FFN_DOWN", "weight", "H,I"),
)
SHARED_EXPERT_ROWS = (
    Row(L_ + "mlp.gate.weight", "FFN_GATE_INP", "weight", "E,H"),  # the router
    Row(L_ + "mlp.shared_expert_gate.weight", "FFN_GATE_INP_SHEXP", "weight", "1,H"),
    Row(L_ + "mlp.shared_expert.gate_proj.weight", "FFN_GATE_SHEXP", "weight", "IS,H"),
    Row(L_ + "mlp.shared_expert.up_proj.weight", "FFN_UP_SHEXP", "weight", "IS,H"),
    Row(L_ + "mlp.shared_expert.down_proj.weight", "FFN_DOWN_SHEXP", "weight", "H,IS"),
)
# Qwen3-Next: one tensor per expert, stacked expert 0 first
PER_EXPERT_ROWS = SHARED_EXPERT_ROWS + (
    Row(L_ + "mlp.experts.{xid}.gate_proj.weight", "FFN_GATE_EXP", "weight", "E,IE,H"),
    Row(L_ + "mlp.experts.{xid}.up_proj.weight", "FFN_UP_EXP", "weight", "E,IE,H"),
    Row(L_ + "mlp.experts.{xid}.down_proj.weight", "FFN_DOWN_EXP", "weight", "E,H,IE"),
)
# Qwen3.5-MoE: the experts fused, gate and up halves of one [E, 2 * IE, H] tensor
FUSED_EXPERT_ROWS = SHARED_EXPERT_ROWS + (
    Row(L_ + "mlp.experts.gate_up_proj", "FFN_GATE_EXP", "weight", "E,IE,H", take="mid:0/2"),
    Row(L_ + "mlp.experts.gate_up_proj", "FFN_UP_EXP", "weight", "E,IE,H", take="mid:1/2"),
    Row(L_ + "mlp.experts.down_proj", "FFN_DOWN_EXP", "weight", "E,H,IE"),
)
# The MTP block's own tensors, beside its full-attention layer (block L of the GGUF)
MTP_HEAD_ROWS = (
    Row("mtp.fc.weight", "NEXTN_EH_PROJ", "weight", "H,H2", blocks="MTP", bid_offset="L"),
    Row("mtp.pre_fc_norm_embedding.weight", "NEXTN_ENORM", "weight", "H", fn=PLUS1, blocks="MTP", bid_offset="L"),
    Row("mtp.pre_fc_norm_hidden.weight", "NEXTN_HNORM", "weight", "H", fn=PLUS1, blocks="MTP", bid_offset="L"),
    Row("mtp.norm.weight", "NEXTN_SHARED_HEAD_NORM", "weight", "H", fn=PLUS1, blocks="MTP", bid_offset="L"),
)


def mtp_rows(layer_rows: tuple[Row, ...]) -> tuple[Row, ...]:
    """The MTP block's layer: the full-attention layer's rows under `mtp.layers.{bid}.`, numbered after the model's."""
    from dataclasses import replace

    out = [replace(r, hf=r.hf.replace(L_, "mtp.layers.{bid}."), blocks="MTP", bid_offset="L")
           for r in layer_rows if r.only != LINEAR]
    return MTP_HEAD_ROWS + tuple(out)


# --- sizes, layer kinds, hyper-parameters ---------------------------------------------------------

def layer_kinds(config: dict[str, Any]) -> list[str]:
    """Each block's kind: `layer_types`, or every `full_attention_interval`-th block full attention."""
    config = text_config(config)
    n = int(config["num_hidden_layers"])
    kinds = config.get("layer_types")
    if isinstance(kinds, list) and len(kinds) == n:
        return [str(k) for k in kinds]
    every = int(config.get("full_attention_interval") or 4)
    return [FULL if (i + 1) % every == 0 else LINEAR for i in range(n)]


def check_hybrid(config: dict[str, Any], path: Path) -> None:
    """Refuse layouts llama.cpp's hybrid models cannot hold."""
    tc = text_config(config)
    kinds = tc.get("layer_types")
    n = tc.get("num_hidden_layers")
    if kinds is not None and (not isinstance(kinds, list) or len(kinds) != n
                              or any(k not in (LINEAR, FULL) for k in kinds)):
        raise CheckpointError(f"{path / 'config.json'}: layer_types must list {n} entries of {LINEAR!r} or "
                              f"{FULL!r} (one per num_hidden_layers); fix config.json")
    for key in ("linear_num_key_heads", "linear_num_value_heads"):
        need_int(tc, key, path)
    if tc["linear_num_value_heads"] % tc["linear_num_key_heads"]:
        raise CheckpointError(f"{path / 'config.json'}: linear_num_value_heads ({tc['linear_num_value_heads']}) must "
                              f"be a multiple of linear_num_key_heads ({tc['linear_num_key_heads']}); fix config.json")
    if tc.get("mlp_only_layers") or int(tc.get("decoder_sparse_step") or 1) != 1:
        raise CheckpointError(f"{path / 'config.json'}: mlp_only_layers/decoder_sparse_step make some layers dense; "
                              "llama.cpp's hybrid MoE models expect experts in every layer, so this checkpoint is refused")


def hybrid_sizes(config: dict[str, Any], path: Path) -> dict[str, int]:
    tc = text_config(config)
    h, nh = need_int(tc, "hidden_size", path), need_int(tc, "num_attention_heads", path)
    hd = int(tc.get("head_dim") or h // nh)
    nkv = int(tc.get("num_key_value_heads") or nh)
    nk, nv = need_int(tc, "linear_num_key_heads", path), need_int(tc, "linear_num_value_heads", path)
    dk, dv = need_int(tc, "linear_key_head_dim", path), need_int(tc, "linear_value_head_dim", path)
    sizes = {"V": need_int(tc, "vocab_size", path), "H": h, "H2": 2 * h, "L": need_int(tc, "num_hidden_layers", path),
             "Q": nh * hd, "Q2": 2 * nh * hd, "KV": nkv * hd, "HD": hd, "NK": nk, "NV": nv, "NV2": 2 * nv,
             "DK": dk, "DV": dv, "VD": nv * dv, "CONV": 2 * nk * dk + nv * dv, "QKVZ": 2 * nk * dk + 2 * nv * dv,
             "CK": need_int(tc, "linear_conv_kernel_dim", path), "MTP": int(config.get("_mtp_layers") or 0)}
    if tc.get("intermediate_size"):
        sizes["I"] = need_int(tc, "intermediate_size", path)
    if "num_experts" in tc:
        sizes["E"] = need_int(tc, "num_experts", path)
        sizes["IE"] = need_int(tc, "moe_intermediate_size", path)
        sizes["IS"] = need_int(tc, "shared_expert_intermediate_size", path)
    return sizes


def _moe_sizes(config: dict[str, Any], path: Path) -> dict[str, int]:
    sizes = hybrid_sizes(config, path)
    if "E" not in sizes:
        raise CheckpointError(f"{path / 'config.json'}: this MoE model's config needs num_experts, "
                              "moe_intermediate_size and shared_expert_intermediate_size; fix config.json")
    return sizes


def _dense_sizes(config: dict[str, Any], path: Path) -> dict[str, int]:
    sizes = hybrid_sizes(config, path)
    if "I" not in sizes:
        need_int(text_config(config), "intermediate_size", path)
    return sizes


def hybrid_hparams(w: Any, config: dict[str, Any], path: Path, mrope_default: bool) -> None:
    """The keys llama.cpp's Qwen3NextModel (and Qwen3.5's mrope mixin) write."""
    tc = text_config(config)
    arch = w.arch
    n_mtp = int(config.get("_mtp_layers") or 0)
    flat = {k: v for k, v in tc.items() if k != "text_config"}  # text_hparams would lift the nested one again
    text_hparams(w, {**flat, "num_hidden_layers": tc["num_hidden_layers"] + n_mtp}, path)
    if tc.get("moe_intermediate_size") is not None:
        w.add_expert_feed_forward_length(int(tc["moe_intermediate_size"]))
    if tc.get("shared_expert_intermediate_size") is not None:
        w.add_expert_shared_feed_forward_length(int(tc["shared_expert_intermediate_size"]))
    if n_mtp:
        w.add_uint32(KEYS["nextn_predict_layers"].format(arch=arch), n_mtp)
    w.add_uint32(KEYS["ssm_conv_kernel"].format(arch=arch), int(tc["linear_conv_kernel_dim"]))
    w.add_uint32(KEYS["ssm_state_size"].format(arch=arch), int(tc["linear_key_head_dim"]))
    w.add_uint32(KEYS["ssm_group_count"].format(arch=arch), int(tc["linear_num_key_heads"]))
    w.add_uint32(KEYS["ssm_time_step_rank"].format(arch=arch), int(tc["linear_num_value_heads"]))
    w.add_uint32(KEYS["ssm_inner_size"].format(arch=arch),
                 int(tc["linear_value_head_dim"]) * int(tc["linear_num_value_heads"]))
    # llama.cpp's converter reads the config through transformers, which fills layer_types from
    # full_attention_interval when the file has none (Qwen3-Next): the flags are always written
    w.add_array(KEYS["recurrent_layers"].format(arch=arch), [k == LINEAR for k in layer_kinds(config)] + [False] * n_mtp)
    w.add_uint32(KEYS["full_attention_interval"].format(arch=arch), int(tc.get("full_attention_interval", 4)))
    from . import rope_parameters

    rope = rope_parameters(config)
    head_dim = tc.get("head_dim") or tc["hidden_size"] // tc["num_attention_heads"]
    factor = rope.get("partial_rotary_factor", tc.get("partial_rotary_factor", 0.25))
    w.add_uint32(KEYS["rope_dimension_count"].format(arch=arch), int(head_dim * factor))
    if mrope_default and "mrope_section" not in rope:
        w.add_array(KEYS["rope_dimension_sections"].format(arch=arch), QWEN35_DEFAULT_MROPE_SECTION)


def mtp_layers(config: dict[str, Any], names: list[str], path: Path, mtp: bool) -> int:
    """How many MTP layers the GGUF gets: the config's mtp_num_hidden_layers, else as many as the
    checkpoint holds (Qwen3-Next's config does not say); 0 with mtp=False (--no-mtp)."""
    if not mtp:
        return 0
    tc = text_config(config)
    held = {int(n.split(".")[2]) for n in names if n.startswith("mtp.layers.") and n.split(".")[2].isdigit()}
    n = int(tc.get("mtp_num_hidden_layers") or 0) or (max(held) + 1 if held else 0)
    if n == 0:
        raise CheckpointError(f"{path}: the checkpoint has no MTP block (no mtp.* tensors) and config.json does not "
                              "give mtp_num_hidden_layers; convert with --no-mtp (mtp=False), as llama.cpp's "
                              "converter also needs")
    return n


def _arch(name: str, model_types: tuple[str, ...], gguf_arch: str, layer_rows: tuple[Row, ...], sizes: Any,
          mrope_default: bool) -> Architecture:
    return Architecture(
        name=name, model_types=model_types, gguf_arch=gguf_arch,
        tensors=HEAD_ROWS + layer_rows + mtp_rows(layer_rows),
        sizes=sizes,
        hparams=lambda w, config, path: hybrid_hparams(w, config, path, mrope_default),
        skipped={"model.layers.{bid}.self_attn.rotary_emb.inv_freq": "recomputed by llama.cpp"},
        check=check_hybrid, layer_kinds=layer_kinds, mtp=True,
        other_part_prefixes=("visual.",),
    )


_QWEN35_LAYER = NORM_ROWS + FULL_ATTN_ROWS + QWEN35_LINEAR_ROWS
QWEN3NEXT = _arch("Qwen3NextForCausalLM", ("qwen3_next",), "QWEN3NEXT",
                  NORM_ROWS + FULL_ATTN_ROWS + QWEN3NEXT_LINEAR_ROWS + PER_EXPERT_ROWS, _moe_sizes, False)
QWEN35 = _arch("Qwen3_5ForConditionalGeneration", ("qwen3_5", "qwen3_5_text"), "QWEN35",
               _QWEN35_LAYER + DENSE_FFN_ROWS, _dense_sizes, True)
QWEN35MOE = _arch("Qwen3_5MoeForConditionalGeneration", ("qwen3_5_moe", "qwen3_5_moe_text"), "QWEN35MOE",
                  _QWEN35_LAYER + FUSED_EXPERT_ROWS, _moe_sizes, True)
HYBRID_ARCHS = (QWEN35, QWEN35MOE, QWEN3NEXT)
