"""Pulling Hugging Face checkpoints into the model store, and finding them again offline.

`pull` wraps huggingface_hub's `snapshot_download`, limited to the files conversion needs,
into the store's own HF cache (`edge_qwen.store.hf_cache_dir()`); `snapshot_path` finds a
pulled repo without touching the network. huggingface_hub is imported only inside functions.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from .errors import ModelNotFoundError
from .store import hf_cache_dir

_COMMIT_RE = re.compile(r"^[0-9a-f]{40}$")


def _repo_folder(repo_id: str) -> Path:
    # huggingface_hub's cache layout: models--{org}--{name}
    return hf_cache_dir() / ("models--" + repo_id.replace("/", "--"))


def _check_repo_id(repo_id: str) -> None:
    from .errors import EdgeQwenError

    if not re.fullmatch(r"[A-Za-z0-9][\w.\-]*/[\w.\-]+", repo_id or "") or ".." in repo_id:
        raise EdgeQwenError(
            f"{repo_id!r} is not a Hugging Face repo id; give it as ORG/NAME, e.g. Qwen/Qwen2.5-0.5B-Instruct",
            param="repo_id",
        )


def snapshot_path(repo_id: str, revision: str | None = None) -> Path:
    """The local folder of a pulled repo, found offline in the store's HF cache.

    `revision` is a branch, tag or commit hash (default: main). Raises ModelNotFoundError
    saying to run `edge-qwen pull REPO` when the repo (or that revision) was never pulled.
    """
    _check_repo_id(repo_id)
    rev = revision or "main"
    folder = _repo_folder(repo_id)
    hint = f"run `edge-qwen pull {repo_id}" + (f" --revision {revision}`" if revision else "`")
    if _COMMIT_RE.fullmatch(rev):
        commit = rev
    else:
        ref = folder / "refs" / rev
        if not ref.is_file():
            raise ModelNotFoundError(
                f"{repo_id} (revision {rev}) is not in the model store ({hf_cache_dir()}); {hint} first"
            )
        commit = ref.read_text(encoding="utf-8").strip()
    snap = folder / "snapshots" / commit
    if not (snap / "config.json").is_file():
        raise ModelNotFoundError(
            f"{repo_id} (revision {rev}, commit {commit[:12]}) is not completely in the model store "
            f"({snap} has no config.json); {hint} to complete it"
        )
    return snap
