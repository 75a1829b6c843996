"""Tiny random vision-language checkpoints of the Qwen3 generation: Qwen3-VL, Qwen3-VL-MoE and
Qwen3.5 (its vision tower; the hybrid text model's tensors only as far as a checkpoint needs
them), in the layout Qwen publishes, made with numpy (no torch) and the real Qwen tokenizer.

Like tests/family_models.py: weights from numpy's frozen legacy `RandomState`, stored as bf16
by truncation, so the recorded digests of llama.cpp's converter output
(tests/data/llamacpp_reference_vl.json, written by tests/make_llamacpp_reference.py --vl) hold
on every machine. Tensors are listed by our own tables (`expected_tensors`), and a test checks
that transformers loads each checkpoint with no missing or unexpected tensor, so a table that
drifted from the real layout cannot pass.

Layouts (as the published repositories, e.g. Qwen/Qwen3-VL-4B-Instruct, Qwen/Qwen3-VL-30B-A3B-Instruct,
Qwen/Qwen3.5-9B):
- tensors under `model.language_model.*`, `model.visual.*` and `lm_head.weight`;
- Qwen3-VL-MoE's experts fused: `mlp.experts.gate_up_proj` (experts, hidden, 2 x ffn) and
  `mlp.experts.down_proj` (experts, ffn, hidden);
- Qwen3-VL's vision tower has deepstack mergers (`deepstack_merger_list.{i}`) for the vision
  layers in `deepstack_visual_indexes`; Qwen3.5's has none;
- Qwen3.5 checkpoints carry an MTP block (`mtp.*`) that transformers does not create (its
  shapes here follow llama.cpp's converter: a full-attention layer plus fc and three norms).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from family_models import HIDDEN, VOCAB, _values, tokenizer_files, write_safetensors

VL_ARCHS = ("qwen3vl", "qwen3vlmoe", "qwen35")

# A reduced Qwen3-VL chat template: Qwen3's turns, image parts as <|vision_start|><|image_pad|><|vision_end|>
# (the runtime puts libmtmd's marker in the text instead), thinking switch as Qwen3's.
QWEN3VL_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message.role + '\\n' }}"
    "{%- if message.content is string %}{{- message.content }}"
    "{%- else %}{%- for part in message.content %}"
    "{%- if part.type == 'image' or 'image' in part or 'image_url' in part %}"
    "{{- '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{%- elif 'text' in part %}{{- part.text }}{%- endif %}"
    "{%- endfor %}{%- endif %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

VL_PREPROCESSOR = {"do_convert_rgb": True, "do_normalize": True, "do_rescale": True, "do_resize": True,
                   "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
                   "image_processor_type": "Qwen2VLImageProcessorFast", "merge_size": 2, "patch_size": 16,
                   "temporal_patch_size": 2, "resample": 3, "rescale_factor": 0.00392156862745098,
                   "size": {"longest_edge": 16777216, "shortest_edge": 65536},
                   "processor_class": "Qwen3VLProcessor"}

_IDS = {"image_token_id": 151655, "video_token_id": 151656, "vision_start_token_id": 151652,
        "vision_end_token_id": 151653}


def _vision(model_type: str, deepstack: list[int] | None) -> dict[str, Any]:
    vc = {"model_type": model_type, "depth": 4, "hidden_size": HIDDEN, "hidden_act": "gelu_pytorch_tanh",
          "intermediate_size": 512, "num_heads": 4, "in_channels": 3, "patch_size": 16, "spatial_merge_size": 2,
          "temporal_patch_size": 2, "out_hidden_size": HIDDEN, "num_position_embeddings": 2304,
          "initializer_range": 0.02}
    if deepstack is not None:
        vc["deepstack_visual_indexes"] = deepstack
    return vc


def _text(model_type: str, **extra: Any) -> dict[str, Any]:
    # four layers: llama.cpp adds the deepstack features after the first ones, never after the last
    return {"model_type": model_type, "vocab_size": VOCAB, "hidden_size": HIDDEN, "intermediate_size": 512,
            "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64,
            "hidden_act": "silu", "max_position_embeddings": 4096, "rms_norm_eps": 1e-6, "rope_theta": 5_000_000.0,
            "rope_scaling": {"rope_type": "default", "mrope_section": [12, 10, 10], "mrope_interleaved": True},
            "attention_bias": False, "attention_dropout": 0.0, "initializer_range": 0.02, "bos_token_id": 151643,
            "eos_token_id": 151645, "dtype": "bfloat16", "use_cache": True, **extra}


def vl_config(arch: str) -> dict[str, Any]:
    """config.json of the tiny checkpoint of `arch` (one of VL_ARCHS)."""
    if arch == "qwen3vl":  # tied, like Qwen3-VL-2B/4B: no lm_head stored
        return {"architectures": ["Qwen3VLForConditionalGeneration"], "model_type": "qwen3_vl", **_IDS,
                "tie_word_embeddings": True, "text_config": _text("qwen3_vl_text", tie_word_embeddings=True),
                "vision_config": _vision("qwen3_vl_vision", [1, 2])}
    if arch == "qwen3vlmoe":  # untied, like Qwen3-VL-30B-A3B
        moe = {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 512, "decoder_sparse_step": 1,
               "mlp_only_layers": [], "norm_topk_prob": True, "tie_word_embeddings": False}
        return {"architectures": ["Qwen3VLMoeForConditionalGeneration"], "model_type": "qwen3_vl_moe", **_IDS,
                "tie_word_embeddings": False, "text_config": _text("qwen3_vl_moe_text", **moe),
                "vision_config": _vision("qwen3_vl_moe_vision", [0, 2])}
    if arch == "qwen35":
        return {"architectures": ["Qwen3_5ForConditionalGeneration"], "model_type": "qwen3_5", **_IDS,
                "tie_word_embeddings": True, "text_config": _qwen35_text(), "vision_config": _vision("qwen3_5_vision", None)}
    raise ValueError(arch)


def _qwen35_text() -> dict[str, Any]:
    """A Qwen3.5-like hybrid text config: three Gated DeltaNet layers, then full attention; one MTP layer."""
    return {"model_type": "qwen3_5_text", "vocab_size": VOCAB, "hidden_size": HIDDEN, "intermediate_size": 512,
            "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64,
            "hidden_act": "silu", "max_position_embeddings": 4096, "rms_norm_eps": 1e-6, "attention_bias": False,
            "attention_dropout": 0.0, "initializer_range": 0.02, "linear_conv_kernel_dim": 4,
            "linear_key_head_dim": 32, "linear_value_head_dim": 32, "linear_num_key_heads": 4,
            "linear_num_value_heads": 8, "full_attention_interval": 4,
            "layer_types": ["linear_attention"] * 3 + ["full_attention"], "mtp_num_hidden_layers": 1,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10_000_000.0, "partial_rotary_factor": 0.25,
                                "mrope_section": [3, 3, 2], "mrope_interleaved": True},
            "tie_word_embeddings": True, "bos_token_id": 151643, "eos_token_id": 151645, "dtype": "bfloat16",
            "use_cache": True}


def _qwen35_text_shapes(config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """The text model's and MTP block's tensors of a Qwen3.5 checkpoint (canonical names: model.*, mtp.*)."""
    t = config["text_config"]
    h, i, hd = t["hidden_size"], t["intermediate_size"], t["head_dim"]
    nk, nv = t["linear_num_key_heads"], t["linear_num_value_heads"]
    dk, dv = t["linear_key_head_dim"], t["linear_value_head_dim"]
    conv = 2 * nk * dk + nv * dv

    def full(prefix: str) -> dict[str, tuple[int, ...]]:
        nh, nkv = t["num_attention_heads"], t["num_key_value_heads"]
        return {f"{prefix}.self_attn.q_proj.weight": (2 * nh * hd, h),  # queries and their output gate
                f"{prefix}.self_attn.k_proj.weight": (nkv * hd, h), f"{prefix}.self_attn.v_proj.weight": (nkv * hd, h),
                f"{prefix}.self_attn.o_proj.weight": (h, nh * hd), f"{prefix}.self_attn.q_norm.weight": (hd,),
                f"{prefix}.self_attn.k_norm.weight": (hd,)}

    def common(prefix: str) -> dict[str, tuple[int, ...]]:
        return {f"{prefix}.mlp.gate_proj.weight": (i, h), f"{prefix}.mlp.up_proj.weight": (i, h),
                f"{prefix}.mlp.down_proj.weight": (h, i), f"{prefix}.input_layernorm.weight": (h,),
                f"{prefix}.post_attention_layernorm.weight": (h,)}

    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (t["vocab_size"], h), "model.norm.weight": (h,)}
    for b, kind in enumerate(t["layer_types"]):
        p = f"model.layers.{b}"
        shapes.update(common(p))
        if kind == "full_attention":
            shapes.update(full(p))
        else:
            la = f"{p}.linear_attn"
            shapes.update({f"{la}.dt_bias": (nv,), f"{la}.A_log": (nv,), f"{la}.conv1d.weight": (conv, 1, t["linear_conv_kernel_dim"]),
                           f"{la}.norm.weight": (dv,), f"{la}.out_proj.weight": (h, nv * dv),
                           f"{la}.in_proj_qkv.weight": (conv, h), f"{la}.in_proj_z.weight": (nv * dv, h),
                           f"{la}.in_proj_b.weight": (nv, h), f"{la}.in_proj_a.weight": (nv, h)})
    for b in range(t["mtp_num_hidden_layers"]):
        shapes.update(common(f"mtp.layers.{b}"))
        shapes.update(full(f"mtp.layers.{b}"))
    shapes.update({"mtp.fc.weight": (h, 2 * h), "mtp.pre_fc_norm_embedding.weight": (h,),
                   "mtp.pre_fc_norm_hidden.weight": (h,), "mtp.norm.weight": (h,)})
    if not t["tie_word_embeddings"]:
        shapes["lm_head.weight"] = (t["vocab_size"], h)
    return shapes


def _published(name: str) -> str:
    """Our table's (canonical) name -> the name a transformers 5 save uses."""
    if name.startswith("visual."):
        return "model." + name
    if name.startswith("model."):
        return "model.language_model." + name[len("model."):]
    return name


def vl_tensor_shapes(config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Every tensor the published checkpoint of `config` holds (published names), with its shape."""
    from edge_qwen.convert.checkpoint import expected_tensors

    shapes = {n: s for n, (_g, s) in expected_tensors(config, Path("."), "mmproj").items()}
    if config["architectures"][0].startswith("Qwen3_5"):
        shapes.update(_qwen35_text_shapes(config))
    else:
        shapes.update({n: s for n, (_g, s) in expected_tensors(config, Path("."), "model").items()})
        if config["text_config"]["tie_word_embeddings"]:
            shapes.pop("lm_head.weight", None)
    return {_published(n): s for n, s in shapes.items()}


def make_vl_checkpoint(path: Path, arch: str, seed: int = 0, *, vision: bool = True) -> Path:
    """A tiny random checkpoint of `arch` in `path`. `vision=False` leaves out what a text-only
    copy lacks (the vision weights and preprocessor_config.json), keeping config.json as is."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = vl_config(arch)
    files = tokenizer_files("qwen3", "tokenizer.json")
    tok_config = json.loads(files["tokenizer_config.json"])
    tok_config.pop("chat_template")  # Qwen3-VL repositories ship it in chat_template.json
    files["tokenizer_config.json"] = json.dumps(tok_config, ensure_ascii=False, indent=1)
    files["chat_template.json"] = json.dumps({"chat_template": QWEN3VL_TEMPLATE}, indent=1)
    for name, text in files.items():
        (path / name).write_text(text, encoding="utf-8")
    (path / "config.json").write_text(json.dumps(config, indent=1))
    (path / "generation_config.json").write_text(json.dumps({"bos_token_id": 151643, "eos_token_id": [151645, 151643],
                                                              "do_sample": False}))
    if vision:
        (path / "preprocessor_config.json").write_text(json.dumps(VL_PREPROCESSOR, indent=1))
    rs = np.random.RandomState(seed)
    shapes = vl_tensor_shapes(config)
    if not vision:
        shapes = {n: s for n, s in shapes.items() if not n.startswith("model.visual.")}
    names = sorted(shapes)
    first = [n for n in names if n.startswith(("model.language_model.embed_tokens", "lm_head"))]
    rest = [n for n in names if n not in first]
    index: dict[str, str] = {}
    for i, group in enumerate((first, rest), 1):
        shard = f"model-0000{i}-of-00002.safetensors"
        write_safetensors(path / shard, {n: _values(rs, n, shapes[n]) for n in group})
        index.update({n: shard for n in group})
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": index}, indent=1))
    return path
