"""Tiny random checkpoints of the hybrid Qwen models (Qwen3.5, Qwen3.5-MoE, Qwen3-Next), made
with numpy like tests/family_models.py, in the layout the published checkpoints have.

What they mimic of the real ones: hidden size 256 (K-quants apply), both layer kinds (three
Gated DeltaNet blocks, then one full-attention block, as `full_attention_interval` 4), more V
heads than K heads in the linear attention (so llama.cpp's V-head reorder is exercised), the
full-attention q_proj holding query and gate, Qwen3.5's nested `text_config` and
`model.language_model.` names, Qwen3.5-MoE's fused experts (`mlp.experts.gate_up_proj`),
Qwen3-Next's per-expert tensors and its config without `layer_types` or
`mtp_num_hidden_layers`, and the MTP block (`mtp.*`) that real checkpoints carry and
transformers does not create. The tokenizer is the real Qwen3 one (Qwen3's added `<think>`,
`<tool_response>` tokens); Qwen3.5's chat template (XML tool calls, thinking on by default) is
tests/data/qwen35_chat_template.jinja, derived from the public copy in llama.cpp's
models/templates/Qwen3.5-4B.jinja. Digests of llama.cpp's converter output on them are in
tests/data/llamacpp_reference_hybrid.json (tests/make_llamacpp_reference.py --hybrid).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from family_models import HIDDEN, VOCAB, _values, tokenizer_files, write_safetensors

HYBRID_ARCHS = ("qwen35", "qwen35moe", "qwen3next")
TEMPLATE = (Path(__file__).parent / "data" / "qwen35_chat_template.jinja").read_text(encoding="utf-8")
LAYERS = 4

_LINEAR = {"linear_conv_kernel_dim": 4, "linear_key_head_dim": 64, "linear_value_head_dim": 64,
           "linear_num_key_heads": 2, "linear_num_value_heads": 4}
_ATTN = {"hidden_size": HIDDEN, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64,
         "num_hidden_layers": LAYERS, "full_attention_interval": 4, "max_position_embeddings": 4096,
         "rms_norm_eps": 1e-6, "vocab_size": VOCAB, "hidden_act": "silu", "attention_bias": False,
         "attention_dropout": 0.0, "initializer_range": 0.02, "use_cache": True}
_LAYER_TYPES = ["linear_attention"] * 3 + ["full_attention"]
_MOE = {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 256,
        "shared_expert_intermediate_size": 256, "norm_topk_prob": True, "router_aux_loss_coef": 0.001,
        "output_router_logits": False}
# Qwen3.5's rope: interleaved multimodal sections over the rotated quarter of each head (16 of 64 dims)
_QWEN35_ROPE = {"rope_type": "default", "rope_theta": 10_000_000.0, "partial_rotary_factor": 0.25,
                "mrope_section": [3, 3, 2], "mrope_interleaved": True}


def hybrid_config(arch: str) -> dict[str, Any]:
    """config.json of the tiny `arch` (one of HYBRID_ARCHS), shaped as the published one."""
    if arch == "qwen3next":
        return {"architectures": ["Qwen3NextForCausalLM"], "model_type": "qwen3_next", **_ATTN, **_LINEAR, **_MOE,
                "intermediate_size": 512, "decoder_sparse_step": 1, "mlp_only_layers": [],
                "partial_rotary_factor": 0.25, "rope_theta": 10_000_000.0, "rope_scaling": None,
                "tie_word_embeddings": False, "bos_token_id": 151643, "eos_token_id": 151645,
                "torch_dtype": "bfloat16"}
    text = {**_ATTN, **_LINEAR, "layer_types": _LAYER_TYPES, "rope_parameters": _QWEN35_ROPE,
            "attn_output_gate": True, "mtp_num_hidden_layers": 1, "mtp_use_dedicated_embeddings": False,
            "eos_token_id": 151645, "dtype": "bfloat16"}
    if arch == "qwen35":
        text.update(model_type="qwen3_5_text", intermediate_size=512, tie_word_embeddings=True)
        top = {"architectures": ["Qwen3_5ForConditionalGeneration"], "model_type": "qwen3_5",
               "tie_word_embeddings": True}
    elif arch == "qwen35moe":
        text.update(model_type="qwen3_5_moe_text", tie_word_embeddings=False, **_MOE)
        top = {"architectures": ["Qwen3_5MoeForConditionalGeneration"], "model_type": "qwen3_5_moe",
               "tie_word_embeddings": False}
    else:
        raise ValueError(arch)
    return {**top, "text_config": text, "image_token_id": 151655, "video_token_id": 151656,
            "vision_start_token_id": 151652, "vision_end_token_id": 151653}


def _published_name(arch: str, name: str) -> str:
    """The name in a published Qwen3.5 checkpoint (the text model nested under model.language_model.)."""
    if arch != "qwen3next" and name.startswith("model."):
        return "model.language_model." + name[len("model."):]
    return name


def make_hybrid_checkpoint(path: Path, arch: str, seed: int = 0, mtp: bool = True) -> Path:
    """A tiny random `arch` checkpoint in `path`: two shards, real Qwen3 tokenizer, Qwen3.5 template.

    `mtp=False` leaves the MTP block out (as transformers saves a model it built)."""
    from edge_qwen.convert.checkpoint import expected_tensors

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = hybrid_config(arch)
    files = tokenizer_files("qwen3", "tokenizer.json")
    tok_config = json.loads(files["tokenizer_config.json"])
    tok_config["chat_template"] = TEMPLATE
    files["tokenizer_config.json"] = json.dumps(tok_config, ensure_ascii=False, indent=1)
    for name, text in files.items():
        (path / name).write_text(text, encoding="utf-8")
    (path / "config.json").write_text(json.dumps(config, indent=1))
    (path / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": 151643, "eos_token_id": [151645, 151643], "do_sample": True, "temperature": 0.6,
         "top_k": 20, "top_p": 0.95}))
    sized = {**config, "_mtp_layers": 1 if mtp else 0}
    shapes = {n: s for n, (_g, s) in expected_tensors(sized, Path("."), "model").items()}
    tied = (config.get("text_config") or config)["tie_word_embeddings"]
    if tied:
        shapes.pop("lm_head.weight")
    rs = np.random.RandomState(seed)
    names = sorted(shapes)
    first = [n for n in names if n.startswith(("model.embed_tokens", "lm_head"))]
    rest = [n for n in names if n not in first]
    index: dict[str, str] = {}
    for i, group in enumerate((first, rest), 1):
        shard = f"model-0000{i}-of-00002.safetensors"
        tensors = {_published_name(arch, n): _hybrid_values(rs, n, shapes[n]) for n in group}
        write_safetensors(path / shard, tensors)
        index.update({n: shard for n in tensors})
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": index}, indent=1))
    return path


def _hybrid_values(rs: np.random.RandomState, name: str, shape: tuple[int, ...]) -> np.ndarray:
    if name.endswith("norm.weight") and not name.endswith("linear_attn.norm.weight"):
        # Qwen3.5/3-Next RMS norms store w - 1: small values around 0
        return (0.1 * rs.standard_normal(int(np.prod(shape)))).astype(np.float32).reshape(shape)
    if name.endswith("A_log"):  # log of decay rates between 1 and 16, as trained ones
        return np.log(rs.uniform(1.0, 16.0, int(np.prod(shape)))).astype(np.float32).reshape(shape)
    return _values(rs, name, shape)
