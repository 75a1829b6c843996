"""Shared fixtures: an isolated store and HF cache per session, the real default model."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Nothing in the tests may reach the network; the store is isolated from the user's.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def default_model() -> Path:
    """The real default GGUF (Qwen2.5-Coder-0.5B-Instruct Q4_K_M), assembled once in the user's store.

    It is the same file in every run, so it is assembled in the real store (not a tmp dir)
    and reused; tests never write to it.
    """
    from edge_qwen.store import default_model_path

    return default_model_path()


@pytest.fixture()
def isolated_home(tmp_path, monkeypatch) -> Path:
    """A fresh EDGE_QWEN_HOME and HF cache for tests that write to the store."""
    home = tmp_path / "home"
    monkeypatch.setenv("EDGE_QWEN_HOME", str(home))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return home


@pytest.fixture(scope="session")
def llm(default_model):
    """The real default model loaded once for the whole session (EdgeQwen, n_ctx=4096), closed at the end."""
    from edge_qwen import EdgeQwen

    model = EdgeQwen(default_model, n_ctx=4096)
    yield model
    model.close()
