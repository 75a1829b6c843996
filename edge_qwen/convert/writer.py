"""Hugging Face Qwen checkpoint -> GGUF, written with gguf-py's GGUFWriter.

The header (hyper-parameters, tokenizer, provenance, tensor directory) is written first;
then tensor data streams in row chunks from the checkpoint's memory maps straight into the
file, so peak memory is one chunk plus the tokenizer, not the model. Tensor names come
from the architecture's table in `edge_qwen.convert.archs`; a Qwen2.5-VL checkpoint also
converts (`mmproj=True`) to the vision-tower GGUF libmtmd loads.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from typing import Any

from .. import __version__
from .checkpoint import Checkpoint, TensorSource, open_checkpoint, tensor_plan
from ..errors import CheckpointError
from ..files import atomic_output

OUTTYPES = ("f32", "f16", "bf16", "q8_0")


def resolve_source(src: str | os.PathLike) -> Path:
    """A local checkpoint folder, or a repo id ("Qwen/Qwen2.5-0.5B-Instruct") already pulled into the store.

    A missing path shaped like a repo id (`ckpt/nope`) is looked up in the store only if it was
    pulled; otherwise the error says first that no such local folder exists (a mistyped path
    is the likelier mistake), then how to pull it if it was meant as a repo.
    """
    from ..files import missing_path_note

    p = Path(src).expanduser()
    if p.exists():
        return p
    text = str(src)
    if re.fullmatch(r"[\w.-]+/[\w.-]+", text) and not text.startswith("."):
        from ..hub import is_pulled, snapshot_path

        if is_pulled(text):
            return Path(snapshot_path(text, revision=None))
        raise CheckpointError(f"{text!r} is not a local folder ({missing_path_note(p)}) nor a repo pulled into "
                              f"the model store; check the path, or if you meant the Hugging Face repo {text}, "
                              f"run `edge-qwen pull {text}` first")
    raise CheckpointError(f"{text!r} is neither a checkpoint folder nor a repo id (org/name) "
                          f"({missing_path_note(p)}); give a Hugging Face checkpoint folder or pull the repository first")


def _provenance(ckpt: Checkpoint) -> dict[str, str]:
    """Where the weights came from: repo and revision (from a hub cache path) and a folder hash."""
    folder = ckpt.path.resolve()
    info: dict[str, str] = {}
    parts = folder.parts
    for i, part in enumerate(parts):
        if part.startswith("models--") and i + 2 < len(parts) and parts[i + 1] == "snapshots":
            info["repo"] = part[len("models--"):].replace("--", "/")
            info["revision"] = parts[i + 2]
    if "repo" not in info:
        name = str(ckpt.config.get("_name_or_path") or "")
        if re.fullmatch(r"[\w.-]+/[\w.-]+", name) and not Path(name).exists():
            info["repo"] = name
    # The folder's identity: config.json plus the index (or the single file's tensor header).
    h = hashlib.sha256((folder / "config.json").read_bytes())
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        h.update(index.read_bytes())
    else:
        with open(ckpt.files[0], "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            h.update(f.read(n))
    info["sha256"] = h.hexdigest()
    lic = _license(folder, ckpt.config)
    if lic:
        info["license"] = lic
    return info


def _license(folder: Path, config: dict[str, Any]) -> str | None:
    if isinstance(config.get("license"), str):
        return config["license"]
    readme = folder / "README.md"
    if readme.is_file():
        m = re.search(r"^license:\s*([\w.+-]+)\s*$", readme.read_text(encoding="utf-8", errors="replace")[:4000], re.M)
        if m:
            return m.group(1)
    lic = folder / "LICENSE"
    if lic.is_file():
        first = lic.read_text(encoding="utf-8", errors="replace").strip().splitlines()
        if first:
            return first[0].strip()[:200]
    return None


# GGUF tensors llama.cpp keeps in float32 whatever the outtype (it computes them in f32):
# the MoE routers, position embeddings and the linear attention's conv1d kernel.
_F32_TENSORS = ("FFN_GATE_INP", "FFN_GATE_INP_SHEXP", "POS_EMBD", "V_ENC_EMBD_POS", "SSM_CONV1D")


def _tensor_type(outtype: str, shape: tuple[int, ...], src: TensorSource | None = None, part: str = "model"):
    """The GGUF type of one tensor, by llama.cpp's converter's rules (so the files are identical)."""
    import gguf

    T = gguf.GGMLQuantizationType
    row = src.row if src is not None else None
    if row is not None and part == "mmproj" and row.tensor == "V_ENC_EMBD_PATCH" and row.suffix == "weight":
        return T.F16 if outtype == "f16" else T.F32  # the patch convolution: f16 or f32 only (its bias: f32)
    if len(shape) < 2 or (src is not None and src.gguf_name.endswith("_norm.weight")):
        return T.F32  # norms and biases stay float32, as llama.cpp expects
    if row is not None and (row.tensor in _F32_TENSORS or not src.gguf_name.endswith(".weight")):
        return T.F32
    if outtype == "q8_0":
        return T.Q8_0 if shape[-1] % 32 == 0 else T.F16  # llama.cpp falls back to f16 the same way
    return {"f32": T.F32, "f16": T.F16, "bf16": T.BF16}[outtype]


def _warn_tied_head(ckpt: Checkpoint, chunk_bytes: int) -> None:
    """Say so when a tied checkpoint stores an lm_head that is not its embedding.

    transformers ignores that head (it ties it to the embedding); llama.cpp's converter writes
    it and llama.cpp uses it, so the GGUF follows llama.cpp and the two runtimes then differ.
    """
    import warnings

    import numpy as np

    head, embd = ckpt.tensors.get("lm_head.weight"), ckpt.tensors.get("model.embed_tokens.weight")
    if not ckpt.tied or head is None or embd is None or head.shape != embd.shape:
        return
    for a, b in zip(head.chunks(chunk_bytes), embd.chunks(chunk_bytes)):
        if not np.array_equal(a, b):
            warnings.warn(f"{ckpt.path}: tie_word_embeddings is true but the stored lm_head.weight differs from "
                          "model.embed_tokens.weight; the GGUF keeps the stored head as output.weight (as "
                          "llama.cpp's converter does), while transformers would use the embedding", stacklevel=3)
            return


def _writer_class() -> Any:
    """gguf.GGUFWriter with a bulk packer for long arrays of strings or numbers (the 151k tokens,
    their types and merges). gguf-py packs them one struct.pack per item: seconds of pure Python,
    a fifth of a 0.5B model's conversion. The bytes are the same."""
    import struct

    import gguf
    import numpy as np

    V = gguf.GGUFValueType
    numeric = {V.UINT8: "<u1", V.INT8: "<i1", V.UINT16: "<u2", V.INT16: "<i2", V.UINT32: "<u4", V.INT32: "<i4",
               V.FLOAT32: "<f4", V.UINT64: "<u8", V.INT64: "<i8", V.FLOAT64: "<f8"}
    python_type = {str: V.STRING, int: V.INT32, float: V.FLOAT32}

    class FastWriter(gguf.GGUFWriter):
        def _pack_val(self, val: Any, vtype: Any, add_vtype: bool, sub_type: Any = None) -> bytes:
            if (vtype != V.ARRAY or not isinstance(val, list) or len(val) < 256
                    or self.endianess != gguf.GGUFEndian.LITTLE):
                return super()._pack_val(val, vtype, add_vtype, sub_type)
            first = type(val[0])
            ltype = sub_type if sub_type is not None else python_type.get(first)
            if ltype is None or not all(type(v) is first for v in val):
                return super()._pack_val(val, vtype, add_vtype, sub_type)  # mixed or other types: gguf-py decides
            head = (struct.pack("<I", vtype) if add_vtype else b"") + struct.pack("<IQ", ltype, len(val))
            if ltype == V.STRING and first is str:
                encoded = [v.encode("utf-8") for v in val]
                lengths = np.fromiter((len(e) for e in encoded), dtype="<u8", count=len(encoded))
                out = bytearray(head)
                for n, e in zip(lengths.view(np.uint8).reshape(-1, 8), encoded):
                    out += n.tobytes()
                    out += e
                return bytes(out)
            if ltype in numeric and first in (int, float):
                return head + np.asarray(val, dtype=numeric[ltype]).tobytes()
            return super()._pack_val(val, vtype, add_vtype, sub_type)

    return FastWriter


def _f16_converter() -> Any:
    """float32 (or float16) array -> float16, the bytes numpy's astype gives (round to nearest even,
    IEEE overflow and subnormals), through ggml's vectorized row converter: about 15x faster than
    numpy's scalar loop, which was half of an f16 conversion's time."""
    import ctypes

    import numpy as np

    try:
        from llama_cpp._ggml import libggml

        fn = libggml.ggml_cpu_fp32_to_fp16
        fn.argtypes, fn.restype = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64], None
    except (ImportError, AttributeError, OSError):  # another llama.cpp build: numpy's own conversion
        return lambda a: np.asarray(a).astype(np.float16)

    buf = np.empty(0, dtype=np.float16)

    def convert(a: Any) -> Any:
        """The result lives in one buffer reused chunk after chunk (fresh pages cost a fault each):
        write it out before converting the next block."""
        nonlocal buf
        if a.dtype == np.float16:
            return a
        a = np.ascontiguousarray(a, dtype=np.float32)
        if buf.size < a.size:
            buf = np.empty(a.size, dtype=np.float16)
        out = buf[:a.size].reshape(a.shape)
        fn(a.ctypes.data, out.ctypes.data, a.size)
        return out

    return convert


def _encode(block: Any, qtype: Any) -> Any:
    import gguf
    import numpy as np

    if qtype == gguf.GGMLQuantizationType.F32:
        return np.ascontiguousarray(block, dtype=np.float32)
    if qtype == gguf.GGMLQuantizationType.F16:
        return block.astype(np.float16)
    return gguf.quants.quantize(np.ascontiguousarray(block, dtype=np.float32), qtype)


# Largest magnitude a tensor type can hold: float16 saturates at 65504, and Q8_0 keeps each
# block's scale (max |x| / 127) in float16.
_FINITE_LIMIT = {"F16": 65504.0, "Q8_0": 65504.0 * 127}


def _check_values(block: Any, ref: Any, qtype: Any, row0: int) -> None:
    """Refuse NaN/infinite weights, and weights the tensor's type cannot hold, naming the tensor.

    Runs on each chunk as it streams (two reductions over memory already read; no extra pass
    over the file). A NaN weight makes llama.cpp's logits NaN, and the model then outputs
    token 0 forever; f16 would silently turn values beyond 65504 into infinities.
    """
    import numpy as np

    hi, lo = float(block.max()), float(block.min())
    if np.isfinite(hi) and np.isfinite(lo):
        limit = _FINITE_LIMIT.get(qtype.name)
        if limit is not None and max(hi, -lo) > limit:
            raise CheckpointError(f"tensor {ref.name!r} in {ref.file.name} has values up to {max(hi, -lo):.4g}, "
                                  f"beyond what {qtype.name} can hold ({limit:.6g}); convert with --outtype bf16 "
                                  "or f32 (outtype='bf16')")
        return
    first = np.argwhere(~np.isfinite(block))[0]
    where = f"row {row0 + int(first[0])}" if block.ndim > 1 else f"index {int(first[0])}"
    raise CheckpointError(f"tensor {ref.name!r} in {ref.file.name} holds {int(np.isnan(block).sum())} NaN and "
                          f"{int(np.isinf(block).sum())} infinite values (the first at {where}); the checkpoint is "
                          "damaged or its training diverged, and a GGUF of it would output garbage: download it again "
                          "or fix the weights")


def convert(src: str | os.PathLike, out: str | os.PathLike | None = None, outtype: str = "f16",
            force: bool = False, quiet: bool = False, name: str | None = None,
            chunk_bytes: int = 64 << 20, mmproj: bool = False, mtp: bool = True) -> Path:
    """Convert a Hugging Face Qwen checkpoint folder (or pulled repo id) to a GGUF file.

    Qwen2/2.5, Qwen3, Qwen2-MoE, Qwen3-MoE and Qwen2.5-VL (the text model). `mmproj=True`
    writes a Qwen2.5-VL checkpoint's vision tower instead (the `mmproj-*.gguf` libmtmd loads).
    Qwen3.5/3.6 (dense and MoE) and Qwen3-Next keep their MTP block unless `mtp=False`
    (llama.cpp's --no-mtp).
    `outtype`: f32, f16, bf16 or q8_0 (norms and biases are always f32). The output is
    written under a temporary name and renamed when complete; an existing `out` is kept
    unless `force`. Returns the output path. Raises CheckpointError / OutputExistsError.
    """
    import gguf
    import numpy as np

    from ..progress import progress
    from .tokenizer import add_vocab, read_vocab

    if outtype not in OUTTYPES:
        raise CheckpointError(f"outtype {outtype!r} is not supported; choose one of {', '.join(OUTTYPES)}")
    folder = resolve_source(src)
    part = "mmproj" if mmproj else "model"
    ckpt = open_checkpoint(folder, part, mtp=mtp)
    prov = _provenance(ckpt)
    # a hub snapshot folder is named after its commit: name the model after the repo instead
    base = prov["repo"].split("/")[-1] if "revision" in prov else folder.resolve().name
    if out is None:
        from ..store import models_dir

        out = models_dir() / f"{'mmproj-' if mmproj else ''}{base.lower()}-{outtype}.gguf"
    from ..files import check_output

    out_path = Path(out).expanduser()
    if out_path.exists() and out_path.resolve().parent == folder.resolve() and out_path.suffix != ".gguf":
        # -o ckpt/model.safetensors --force would replace a file of the checkpoint with the GGUF
        raise CheckpointError(f"output {out} is a file of the checkpoint being converted; write the GGUF "
                              "to another name (a .gguf file)")
    check_output(out, force)  # fail before the slow tokenizer work
    from .archs import text_config

    vocab = None if mmproj else read_vocab(folder, int(text_config(ckpt.config)["vocab_size"]))
    _warn_tied_head(ckpt, chunk_bytes)
    plan = []  # (gguf name, tensor source, gguf type, nbytes)
    for source in tensor_plan(ckpt):
        qtype = _tensor_type(outtype, source.shape, source, part)
        block, size = gguf.GGML_QUANT_SIZES[qtype]
        plan.append((source.gguf_name, source, qtype, int(np.prod(source.shape)) // block * size))
    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                 "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[outtype]

    with atomic_output(out, force, expected_size=sum(p[3] for p in plan)) as tmp:
        w = _writer_class()(tmp, ckpt.arch.arch_name)
        try:
            w.add_type(gguf.GGUFType.MMPROJ if mmproj else gguf.GGUFType.MODEL)
            w.add_name(name or str(ckpt.config.get("_name_or_path") or "").split("/")[-1] or base)
            if "repo" in prov:
                w.add_source_repo_url(f"https://huggingface.co/{prov['repo']}")
                w.add_string("edge_qwen.source.repo", prov["repo"])
            if "revision" in prov:
                w.add_string("edge_qwen.source.revision", prov["revision"])
            if "license" in prov:
                w.add_license(prov["license"])
            w.add_string("edge_qwen.source.sha256", prov["sha256"])
            w.add_string("edge_qwen.version", __version__)
            w.add_string("edge_qwen.outtype", outtype)
            try:
                ckpt.arch.hparams(w, ckpt.config, folder)
            except (KeyError, TypeError, ValueError) as e:
                raise CheckpointError(f"{folder / 'config.json'} has a missing or malformed value "
                                      f"({type(e).__name__}: {e}); fix config.json") from None
            w.add_file_type(file_type)
            w.add_quantization_version(gguf.GGML_QUANT_VERSION)
            if vocab is not None:
                add_vocab(w, vocab)
            for gguf_name, ref, qtype, nbytes in plan:
                w.add_tensor_info(gguf_name, ref.shape, np.dtype(np.float32), nbytes, raw_dtype=qtype)
            w.write_header_to_file()
            w.write_kv_data_to_file()
            w.write_ti_data_to_file()
            del vocab
            fout = w.fout[0]
            to_f16 = _f16_converter()
            total = sum(p[3] for p in plan)
            with progress(total, f"converting to {outtype}", "B", quiet, unit_scale=True) as bar:
                for i, (gguf_name, ref, qtype, nbytes) in enumerate(plan, 1):
                    w.write_padding(fout, fout.tell())
                    written = row0 = 0
                    # f16: straight from the memory map (no float32 copy), through ggml's converter
                    direct = qtype == gguf.GGMLQuantizationType.F16
                    for block in ref.chunks(chunk_bytes, raw=direct):
                        _check_values(block, ref, qtype, row0)
                        data = to_f16(block) if direct else _encode(block, qtype)
                        row0 += block.shape[0] if block.ndim > 1 else 0
                        del block
                        # fout.write, not ndarray.tofile: tofile reports a full disk without an errno
                        fout.write(memoryview(np.ascontiguousarray(data)).cast("B"))
                        written += data.nbytes
                        bar.update(data.nbytes)
                    if written != nbytes:  # would silently corrupt every later tensor
                        raise RuntimeError(f"internal error: {gguf_name} wrote {written} bytes, planned {nbytes}")
                    w.write_padding(fout, nbytes)
                    bar.set_postfix_str(f"tensor {i}/{len(plan)}", refresh=False)
            fout.flush()
        finally:
            w.close()
    return Path(out)


PROVENANCE_PREFIXES = ("general.", "edge_qwen.")


def inspect_gguf(path: str | os.PathLike) -> dict[str, Any]:
    """A summary of a GGUF file: size, parameters, bits per weight, tensor types, layer kinds, metadata, provenance."""
    from ..gguf_file import check_gguf, layer_kinds, read_header

    info = check_gguf(path, architectures=None)
    meta = {k: v for k, v in info.metadata.items()}
    layers = layer_kinds(meta, read_header(info.path)[1])
    return {
        "path": str(info.path),
        "architecture": info.architecture,
        "size_bytes": info.size,
        "n_tensors": info.n_tensors,
        "n_params": info.n_params,
        "bits_per_weight": round(info.bits_per_weight, 3),
        "file_type": info.file_type,
        "tensor_types": dict(sorted(info.tensor_types.items())),
        "layer_kinds": layers["counts"],  # attention / linear_attention (recurrent) / mtp, "+moe" with experts
        "layers": layers["blocks"],
        "provenance": {k: v for k, v in meta.items() if k.startswith(PROVENANCE_PREFIXES)},
        "metadata": {k: v for k, v in meta.items() if not k.startswith(PROVENANCE_PREFIXES)},
    }


def default_f16_gguf(quiet: bool = True) -> Path:
    """The store's f16 GGUF converted by edge-qwen from the rebuilt default checkpoint (made once)."""
    from .rebuild import default_checkpoint
    from ..store import DEFAULT_MODEL_NAME, models_dir

    out = models_dir() / (DEFAULT_MODEL_NAME.removesuffix("-q4_k_m") + "-f16.gguf")
    if out.is_file():  # written atomically: present means complete
        return out
    return convert(default_checkpoint(quiet), out, outtype="f16", quiet=quiet)
