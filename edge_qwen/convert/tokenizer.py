"""Hugging Face tokenizer (tokenizer.json + tokenizer_config.json) <-> GGUF vocabulary.

llama.cpp re-implements the tokenizer from the GGUF: the token strings, their types, the BPE
merges and the name of a pre-tokenizer it knows ("qwen2"). That only reproduces Hugging
Face's tokenization when the tokenizer is byte-level BPE with exactly Qwen2's split regex,
so anything else is refused with a message rather than converted into a model that
tokenizes differently. The same facts, read back from a GGUF, rebuild a tokenizer.json.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import CheckpointError

# Qwen2's pre-tokenizer split (from its tokenizer.json); llama.cpp calls it "qwen2".
QWEN2_SPLIT_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_PRE = "qwen2"

# gguf.TokenType values (kept as ints so importing this module stays cheap).
NORMAL, CONTROL, USER_DEFINED, UNUSED = 1, 3, 4, 5


@dataclass
class GGUFVocab:
    """Everything llama.cpp needs to tokenize like the Hugging Face tokenizer."""

    tokens: list[str]
    token_types: list[int]
    merges: list[str]
    special_ids: dict[str, int] = field(default_factory=dict)  # bos/eos/pad/... -> id
    add_special: dict[str, bool] = field(default_factory=dict)  # bos/eos -> add it?
    chat_template: str | None = None
    pre: str = QWEN2_PRE


def _byte_level(component: dict[str, Any] | None) -> bool:
    if not component:
        return False
    if component.get("type") == "ByteLevel":
        return True
    return any(_byte_level(c) for c in component.get("pretokenizers", []) or component.get("decoders", []) or [])


def _split_regexes(pre: dict[str, Any] | None) -> list[str]:
    if not pre:
        return []
    if pre.get("type") == "Split":
        pattern = pre.get("pattern") or {}
        regex = pattern.get("Regex", pattern.get("String", ""))
        # the same regex used another way (kept as separate pieces, or inverted) splits differently
        if pre.get("behavior") != "Isolated" or pre.get("invert"):
            regex = f"{regex} (behavior {pre.get('behavior')}, invert {pre.get('invert')})"
        return [regex]
    return [r for p in pre.get("pretokenizers", []) or [] for r in _split_regexes(p)]


def check_tokenizer_json(tok: dict[str, Any], file: Path) -> None:
    """Refuse a tokenizer llama.cpp's "qwen2" tokenizer would not reproduce."""
    model = tok.get("model") or {}
    if model.get("type") != "BPE":
        raise CheckpointError(f"{file}: tokenizer model {model.get('type')!r} is not supported; edge-qwen converts "
                              "Qwen2-style byte-level BPE tokenizers only")
    if not _byte_level(tok.get("pre_tokenizer")) or not _byte_level(tok.get("decoder")):
        raise CheckpointError(f"{file}: the tokenizer is not byte-level BPE (no ByteLevel pre-tokenizer/decoder); "
                              "llama.cpp could not reproduce it, so it is not converted")
    regexes = _split_regexes(tok.get("pre_tokenizer"))
    if regexes != [QWEN2_SPLIT_REGEX]:
        raise CheckpointError(f"{file}: pre-tokenizer split {regexes or 'none'} is not Qwen2's; llama.cpp's 'qwen2' "
                              "pre-tokenizer would tokenize differently, so this tokenizer is refused")
    norm = tok.get("normalizer")
    if norm is not None and norm.get("type") != "NFC":
        raise CheckpointError(f"{file}: normalizer {norm.get('type')!r} is not supported (Qwen2 uses NFC or none)")
    if model.get("byte_fallback") or model.get("continuing_subword_prefix") or model.get("end_of_word_suffix"):
        raise CheckpointError(f"{file}: BPE options (byte_fallback/subword prefix/suffix) that Qwen2 does not use "
                              "are set; llama.cpp could not reproduce this tokenizer")
    if not model.get("merges"):
        raise CheckpointError(f"{file}: the BPE model has no merges; the tokenizer file is incomplete")


def read_vocab(folder: str | Path, vocab_size: int) -> GGUFVocab:
    """Build the GGUF vocabulary of a checkpoint folder, padded to the model's `vocab_size`.

    Added tokens marked special become CONTROL tokens, other added tokens USER_DEFINED;
    ids past the tokenizer's end (the embedding is usually padded) become "[PAD<id>]"
    UNUSED tokens, as llama.cpp's own converter names them.
    """
    import logging

    import gguf

    folder = Path(folder)
    file = folder / "tokenizer.json"
    if not file.is_file():
        raise CheckpointError(f"{folder} has no tokenizer.json; copy the tokenizer files of the model into the "
                              "folder (Qwen2 ships tokenizer.json and tokenizer_config.json)")
    from .checkpoint import read_json_file

    tok = read_json_file(file)
    check_tokenizer_json(tok, file)
    model = tok["model"]
    by_id: dict[int, tuple[str, int]] = {i: (t, NORMAL) for t, i in model["vocab"].items()}
    for added in tok.get("added_tokens", []):
        by_id[added["id"]] = (added["content"], CONTROL if added.get("special") else USER_DEFINED)
    if by_id and max(by_id) >= vocab_size:
        raise CheckpointError(f"{file}: token id {max(by_id)} does not fit vocab_size {vocab_size} of config.json; "
                              "the tokenizer and the model do not belong together")
    tokens, types = [], []
    for i in range(vocab_size):
        text, kind = by_id.get(i, (f"[PAD{i}]", UNUSED))
        tokens.append(text)
        types.append(kind)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    # gguf-py's SpecialVocab reads bos/eos/pad, add_bos_token and the chat template the way
    # llama.cpp's converter does (tokenizer_config first, config.json ids as fallback).
    logging.getLogger("gguf.vocab").setLevel(logging.ERROR)
    special = gguf.SpecialVocab(folder, load_merges=False, n_vocab=vocab_size)
    template = special.chat_template
    if template is not None and not isinstance(template, str):
        raise CheckpointError(f"{folder}: several named chat templates are not supported; keep one "
                              "'chat_template' string in tokenizer_config.json")
    return GGUFVocab(tokens=tokens, token_types=types, merges=merges,
                     special_ids=dict(special.special_token_ids), add_special=dict(special.add_special_token),
                     chat_template=template)


def add_vocab(writer: Any, vocab: GGUFVocab) -> None:
    """Write the tokenizer.* keys to a gguf.GGUFWriter."""
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.token_types)
    writer.add_token_merges(vocab.merges)
    for kind, tid in vocab.special_ids.items():
        getattr(writer, f"add_{kind}_token_id")(tid)
    for kind, on in vocab.add_special.items():
        getattr(writer, f"add_add_{kind}_token")(on)
    if vocab.chat_template:
        writer.add_chat_template(vocab.chat_template)


def tokenizer_json_from_vocab(tokens: list[str], types: list[int], merges: list[str]) -> dict[str, Any]:
    """A Hugging Face tokenizer.json (byte-level BPE, Qwen2 split) from GGUF vocabulary arrays."""
    byte = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}
    added, vocab = [], {}
    for i, (text, kind) in enumerate(zip(tokens, types)):
        if kind in (CONTROL, USER_DEFINED):
            added.append({"id": i, "content": text, "single_word": False, "lstrip": False, "rstrip": False,
                          "normalized": False, "special": kind == CONTROL})
        elif kind == NORMAL:
            vocab[text] = i
        elif kind != UNUSED:
            raise CheckpointError(f"token {i} {text!r} has GGUF type {kind}, which a byte-level BPE tokenizer "
                                  "cannot hold; this GGUF's tokenizer cannot be rebuilt")
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": {"type": "NFC"},
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": QWEN2_SPLIT_REGEX}, "behavior": "Isolated", "invert": False},
            byte,
        ]},
        "post_processor": byte,
        "decoder": byte,
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": "",
                  "end_of_word_suffix": "", "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": vocab, "merges": merges},
    }
