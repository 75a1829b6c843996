"""One Hugging Face -> GGUF tensor table per Qwen architecture, and the registry that picks one.

Each architecture module (qwen2, qwen3, qwen2moe, qwen3moe, qwen2vl, qwen3vl) holds a readable table of
`Row`s: the Hugging Face tensor name, the GGUF tensor (a `gguf.MODEL_TENSOR` member name, so
the GGUF name comes from gguf-py's tables), and its shape in terms of the config's sizes. A
row may gather many Hugging Face tensors into one GGUF tensor (MoE experts, `{xid}`) or take
a slice of one (a fused qkv, one temporal half of a 3-D patch convolution): the writer streams
those pieces in order, so the memory bound is the same as for a plain copy.

What the table says is what llama.cpp's own converter (convert_hf_to_gguf.py) writes; the tests
compare both on tiny random checkpoints of each architecture.
"""

from __future__ import annotations

import json

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ...errors import CheckpointError


@dataclass(frozen=True)
class Row:
    """One table row: Hugging Face name(s) -> one GGUF tensor.

    `hf`: the Hugging Face name; "{bid}" is the block number, "{xid}" the expert number (the
    experts are stacked, expert 0 first, into one 3-D GGUF tensor). `tensor` and `suffix` name
    the GGUF tensor via gguf.TENSOR_NAMES; `shape` is the numpy-order shape of the GGUF tensor as
    config sizes ("E,IE,H"). `take` selects part of the Hugging Face tensor: "rows:i/n" is the
    i-th of n equal row blocks (a fused qkv), "t:i" the i-th slice of axis 2 (a 3-D patch
    convolution split into 2-D ones), "xT:i/n" each expert's matrix of a fused 3-D expert tensor
    transposed after taking the i-th of n column blocks (Qwen3-VL-MoE's `gate_up_proj` stores
    (experts, hidden, 2 x ffn)), "pick:a,b" the rows a and b, in that order (a reranker's
    classifier). `gguf_suffix` is appended to the GGUF name (".1"). `blocks`
    names the size that numbers this row's "{bid}" when it is not the architecture's
    `blocks_key` (Qwen3-VL's deepstack mergers), and the architecture's `block_ids` then gives
    the GGUF block number of each.
    """

    hf: str
    tensor: str
    suffix: str
    shape: str
    take: str | None = None
    gguf_suffix: str = ""
    fixed_bid: int | None = None  # a numbered GGUF tensor outside the blocks ("mm.0", "mm.2")
    # Hybrid models (archs/hybrid.py): `fn` names transforms of archs.transforms.TRANSFORMS applied
    # in order to the whole tensor (llama.cpp's modify_tensors), `src_shape` the Hugging Face
    # tensor's shape when they change it; `blocks` the size that numbers this row's "{bid}"
    # (default the architecture's blocks_key; Qwen3-VL's deepstack mergers, whose GGUF numbers
    # come from the architecture's `block_ids`), `bid_offset` a size added to the GGUF block number
    # (an MTP block follows the model's blocks); `only` the layer kind the row belongs to.
    fn: tuple[str, ...] = ()
    src_shape: str | None = None
    blocks: str | None = None
    bid_offset: str | None = None
    only: str | None = None

    def gguf_name(self, bid: int | None = None) -> str:
        bid = self.fixed_bid if self.fixed_bid is not None else bid
        base = tensor_base_name(self.tensor)
        return (base.format(bid=bid) if "{bid}" in base else base) + ("." + self.suffix if self.suffix else "") \
            + self.gguf_suffix

    def hf_shape(self, sizes: dict[str, int]) -> tuple[int, ...]:
        """The shape each Hugging Face piece must have."""
        if self.src_shape is not None:
            return dims(self.src_shape, sizes)
        shape = dims(self.shape, sizes)
        if "{xid}" in self.hf:
            return shape[1:]
        if self.take and self.take.startswith("rows:"):
            n = int(self.take.split("/")[1])
            return (shape[0] * n,) + shape[1:]
        if self.take and self.take.startswith("t:"):
            return shape[:2] + (sizes["T"],) + shape[2:]
        if self.take and self.take.startswith("xT:"):
            n = int(self.take.split("/")[1])
            return (shape[0], shape[2], shape[1] * n)
        if self.take and self.take.startswith("pick:"):  # chosen rows of a (V, H) head (a reranker)
            return (sizes["V"],) + shape[1:]
        if self.take and self.take.startswith("mid:"):  # one of n equal parts of axis 1 (fused gate_up experts)
            n = int(self.take.split("/")[1])
            return (shape[0], shape[1] * n) + shape[2:]
        return shape


@dataclass(frozen=True)
class Architecture:
    """What one Hugging Face architecture converts to.

    `sizes(config, path)` gives the dimensions the table's shapes use; `hparams(writer, config,
    path)` writes the GGUF hyper-parameters; `skipped` lists checkpoint tensors deliberately not
    written, with the reason; `check(config, path)` refuses configs llama.cpp would run
    differently. `kind` is "model" (a text model with a tokenizer) or "mmproj" (a vision tower).
    """

    name: str  # the Hugging Face class name in config.json "architectures"
    model_types: tuple[str, ...]
    gguf_arch: str  # gguf.MODEL_ARCH member name
    tensors: tuple[Row, ...]
    sizes: Callable[[dict[str, Any], Path], dict[str, int]]
    hparams: Callable[[Any, dict[str, Any], Path], None]
    skipped: dict[str, str] = field(default_factory=dict)
    check: Callable[[dict[str, Any], Path], None] | None = None
    kind: str = "model"
    # the Hugging Face tensors of another part of the checkpoint (the vision tower of a VL text
    # model), left to that part's own conversion
    other_part_prefixes: tuple[str, ...] = ()
    blocks_key: str = "L"  # the size that numbers the "{bid}" rows
    # for rows with `blocks`: that size's Hugging Face index -> GGUF block number (a deepstack
    # merger is numbered after the vision block it reads)
    block_ids: Callable[[dict[str, Any], Path], dict[str, tuple[int, ...]]] | None = None
    # the checkpoint's flavour of this architecture (a Qwen3-Reranker), decided from its files
    variant: Callable[[Architecture, dict[str, Any], Path], Architecture] | None = None
    # the kind of each block ("linear_attention" / "full_attention"), for rows with `only`
    layer_kinds: Callable[[dict[str, Any]], list[str]] | None = None
    mtp: bool = False  # carries an MTP block (`mtp.*`) that --no-mtp leaves out

    @property
    def arch_name(self) -> str:
        import gguf

        member = getattr(gguf.MODEL_ARCH, self.gguf_arch, None)
        if member is not None and member in gguf.MODEL_ARCH_NAMES:
            return gguf.MODEL_ARCH_NAMES[member]
        return EXTRA_ARCH_NAMES[self.gguf_arch]


def dims(spec: str, sizes: dict[str, int]) -> tuple[int, ...]:
    """A shape spec ("E,IE,H", "NV,1") as numbers: config sizes or integer literals."""
    return tuple(int(d) if d.isdigit() else sizes[d] for d in spec.split(","))


# GGUF tensor names newer than the gguf-py on PyPI (0.19.0): llama.cpp's names, kept here so
# conversion does not depend on an unreleased gguf-py. gguf-py's own table wins where it has one.
EXTRA_TENSOR_NAMES: dict[str, str] = {
    "ATTN_GATE": "blk.{bid}.attn_gate",
    "ATTN_POST_NORM": "blk.{bid}.post_attention_norm",
    "SSM_CONV1D": "blk.{bid}.ssm_conv1d",
    "SSM_DT": "blk.{bid}.ssm_dt",
    "SSM_A": "blk.{bid}.ssm_a",
    "SSM_NORM": "blk.{bid}.ssm_norm",
    "SSM_OUT": "blk.{bid}.ssm_out",
    "SSM_ALPHA": "blk.{bid}.ssm_alpha",
    "SSM_BETA": "blk.{bid}.ssm_beta",
    "SSM_BETA_ALPHA": "blk.{bid}.ssm_ba",
    "NEXTN_EH_PROJ": "blk.{bid}.nextn.eh_proj",
    "NEXTN_ENORM": "blk.{bid}.nextn.enorm",
    "NEXTN_HNORM": "blk.{bid}.nextn.hnorm",
    "NEXTN_SHARED_HEAD_NORM": "blk.{bid}.nextn.shared_head_norm",
}


# GGUF architecture names newer than the gguf-py on PyPI (llama.cpp's src/llama-arch.cpp)
EXTRA_ARCH_NAMES: dict[str, str] = {"QWEN3NEXT": "qwen3next", "QWEN35": "qwen35", "QWEN35MOE": "qwen35moe"}


def tensor_base_name(tensor: str) -> str:
    """The GGUF name pattern of a gguf.MODEL_TENSOR member name ("blk.{bid}.attn_q")."""
    import gguf

    member = getattr(gguf.MODEL_TENSOR, tensor, None)
    if member is not None and member in gguf.TENSOR_NAMES:
        return gguf.TENSOR_NAMES[member]
    return EXTRA_TENSOR_NAMES[tensor]


def row_blocks(arch: "Architecture", row: Row, sizes: dict[str, int], kinds: list[str] | None = None,
               config: dict[str, Any] | None = None, path: Path | None = None) -> list[tuple[int | None, int | None]]:
    """(Hugging Face block number, GGUF block number) of every copy of `row`.

    A row numbered by another size than the architecture's blocks (`row.blocks`) takes its GGUF
    numbers from the architecture's `block_ids` when it has them (Qwen3-VL's deepstack mergers).
    """
    if "{bid}" not in row.hf:
        if row.bid_offset is None:
            return [(None, None)]
        if row.blocks is not None and not sizes[row.blocks]:
            return []  # a tensor of blocks there are none of (the MTP block, left out)
        return [(None, sizes[row.bid_offset])]
    n = sizes[row.blocks or arch.blocks_key]
    offset = sizes[row.bid_offset] if row.bid_offset else 0
    if row.blocks is not None and arch.block_ids is not None and config is not None and path is not None:
        return [(b, g + offset) for b, g in enumerate(arch.block_ids(config, path)[row.blocks])]
    out = []
    for b in range(n):
        if row.only is not None and row.bid_offset is None and kinds is not None and kinds[b] != row.only:
            continue
        out.append((b, b + offset))
    return out


# --- shared helpers for the architecture modules ------------------------------------------------

def need_int(config: dict[str, Any], key: str, path: Path, where: str = "config.json") -> int:
    """A positive integer from the config, or a CheckpointError naming the key."""
    v = config.get(key)
    if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
        raise CheckpointError(f"{path / 'config.json'}: key {key!r}{'' if where == 'config.json' else ' in ' + where} "
                              f"must be a positive integer, got {v!r}; fix config.json (it should come with the checkpoint)")
    return v


def text_config(config: dict[str, Any]) -> dict[str, Any]:
    """The text model's settings: a nested text_config (VL checkpoints) lifted to the top, as llama.cpp does."""
    nested = config.get("text_config")
    return {**config, **nested} if isinstance(nested, dict) else config


def text_sizes(config: dict[str, Any], path: Path, default_head_dim: int | None = None) -> dict[str, int]:
    """V, H, I, L, Q, KV (and E, IE, IS for MoE configs) of a Qwen text model."""
    config = text_config(config)
    h, nh = need_int(config, "hidden_size", path), need_int(config, "num_attention_heads", path)
    nkv = config.get("num_key_value_heads") or nh
    head_dim = config.get("head_dim") or default_head_dim or h // nh
    sizes = {"V": need_int(config, "vocab_size", path), "H": h, "I": need_int(config, "intermediate_size", path),
             "L": need_int(config, "num_hidden_layers", path), "Q": nh * head_dim, "KV": int(nkv) * head_dim,
             "HD": head_dim}
    if "num_experts" in config:
        sizes["E"] = need_int(config, "num_experts", path)
        sizes["IE"] = need_int(config, "moe_intermediate_size", path)
        if config.get("shared_expert_intermediate_size"):
            sizes["IS"] = need_int(config, "shared_expert_intermediate_size", path)
    return sizes


def rope_parameters(config: dict[str, Any]) -> dict[str, Any]:
    """Rope settings from `rope_parameters` (transformers >= 5) or `rope_scaling` + `rope_theta`."""
    config = text_config(config)
    # a config may carry both (a transformers 5 save with a hand-added rope_scaling): the
    # explicit rope_scaling wins
    scaling = dict(config.get("rope_scaling") or {})
    if "type" in scaling and "rope_type" not in scaling:
        scaling["rope_type"] = scaling["type"]
    rope = {**dict(config.get("rope_parameters") or {}), **scaling}
    if "rope_theta" not in rope and config.get("rope_theta") is not None:
        rope["rope_theta"] = config["rope_theta"]
    if "original_max_position_embeddings" not in rope and config.get("original_max_position_embeddings"):
        rope["original_max_position_embeddings"] = config["original_max_position_embeddings"]
    return rope


# Rope types llama.cpp's converter writes nothing for, because the model code handles them
# ("mrope" is Qwen2-VL's multimodal rope: its sections are written apart).
_NO_SCALING = (None, "default", "mrope")


def text_hparams(w: Any, config: dict[str, Any], path: Path) -> None:
    """The hyper-parameters every Qwen text model writes, as llama.cpp's TextModel writes them."""
    import gguf

    config = text_config(config)
    if config.get("use_sliding_window"):
        raise CheckpointError(f"{path / 'config.json'}: use_sliding_window is true; llama.cpp's Qwen models have no "
                              "sliding window attention, so the model would run differently; set it to false if unused")
    h, nh = config["hidden_size"], config["num_attention_heads"]
    w.add_block_count(config["num_hidden_layers"])
    w.add_context_length(int(config.get("max_position_embeddings") or 32768))
    w.add_embedding_length(h)
    if config.get("intermediate_size") is not None:  # a hybrid MoE config may have none
        w.add_feed_forward_length(config["intermediate_size"])
    w.add_head_count(nh)
    w.add_head_count_kv(int(config.get("num_key_value_heads") or nh))
    rope = rope_parameters(config)
    kind = rope.get("rope_type")
    if kind == "yarn":
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(float(rope["factor"]))
        w.add_rope_scaling_orig_ctx_len(int(rope.get("original_max_position_embeddings") or 32768))
        # the YaRN extras change the attention scale and the frequency ramp; llama.cpp reads them
        if rope.get("extrapolation_factor") is not None:
            w.add_rope_scaling_yarn_ext_factor(float(rope["extrapolation_factor"]))
        attn = rope.get("attention_factor", rope.get("attn_factor"))
        if attn is not None:
            w.add_rope_scaling_yarn_attn_factor(float(attn))
        if rope.get("beta_fast") is not None:
            w.add_rope_scaling_yarn_beta_fast(float(rope["beta_fast"]))
        if rope.get("beta_slow") is not None:
            w.add_rope_scaling_yarn_beta_slow(float(rope["beta_slow"]))
    elif kind == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(rope["factor"]))
    elif kind not in _NO_SCALING:
        raise CheckpointError(f"{path / 'config.json'}: rope_scaling type {kind!r} is not supported "
                              "(edge-qwen writes yarn and linear); remove rope_scaling or use one of those")
    if "mrope_section" in rope:
        sections = [int(s) for s in rope["mrope_section"]]
        w.add_rope_dimension_sections((sections + [0, 0, 0, 0])[:4])
    w.add_rope_freq_base(float(rope.get("rope_theta") or 10000.0))
    w.add_layer_norm_rms_eps(float(config.get("rms_norm_eps", 1e-6)))
    if config.get("num_experts") is not None:
        w.add_expert_count(int(config["num_experts"]))
    if config.get("num_experts_per_tok") is not None:
        w.add_expert_used_count(int(config["num_experts_per_tok"]))
    if config.get("head_dim") is not None:  # llama.cpp writes it whenever the config has it
        w.add_key_length(int(config["head_dim"]))
        w.add_value_length(int(config["head_dim"]))
    del h


def moe_hparams(w: Any, config: dict[str, Any], path: Path) -> None:
    """text_hparams plus the expert and shared-expert feed-forward sizes (Qwen2-MoE, Qwen3-MoE)."""
    text_hparams(w, config, path)
    config = text_config(config)
    if config.get("moe_intermediate_size") is not None:
        w.add_expert_feed_forward_length(int(config["moe_intermediate_size"]))
    if config.get("shared_expert_intermediate_size") is not None:
        w.add_expert_shared_feed_forward_length(int(config["shared_expert_intermediate_size"]))


def check_moe(config: dict[str, Any], path: Path) -> None:
    """Refuse MoE layouts llama.cpp's qwen2moe/qwen3moe cannot hold (dense layers between MoE ones)."""
    config = text_config(config)
    if config.get("mlp_only_layers") or int(config.get("decoder_sparse_step") or 1) != 1:
        raise CheckpointError(f"{path / 'config.json'}: mlp_only_layers/decoder_sparse_step make some layers dense; "
                              "llama.cpp's MoE models expect experts in every layer, so this checkpoint is refused")


# Tensors of every Qwen text checkpoint that are deliberately not written.
TEXT_SKIPPED: dict[str, str] = {
    "model.layers.{bid}.self_attn.rotary_emb.inv_freq": "rotary frequencies are recomputed by llama.cpp from rope_theta",
}

# The rows every Qwen text model starts with (embedding, final norm, output head).
HEAD_ROWS: tuple[Row, ...] = (
    Row("model.embed_tokens.weight", "TOKEN_EMBD", "weight", "V,H"),
    Row("model.norm.weight", "OUTPUT_NORM", "weight", "H"),
    # written when the checkpoint stores it, even with tie_word_embeddings (llama.cpp does the same)
    Row("lm_head.weight", "OUTPUT", "weight", "V,H"),
)
ATTN_ROWS: tuple[Row, ...] = (
    Row("model.layers.{bid}.input_layernorm.weight", "ATTN_NORM", "weight", "H"),
    Row("model.layers.{bid}.self_attn.q_proj.weight", "ATTN_Q", "weight", "Q,H"),
    Row("model.layers.{bid}.self_attn.k_proj.weight", "ATTN_K", "weight", "KV,H"),
    Row("model.layers.{bid}.self_attn.v_proj.weight", "ATTN_V", "weight", "KV,H"),
    Row("model.layers.{bid}.self_attn.o_proj.weight", "ATTN_OUT", "weight", "H,Q"),
    Row("model.layers.{bid}.post_attention_layernorm.weight", "FFN_NORM", "weight", "H"),
)
QKV_BIAS_ROWS: tuple[Row, ...] = (
    Row("model.layers.{bid}.self_attn.q_proj.bias", "ATTN_Q", "bias", "Q"),
    Row("model.layers.{bid}.self_attn.k_proj.bias", "ATTN_K", "bias", "KV"),
    Row("model.layers.{bid}.self_attn.v_proj.bias", "ATTN_V", "bias", "KV"),
)
QK_NORM_ROWS: tuple[Row, ...] = (
    Row("model.layers.{bid}.self_attn.q_norm.weight", "ATTN_Q_NORM", "weight", "HD"),
    Row("model.layers.{bid}.self_attn.k_norm.weight", "ATTN_K_NORM", "weight", "HD"),
)
DENSE_FFN_ROWS: tuple[Row, ...] = (
    Row("model.layers.{bid}.mlp.gate_proj.weight", "FFN_GATE", "weight", "I,H"),
    Row("model.layers.{bid}.mlp.up_proj.weight", "FFN_UP", "weight", "I,H"),
    Row("model.layers.{bid}.mlp.down_proj.weight", "FFN_DOWN", "weight", "H,I"),
)
EXPERT_ROWS: tuple[Row, ...] = (
    Row("model.layers.{bid}.mlp.gate.weight", "FFN_GATE_INP", "weight", "E,H"),  # the router
    Row("model.layers.{bid}.mlp.experts.{xid}.gate_proj.weight", "FFN_GATE_EXP", "weight", "E,IE,H"),
    Row("model.layers.{bid}.mlp.experts.{xid}.up_proj.weight", "FFN_UP_EXP", "weight", "E,IE,H"),
    Row("model.layers.{bid}.mlp.experts.{xid}.down_proj.weight", "FFN_DOWN_EXP", "weight", "E,H,IE"),
)


def _registry() -> dict[str, Architecture]:
    from . import qwen2, qwen2moe, qwen2vl, qwen3, qwen3moe, qwen3vl
    from .hybrid import HYBRID_ARCHS

    archs = (qwen2.QWEN2, qwen3.QWEN3, qwen2moe.QWEN2MOE, qwen3moe.QWEN3MOE, qwen2vl.QWEN2VL, *HYBRID_ARCHS)
    archs += (qwen3vl.QWEN3VL, qwen3vl.QWEN3VLMOE)
    archs += (qwen3.QWEN3_BASE,)  # Qwen3Model: Qwen3-Embedding saved without its head
    return {a.name: a for a in archs}


def _vision_registry() -> dict[str, Architecture]:
    """Hugging Face architecture name -> the table of its vision tower (the mmproj GGUF)."""
    from . import qwen2vl, qwen3vl

    return {**qwen2vl.VISION, **qwen3vl.VISION}


def supported_architectures() -> tuple[str, ...]:
    """The Hugging Face architecture names edge-qwen converts."""
    return tuple(_registry())


def _check_model_type(config: dict[str, Any], path: Path, found: Architecture) -> None:
    model_type = config.get("model_type")
    if model_type is not None and (not isinstance(model_type, str) or model_type not in found.model_types):
        raise CheckpointError(f"{path / 'config.json'}: model_type {json.dumps(model_type)[:80]} does not match "
                              f"architecture {found.name} (expected {' or '.join(found.model_types)}); fix "
                              "config.json or convert a checkpoint of a supported architecture")


def find_architecture(config: dict[str, Any], path: Path, part: str = "model") -> Architecture:
    """The table for a config's architecture (part "model", or "mmproj" for a VL vision tower)."""
    reg = _registry()
    archs = config.get("architectures") or []
    if not isinstance(archs, list):
        archs = [archs]
    supported = (f"edge-qwen converts {', '.join(reg)} (Qwen2/2.5, Qwen3, their MoE models, Qwen2.5-VL, "
                 "Qwen3-VL, Qwen3.5/3.6, Qwen3-Next, Qwen3-Embedding/Reranker and fine-tunes)")
    if not all(isinstance(a, str) for a in archs):
        raise CheckpointError(f"{path / 'config.json'}: \"architectures\" must be a list of class names, got "
                              f"{json.dumps(config.get('architectures'))[:80]}; {supported}")
    model_type = config.get("model_type")
    if part == "mmproj":
        vision = _vision_registry()
        tower = next((vision[a] for a in archs if a in vision), None)
        if tower is not None:
            _check_model_type(config, path, tower)
            if not isinstance(config.get("vision_config"), dict):
                raise CheckpointError(f"{path / 'config.json'} has no vision_config: this {tower.name} checkpoint "
                                      "holds no vision tower (a text-only copy?); download the full repository "
                                      "for --mmproj, or convert the text model without --mmproj")
            return tower
    found = next((reg[a] for a in archs if a in reg), None)
    if found is None and not archs:  # some fine-tunes leave "architectures" out
        found = next((a for a in reg.values() if isinstance(model_type, str) and model_type in a.model_types), None)
    if found is None:
        what = ", ".join(archs) or (model_type if isinstance(model_type, str) else None) or "unknown"
        raise CheckpointError(f"{path / 'config.json'}: architecture {what} is not supported; {supported}")
    _check_model_type(config, path, found)
    if part == "mmproj":
        raise CheckpointError(f"{path}: {found.name} has no vision tower; --mmproj is for the vision-language "
                              f"checkpoints ({', '.join(_vision_registry())})")
    if found.variant is not None:
        found = found.variant(found, config, path)
    return found
