"""Hugging Face tokenizer (tokenizer.json, or vocab.json + merges.txt, with tokenizer_config.json) <-> GGUF vocabulary.

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
# The slow-tokenizer classes whose split regex is Qwen2's (transformers hard-codes it), so a
# checkpoint with only vocab.json + merges.txt can be converted when it names one of them.
QWEN2_TOKENIZER_CLASSES = ("Qwen2Tokenizer", "Qwen2TokenizerFast")


def looks_like_control(text: str) -> bool:
    """True for added tokens llama.cpp's converter stores as CONTROL even when not marked special.

    Qwen's published tokenizer marks `<|fim_prefix|>` ... `<|file_sep|>` `"special": false`;
    llama.cpp's convert_hf_to_gguf.py (`does_token_look_special`) makes every `<|...|>` token
    CONTROL anyway, and llama.cpp warns at load about control-looking tokens that are not. The
    same rule here keeps the two converters' files, and their tokenization, identical.
    """
    return (text in ("<pad>", "<mask>", "<2mass>", "[@BOS@]")
            or (text.startswith("<|") and text.endswith("|>"))
            or (text.startswith("<\uff5c") and text.endswith("\uff5c>"))
            or (text.startswith("<unused") and text.endswith(">")))


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


def _read_vocab_merges(folder: Path) -> tuple[dict[str, int], list[str], list[dict[str, Any]]]:
    """(vocab, merges, added tokens) of a checkpoint that ships vocab.json + merges.txt only."""
    from .checkpoint import read_json_file

    cfg_file = folder / "tokenizer_config.json"
    cfg = read_json_file(cfg_file) if cfg_file.is_file() else {}
    cls = cfg.get("tokenizer_class") if isinstance(cfg, dict) else None
    if cls not in QWEN2_TOKENIZER_CLASSES:
        raise CheckpointError(f"{folder} has vocab.json and merges.txt but no tokenizer.json, and "
                              f"{cfg_file.name} names tokenizer_class {cls!r}, not {' or '.join(QWEN2_TOKENIZER_CLASSES)}; "
                              "without tokenizer.json only Qwen2's tokenizer (whose split is known) can be converted")
    vocab = read_json_file(folder / "vocab.json")
    if not isinstance(vocab, dict) or not all(isinstance(i, int) for i in vocab.values()):
        raise CheckpointError(f"{folder / 'vocab.json'} must map token strings to ids; download it again")
    lines = (folder / "merges.txt").read_text(encoding="utf-8").splitlines()
    merges = [m for m in lines if m and not m.startswith("#version")]
    if not merges or any(len(m.split(" ")) != 2 for m in merges):
        raise CheckpointError(f"{folder / 'merges.txt'} is empty or damaged (each line must be two pieces); "
                              "download it again")
    decoder = cfg.get("added_tokens_decoder") or {}
    added = []
    for tid, info in decoder.items():
        try:
            added.append({"id": int(tid), "content": str(info["content"]), "special": bool(info.get("special"))})
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{cfg_file}: added_tokens_decoder entry {tid!r} is damaged") from None
    return vocab, merges, added


def read_vocab(folder: str | Path, vocab_size: int) -> GGUFVocab:
    """Build the GGUF vocabulary of a checkpoint folder, padded to the model's `vocab_size`.

    Reads tokenizer.json, or vocab.json + merges.txt (+ tokenizer_config.json's added tokens)
    when a checkpoint ships only those. Added tokens marked special, or looking like control
    tokens (`<|...|>`, see `looks_like_control`), become CONTROL tokens, other added tokens
    USER_DEFINED; ids past the tokenizer's end (the embedding is usually padded) become
    "[PAD<id>]" UNUSED tokens, as llama.cpp's own converter names them.
    """
    import logging

    import gguf

    folder = Path(folder)
    file = folder / "tokenizer.json"
    from .checkpoint import read_json_file

    from .checkpoint import fetch_again

    for name in ("tokenizer_config.json", "special_tokens_map.json", "added_tokens.json"):
        # gguf-py's SpecialVocab below reads them with a bare json.load: check them first
        if (folder / name).is_file() and not isinstance(read_json_file(folder / name), dict):
            raise CheckpointError(f"{folder / name} must hold a JSON object; {fetch_again(folder)}")
    try:  # the file's structure, as far as a damaged or foreign file can break it
        if file.is_file():
            tok = read_json_file(file)
            if not isinstance(tok, dict):
                raise CheckpointError(f"{file} must hold a JSON object; {fetch_again(folder)}")
            check_tokenizer_json(tok, file)
            vocab_map, raw_merges = tok["model"]["vocab"], tok["model"]["merges"]
            added_tokens = tok.get("added_tokens") or []
        elif (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
            vocab_map, raw_merges, added_tokens = _read_vocab_merges(folder)
            file = folder / "vocab.json"
        else:
            raise CheckpointError(f"{folder} has no tokenizer.json (nor vocab.json + merges.txt); copy the tokenizer "
                                  "files of the model into the folder (Qwen ships tokenizer.json and "
                                  "tokenizer_config.json)")
        by_id: dict[int, tuple[str, int]] = {int(i): (str(t), NORMAL) for t, i in vocab_map.items()}
        for added in added_tokens:
            text = str(added["content"])
            by_id[int(added["id"])] = (text, CONTROL if added.get("special") or looks_like_control(text)
                                       else USER_DEFINED)
        merges = [m if isinstance(m, str) else " ".join(m) for m in raw_merges]
    except (AttributeError, KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{file} is damaged ({type(e).__name__}: {str(e)[:80]}); {fetch_again(folder)}") from None
    if by_id and max(by_id) >= vocab_size:
        raise CheckpointError(f"{file}: token id {max(by_id)} does not fit vocab_size {vocab_size} of config.json; "
                              "the tokenizer and the model do not belong together")
    tokens, types = [], []
    for i in range(vocab_size):
        text, kind = by_id.get(i, (f"[PAD{i}]", UNUSED))
        tokens.append(text)
        types.append(kind)
    # gguf-py's SpecialVocab reads bos/eos/pad, add_bos_token and the chat template the way
    # llama.cpp's converter does (tokenizer_config first, config.json ids as fallback).
    logging.getLogger("gguf.vocab").setLevel(logging.ERROR)
    try:
        special = gguf.SpecialVocab(folder, load_merges=False, n_vocab=vocab_size)
    except (AttributeError, KeyError, TypeError, ValueError) as e:  # a value of the wrong type in those files
        raise CheckpointError(f"{folder}: tokenizer_config.json or special_tokens_map.json is damaged "
                              f"({type(e).__name__}: {str(e)[:80]}); {fetch_again(folder)}") from None
    template = special.chat_template
    if template is None:  # gguf-py before 0.18 reads only tokenizer_config.json's template
        template = _separate_chat_template(folder)
    if template is not None and not isinstance(template, str):
        raise CheckpointError(f"{folder}: several named chat templates are not supported; keep one "
                              "'chat_template' string in tokenizer_config.json")
    add_special = dict(special.add_special_token)
    if file.name == "tokenizer.json" and (tok.get("post_processor") or {}).get("type") == "ByteLevel":
        # a ByteLevel post-processor adds no BOS/EOS: llama.cpp's gguf-py (newer than PyPI's)
        # writes both flags as false, and so do we, so the files agree key for key
        add_special.setdefault("bos", False)
        add_special.setdefault("eos", False)
    return GGUFVocab(tokens=tokens, token_types=types, merges=merges,
                     special_ids=dict(special.special_token_ids), add_special=add_special,
                     chat_template=template)


def _separate_chat_template(folder: Path) -> str | None:
    """The chat template a repository keeps apart from tokenizer_config.json (chat_template.jinja, or
    chat_template.json's "chat_template"), as transformers and llama.cpp's converter read it."""
    from .checkpoint import fetch_again, read_json_file

    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        try:
            return jinja.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise CheckpointError(f"{jinja} is not UTF-8 text; {fetch_again(folder)}") from None
    js = folder / "chat_template.json"
    if js.is_file():
        data = read_json_file(js)
        if not isinstance(data, dict) or not isinstance(data.get("chat_template"), str):
            raise CheckpointError(f"{js} must hold {{\"chat_template\": \"...\"}}; {fetch_again(folder)}")
        return data["chat_template"]
    return None


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
