"""Tiny random checkpoints of the Qwen family (Qwen3, Qwen2-MoE, Qwen3-MoE, Qwen2.5-VL) with the
real Qwen tokenizer, made without torch and bit-for-bit the same on every machine.

The weights come from numpy's legacy `RandomState` (its stream is frozen by numpy's policy),
stored as bf16 by truncation, so the recorded hashes of llama.cpp's converter output in
tests/data/llamacpp_reference.json stay valid: tests/make_llamacpp_reference.py rebuilds
these checkpoints, runs llama.cpp's convert_hf_to_gguf.py on them and writes that file.

The tokenizer is the real Qwen2.5 one (151,643 BPE tokens + added tokens, read from the
default GGUF) in the form Qwen publishes it: ids 151659-151664 (`<|fim_*|>`, `<|repo_name|>`,
`<|file_sep|>`) are `"special": false`. The Qwen3 flavour adds Qwen3's four added tokens
(`<tool_response>`, `</tool_response>`, `<think>`, `</think>`, also not special) and a chat
template with Qwen3's `enable_thinking` switch.
"""

from __future__ import annotations

import json
import struct
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

HIDDEN = 256  # a multiple of 256, so K-quants apply to every matrix
VOCAB = 151936
PUBLISHED_NOT_SPECIAL = range(151659, 151665)
QWEN3_ADDED = ("<tool_response>", "</tool_response>", "<think>", "</think>")  # ids 151665-151668

# Qwen3's chat template, reduced to what the runtime uses (no tools): earlier assistant turns
# lose their reasoning, and enable_thinking=false pre-fills an empty think block, as Qwen's own.
QWEN3_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if message.role == 'assistant' %}"
    "{%- set content = message.content %}"
    "{%- if '</think>' in content %}{%- set content = content.split('</think>')[-1].lstrip('\\n') %}{%- endif %}"
    "{{- '<|im_start|>assistant\\n' + content + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}"
)


@lru_cache(maxsize=1)
def _default_vocab() -> tuple[tuple[str, ...], tuple[int, ...], tuple[str, ...], str]:
    """tokens, types, merges and chat template of the real default GGUF (Qwen2.5-Coder-0.5B)."""
    import gguf

    from edge_qwen.store import default_model_path

    r = gguf.GGUFReader(str(default_model_path()))

    def field(key: str) -> Any:
        return r.fields[key].contents()

    return (tuple(field("tokenizer.ggml.tokens")), tuple(int(t) for t in field("tokenizer.ggml.token_type")),
            tuple(field("tokenizer.ggml.merges")), field("tokenizer.chat_template"))


def tokenizer_files(flavor: str = "qwen2.5", form: str = "tokenizer.json") -> dict[str, str]:
    """The published Qwen tokenizer files: tokenizer.json (or vocab.json + merges.txt) and tokenizer_config.json."""
    from edge_qwen.convert.tokenizer import CONTROL, USER_DEFINED, tokenizer_json_from_vocab

    tokens, types, merges, template = _default_vocab()
    tokens, types = list(tokens[:151665]), list(types[:151665])  # the GGUF pads to 151936 with [PAD] tokens
    if flavor == "qwen3":
        tokens += list(QWEN3_ADDED)
        types += [USER_DEFINED] * len(QWEN3_ADDED)
        template = QWEN3_TEMPLATE
    tok = tokenizer_json_from_vocab(tokens, types, list(merges))
    decoder = {}
    for added in tok["added_tokens"]:
        if added["id"] in PUBLISHED_NOT_SPECIAL:
            added["special"] = False  # as in Qwen's published tokenizer.json
        decoder[str(added["id"])] = {"content": added["content"], "lstrip": False, "normalized": False,
                                     "rstrip": False, "single_word": False, "special": added["special"]}
    assert all(types[i] in (CONTROL, USER_DEFINED) for i in range(151643, len(tokens)))
    config = {"add_bos_token": False, "add_prefix_space": False, "added_tokens_decoder": decoder,
              "bos_token": None, "chat_template": template, "clean_up_tokenization_spaces": False,
              "eos_token": "<|im_end|>", "errors": "replace", "model_max_length": 131072,
              "pad_token": "<|endoftext|>", "split_special_tokens": False, "tokenizer_class": "Qwen2Tokenizer",
              "unk_token": None}
    files = {"tokenizer_config.json": json.dumps(config, ensure_ascii=False, indent=1)}
    if form == "tokenizer.json":
        files["tokenizer.json"] = json.dumps(tok, ensure_ascii=False)
    else:  # the older layout some fine-tunes ship: no tokenizer.json
        files["vocab.json"] = json.dumps(tok["model"]["vocab"], ensure_ascii=False)
        files["merges.txt"] = "#version: 0.2\n" + "\n".join(tok["model"]["merges"]) + "\n"
    return files


def _text_config(arch: str) -> dict[str, Any]:
    base = {"vocab_size": VOCAB, "hidden_size": HIDDEN, "intermediate_size": 512, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 4096,
            "rms_norm_eps": 1e-6, "rope_theta": 1_000_000.0, "hidden_act": "silu", "initializer_range": 0.02,
            "attention_dropout": 0.0, "bos_token_id": 151643, "eos_token_id": 151645, "use_cache": True,
            "use_sliding_window": False, "sliding_window": None, "max_window_layers": 2, "torch_dtype": "bfloat16"}
    if arch == "qwen3":
        # a Qwen3-4B-like config: explicit head_dim, tied embeddings (the checkpoint still stores
        # an lm_head, which llama.cpp keeps), and YaRN with its extras
        return {**base, "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "head_dim": 64,
                "attention_bias": False, "tie_word_embeddings": True,
                "rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 1024,
                                 "attention_factor": 1.2, "beta_fast": 24.0, "beta_slow": 2.0}}
    if arch == "qwen2moe":
        return {**base, "architectures": ["Qwen2MoeForCausalLM"], "model_type": "qwen2_moe", "num_experts": 4,
                "num_experts_per_tok": 2, "moe_intermediate_size": 256, "shared_expert_intermediate_size": 512,
                "decoder_sparse_step": 1, "mlp_only_layers": [], "norm_topk_prob": False,
                "output_router_logits": False, "router_aux_loss_coef": 0.001, "tie_word_embeddings": False,
                "qkv_bias": True}
    if arch == "qwen3moe":
        return {**base, "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "head_dim": 64,
                "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 256, "decoder_sparse_step": 1,
                "mlp_only_layers": [], "norm_topk_prob": True, "output_router_logits": False,
                "router_aux_loss_coef": 0.001, "attention_bias": False, "tie_word_embeddings": True}
    if arch == "qwen2vl":
        return {**base, "architectures": ["Qwen2_5_VLForConditionalGeneration"], "model_type": "qwen2_5_vl",
                "tie_word_embeddings": True, "image_token_id": 151655, "video_token_id": 151656,
                "vision_start_token_id": 151652, "vision_end_token_id": 151653, "vision_token_id": 151654,
                "rope_scaling": {"type": "mrope", "mrope_section": [8, 12, 12]},  # sums to head_dim / 2
                "vision_config": {"depth": 4, "hidden_act": "silu", "hidden_size": HIDDEN, "intermediate_size": 512,
                                  "num_heads": 4, "in_chans": 3, "out_hidden_size": HIDDEN, "patch_size": 14,
                                  "spatial_merge_size": 2, "spatial_patch_size": 14, "window_size": 112,
                                  "fullatt_block_indexes": [1, 3], "tokens_per_second": 2,
                                  "temporal_patch_size": 2, "model_type": "qwen2_5_vl"}}
    raise ValueError(arch)


ARCHS = ("qwen3", "qwen2moe", "qwen3moe", "qwen2vl")
# Which variant of the published files each tiny checkpoint uses, so each of the four
# converter differences of issue 14 is covered by a checkpoint llama.cpp also converts.
TOKENIZER_FORM = {"qwen3": "tokenizer.json", "qwen2moe": "vocab.json", "qwen3moe": "tokenizer.json",
                  "qwen2vl": "tokenizer.json"}
STORED_TIED_HEAD = {"qwen3"}
PREPROCESSOR = {"do_convert_rgb": True, "do_normalize": True, "do_rescale": True, "do_resize": True,
                "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
                "image_processor_type": "Qwen2VLImageProcessor", "max_pixels": 12845056, "merge_size": 2,
                "min_pixels": 3136, "patch_size": 14, "processor_class": "Qwen2_5_VLProcessor", "resample": 3,
                "rescale_factor": 0.00392156862745098, "temporal_patch_size": 2}


def _tensor_shapes(config: dict[str, Any], with_head: bool) -> dict[str, tuple[int, ...]]:
    """Every tensor a published checkpoint of this config holds, with its shape."""
    from edge_qwen.convert.checkpoint import expected_tensors

    shapes = {n: s for n, (_g, s) in expected_tensors(config, Path("."), "model").items()}
    if not with_head:
        shapes.pop("lm_head.weight", None)
    if "vision_config" in config:
        shapes.update({n: s for n, (_g, s) in expected_tensors(config, Path("."), "mmproj").items()})
    return shapes


def _values(rs: np.random.RandomState, name: str, shape: tuple[int, ...]) -> np.ndarray:
    n = int(np.prod(shape))
    if name.endswith("norm.weight") or name.endswith("ln_q.weight") or ".norm" in name:
        v = 0.5 + rs.random_sample(n)  # RMS norm weights around 1
    elif name.endswith(".bias"):
        v = 0.5 * rs.standard_normal(n)
    else:
        v = 0.08 * rs.standard_normal(n)
    return v.astype(np.float32).reshape(shape)


def write_safetensors(path: Path, tensors: dict[str, np.ndarray]) -> None:
    """A bf16 safetensors file (bf16 = the top half of each float32: exact and reproducible)."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, a in tensors.items():
        nbytes = a.size * 2
        header[name] = {"dtype": "BF16", "shape": list(a.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(head)))
        f.write(head)
        for a in tensors.values():
            f.write((np.ascontiguousarray(a, dtype=np.float32).view(np.uint32) >> 16).astype("<u2").tobytes())


def make_family_checkpoint(path: Path, arch: str, seed: int = 0) -> Path:
    """A tiny random checkpoint of `arch` (one of ARCHS) in the published layout, in `path`."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = _text_config(arch)
    flavor = "qwen3" if arch in ("qwen3", "qwen3moe") else "qwen2.5"
    for name, text in tokenizer_files(flavor, TOKENIZER_FORM[arch]).items():
        (path / name).write_text(text, encoding="utf-8")
    (path / "config.json").write_text(json.dumps(config, indent=1))
    (path / "generation_config.json").write_text(json.dumps({"bos_token_id": 151643, "eos_token_id": [151645, 151643],
                                                              "do_sample": False}))
    if arch == "qwen2vl":
        (path / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR, indent=1))
    rs = np.random.RandomState(seed)
    shapes = _tensor_shapes(config, with_head=not config["tie_word_embeddings"] or arch in STORED_TIED_HEAD)
    # two shards, split where the embedding ends, like the published multi-file checkpoints
    names = sorted(shapes)
    first = [n for n in names if n.startswith(("model.embed_tokens", "lm_head"))]
    rest = [n for n in names if n not in first]
    index: dict[str, str] = {}
    for i, group in enumerate((first, rest), 1):
        shard = f"model-0000{i}-of-00002.safetensors"
        write_safetensors(path / shard, {n: _values(rs, n, shapes[n]) for n in group})
        index.update({n: shard for n in group})
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": index}, indent=1))
    return path


# Keys that say who made the file (and when), not what the model is: left out of comparisons.
_PROVENANCE = ("general.", "edge_qwen.")


def gguf_digest(path: Path) -> dict[str, Any]:
    """What must agree between two converters' files: every tensor (type, shape, sha256 of its
    bytes) and every non-provenance key (long arrays as a sha256 of their JSON)."""
    import hashlib

    import gguf

    r = gguf.GGUFReader(str(path))
    tensors = {t.name: [t.tensor_type.name, [int(d) for d in t.shape], hashlib.sha256(t.data.tobytes()).hexdigest()]
               for t in r.tensors}
    keys: dict[str, Any] = {}
    for name, f in r.fields.items():
        if name.startswith(_PROVENANCE) or name.startswith("GGUF."):
            continue
        v = f.contents()
        if isinstance(v, list) and len(v) > 16:
            v = "sha256:" + hashlib.sha256(json.dumps(v, ensure_ascii=False).encode()).hexdigest()
        elif isinstance(v, float):
            v = round(v, 6)
        elif isinstance(v, list):
            v = [round(x, 6) if isinstance(x, float) else x for x in v]
        keys[name] = v
    return {"tensors": tensors, "keys": keys}


def digest_diff(ours: dict[str, Any], ref: dict[str, Any]) -> list[str]:
    """Human-readable differences between two digests (empty when identical)."""
    out = []
    for kind in ("tensors", "keys"):
        a, b = ours[kind], ref[kind]
        for k in sorted(set(a) | set(b)):
            if a.get(k) != b.get(k):
                out.append(f"{kind[:-1]} {k}: ours {str(a.get(k))[:90]} vs llama.cpp {str(b.get(k))[:90]}")
    return out


def make_scripted_qwen3(path: Path, script: dict[str, str]) -> Path:
    """A tiny Qwen3 checkpoint whose greedy reply is fixed by hand-set weights, for thinking tests
    where no real Qwen3 model is available (there is no Hub here).

    Every attention and FFN output projection is zero, so the last hidden state is the current
    token's embedding: each token in `script` (text of one token -> text of the next) gets its
    own embedding axis, and the lm_head row of its successor reads that axis. So after the prompt's
    last token the model writes the chain the script spells, and llama.cpp runs it as any Qwen3.
    """
    from tokenizers import Tokenizer

    path = make_family_checkpoint(path, "qwen3")
    tok = Tokenizer.from_str((path / "tokenizer.json").read_text(encoding="utf-8"))

    def one(text: str) -> int:
        ids = tok.encode(text, add_special_tokens=False).ids
        assert len(ids) == 1, (text, ids)
        return ids[0]

    config = json.loads((path / "config.json").read_text())
    config.pop("rope_scaling")
    config["tie_word_embeddings"] = False
    (path / "config.json").write_text(json.dumps(config, indent=1))
    embd = np.zeros((VOCAB, HIDDEN), np.float32)
    head = np.zeros((VOCAB, HIDDEN), np.float32)
    for axis, (src, dst) in enumerate(script.items()):
        embd[one(src), axis] = 1.0
        head[one(dst), axis] = 1.0
    index = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]
    shards: dict[str, dict[str, np.ndarray]] = {}
    from edge_qwen.convert.checkpoint import open_checkpoint

    ckpt = open_checkpoint(path)
    for name, ref in ckpt.tensors.items():
        value = ref.read()
        if name == "model.embed_tokens.weight":
            value = embd
        elif name == "lm_head.weight":
            value = head
        elif name.endswith(("o_proj.weight", "down_proj.weight")):
            value = np.zeros_like(value)
        elif "norm" in name:
            value = np.ones_like(value)
        shards.setdefault(index[name], {})[name] = value
    for shard, tensors in shards.items():
        write_safetensors(path / shard, tensors)
    return path


# What the scripted Qwen3 writes: after the generation prompt ("...assistant\n") it thinks, then
# answers; after the empty think block of enable_thinking=false ("...</think>\n\n") it answers.
THINKING_SCRIPT = {"\n": "<think>", "<think>": "Let", "Let": " me", " me": " see", " see": "</think>",
                   "</think>": "\n\n", "\n\n": "Hello", "Hello": "<|im_end|>"}
