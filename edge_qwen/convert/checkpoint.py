"""Reading and validating Hugging Face Qwen2 checkpoint folders, tensor by tensor.

A checkpoint is config.json plus one `model.safetensors` or shards listed in
`model.safetensors.index.json`. Safetensors headers are parsed here (not by the safetensors
package) so a missing or truncated shard is reported by name before any work starts, and
tensor data is read from memory maps in row chunks: converting never holds more than one
chunk of one tensor in memory, whatever the model size.

This module also owns the Qwen2 tensor layout: the ONE table that maps Hugging Face tensor
names to GGUF tensor names, with the shape each must have for a given config.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import CheckpointError

SUPPORTED_ARCHITECTURES = ("Qwen2ForCausalLM",)
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# safetensors dtype name -> (numpy dtype name used to read the raw bytes, bytes per value)
_DTYPES = {"F32": ("float32", 4), "F16": ("float16", 2), "BF16": ("uint16", 2)}

# The Qwen2 tensor table. Each row: Hugging Face name ("{bid}" = block number), the GGUF
# tensor (gguf.MODEL_TENSOR member name, turned into a name by gguf.TENSOR_NAMES), the GGUF
# suffix, and the shape as a function of the config's sizes (see `_sizes`).
QWEN2_TENSORS: tuple[tuple[str, str, str, str], ...] = (
    ("model.embed_tokens.weight", "TOKEN_EMBD", "weight", "V,H"),
    ("model.norm.weight", "OUTPUT_NORM", "weight", "H"),
    ("lm_head.weight", "OUTPUT", "weight", "V,H"),
    ("model.layers.{bid}.input_layernorm.weight", "ATTN_NORM", "weight", "H"),
    ("model.layers.{bid}.self_attn.q_proj.weight", "ATTN_Q", "weight", "Q,H"),
    ("model.layers.{bid}.self_attn.q_proj.bias", "ATTN_Q", "bias", "Q"),
    ("model.layers.{bid}.self_attn.k_proj.weight", "ATTN_K", "weight", "KV,H"),
    ("model.layers.{bid}.self_attn.k_proj.bias", "ATTN_K", "bias", "KV"),
    ("model.layers.{bid}.self_attn.v_proj.weight", "ATTN_V", "weight", "KV,H"),
    ("model.layers.{bid}.self_attn.v_proj.bias", "ATTN_V", "bias", "KV"),
    ("model.layers.{bid}.self_attn.o_proj.weight", "ATTN_OUT", "weight", "H,Q"),
    ("model.layers.{bid}.post_attention_layernorm.weight", "FFN_NORM", "weight", "H"),
    ("model.layers.{bid}.mlp.gate_proj.weight", "FFN_GATE", "weight", "I,H"),
    ("model.layers.{bid}.mlp.up_proj.weight", "FFN_UP", "weight", "I,H"),
    ("model.layers.{bid}.mlp.down_proj.weight", "FFN_DOWN", "weight", "H,I"),
)
# Tensors a checkpoint may hold that are deliberately not written, and why.
SKIPPED_TENSORS: dict[str, str] = {
    "lm_head.weight": "tied to model.embed_tokens.weight (tie_word_embeddings: true); llama.cpp reuses token_embd",
    "model.layers.{bid}.self_attn.rotary_emb.inv_freq": "rotary frequencies are recomputed by llama.cpp from rope_theta",
}


@dataclass
class TensorRef:
    """Where one tensor's bytes live: file, absolute byte offset, dtype and shape."""

    name: str
    file: Path
    offset: int
    dtype: str  # safetensors name: F32, F16 or BF16
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return _DTYPES[self.dtype][1] * _numel(self.shape)

    def chunks(self, max_bytes: int = 64 << 20) -> Iterator[Any]:
        """Yield float32 row blocks of the tensor (2-D: rows of the first axis), read via mmap.

        Each block's memory map is dropped before the next one is made, so resident memory
        stays at one block however large the tensor is. bf16 is widened exactly to float32.
        """
        import numpy as np

        np_dtype, size = _DTYPES[self.dtype]
        shape = self.shape if self.shape else (1,)
        row = _numel(shape[1:]) if len(shape) > 1 else _numel(shape)
        rows = shape[0] if len(shape) > 1 else 1
        step = max(1, max_bytes // max(row * 4, 1))
        for start in range(0, rows, step):
            n = min(step, rows - start)
            mm = np.memmap(self.file, dtype=np_dtype, mode="r", offset=self.offset + start * row * size,
                           shape=(n * row,))
            if self.dtype == "BF16":
                block = (mm.astype(np.uint32) << 16).view(np.float32)
            else:
                block = mm.astype(np.float32)
            del mm
            yield block.reshape((n,) + tuple(shape[1:])) if len(shape) > 1 else block.reshape(shape)

    def read(self) -> Any:
        """The whole tensor as float32 (for small tensors and tests)."""
        import numpy as np

        parts = list(self.chunks(max_bytes=1 << 40))
        return parts[0] if len(parts) == 1 else np.concatenate(parts)


@dataclass
class Checkpoint:
    """A validated checkpoint folder: its config and every tensor, in file order."""

    path: Path
    config: dict[str, Any]
    tensors: dict[str, TensorRef] = field(default_factory=dict)
    files: list[Path] = field(default_factory=list)

    @property
    def tied(self) -> bool:
        return bool(self.config.get("tie_word_embeddings", False))

    @property
    def largest_tensor_bytes(self) -> int:
        return max((t.nbytes for t in self.tensors.values()), default=0)


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def _sizes(config: dict[str, Any], path: Path) -> dict[str, int]:
    """The dimensions the tensor table's shapes refer to, checked for presence and type."""
    def need(key: str) -> int:
        v = config.get(key)
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            raise CheckpointError(f"{path / 'config.json'}: key {key!r} must be a positive integer, got {v!r}; "
                                  "fix config.json (it should come with the checkpoint)")
        return v

    h, nh = need("hidden_size"), need("num_attention_heads")
    nkv = config.get("num_key_value_heads") or nh
    head_dim = config.get("head_dim") or h // nh
    return {"V": need("vocab_size"), "H": h, "I": need("intermediate_size"), "L": need("num_hidden_layers"),
            "Q": nh * head_dim, "KV": int(nkv) * head_dim}


def expected_tensors(config: dict[str, Any], path: Path = Path(".")) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Hugging Face tensor name -> (GGUF tensor name, expected shape) for a Qwen2 config."""
    import gguf

    sizes = _sizes(config, path)
    out: dict[str, tuple[str, tuple[int, ...]]] = {}
    for hf, kind, suffix, dims in QWEN2_TENSORS:
        gguf_name = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR[kind]] + "." + suffix
        shape = tuple(sizes[d] for d in dims.split(","))
        blocks = range(sizes["L"]) if "{bid}" in hf else [None]
        for b in blocks:
            out[hf.format(bid=b)] = (gguf_name.format(bid=b), shape)
    return out


def read_json_file(file: Path) -> Any:
    """Parse a checkpoint's JSON file, or a CheckpointError naming it and saying to fetch it again."""
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{file} is not valid JSON ({e}); download it again") from None


def read_config(path: str | os.PathLike) -> dict[str, Any]:
    """config.json of a checkpoint folder, refused unless it describes a supported architecture."""
    folder = Path(path)
    if not folder.is_dir():
        raise CheckpointError(f"{folder} is not a folder; give a Hugging Face checkpoint folder "
                              "(with config.json and *.safetensors) or a repo id already pulled")
    cfg_file = folder / "config.json"
    if not cfg_file.is_file():
        raise CheckpointError(f"{folder} has no config.json; it is not a Hugging Face checkpoint folder "
                              "(download the whole repository, e.g. with `edge-qwen pull`)")
    config = read_json_file(cfg_file)
    if not isinstance(config, dict):
        raise CheckpointError(f"{cfg_file} must hold a JSON object")
    archs = config.get("architectures") or []
    if not isinstance(archs, list):
        archs = [archs]
    known = any(a in SUPPORTED_ARCHITECTURES for a in archs) or (not archs and config.get("model_type") == "qwen2")
    if not known or config.get("model_type", "qwen2") != "qwen2":
        raise CheckpointError(
            f"{cfg_file}: architecture {', '.join(map(str, archs)) or config.get('model_type') or 'unknown'} is not "
            f"supported; edge-qwen converts {', '.join(SUPPORTED_ARCHITECTURES)} (Qwen2 / Qwen2.5 and their fine-tunes) only"
        )
    return config


def read_safetensors_header(file: Path) -> tuple[dict[str, Any], int]:
    """(header dict, data start offset) of a safetensors file, checking it is complete."""
    size = file.stat().st_size
    with open(file, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{file} is truncated ({size} bytes); download it again")
        (n,) = struct.unpack("<Q", head)
        if n > 100_000_000 or 8 + n > size:
            raise CheckpointError(f"{file} is truncated or not a safetensors file (header of {n} bytes, "
                                  f"file of {size}); download it again")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise CheckpointError(f"{file} has a damaged header; download it again") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{file} has a damaged header; download it again")
    start = 8 + n
    for name, v in header.items():
        if name == "__metadata__":
            continue
        try:
            begin, stop = (int(x) for x in v["data_offsets"])
            shape = [int(d) for d in v["shape"]]
            dtype = str(v["dtype"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{file} has a damaged entry for tensor {name!r}; download it again") from None
        if dtype in _DTYPES and stop - begin != _DTYPES[dtype][1] * _numel(shape):
            raise CheckpointError(f"{file}: tensor {name!r} has {stop - begin} bytes for shape {shape} {dtype}; "
                                  "the file is damaged, download it again")
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if start + end > size:
        raise CheckpointError(f"{file} is truncated: its tensors need {start + end} bytes but the file has "
                              f"{size}; download it again")
    return header, start


def open_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Validate a Qwen2 checkpoint folder and index its tensors (no tensor data is read).

    Checks: config.json and architecture; every shard present and complete; every tensor
    known to the Qwen2 table (or deliberately skipped), of dtype F32/F16/BF16 and of the
    shape the config implies; no required tensor missing. Raises CheckpointError naming
    the file, tensor or key and what to do.
    """
    folder = Path(path)
    config = read_config(folder)
    index_file = folder / INDEX_FILE
    if index_file.is_file():
        try:
            weight_map = json.loads(index_file.read_text(encoding="utf-8"))["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError):
            raise CheckpointError(f"{index_file} is damaged (no weight_map); download it again") from None
        names = list(dict.fromkeys(weight_map.values()))
    elif (folder / SINGLE_FILE).is_file():
        weight_map, names = None, [SINGLE_FILE]
    else:
        found = sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".gguf"))
        hint = f" (found {', '.join(found[:3])}: only safetensors weights are read)" if found else ""
        raise CheckpointError(f"{folder} has neither {SINGLE_FILE} nor {INDEX_FILE}{hint}; "
                              "download the safetensors weights of the checkpoint")
    ckpt = Checkpoint(path=folder, config=config)
    for name in names:
        file = folder / name
        if not file.is_file():
            raise CheckpointError(f"shard {file} listed in {INDEX_FILE} is missing; download it again")
        header, start = read_safetensors_header(file)
        ckpt.files.append(file)
        for tname, info in header.items():
            if tname == "__metadata__":
                continue
            if weight_map is not None and weight_map.get(tname) != name:
                raise CheckpointError(f"{file} holds tensor {tname!r} but {INDEX_FILE} places it in "
                                      f"{weight_map.get(tname)!r}; the index and shards do not match, download again")
            ckpt.tensors[tname] = TensorRef(tname, file, start + info["data_offsets"][0], info["dtype"],
                                            tuple(info["shape"]))
    if weight_map is not None:
        for tname, shard in weight_map.items():
            if tname not in ckpt.tensors:
                raise CheckpointError(f"tensor {tname!r} is listed in {INDEX_FILE} but missing from {shard}; "
                                      "download the shard again")
    _validate(ckpt)
    return ckpt


def _is_skipped(name: str) -> bool:
    import re

    for pattern in SKIPPED_TENSORS:
        if re.fullmatch(re.escape(pattern).replace(r"\{bid\}", r"\d+"), name):
            return True
    return False


def _validate(ckpt: Checkpoint) -> None:
    expected = expected_tensors(ckpt.config, ckpt.path)
    for name, ref in ckpt.tensors.items():
        if ref.dtype not in _DTYPES:
            raise CheckpointError(f"tensor {name!r} in {ref.file.name} has dtype {ref.dtype}; edge-qwen reads "
                                  "F32, F16 and BF16 checkpoints only (dequantize GPTQ/AWQ checkpoints first)")
        if name == "lm_head.weight" and ckpt.tied:
            continue
        if name not in expected:
            if _is_skipped(name):
                continue
            raise CheckpointError(f"tensor {name!r} in {ref.file.name} is not part of a Qwen2ForCausalLM model "
                                  "(no GGUF name for it); is this checkpoint another architecture or an adapter?")
        shape = expected[name][1]
        if tuple(ref.shape) != shape:
            raise CheckpointError(f"tensor {name!r} in {ref.file.name} has shape {list(ref.shape)} but config.json "
                                  f"implies {list(shape)}; the weights do not match config.json")
    for name in expected:
        if name not in ckpt.tensors and not (name == "lm_head.weight" and ckpt.tied):
            raise CheckpointError(f"tensor {name!r} is missing from {ckpt.path}; the checkpoint is incomplete "
                                  "(download all shards) or is not a Qwen2ForCausalLM model")
