"""The model manifest (models/manifest.json): known Qwen repositories (safetensors and GGUF) and the offline default."""

from __future__ import annotations

import json
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any


@lru_cache(maxsize=1)
def load_manifest() -> dict[str, Any]:
    """The manifest as a dict, from the checkout's models/ folder or the installed package copy."""
    repo_copy = Path(__file__).resolve().parent.parent / "models" / "manifest.json"
    if repo_copy.is_file():
        return json.loads(repo_copy.read_text(encoding="utf-8"))
    return json.loads(resources.files("edge_qwen").joinpath("data/manifest.json").read_text(encoding="utf-8"))


def hub_models() -> list[dict[str, Any]]:
    """The official Qwen repositories the manifest lists (Qwen2.5 ... Qwen3.6, VL, Next, Embedding, Reranker)."""
    return list(load_manifest()["hub"])


def find_hub_model(repo_id: str) -> dict[str, Any] | None:
    """The manifest entry for a repo id (case-insensitive), or None."""
    for m in hub_models():
        if m["repo"].lower() == repo_id.lower():
            return m
    return None
