"""A Hugging Face checkpoint rebuilt from a qwen2 GGUF file.

Every tensor is dequantized with gguf-py, renamed back through the Qwen2 table and written
as safetensors (optionally sharded); config.json, generation_config.json, tokenizer.json and
tokenizer_config.json are rebuilt from the GGUF's metadata. This is how edge-qwen gets a real
checkpoint offline, and how its converter is checked against a GGUF that llama.cpp's own
converter made: qwen2 has no llama.cpp-side permutation of q/k, so names and shapes map 1:1.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ..errors import EdgeQwenError, ModelFileError

DTYPES = ("f32", "f16", "bf16")
_ST_DTYPE = {"f32": "F32", "f16": "F16", "bf16": "BF16"}
_TORCH_DTYPE = {"f32": "float32", "f16": "float16", "bf16": "bfloat16"}
_ROWS = 8192  # rows dequantized at a time, to keep memory flat


def _meta(reader: Any, key: str, default: Any = None) -> Any:
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def rebuild_config(reader: Any, path: Path, dtype: str) -> dict[str, Any]:
    """config.json for the GGUF's hyper-parameters (Qwen2ForCausalLM)."""
    arch = _meta(reader, "general.architecture")
    if arch != "qwen2":
        raise ModelFileError(f"{path} is a {arch!r} model; only qwen2 GGUF files can be rebuilt into a checkpoint")

    def need(key: str) -> Any:
        v = _meta(reader, f"qwen2.{key}")
        if v is None:
            raise ModelFileError(f"{path} lacks the key qwen2.{key}; it cannot be rebuilt into a checkpoint")
        return v

    names = {t.name for t in reader.tensors}
    n_vocab = len(reader.fields["tokenizer.ggml.tokens"].data)
    ctx = int(need("context_length"))
    layers = int(need("block_count"))
    config: dict[str, Any] = {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "_name_or_path": _meta(reader, "general.name") or path.stem,
        "hidden_size": int(need("embedding_length")),
        "intermediate_size": int(need("feed_forward_length")),
        "num_hidden_layers": layers,
        "num_attention_heads": int(need("attention.head_count")),
        "num_key_value_heads": int(need("attention.head_count_kv")),
        "max_position_embeddings": ctx,
        # float32 in the GGUF; 7 significant digits give back the same float32 (1e-06, not 9.99e-07)
        "rope_theta": float(f"{need('rope.freq_base'):.7g}"),
        "rms_norm_eps": float(f"{need('attention.layer_norm_rms_epsilon'):.7g}"),
        "vocab_size": n_vocab,
        "tie_word_embeddings": "output.weight" not in names,
        "hidden_act": "silu",
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "use_cache": True,
        "use_sliding_window": False,
        "sliding_window": ctx,
        "max_window_layers": layers,
        "rope_scaling": None,
        "torch_dtype": _TORCH_DTYPE[dtype],
    }
    kind = _meta(reader, "qwen2.rope.scaling.type")
    if kind in ("yarn", "linear"):
        config["rope_scaling"] = {"type": kind, "factor": float(f"{_meta(reader, 'qwen2.rope.scaling.factor'):.7g}")}
        if kind == "yarn":
            config["rope_scaling"]["original_max_position_embeddings"] = int(
                _meta(reader, "qwen2.rope.scaling.original_context_length", ctx))
    for key, tok in (("bos_token_id", "bos"), ("eos_token_id", "eos")):
        v = _meta(reader, f"tokenizer.ggml.{tok}_token_id")
        if v is not None:
            config[key] = int(v)
    return config


def _tokenizer_files(reader: Any, config: dict[str, Any]) -> dict[str, Any]:
    from .tokenizer import tokenizer_json_from_vocab

    if _meta(reader, "tokenizer.ggml.model") != "gpt2" or _meta(reader, "tokenizer.ggml.pre") != "qwen2":
        raise ModelFileError("the GGUF's tokenizer is not gpt2 BPE with the qwen2 pre-tokenizer; "
                             "edge-qwen rebuilds Qwen2 tokenizers only")
    tokens = _meta(reader, "tokenizer.ggml.tokens")
    types = [int(t) for t in _meta(reader, "tokenizer.ggml.token_type")]
    merges = _meta(reader, "tokenizer.ggml.merges")
    tok_json = tokenizer_json_from_vocab(tokens, types, merges)

    def token(kind: str) -> str | None:
        tid = _meta(reader, f"tokenizer.ggml.{kind}_token_id")
        return None if tid is None else tokens[int(tid)]

    tok_config: dict[str, Any] = {
        "add_bos_token": bool(_meta(reader, "tokenizer.ggml.add_bos_token", False)),
        "add_prefix_space": False,
        # Qwen2 has no BOS in its tokenizer config; the id lives in config.json (as Qwen ships it)
        "bos_token": None,
        "eos_token": token("eos"),
        "pad_token": token("padding"),
        "unk_token": None,
        "clean_up_tokenization_spaces": False,
        "errors": "replace",
        "model_max_length": config["max_position_embeddings"],
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
    }
    template = _meta(reader, "tokenizer.chat_template")
    if template:
        tok_config["chat_template"] = template
    gen = {"bos_token_id": config.get("bos_token_id"), "eos_token_id": config.get("eos_token_id"),
           "pad_token_id": _meta(reader, "tokenizer.ggml.padding_token_id")}
    gen = {k: int(v) for k, v in gen.items() if v is not None}
    return {"tokenizer.json": tok_json, "tokenizer_config.json": tok_config, "generation_config.json": gen}


def _encode(rows: Any, dtype: str) -> Any:
    import gguf
    import numpy as np

    if dtype == "f32":
        return np.ascontiguousarray(rows, dtype=np.float32)
    if dtype == "f16":
        return rows.astype(np.float16)
    return gguf.quants.quantize(np.ascontiguousarray(rows, dtype=np.float32), gguf.GGMLQuantizationType.BF16)


def _write_json(path: Path, obj: Any) -> None:
    # inside the folder's temporary name: the whole folder appears at once, or not at all
    path.write_text(json.dumps(obj, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")


def rebuild_checkpoint(gguf_path: str | os.PathLike, out_dir: str | os.PathLike, dtype: str = "f16",
                       max_shard_bytes: int | None = None, force: bool = False, quiet: bool = False) -> Path:
    """Rebuild a Hugging Face Qwen2 checkpoint folder from a qwen2 GGUF file.

    Writes model.safetensors (or model-0000i-of-0000n.safetensors + index when the weights
    exceed `max_shard_bytes`), config.json, generation_config.json, tokenizer.json and
    tokenizer_config.json into `out_dir`. The folder is built under a temporary name and
    renamed when complete; an existing non-empty `out_dir` is refused unless `force`, and with
    `force` it is deleted only after the new folder has taken its place.
    """
    import gguf
    import numpy as np

    from .checkpoint import expected_tensors
    from ..errors import OutputExistsError
    from ..gguf_file import open_reader
    from ..progress import progress

    if dtype not in DTYPES:
        raise ModelFileError(f"dtype {dtype!r} is not supported for a rebuilt checkpoint; choose {', '.join(DTYPES)}")
    src, out = Path(gguf_path), Path(out_dir)
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"{out} is a file; give a folder for the rebuilt checkpoint")
    if out.exists() and any(out.iterdir()):
        if not force:
            raise OutputExistsError(f"{out} already exists and is not empty; pass --force to replace it or choose "
                                    "another folder")
        # --force deletes the old folder once the new one is in: only ever a checkpoint, never the
        # source's own folder or a folder of other files given by mistake (`rebuild m.gguf . --force`)
        if src.resolve().is_relative_to(out.resolve()):
            raise OutputExistsError(f"{src} is inside {out}, which --force would replace (deleting it); choose "
                                    "another folder for the rebuilt checkpoint")
        if not (out / "config.json").is_file() or not any(out.glob("*.safetensors")):
            raise OutputExistsError(f"{out} is not a checkpoint folder (no config.json and *.safetensors), so "
                                    "--force does not replace it: it would delete what is there; choose an empty "
                                    "or new folder")
    reader = open_reader(src)
    config = rebuild_config(reader, src, dtype)
    files = _tokenizer_files(reader, config)
    to_hf = {g: hf for hf, (g, _shape) in expected_tensors(config, src).items()}
    plan = []  # (hf name, reader tensor, numpy shape)
    for t in reader.tensors:
        if t.name not in to_hf:
            raise ModelFileError(f"{src} has tensor {t.name!r}, which has no place in a Qwen2ForCausalLM checkpoint")
        plan.append((to_hf[t.name], t, tuple(int(d) for d in reversed(t.shape.tolist()))))
    missing = set(to_hf) - {t.name for t in reader.tensors} - ({"output.weight"} if config["tie_word_embeddings"] else set())
    if missing:
        raise ModelFileError(f"{src} lacks tensor(s) {', '.join(sorted(missing))}; it cannot be rebuilt")
    plan.sort(key=lambda p: p[0])
    width = 2 if dtype != "f32" else 4
    shards: list[list[tuple[str, Any, tuple[int, ...]]]] = [[]]
    size = 0
    for item in plan:
        nbytes = int(np.prod(item[2])) * width
        if max_shard_bytes and shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(item)
        size += nbytes

    from ..files import (check_free_space, partial_path, remove_quietly, remove_stale_partials, replace_into_place,
                         write_error)

    total = sum(int(np.prod(p[2])) * width for p in plan)
    tmp = partial_path(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_partials(out.parent)  # what runs killed with SIGKILL left behind
        remove_quietly(tmp)
        tmp.mkdir()  # a read-only folder fails here, before any work
    except OSError as e:
        raise write_error(e, out, tmp) from None
    try:
        check_free_space(out, total)  # the weights; the JSON files are small beside them
    except EdgeQwenError:
        remove_quietly(tmp)
        raise
    try:
        weight_map: dict[str, str] = {}
        with progress(total, f"rebuilding {dtype} checkpoint", "B", quiet, unit_scale=True) as bar:
            for i, shard in enumerate(shards, 1):
                fname = "model.safetensors" if len(shards) == 1 else f"model-{i:05d}-of-{len(shards):05d}.safetensors"
                header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
                offset = 0
                for hf, _t, shape in shard:
                    n = int(np.prod(shape)) * width
                    header[hf] = {"dtype": _ST_DTYPE[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
                    offset += n
                    weight_map[hf] = fname
                raw = json.dumps(header, separators=(",", ":")).encode()
                raw += b" " * (-len(raw) % 8)  # safetensors pads the header to 8 bytes
                with open(tmp / fname, "wb") as f:
                    f.write(len(raw).to_bytes(8, "little"))
                    f.write(raw)
                    for hf, t, shape in shard:
                        data = t.data
                        for start in range(0, data.shape[0] if data.ndim > 1 else 1, _ROWS):
                            part = data[start:start + _ROWS] if data.ndim > 1 else data
                            rows = gguf.quants.dequantize(part, t.tensor_type)
                            enc = _encode(rows, dtype)
                            f.write(memoryview(np.ascontiguousarray(enc)).cast("B"))  # errno kept (tofile drops it)
                            bar.update(enc.nbytes)
        if len(shards) > 1:
            _write_json(tmp / "model.safetensors.index.json",
                        {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))})
        _write_json(tmp / "config.json", config)
        for name, obj in files.items():
            _write_json(tmp / name, obj)
        # the old folder (--force) goes only once the new one is in its place
        replace_into_place(tmp, out)
    except OSError as e:  # a full disk or a folder gone read-only: one clear error, no partial folder
        raise write_error(e, out, tmp) from None
    finally:
        remove_quietly(tmp)
    return out


def default_checkpoint(quiet: bool = True) -> Path:
    """The default model rebuilt as an f16 checkpoint in the store (made once, then reused).

    The folder appears only when complete (built under a temporary name), so its config.json
    existing means it is whole.
    """
    from ..store import DEFAULT_MODEL_NAME, checkpoints_dir, default_model_path

    out = checkpoints_dir() / DEFAULT_MODEL_NAME.removesuffix("-q4_k_m")
    if (out / "config.json").is_file():
        return out
    return rebuild_checkpoint(default_model_path(quiet=quiet), out, dtype="f16", force=True, quiet=quiet)
