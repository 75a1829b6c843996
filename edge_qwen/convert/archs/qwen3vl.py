"""Qwen3-VL (Qwen3VLForConditionalGeneration, Qwen3VLMoeForConditionalGeneration) and the vision
tower Qwen3.5 shares with it: two GGUF files each, as llama.cpp makes them.

- the text model, GGUF architecture qwen3vl (Qwen3's tensors) or qwen3vlmoe (Qwen3-MoE's, from
  the fused, transposed expert tensors Qwen publishes: `experts.gate_up_proj` is (experts,
  hidden, 2 x ffn), `experts.down_proj` (experts, ffn, hidden)); plus the multimodal rope
  sections and `n_deepstack_layers`, the number of vision layers whose features are added to
  the first text layers;
- the vision tower, an mmproj GGUF (architecture clip, projector qwen3vl_merger): the 3-D patch
  convolution split in two 2-D halves (with its bias), a learned position embedding, LayerNorm
  blocks with a fused qkv and a GELU MLP, the 2x2 patch merger, and one "deepstack" merger per
  layer listed in `deepstack_visual_indexes`, numbered after the vision block it reads.

Qwen3.5 and Qwen3.5-MoE (Qwen3_5ForConditionalGeneration, Qwen3_5MoeForConditionalGeneration)
have the same vision tower without deepstack mergers: their mmproj is written from this table
(their hybrid text model has its own module).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ...errors import CheckpointError
from . import (ATTN_ROWS, DENSE_FFN_ROWS, HEAD_ROWS, QK_NORM_ROWS, TEXT_SKIPPED, Architecture, Row, check_moe,
               moe_hparams, need_int, text_config, text_hparams, text_sizes)
from .qwen2vl import _preprocessor


def _deepstack_indexes(config: dict[str, Any]) -> list[int]:
    vc = config.get("vision_config")
    idx = (vc or {}).get("deepstack_visual_indexes") if isinstance(vc, dict) else None
    return [int(i) for i in idx] if isinstance(idx, list) else []


def _text_hparams(w: Any, config: dict[str, Any], path: Path) -> None:
    text_hparams(w, config, path)
    w.add_num_deepstack_layers(len(_deepstack_indexes(config)))


def _moe_hparams(w: Any, config: dict[str, Any], path: Path) -> None:
    moe_hparams(w, config, path)
    w.add_num_deepstack_layers(len(_deepstack_indexes(config)))


def _check_text(config: dict[str, Any], path: Path) -> None:
    """Refuse deepstack layers that reach the last text layer: llama.cpp's qwen3vl graph adds them
    after the output rows are picked there, and aborts the process on the first prompt."""
    n, layers = len(_deepstack_indexes(config)), text_config(config).get("num_hidden_layers")
    if isinstance(layers, int) and n >= layers:
        raise CheckpointError(f"{path / 'config.json'}: {n} deepstack_visual_indexes for {layers} text layers; "
                              "llama.cpp needs fewer deepstack layers than text layers (it would abort on the "
                              "first prompt); fix vision_config.deepstack_visual_indexes")


def _check_moe_text(config: dict[str, Any], path: Path) -> None:
    check_moe(config, path)
    _check_text(config, path)


def _moe_sizes(config: dict[str, Any], path: Path) -> dict[str, int]:
    sizes = text_sizes(config, path, default_head_dim=128)
    if "E" not in sizes:
        raise CheckpointError(f"{path / 'config.json'}: a Qwen3-VL-MoE config needs num_experts and "
                              "moe_intermediate_size in text_config; fix config.json")
    return sizes


# the vision tower's tensors (model.visual.* in newer saves), left to the --mmproj conversion
_VISUAL = ("visual.",)

QWEN3VL = Architecture(
    name="Qwen3VLForConditionalGeneration",
    model_types=("qwen3_vl",),
    gguf_arch="QWEN3VL",
    tensors=HEAD_ROWS + ATTN_ROWS + QK_NORM_ROWS + DENSE_FFN_ROWS,
    # transformers' Qwen3-VL text config defaults head_dim to 128, as Qwen3's does
    sizes=lambda config, path: text_sizes(config, path, default_head_dim=128),
    hparams=_text_hparams,
    skipped=TEXT_SKIPPED,
    check=_check_text,
    other_part_prefixes=_VISUAL,
)

# Qwen3-VL-MoE's experts are two fused tensors per layer, each expert's matrix transposed
FUSED_EXPERT_ROWS: tuple[Row, ...] = (
    Row("model.layers.{bid}.mlp.gate.weight", "FFN_GATE_INP", "weight", "E,H"),  # the router
    Row("model.layers.{bid}.mlp.experts.gate_up_proj", "FFN_GATE_EXP", "weight", "E,IE,H", take="xT:0/2"),
    Row("model.layers.{bid}.mlp.experts.gate_up_proj", "FFN_UP_EXP", "weight", "E,IE,H", take="xT:1/2"),
    Row("model.layers.{bid}.mlp.experts.down_proj", "FFN_DOWN_EXP", "weight", "E,H,IE", take="xT:0/1"),
)

QWEN3VLMOE = Architecture(
    name="Qwen3VLMoeForConditionalGeneration",
    model_types=("qwen3_vl_moe",),
    gguf_arch="QWEN3VLMOE",
    tensors=HEAD_ROWS + ATTN_ROWS + QK_NORM_ROWS + FUSED_EXPERT_ROWS,
    sizes=_moe_sizes,
    hparams=_moe_hparams,
    skipped=TEXT_SKIPPED,
    check=_check_moe_text,
    other_part_prefixes=_VISUAL,
)

VISION_ROWS: tuple[Row, ...] = (
    Row("visual.patch_embed.proj.weight", "V_ENC_EMBD_PATCH", "weight", "VH,C,P,P", take="t:0"),
    Row("visual.patch_embed.proj.weight", "V_ENC_EMBD_PATCH", "weight", "VH,C,P,P", take="t:1", gguf_suffix=".1"),
    Row("visual.patch_embed.proj.bias", "V_ENC_EMBD_PATCH", "bias", "VH"),
    Row("visual.pos_embed.weight", "V_ENC_EMBD_POS", "weight", "NP,VH"),
    Row("visual.blocks.{bid}.norm1.weight", "V_ENC_INPUT_NORM", "weight", "VH"),
    Row("visual.blocks.{bid}.norm1.bias", "V_ENC_INPUT_NORM", "bias", "VH"),
    Row("visual.blocks.{bid}.attn.qkv.weight", "V_ENC_ATTN_QKV", "weight", "VH3,VH"),
    Row("visual.blocks.{bid}.attn.qkv.bias", "V_ENC_ATTN_QKV", "bias", "VH3"),
    Row("visual.blocks.{bid}.attn.proj.weight", "V_ENC_ATTN_O", "weight", "VH,VH"),
    Row("visual.blocks.{bid}.attn.proj.bias", "V_ENC_ATTN_O", "bias", "VH"),
    Row("visual.blocks.{bid}.norm2.weight", "V_ENC_POST_ATTN_NORM", "weight", "VH"),
    Row("visual.blocks.{bid}.norm2.bias", "V_ENC_POST_ATTN_NORM", "bias", "VH"),
    Row("visual.blocks.{bid}.mlp.linear_fc1.weight", "V_ENC_FFN_UP", "weight", "VI,VH"),
    Row("visual.blocks.{bid}.mlp.linear_fc1.bias", "V_ENC_FFN_UP", "bias", "VI"),
    Row("visual.blocks.{bid}.mlp.linear_fc2.weight", "V_ENC_FFN_DOWN", "weight", "VH,VI"),
    Row("visual.blocks.{bid}.mlp.linear_fc2.bias", "V_ENC_FFN_DOWN", "bias", "VH"),
    Row("visual.merger.norm.weight", "V_POST_NORM", "weight", "VH"),
    Row("visual.merger.norm.bias", "V_POST_NORM", "bias", "VH"),
    Row("visual.merger.linear_fc1.weight", "V_MMPROJ", "weight", "M,M", fixed_bid=0),
    Row("visual.merger.linear_fc1.bias", "V_MMPROJ", "bias", "M", fixed_bid=0),
    Row("visual.merger.linear_fc2.weight", "V_MMPROJ", "weight", "OH,M", fixed_bid=2),
    Row("visual.merger.linear_fc2.bias", "V_MMPROJ", "bias", "OH", fixed_bid=2),
)
# one merger per deepstack layer; GGUF block = the vision block it reads (deepstack_visual_indexes)
DEEPSTACK_ROWS: tuple[Row, ...] = (
    Row("visual.deepstack_merger_list.{bid}.norm.weight", "V_DS_NORM", "weight", "M", blocks="DS"),
    Row("visual.deepstack_merger_list.{bid}.norm.bias", "V_DS_NORM", "bias", "M", blocks="DS"),
    Row("visual.deepstack_merger_list.{bid}.linear_fc1.weight", "V_DS_FC1", "weight", "M,M", blocks="DS"),
    Row("visual.deepstack_merger_list.{bid}.linear_fc1.bias", "V_DS_FC1", "bias", "M", blocks="DS"),
    Row("visual.deepstack_merger_list.{bid}.linear_fc2.weight", "V_DS_FC2", "weight", "OH,M", blocks="DS"),
    Row("visual.deepstack_merger_list.{bid}.linear_fc2.bias", "V_DS_FC2", "bias", "OH", blocks="DS"),
)


def _vision_config(config: dict[str, Any], path: Path) -> dict[str, Any]:
    vc = config.get("vision_config")
    if not isinstance(vc, dict):
        raise CheckpointError(f"{path / 'config.json'} has no vision_config; this checkpoint holds no vision tower")
    return vc


def _vision_sizes(config: dict[str, Any], path: Path) -> dict[str, int]:
    vc = _vision_config(config, path)
    where = "vision_config"
    vh = need_int(vc, "hidden_size", path, where)
    merge = int(vc.get("spatial_merge_size") or 2)
    return {"VH": vh, "VH3": 3 * vh, "VI": need_int(vc, "intermediate_size", path, where),
            "VL": need_int(vc, "depth", path, where), "P": need_int(vc, "patch_size", path, where),
            "C": int(vc.get("in_channels") or vc.get("in_chans") or 3), "T": int(vc.get("temporal_patch_size") or 2),
            "OH": need_int(vc, "out_hidden_size", path, where), "M": vh * merge * merge,
            "NP": need_int(vc, "num_position_embeddings", path, where), "DS": len(_deepstack_indexes(config))}


def _block_ids(config: dict[str, Any], path: Path) -> dict[str, tuple[int, ...]]:
    return {"DS": tuple(_deepstack_indexes(config))}


def _check_vision(config: dict[str, Any], path: Path) -> None:
    vc = _vision_config(config, path)
    if int(vc.get("temporal_patch_size") or 2) != 2:
        raise CheckpointError(f"{path / 'config.json'}: temporal_patch_size {vc.get('temporal_patch_size')} is not 2; "
                              "llama.cpp's Qwen3-VL vision tower splits the patch convolution in two halves only")
    depth = need_int(vc, "depth", path, "vision_config")
    bad = [i for i in _deepstack_indexes(config) if not 0 <= i < depth]
    if bad:
        raise CheckpointError(f"{path / 'config.json'}: deepstack_visual_indexes {bad} are not vision layers "
                              f"(depth {depth}); fix vision_config")
    if not (path / "preprocessor_config.json").is_file():
        raise CheckpointError(f"{path} has no preprocessor_config.json; the vision tower needs its image_mean and "
                              "image_std: copy the file from the model's repository")


def _vision_hparams(w: Any, config: dict[str, Any], path: Path) -> None:
    """The clip.* keys llama.cpp's Qwen3VLVisionModel writes."""
    import gguf

    vc = _vision_config(config, path)
    nested = config.get("text_config") if isinstance(config.get("text_config"), dict) else {}
    w.add_clip_has_vision_encoder(True)
    w.add_vision_projection_dim(int(text_config(config)["hidden_size"]))
    # llama.cpp derives the image size from the position grid when the config leaves it out
    image_size = vc.get("image_size") or int(int(vc.get("num_position_embeddings", 2304)) ** 0.5
                                             * int(vc.get("patch_size", 16)))
    w.add_vision_image_size(int(image_size))
    w.add_vision_patch_size(int(vc["patch_size"]))
    w.add_vision_embedding_length(int(vc["hidden_size"]))
    w.add_vision_feed_forward_length(int(vc["intermediate_size"]))
    w.add_vision_block_count(int(vc["depth"]))
    w.add_vision_head_count(int(vc["num_heads"]))
    pre = _preprocessor(path)
    try:
        w.add_vision_image_mean([float(x) for x in pre["image_mean"]])
        w.add_vision_image_std([float(x) for x in pre["image_std"]])
    except (KeyError, TypeError, ValueError):
        raise CheckpointError(f"{path / 'preprocessor_config.json'} needs image_mean and image_std lists") from None
    w.add_clip_projector_type(gguf.VisionProjectorType.QWEN3VL)
    w.add_vision_use_gelu(True)
    if vc.get("spatial_merge_size") is not None:
        w.add_vision_spatial_merge_size(int(vc["spatial_merge_size"]))
    # the text model's rms_norm_eps, read from text_config only (as llama.cpp reads it)
    w.add_vision_attention_layernorm_eps(float(nested.get("rms_norm_eps", 1e-6)))
    deepstack = set(_deepstack_indexes(config))
    w.add_vision_is_deepstack_layers([i in deepstack for i in range(int(vc["depth"]))])


def _tower(name: str, model_types: tuple[str, ...], rows: tuple[Row, ...]) -> Architecture:
    return Architecture(name=name, model_types=model_types, gguf_arch="MMPROJ", tensors=rows, sizes=_vision_sizes,
                        hparams=_vision_hparams, check=_check_vision, kind="mmproj",
                        # the text model, its MTP block (Qwen3.5) and the head: the text conversion's
                        other_part_prefixes=("model.", "lm_head.", "mtp."), blocks_key="VL", block_ids=_block_ids)


QWEN3VL_VISION = _tower(QWEN3VL.name, QWEN3VL.model_types, VISION_ROWS + DEEPSTACK_ROWS)
QWEN3VLMOE_VISION = _tower(QWEN3VLMOE.name, QWEN3VLMOE.model_types, VISION_ROWS + DEEPSTACK_ROWS)
# Qwen3.5's tower: Qwen3-VL's without deepstack (a config that lists deepstack layers is refused
# by the table: its merger tensors would have no rows)
QWEN35_VISION = _tower("Qwen3_5ForConditionalGeneration", ("qwen3_5",), VISION_ROWS)
QWEN35MOE_VISION = _tower("Qwen3_5MoeForConditionalGeneration", ("qwen3_5_moe",), VISION_ROWS)

# Hugging Face architecture name -> its vision tower's table
VISION: dict[str, Architecture] = {a.name: a for a in (QWEN3VL_VISION, QWEN3VLMOE_VISION, QWEN35_VISION,
                                                       QWEN35MOE_VISION)}
