"""The model store as Ollama's verbs see it: list what is there, show one model, copy (alias), remove.

Runnable models are the GGUF files in `<home>/models` (aliases made by `copy_model` are symbolic
links there) and the GGUF files of repos pulled with `pull REPO --quant Q`. `edge-qwen list`,
`show`, `cp` and `rm` are thin shells over these functions.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from collections.abc import Callable

from .errors import EdgeQwenError, ModelNotFoundError, OutputExistsError


@dataclass
class StoreModel:
    """One runnable model in the store."""

    name: str  # what to type: a store name, or ORG/NAME[:QUANT] for a pulled GGUF repo
    path: Path
    size: int
    modified: float  # seconds since the epoch
    file_type: str | None  # llama.cpp's name (Q4_K_M ...), None if unreadable
    architecture: str | None
    alias_of: Path | None = None  # set for an alias made by `cp`
    error: str | None = None  # why the file cannot be used, if it cannot

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["path"] = str(self.path)
        d["alias_of"] = str(self.alias_of) if self.alias_of else None
        d["modified"] = datetime.fromtimestamp(self.modified, timezone.utc).isoformat()
        return d


def _describe(name: str, path: Path) -> StoreModel:
    from .gguf_file import check_gguf
    from .hub import _file_type_name

    alias = Path(os.readlink(path)) if path.is_symlink() else None
    try:
        st = path.stat()
    except OSError:  # a dangling alias
        return StoreModel(name, path, 0, path.lstat().st_mtime, None, None, alias,
                          error=f"alias of {alias}, which no longer exists")
    try:
        info = check_gguf(path, architectures=None)
    except EdgeQwenError as e:
        return StoreModel(name, path, st.st_size, st.st_mtime, None, None, alias, error=e.message)
    return StoreModel(name, path, st.st_size, st.st_mtime, _file_type_name(info.file_type), info.architecture, alias)


def list_models() -> list[StoreModel]:
    """The runnable models in the store, newest first: store GGUFs and aliases, then pulled GGUF repos."""
    from .hub import list_checkpoints
    from .store import home

    out = []
    folder = home() / "models"
    for p in sorted(folder.glob("*.gguf")) if folder.is_dir() else []:
        out.append(_describe(p.stem, p))
    for c in list_checkpoints():
        ggufs = [f for f in sorted(c.path.glob("*.gguf")) if "-of-" not in f.name or "-00001-of-" in f.name]
        for f in ggufs:
            name = c.repo_id if len(ggufs) == 1 else f"{c.repo_id}:{_quant_of(f.name)}"
            out.append(_describe(name, f))
    out.sort(key=lambda m: -m.modified)
    return out


def _quant_of(filename: str) -> str:
    import re

    stem = re.sub(r"-\d{5}-of-\d{5}$", "", filename.removesuffix(".gguf"))
    return stem.rsplit("-", 1)[-1]


def model_info(model: str | None) -> dict[str, Any]:
    """What `show` prints: architecture, parameters, context, quantization, template, license, defaults."""
    from .gguf_file import check_gguf
    from .hub import _file_type_name
    from .store import resolve_model

    path = resolve_model(model)
    info = check_gguf(path, architectures=None)
    md = info.metadata
    arch = info.architecture
    stop = _token_text(path, md.get("tokenizer.ggml.eos_token_id"))
    return {
        "name": str(model or "default"), "path": str(path), "architecture": arch,
        "model_name": md.get("general.name"), "parameters": info.n_params,
        "size_label": md.get("general.size_label"),
        "context_length": md.get(f"{arch}.context_length"),
        "embedding_length": md.get(f"{arch}.embedding_length"),
        "quantization": _file_type_name(info.file_type), "size_bytes": info.size,
        "bits_per_weight": round(info.bits_per_weight, 2),
        "license": md.get("general.license") or md.get("general.license.name"),
        "template": md.get("tokenizer.chat_template"),
        # edge-qwen's own sampling defaults (chat), and the stop token the model ends a turn with
        "defaults": {"temperature": 0.7, "top_p": 0.9, "top_k": 0, "num_ctx": 4096, "num_predict": 1024,
                     **({"stop": stop} if stop else {})},
    }


def _token_text(path: Path, token_id: Any) -> str | None:
    """The text of one vocabulary entry, read straight from the header (check_gguf summarises the
    150k-token list, and gguf-py's reader takes about a minute to decode all of it)."""
    import mmap

    from .gguf_file import _ARRAY, _STRING, _Cursor

    if not isinstance(token_id, int) or token_id < 0:
        return None
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        view = memoryview(mm)
        try:
            cur = _Cursor(view, path)
            cur.take(16)
            n_kv = cur.unpack("Q")
            for _ in range(n_kv):
                key, vtype = cur.string(), cur.unpack("I")
                if key != "tokenizer.ggml.tokens":
                    cur.value(vtype, keep=False)
                    continue
                if vtype != _ARRAY or cur.unpack("I") != _STRING or token_id >= cur.unpack("Q"):
                    return None
                for _ in range(token_id):
                    cur.pos += 8 + cur.unpack("Q")
                return cur.string()
            return None
        finally:
            del cur
            view.release()


def info_rows(info: dict[str, Any]) -> list[tuple[str, Any]]:
    """`model_info` as (label, value) rows, in the order `show` and chat's `/show` print them."""
    params = info["parameters"]
    return [("model", info["model_name"] or info["name"]), ("path", info["path"]),
            ("architecture", info["architecture"]),
            ("parameters", f"{params / 1e9:.2f}B" if params >= 1e9 else f"{params / 1e6:.0f}M"),
            ("context length", info["context_length"]), ("embedding length", info["embedding_length"]),
            ("quantization", f"{info['quantization']} ({info['bits_per_weight']} bits/weight)"),
            ("size", f"{info['size_bytes'] / 1e6:.1f} MB"),
            ("license", info["license"] or "not recorded in the file")]


def copy_model(src: str, name: str, force: bool = False) -> Path:
    """Make NAME an alias of the model SRC in the store (a symbolic link; the file is not copied)."""
    from .files import check_output
    from .store import models_dir, resolve_model

    _check_name(name)
    target = (resolve_model(src)).resolve()
    dest = models_dir() / f"{name}.gguf"
    if dest.exists() or dest.is_symlink():
        if not force:
            raise OutputExistsError(f"the store already has a model named {name!r} ({dest}); choose another NAME "
                                    f"or `edge-qwen rm {name}` first")
    check_output(dest, force=True)
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.symlink(target, tmp)
    except OSError:  # no symbolic links here (Windows without the right): a hard link still costs no space
        os.link(target, tmp)
    os.replace(tmp, dest)
    return dest


def remove_model(name: str, confirm: Callable[[Path], bool] | None = None) -> Path | None:
    """Delete the store model NAME (an alias: only the alias; a pulled repo: its whole download).

    Files outside the store are never touched. `confirm(path)` is asked first, once the model is
    found; a False answer keeps it and returns None.
    """
    from .store import home

    folder = home() / "models"
    target: Path | None = None
    for cand in (folder / name, folder / f"{name}.gguf"):
        if cand.suffix == ".gguf" and (cand.is_file() or cand.is_symlink()) and cand.parent == folder:
            target = cand
            break
    repo = None
    if target is None and "/" in name:
        from .hub import list_checkpoints

        repo = name.partition(":")[0]
        if any(c.repo_id == repo for c in list_checkpoints()):
            from .store import hf_cache_dir

            target = hf_cache_dir() / f"models--{repo.replace('/', '--')}"
    if target is None:
        raise ModelNotFoundError(f"the store has no model named {name!r}; `edge-qwen list` shows what it has "
                                 "(files outside the store are not removed by edge-qwen)")
    if confirm is not None and not confirm(target):
        return None
    if repo is not None:
        import shutil

        shutil.rmtree(target)
    else:
        target.unlink()
    return target


def _check_name(name: str) -> None:
    import re

    if not re.fullmatch(r"[\w][\w.+-]{0,127}", name) or name == "default":
        raise EdgeQwenError(f"{name!r} cannot name a model: use letters, digits, '.', '_', '+' or '-' "
                            "(no folders, not 'default')", param="name")
