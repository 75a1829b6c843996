"""Qwen2.5-VL (Qwen2_5_VLForConditionalGeneration): two GGUF files, as llama.cpp makes them.

- the text model, GGUF architecture qwen2vl: Qwen2's tensors, plus the multimodal rope
  sections (`rope.dimension_sections` from `mrope_section`);
- the vision tower, an mmproj GGUF (architecture clip, projector qwen2.5vl_merger) that
  libmtmd loads next to it: the 3-D patch convolution split into two 2-D halves, each fused
  qkv split into q, k and v, SwiGLU blocks with RMS norms, and the 2x2 patch merger.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ...errors import CheckpointError
from . import (ATTN_ROWS, DENSE_FFN_ROWS, HEAD_ROWS, QKV_BIAS_ROWS, TEXT_SKIPPED, Architecture, Row, need_int,
               text_hparams, text_sizes)

QWEN2VL = Architecture(
    name="Qwen2_5_VLForConditionalGeneration",
    model_types=("qwen2_5_vl",),
    gguf_arch="QWEN2VL",
    tensors=HEAD_ROWS + ATTN_ROWS + QKV_BIAS_ROWS + DENSE_FFN_ROWS,
    sizes=lambda config, path: text_sizes(config, path),
    hparams=text_hparams,
    skipped=TEXT_SKIPPED,
    other_part_prefixes=("visual.",),
)

VISION_ROWS: tuple[Row, ...] = (
    Row("visual.patch_embed.proj.weight", "V_ENC_EMBD_PATCH", "weight", "VH,C,P,P", take="t:0"),
    Row("visual.patch_embed.proj.weight", "V_ENC_EMBD_PATCH", "weight", "VH,C,P,P", take="t:1", gguf_suffix=".1"),
    Row("visual.blocks.{bid}.norm1.weight", "V_ENC_INPUT_NORM", "weight", "VH"),
    Row("visual.blocks.{bid}.attn.qkv.weight", "V_ENC_ATTN_Q", "weight", "VH,VH", take="rows:0/3"),
    Row("visual.blocks.{bid}.attn.qkv.weight", "V_ENC_ATTN_K", "weight", "VH,VH", take="rows:1/3"),
    Row("visual.blocks.{bid}.attn.qkv.weight", "V_ENC_ATTN_V", "weight", "VH,VH", take="rows:2/3"),
    Row("visual.blocks.{bid}.attn.qkv.bias", "V_ENC_ATTN_Q", "bias", "VH", take="rows:0/3"),
    Row("visual.blocks.{bid}.attn.qkv.bias", "V_ENC_ATTN_K", "bias", "VH", take="rows:1/3"),
    Row("visual.blocks.{bid}.attn.qkv.bias", "V_ENC_ATTN_V", "bias", "VH", take="rows:2/3"),
    Row("visual.blocks.{bid}.attn.proj.weight", "V_ENC_ATTN_O", "weight", "VH,VH"),
    Row("visual.blocks.{bid}.attn.proj.bias", "V_ENC_ATTN_O", "bias", "VH"),
    Row("visual.blocks.{bid}.norm2.weight", "V_ENC_POST_ATTN_NORM", "weight", "VH"),
    Row("visual.blocks.{bid}.mlp.gate_proj.weight", "V_ENC_FFN_GATE", "weight", "VI,VH"),
    Row("visual.blocks.{bid}.mlp.gate_proj.bias", "V_ENC_FFN_GATE", "bias", "VI"),
    Row("visual.blocks.{bid}.mlp.up_proj.weight", "V_ENC_FFN_UP", "weight", "VI,VH"),
    Row("visual.blocks.{bid}.mlp.up_proj.bias", "V_ENC_FFN_UP", "bias", "VI"),
    Row("visual.blocks.{bid}.mlp.down_proj.weight", "V_ENC_FFN_DOWN", "weight", "VH,VI"),
    Row("visual.blocks.{bid}.mlp.down_proj.bias", "V_ENC_FFN_DOWN", "bias", "VH"),
    Row("visual.merger.ln_q.weight", "V_POST_NORM", "weight", "VH"),
    Row("visual.merger.mlp.0.weight", "V_MMPROJ", "weight", "M,M", fixed_bid=0),
    Row("visual.merger.mlp.0.bias", "V_MMPROJ", "bias", "M", fixed_bid=0),
    Row("visual.merger.mlp.2.weight", "V_MMPROJ", "weight", "OH,M", fixed_bid=2),
    Row("visual.merger.mlp.2.bias", "V_MMPROJ", "bias", "OH", fixed_bid=2),
)


def vision_config(config: dict[str, Any], path: Path) -> dict[str, Any]:
    vc = config.get("vision_config")
    if not isinstance(vc, dict):
        raise CheckpointError(f"{path / 'config.json'} has no vision_config; it is not a Qwen2.5-VL checkpoint")
    return vc


def vision_sizes(config: dict[str, Any], path: Path) -> dict[str, int]:
    vc = vision_config(config, path)
    where = "vision_config"
    vh = need_int(vc, "hidden_size", path, where)
    merge = int(vc.get("spatial_merge_size") or 2)
    return {"VH": vh, "VI": need_int(vc, "intermediate_size", path, where), "VL": need_int(vc, "depth", path, where),
            "P": need_int(vc, "patch_size", path, where), "C": int(vc.get("in_chans") or vc.get("in_channels") or 3),
            "T": int(vc.get("temporal_patch_size") or 2), "OH": need_int(vc, "out_hidden_size", path, where),
            "M": vh * merge * merge}


def check_vision(config: dict[str, Any], path: Path) -> None:
    vc = vision_config(config, path)
    if int(vc.get("temporal_patch_size") or 2) != 2:
        raise CheckpointError(f"{path / 'config.json'}: temporal_patch_size {vc.get('temporal_patch_size')} is not 2; "
                              "llama.cpp's Qwen2.5-VL vision tower splits the patch convolution in two halves only")
    if not (path / "preprocessor_config.json").is_file():
        raise CheckpointError(f"{path} has no preprocessor_config.json; the vision tower needs its image_mean and "
                              "image_std: copy the file from the model's repository")


def _preprocessor(path: Path) -> dict[str, Any]:
    from ..checkpoint import read_json_file

    cfg: dict[str, Any] = {}
    for name, nested in (("preprocessor_config.json", "media_proc_cfg"), ("processor_config.json", "image_processor")):
        file = path / name
        if file.is_file():
            data = read_json_file(file)
            if isinstance(data, dict):
                cfg.update({**data, **(data.get(nested) or {})})
    return cfg


def vision_hparams(w: Any, config: dict[str, Any], path: Path) -> None:
    """The clip.* keys llama.cpp's Qwen2VLVisionModel writes for a Qwen2.5-VL vision tower."""
    import gguf

    vc = vision_config(config, path)
    text = {**config, **(config.get("text_config") or {})}
    w.add_clip_has_vision_encoder(True)
    w.add_vision_projection_dim(int(text["hidden_size"]))
    w.add_vision_image_size(int(vc.get("image_size") or 560))
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
    w.add_clip_projector_type(gguf.VisionProjectorType.QWEN25VL)
    w.add_vision_use_silu(True)
    full = vc.get("fullatt_block_indexes")
    if not full or not isinstance(full, list):
        raise CheckpointError(f"{path / 'config.json'}: vision_config.fullatt_block_indexes is required for Qwen2.5-VL")
    pattern = int(full[0]) + 1  # window attention everywhere but every pattern-th block
    if any(b - a != pattern for a, b in zip(full, full[1:])):
        raise CheckpointError(f"{path / 'config.json'}: fullatt_block_indexes {full} is not evenly spaced; "
                              "llama.cpp's vision tower needs a regular window-attention pattern")
    w.add_vision_n_wa_pattern(pattern)
    w.add_vision_attention_layernorm_eps(float(config.get("rms_norm_eps", 1e-6)))


QWEN25VL_VISION = Architecture(
    name="Qwen2_5_VLForConditionalGeneration",
    model_types=("qwen2_5_vl",),
    gguf_arch="MMPROJ",
    tensors=VISION_ROWS,
    sizes=vision_sizes,
    hparams=vision_hparams,
    check=check_vision,
    kind="mmproj",
    other_part_prefixes=("model.", "lm_head."),
    blocks_key="VL",
)

# text architecture name -> its vision tower's table
VISION: dict[str, Architecture] = {QWEN2VL.name: QWEN25VL_VISION}
