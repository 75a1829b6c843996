"""Token counts without loading the weights: the model's tokenizer alone (llama.cpp vocab_only)."""

from __future__ import annotations

from typing import Any

from .chunking import TokenCounter


def token_counter(model: Any = None) -> TokenCounter:
    """A counter of the tokens `model`'s tokenizer makes of a text (None: the default model)."""
    from ..gguf_file import check_gguf
    from ..store import resolve_model

    path = resolve_model(model)
    check_gguf(path)  # before llama.cpp sees the file
    from llama_cpp import Llama

    vocab = Llama(model_path=str(path), vocab_only=True, verbose=False)
    return lambda text: len(vocab.tokenize(text.encode("utf-8"), add_bos=False, special=False))
