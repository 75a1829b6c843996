"""Qwen3-Embedding and Qwen3-Reranker: Qwen3 text models that llama.cpp runs pooled, not generating.

Both are plain Qwen3 checkpoints (`Qwen3ForCausalLM` or `Qwen3Model`); what makes them pooled is
written the way llama.cpp's converter (convert_hf_to_gguf.py, `Qwen2Model._try_set_pooling_type`
and `Qwen3Model`'s rerank logic) writes it:

- an embedding model ships sentence-transformers files: `modules.json` names a Pooling module
  whose `config.json` says the pooling (Qwen3-Embedding: last token). It becomes
  `{arch}.pooling_type`. Qwen3-Embedding's published weights have no `model.` prefix
  (`embed_tokens.weight`, `layers.0...`); checkpoint.canonical_name adds it.
- a reranker is recognised by the same hints llama.cpp uses (a README titled "# Qwen3-Reranker",
  or "qwen3-reranker" in the folder name, `_name_or_path`, model_type or architecture). Its head
  becomes a two-row classifier `cls.output.weight`: the lm_head (or, tied, the embedding) rows
  of the tokens "yes" and "no", in that order. The file gets pooling type RANK, the classifier
  labels ["yes", "no"] and the named chat template "rerank" that llama-server fills with the
  query and the document. An untied reranker's lm_head is not written as `output.weight`.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable

from ...errors import CheckpointError
from . import Architecture, Row, text_config

# llama.cpp's LLAMA_POOLING_TYPE values (gguf.PoolingType), by sentence-transformers' names
POOLING_MODES = {"mean": 1, "cls": 2, "lasttoken": 3}
RANK = 4

# The prompt llama.cpp's converter stores as the "rerank" chat template of a Qwen3-Reranker
# (Qwen's documented reranker format; llama-server replaces {query} and {document}).
RERANK_TEMPLATE = (
    "<|im_start|>system\nJudge whether the Document meets the requirements based on the Query and the Instruct "
    "provided. Note that the answer can only be \"yes\" or \"no\".<|im_end|>\n"
    "<|im_start|>user\n<Instruct>: Given a web search query, retrieve relevant passages that answer the query\n"
    "<Query>: {query}\n<Document>: {document}<|im_end|>\n"
    "<|im_start|>assistant\n<think>\n\n</think>\n\n"
)
RERANK_LABELS = ("yes", "no")


def sentence_transformers_pooling(path: Path) -> int | None:
    """The pooling type a sentence-transformers folder declares (modules.json -> the Pooling module), or None."""
    from ..checkpoint import read_json_file

    modules_file = Path(path) / "modules.json"
    if not modules_file.is_file():
        return None
    modules = read_json_file(modules_file)
    pooling_dir = None
    try:
        for mod in modules:
            if str(mod["type"]).endswith("Pooling"):
                pooling_dir = str(mod["path"])
                break
    except (KeyError, TypeError):
        raise CheckpointError(f"{modules_file} is damaged (a list of modules with 'type' and 'path' expected); "
                              "download it again") from None
    if pooling_dir is None:
        return None
    cfg_file = Path(path) / pooling_dir / "config.json"
    if not cfg_file.is_file():
        raise CheckpointError(f"{modules_file} names the pooling module {pooling_dir!r} but {cfg_file} is missing; "
                              "download the model's sentence-transformers files again")
    cfg = read_json_file(cfg_file)
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{cfg_file} must hold a JSON object")
    if cfg.get("pooling_mode_mean_tokens"):
        return POOLING_MODES["mean"]
    if cfg.get("pooling_mode_cls_token"):
        return POOLING_MODES["cls"]
    if cfg.get("pooling_mode_lasttoken"):
        return POOLING_MODES["lasttoken"]
    if cfg.get("pooling_mode") in POOLING_MODES:
        return POOLING_MODES[cfg["pooling_mode"]]
    raise CheckpointError(f"{cfg_file}: pooling {cfg.get('pooling_mode') or 'other than mean/cls/last token'} is not "
                          "supported; llama.cpp pools by mean, first (cls) or last token only")


def with_pooling(hparams: Callable[[Any, dict[str, Any], Path], None]) -> Callable[[Any, dict[str, Any], Path], None]:
    """`hparams` plus the pooling keys llama.cpp's Qwen2/Qwen3 converter writes for sentence-transformers folders."""

    def write(w: Any, config: dict[str, Any], path: Path) -> None:
        import gguf

        hparams(w, config, path)
        pooling = sentence_transformers_pooling(path)
        if pooling is not None:
            w.add_pooling_type(gguf.PoolingType(pooling))
        classifier = config.get("classifier_pooling")
        if classifier is not None:
            if classifier not in ("cls", "mean"):
                raise CheckpointError(f"{path / 'config.json'}: classifier_pooling {classifier!r} is not supported "
                                      "(llama.cpp reads cls or mean)")
            w.add_classifier_pooling_type(gguf.PoolingType(POOLING_MODES[classifier]))

    return write


def is_qwen3_reranker(config: dict[str, Any], path: Path) -> bool:
    """llama.cpp's test (Qwen3Model._is_qwen3_reranker): the README title or a name hint."""
    readme = Path(path) / "README.md"
    text = readme.read_text(encoding="utf-8", errors="replace").lower() if readme.is_file() else ""
    if "# qwen3-reranker" in text or "# qwen3-vl-reranker" in text:
        return True
    archs = config.get("architectures") or [None]
    first = archs[0] if isinstance(archs, list) and archs else None
    hints = [Path(path).name, str(config.get("_name_or_path") or ""), str(config.get("model_type") or ""),
             str(first or "")]
    if any("qwen3-reranker" in h.lower() or "qwen3-vl-reranker" in h.lower() for h in hints if h):
        return True
    return "sequenceclassification" in str(first or "").lower()


def label_token_ids(path: Path) -> tuple[int, ...]:
    """The ids of the tokens "yes" and "no" in the checkpoint's tokenizer."""
    from ..checkpoint import read_json_file

    folder = Path(path)
    vocab: dict[str, int] = {}
    if (folder / "tokenizer.json").is_file():
        tok = read_json_file(folder / "tokenizer.json")
        try:
            vocab = dict(tok["model"]["vocab"])
            vocab.update({a["content"]: int(a["id"]) for a in tok.get("added_tokens") or []})
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{folder / 'tokenizer.json'} is damaged; download it again") from None
    elif (folder / "vocab.json").is_file():
        vocab = read_json_file(folder / "vocab.json")
    ids = []
    for label in RERANK_LABELS:
        if not isinstance(vocab.get(label), int):
            raise CheckpointError(f"{folder}: this is a Qwen3-Reranker, but its tokenizer has no token {label!r}, "
                                  "whose lm_head row becomes the classifier; the tokenizer files do not belong to it")
        ids.append(vocab[label])
    return tuple(ids)


Hparams = Callable[[Any, dict[str, Any], Path], None]


def _rerank_hparams(hparams: Hparams) -> Hparams:
    def write(w: Any, config: dict[str, Any], path: Path) -> None:
        import gguf

        hparams(w, config, path)
        w.add_pooling_type(gguf.PoolingType(RANK))
        w.add_classifier_output_labels(list(RERANK_LABELS))
        w.add_chat_template([{"name": "rerank", "template": RERANK_TEMPLATE}])

    return write


def reranker_variant(arch: Architecture, config: dict[str, Any], path: Path) -> Architecture:
    """`arch` (Qwen3) as a reranker when the checkpoint is one, else `arch` unchanged."""
    if not is_qwen3_reranker(config, path):
        return arch
    yes, no = label_token_ids(path)
    tied = bool(text_config(config).get("tie_word_embeddings", False))
    source = "model.embed_tokens.weight" if tied else "lm_head.weight"
    cls = Row(source, "CLS_OUT", "weight", "NCLS,H", take=f"pick:{yes},{no}")
    # tied: the embedding also stays token_embd (and a stored lm_head is still output.weight);
    # untied: the lm_head becomes the classifier only
    rows = tuple(r for r in arch.tensors if tied or r.hf != "lm_head.weight") + (cls,)
    base_sizes = arch.sizes

    def sizes(config: dict[str, Any], path: Path) -> dict[str, int]:
        return {**base_sizes(config, path), "NCLS": len(RERANK_LABELS)}

    return dataclasses.replace(arch, tensors=rows, sizes=sizes, hparams=_rerank_hparams(arch.hparams), variant=None)

