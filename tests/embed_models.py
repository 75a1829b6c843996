"""Tiny random Qwen3-Embedding and Qwen3-Reranker checkpoints, in the layouts Qwen publishes them,
made without torch and bit-for-bit the same on every machine (numpy's frozen legacy stream, bf16
by truncation, as tests/family_models.py makes the other Qwen architectures).

- "qwen3-embedding": like Qwen/Qwen3-Embedding-0.6B: `Qwen3ForCausalLM` in config.json but the
  weights of the headless Qwen3Model saved bare (`embed_tokens.weight`, `layers.0...`, no
  `model.` prefix, no lm_head), sentence-transformers files (modules.json, 1_Pooling with
  last-token pooling, 2_Normalize, the query prompt), and a tokenizer.json whose
  TemplateProcessing post-processor appends `<|endoftext|>` to every input.
- "qwen3-reranker": like Qwen/Qwen3-Reranker-0.6B: a plain tied Qwen3ForCausalLM whose README is
  titled "# Qwen3-Reranker-0.6B" (how llama.cpp's converter recognises it).
- "qwen3-reranker-untied": like Qwen3-Reranker-4B: untied, with its lm_head, recognised by the
  folder name (`tiny-qwen3-reranker-untied`) only.

tests/make_llamacpp_reference_embed.py runs llama.cpp's converter on them and records the
digests in tests/data/llamacpp_reference_embed.json.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from family_models import _text_config, _values, tokenizer_files, write_safetensors

EMBED_ARCHS = ("qwen3-embedding", "qwen3-reranker", "qwen3-reranker-untied")
# the folder each is made in (a reranker's folder name is one of llama.cpp's hints)
FOLDER = {"qwen3-embedding": "tiny-qwen3-embedding", "qwen3-reranker": "tiny-reranker",
          "qwen3-reranker-untied": "tiny-qwen3-reranker-untied"}
QUERY_PROMPT = "Instruct: Given a web search query, retrieve relevant passages that answer the query\nQuery:"
ENDOFTEXT = 151643


def _config(arch: str) -> dict[str, Any]:
    config = _text_config("qwen3")
    config.pop("rope_scaling")
    config["max_position_embeddings"] = 32768
    config["tie_word_embeddings"] = arch != "qwen3-reranker-untied"
    return config


def _embedding_files(path: Path) -> None:
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
               {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}]
    (path / "modules.json").write_text(json.dumps(modules, indent=1))
    (path / "1_Pooling").mkdir(exist_ok=True)
    (path / "2_Normalize").mkdir(exist_ok=True)
    pooling = {"word_embedding_dimension": 256, "pooling_mode_cls_token": False, "pooling_mode_mean_tokens": False,
               "pooling_mode_max_tokens": False, "pooling_mode_mean_sqrt_len_tokens": False,
               "pooling_mode_weightedmean_tokens": False, "pooling_mode_lasttoken": True, "include_prompt": True}
    (path / "1_Pooling" / "config.json").write_text(json.dumps(pooling, indent=1))
    (path / "config_sentence_transformers.json").write_text(json.dumps(
        {"prompts": {"query": QUERY_PROMPT, "document": ""}, "default_prompt_name": None,
         "similarity_fn_name": "cosine"}, indent=1))
    tok = json.loads((path / "tokenizer.json").read_text(encoding="utf-8"))
    eot = {"SpecialToken": {"id": "<|endoftext|>", "type_id": 0}}
    tok["post_processor"] = {
        "type": "TemplateProcessing",
        "single": [{"Sequence": {"id": "A", "type_id": 0}}, eot],
        "pair": [{"Sequence": {"id": "A", "type_id": 0}}, eot, {"Sequence": {"id": "B", "type_id": 1}},
                 {"SpecialToken": {"id": "<|endoftext|>", "type_id": 1}}],
        "special_tokens": {"<|endoftext|>": {"id": "<|endoftext|>", "ids": [ENDOFTEXT], "tokens": ["<|endoftext|>"]}}}
    (path / "tokenizer.json").write_text(json.dumps(tok, ensure_ascii=False), encoding="utf-8")


def make_embed_checkpoint(root: Path, arch: str, seed: int = 0) -> Path:
    """A tiny random checkpoint of `arch` (one of EMBED_ARCHS) in root / FOLDER[arch]."""
    from edge_qwen.convert.checkpoint import expected_tensors

    path = Path(root) / FOLDER[arch]
    path.mkdir(parents=True, exist_ok=True)
    config = _config(arch)
    for name, text in tokenizer_files("qwen3").items():
        (path / name).write_text(text, encoding="utf-8")
    (path / "config.json").write_text(json.dumps(config, indent=1))
    (path / "generation_config.json").write_text(json.dumps({"bos_token_id": 151643, "eos_token_id": 151645}))
    if arch == "qwen3-embedding":
        _embedding_files(path)
    elif arch == "qwen3-reranker":
        readme = "---\nlicense: apache-2.0\n---\n# Qwen3-Reranker-0.6B\n\nA tiny random stand-in.\n"
        (path / "README.md").write_text(readme)
    shapes = {n: s for n, (_g, s) in expected_tensors(config, path, "model").items()}
    if config["tie_word_embeddings"]:
        shapes.pop("lm_head.weight", None)
    rs = np.random.RandomState(seed)
    tensors = {n: _values(rs, n, shapes[n]) for n in sorted(shapes)}
    if arch == "qwen3-embedding":  # the published Qwen3-Embedding names: the bare Qwen3Model
        tensors = {n.removeprefix("model."): v for n, v in tensors.items()}
    write_safetensors(path / "model.safetensors", tensors)
    return path
