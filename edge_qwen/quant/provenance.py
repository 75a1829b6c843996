"""Provenance of quantized files: the source's sha256 (computed once, remembered) and the
`general.quantize.*` keys, written through llama.cpp's KV overrides.

Hashing a 1+ GB source costs about a second of CPU, so it runs on a low-priority thread while
llama.cpp quantizes: the output is written with a placeholder hash that is patched in place
(same length, so the GGUF layout does not move) before the file is renamed into place. Hashes are
remembered per (path, size, mtime, inode) in the process and in `<store>/cache/sha256.json`.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

from ..errors import EdgeQwenError
from ..files import sha256_file

HASH_PLACEHOLDER = "0" * 64
_ALIGN = 32  # GGUF_DEFAULT_ALIGNMENT
_hash_cache: dict[tuple[str, int, int, int], str] = {}


def _hash_key(path: str | os.PathLike) -> tuple[str, int, int, int]:
    st = os.stat(path)
    return (os.path.realpath(path), st.st_size, st.st_mtime_ns, st.st_ino)


def _hash_store() -> Path:
    from ..store import home

    return home() / "cache" / "sha256.json"


def _load_hash_store() -> dict[str, Any]:
    import json

    try:
        data = json.loads(_hash_store().read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


_store_lock = threading.Lock()  # the background hasher and the caller may save at once


def _write_hash_store(data: dict[str, Any]) -> None:
    # Through atomic_output like every output: a run killed while writing leaves a
    # `.sha256.json.partial-PID` that the next write here removes, never a half file.
    # Best effort: a read-only or full store only costs the hash again next time.
    import json

    from ..files import atomic_output

    with _store_lock:
        try:
            with atomic_output(_hash_store(), force=True) as tmp:
                tmp.write_text(json.dumps(data, indent=0), encoding="utf-8")
        except (OSError, EdgeQwenError):
            pass


def _save_hash(key: tuple[str, int, int, int], digest: str) -> None:
    # Remembered across processes, so a second `edge-qwen quantize` of the same file does not
    # read 1+ GB again; entries of files that are gone are dropped.
    data = {p: v for p, v in _load_hash_store().items() if os.path.exists(p)}
    data[key[0]] = {"size": key[1], "mtime_ns": key[2], "inode": key[3], "sha256": digest}
    _write_hash_store(data)


def cached_sha256(path: str | os.PathLike) -> str | None:
    """The sha256 remembered for this exact file (same path, size, mtime and inode), if any."""
    key = _hash_key(path)
    if key in _hash_cache:
        return _hash_cache[key]
    hit = _load_hash_store().get(key[0])
    if isinstance(hit, dict) and (hit.get("size"), hit.get("mtime_ns"), hit.get("inode")) == key[1:]:
        _hash_cache[key] = str(hit["sha256"])
        return _hash_cache[key]
    return None


def source_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file, remembered (in the process and in the store) while the file is unchanged."""
    known = cached_sha256(path)
    if known is None:
        key = _hash_key(path)
        known = _hash_cache[key] = sha256_file(path)
        _save_hash(key, known)
    return known


def hash_in_background(path: Path) -> None:
    # Lowest priority (Linux sets it per thread): hashing uses the cores llama.cpp leaves idle
    # (loading, writing) instead of slowing its quantization threads.
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
    except (AttributeError, OSError):
        pass
    source_sha256(path)


def kv_overrides(llama_cpp, kv: dict[str, str | int]):
    arr = (llama_cpp.llama_model_kv_override * (len(kv) + 1))()
    for i, (k, v) in enumerate(kv.items()):
        arr[i].key = k.encode()[:127]
        if isinstance(v, int):
            arr[i].tag = llama_cpp.LLAMA_KV_OVERRIDE_TYPE_INT
            arr[i].value.val_i64 = v
        else:
            arr[i].tag = llama_cpp.LLAMA_KV_OVERRIDE_TYPE_STR
            raw = str(v).encode()
            while len(raw) > 127:  # the C field holds 127 bytes; cut on a UTF-8 boundary
                raw = raw[:127].decode("utf-8", "ignore").encode()
            arr[i].value.val_str = raw
    return arr


def patch_string(path: Path, key: str, old: str, new: str) -> None:
    """Overwrite a same-length string value in a GGUF header in place (the file stays valid).

    A plain seek+write: an mmap flush here would force the whole freshly written file to disk.
    """
    import struct

    k = key.encode()
    needle = struct.pack("<Q", len(k)) + k + struct.pack("<IQ", 8, len(old)) + old.encode()
    with open(path, "r+b") as f:
        buf, base = b"", 0
        while block := f.read(1 << 22):  # the header comes first: a few MB at most
            buf += block
            at = buf.find(needle)
            if at >= 0:
                f.seek(base + at + len(needle) - len(old))
                f.write(new.encode())
                return
            keep = len(needle) - 1  # the needle may straddle two blocks
            base += len(buf) - keep
            buf = buf[-keep:]
    raise EdgeQwenError(f"internal error: provenance key {key} not found in {path}")


def kv_bytes(kv: dict[str, str | int], existing: dict[str, Any]) -> int:
    """Header bytes the new keys add (strings as written; ints become u32), padded to the alignment."""
    n = 0
    for k, v in kv.items():
        if k not in existing:
            n += 8 + len(k.encode()) + 4 + (4 if isinstance(v, int) else 8 + min(len(str(v).encode()), 127))
    return n + (-n % _ALIGN)


def forget_sha256(path: str | os.PathLike) -> None:
    """Drop a file's remembered hash (benchmarks use it to measure a first run)."""
    real = os.path.realpath(path)
    for key in [k for k in _hash_cache if k[0] == real]:
        del _hash_cache[key]
    data = _load_hash_store()
    if data.pop(real, None) is not None:
        _write_hash_store(data)
