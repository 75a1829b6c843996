"""Checking and describing GGUF files before llama.cpp ever sees them.

llama.cpp aborts the process (or worse) on some malformed files; everything edge-qwen hands
to llama.cpp passes `check_gguf` first, which parses the header with gguf-py and checks that
every tensor's data lies inside the file.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ModelFileError

GGUF_MAGIC = b"GGUF"
SUPPORTED_ARCHITECTURES = ("qwen2", "qwen3", "qwen2moe", "qwen3moe", "qwen2vl")  # the Qwen family (issue 14)
# Gated DeltaNet linear attention interleaved with full attention (issue 23): Qwen3.5/3.6, Qwen3-Next,
# Qwen3.8-Flash-Next. Their recurrent state cannot be cut back to a prefix (see engine.scheduler).
HYBRID_ARCHITECTURES = ("qwen35", "qwen35moe", "qwen3next", "qwen4exp")
SUPPORTED_ARCHITECTURES += HYBRID_ARCHITECTURES

# Qwen3-VL (issue 23): its text models, which take images with their --mmproj vision tower
SUPPORTED_ARCHITECTURES += ("qwen3vl", "qwen3vlmoe")


@dataclass
class GGUFInfo:
    """What `check_gguf` learned about a file."""

    path: Path
    size: int
    architecture: str
    file_type: int | None
    n_tensors: int
    n_params: int
    metadata: dict[str, Any] = field(default_factory=dict)
    tensor_types: dict[str, int] = field(default_factory=dict)  # type name -> count

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.size / max(self.n_params, 1)


# GGUF value types (gguf.GGUFValueType) -> struct format of a scalar.
_SCALAR = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9
_MAX_ARRAY_SHOWN = 64


class _Cursor:
    """A bounds-checked little-endian reader over a memory map (fast: no per-value numpy)."""

    def __init__(self, buf, path: Path):
        self.buf, self.pos, self.path = buf, 0, path

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.buf):
            raise ModelFileError(f"{self.path} is truncated or damaged: its header ends early "
                                 f"(needed {n} bytes at offset {self.pos}); download or convert it again")
        b = self.buf[self.pos:self.pos + n]
        self.pos += n
        return b

    def unpack(self, fmt: str):
        import struct

        return struct.unpack("<" + fmt, self.take(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        n = self.unpack("Q")
        return bytes(self.take(n)).decode("utf-8", errors="replace")

    def value(self, vtype: int, keep: bool = True):
        if vtype in _SCALAR:
            return self.unpack(_SCALAR[vtype])
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            sub = self.unpack("I")
            n = self.unpack("Q")
            if sub in _SCALAR and n > _MAX_ARRAY_SHOWN:
                import struct

                self.take(n * struct.calcsize(_SCALAR[sub]))
                return f"[{n} values]"
            if sub == _STRING and n > _MAX_ARRAY_SHOWN:
                buf, pos, end = self.buf, self.pos, len(self.buf)
                for _ in range(n):  # skip without decoding: 300k tokens in a few ms
                    if pos + 8 > end:
                        break
                    pos += 8 + int.from_bytes(buf[pos:pos + 8], "little")
                else:
                    if pos <= end:
                        self.pos = pos
                        return f"[{n} strings]"
                self.take(end + 1 - self.pos)  # past the end: raises "truncated"
            items = [self.value(sub) for _ in range(n)]
            if n > _MAX_ARRAY_SHOWN:
                return f"[{n} {'strings' if sub == _STRING else 'values'}]"
            return items
        raise ModelFileError(f"{self.path} is damaged: unknown GGUF value type {vtype} at offset {self.pos}")


def read_header(path: str | os.PathLike) -> tuple[dict[str, Any], list[tuple[str, tuple[int, ...], int, int]], int]:
    """Parse a GGUF header: (metadata, [(tensor name, shape, ggml type, offset)], data start).

    Arrays longer than 64 items are summarised as "[N values]" rather than decoded.
    Raises ModelFileError naming the problem for a missing, foreign, truncated or unreadable file.
    """
    try:
        return _read_header(Path(path))
    except OSError as e:  # a failing disk, a file that cannot be read or mapped: one line naming it
        from .files import describe_os_error

        raise ModelFileError(describe_os_error(e, "cannot read", path)) from None


def _read_header(p: Path) -> tuple[dict[str, Any], list[tuple[str, tuple[int, ...], int, int]], int]:
    import mmap

    if not p.exists():
        from .files import missing_path_note

        raise ModelFileError(f"{p} does not exist ({missing_path_note(p)}); give the path of a GGUF model file")
    if p.is_dir():
        raise ModelFileError(f"{p} is a folder, not a GGUF file (to convert a Hugging Face folder use `edge-qwen convert`)")
    if not p.is_file():  # a pipe or a device: opening it would block, and it cannot be mapped
        raise ModelFileError(f"{p} is not a regular file (a pipe or a device); give a GGUF model file")
    size = p.stat().st_size
    with open(p, "rb") as f:
        head = f.read(8)
        if len(head) < 8 or head[:4] != GGUF_MAGIC:
            raise ModelFileError(f"{p} is not a GGUF file (no GGUF magic in its first bytes); give a .gguf model file")
        version = int.from_bytes(head[4:8], "little")
        if version not in (2, 3):
            raise ModelFileError(f"{p} is GGUF version {version}; only versions 2 and 3 are supported")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            cur = _Cursor(memoryview(mm), p)
            try:
                cur.take(8)
                n_tensors, n_kv = cur.unpack("Q"), cur.unpack("Q")
                if n_tensors > 1_000_000 or n_kv > 1_000_000:
                    raise ModelFileError(f"{p} is damaged: implausible header counts ({n_tensors} tensors, {n_kv} keys)")
                meta: dict[str, Any] = {}
                for _ in range(n_kv):
                    key = cur.string()
                    meta[key] = cur.value(cur.unpack("I"))
                tensors = []
                for _ in range(n_tensors):
                    name = cur.string()
                    nd = cur.unpack("I")
                    if nd > 8:
                        raise ModelFileError(f"{p} is damaged: tensor {name!r} claims {nd} dimensions")
                    shape = tuple(cur.unpack("Q") for _ in range(nd))
                    tensors.append((name, shape, cur.unpack("I"), cur.unpack("Q")))
                align = int(meta.get("general.alignment", 32) or 32)
                start = cur.pos + (-cur.pos % align)
            finally:
                cur.buf.release()
    import gguf

    for name, shape, ttype, off in tensors:
        try:
            block, tsize = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(ttype)]
        except (ValueError, KeyError):
            raise ModelFileError(f"{p} has tensor {name!r} of unknown type {ttype}; is it from a newer llama.cpp?") from None
        n = 1
        for d in shape:
            n *= d
        if shape and shape[0] % block:
            raise ModelFileError(f"{p} is damaged: tensor {name!r} row of {shape[0]} is not a multiple of its block {block}")
        end = start + off + n // block * tsize
        if end > size:
            raise ModelFileError(
                f"{p} is truncated: tensor {name!r} needs bytes up to {end} but the file has {size}; "
                "download or convert it again"
            )
    return meta, tensors, start


def open_reader(path: str | os.PathLike):
    """A gguf.GGUFReader for a file that passed `read_header` (for reading tensor data)."""
    import gguf

    read_header(path)
    try:
        return gguf.GGUFReader(str(path), "r")
    except Exception as e:  # gguf-py raises ValueError/IndexError/etc. on damaged files
        raise ModelFileError(f"{path} is a damaged GGUF file ({type(e).__name__}: {e}); download or convert it again") from None


def check_gguf(path: str | os.PathLike, architectures: tuple[str, ...] | None = SUPPORTED_ARCHITECTURES) -> GGUFInfo:
    """Validate a GGUF file and summarise it. Raises ModelFileError naming the problem."""
    import gguf

    p = Path(path)
    meta, tensors, _ = read_header(p)
    arch = meta.get("general.architecture")
    if not isinstance(arch, str):
        raise ModelFileError(f"{p} has no general.architecture key; it is not a model file llama.cpp can load")
    if architectures is not None and arch not in architectures:
        raise ModelFileError(
            f"{p} is a {arch!r} model; edge-qwen supports {', '.join(architectures)} (the Qwen family) only"
            + ("; a 'clip' file is a vision projector: pass it as --mmproj next to its model" if arch == "clip" else "")
        )
    types: dict[str, int] = {}
    n_params = 0
    for _name, shape, ttype, _off in tensors:
        tname = gguf.GGMLQuantizationType(ttype).name
        types[tname] = types.get(tname, 0) + 1
        n = 1
        for d in shape:
            n *= d
        n_params += n
    ft = meta.get("general.file_type")
    return GGUFInfo(path=p, size=p.stat().st_size, architecture=arch,
                    file_type=int(ft) if isinstance(ft, int) else None,
                    n_tensors=len(tensors), n_params=n_params, metadata=meta, tensor_types=types)


def layer_kinds(metadata: dict[str, Any], tensors: list[tuple[str, tuple[int, ...], int, int]]) -> dict[str, Any]:
    """What each block of a model is, from its tensors: "attention", "linear_attention" (Gated
    DeltaNet / SSM state: ssm_* tensors) or "mtp" (the multi-token-prediction block after the
    model's, `nextn_predict_layers`), each with "+moe" when it has experts. Returns
    {"blocks": [kind per block], "counts": {kind: n}}."""
    arch = metadata.get("general.architecture", "")
    n_blocks = int(metadata.get(f"{arch}.block_count") or 0)
    n_mtp = int(metadata.get(f"{arch}.nextn_predict_layers") or 0)
    parts: dict[int, set[str]] = {}
    for name, *_ in tensors:
        p = name.split(".")
        if len(p) > 2 and p[0] == "blk" and p[1].isdigit():
            parts.setdefault(int(p[1]), set()).add(p[2])
    blocks = []
    for b in range(n_blocks):
        t = parts.get(b, set())
        if n_mtp and b >= n_blocks - n_mtp:
            kind = "mtp"
        elif any(x.startswith("ssm_") for x in t):
            kind = "linear_attention"
        elif t & {"attn_q", "attn_qkv", "attn_k"}:
            kind = "attention"
        else:
            kind = "other"
        if t & {"ffn_gate_exps", "ffn_up_exps", "ffn_down_exps", "ffn_gate_up_exps"}:
            kind += "+moe"
        blocks.append(kind)
    counts: dict[str, int] = {}
    for k in blocks:
        counts[k] = counts.get(k, 0) + 1
    return {"blocks": blocks, "counts": counts}
