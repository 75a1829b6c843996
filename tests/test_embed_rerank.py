"""Qwen3-Embedding and Qwen3-Reranker: conversion equal to llama.cpp's converter, /v1/embeddings with
last-token pooling and Qwen's query instruction, /v1/rerank equal to llama-server --rerank, an
embedding model refused for chat, and retrieval (index add --embed-model, ask --rerank-model).

The references are RECORDED in tests/data/llamacpp_reference_embed.json by
tests/make_llamacpp_reference_embed.py: the digests of llama.cpp's convert_hf_to_gguf.py output
for the tiny checkpoints of tests/embed_models.py (f16, bf16, q8_0), and llama-server's rerank
scores on the reranker's f16 GGUF, with the command that produced them.
"""

from __future__ import annotations

import json
import warnings
from functools import lru_cache
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from embed_models import EMBED_ARCHS, QUERY_PROMPT, make_embed_checkpoint
from family_models import digest_diff
from family_models import gguf_digest as _digest

from edge_qwen.cli import main
from edge_qwen.convert.writer import convert

gguf_digest = lru_cache(maxsize=None)(_digest)
DATA = json.loads((Path(__file__).parent / "data" / "llamacpp_reference_embed.json").read_text(encoding="utf-8"))
REFERENCE = DATA["files"]
# The fast tier compares the f16 files (the ones the serving tests use too); the slow tier bf16 and
# q8_0 (every file is in the recorded reference, and tests/make_llamacpp_reference_embed.py
# compares all nine when it records them)
FAST = [("qwen3-embedding", "f16"), ("qwen3-reranker", "f16"), ("qwen3-reranker-untied", "f16")]
CASES = [pytest.param(a, t, marks=() if (a, t) in FAST else pytest.mark.slow)
         for a in EMBED_ARCHS for t in ("f16", "bf16", "q8_0")]


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("embed")
    return {a: make_embed_checkpoint(root, a) for a in EMBED_ARCHS}


@pytest.fixture(scope="module")
def converted(ckpts, tmp_path_factory):
    root = tmp_path_factory.mktemp("embed_gguf")
    cache: dict[tuple[str, str], Path] = {}

    def get(arch: str, outtype: str) -> Path:
        if (arch, outtype) not in cache:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                cache[arch, outtype] = convert(ckpts[arch], root / f"{arch}-{outtype}.gguf", outtype=outtype,
                                               quiet=True)
        return cache[arch, outtype]

    return get


@pytest.mark.parametrize("arch,outtype", CASES)
def test_tensor_identical_to_llamacpp(converted, arch, outtype):
    ours = gguf_digest(converted(arch, outtype))
    ref = REFERENCE[f"{arch}-{outtype}"]
    assert digest_diff(ours, ref) == []
    assert len(ours["tensors"]) == len(ref["tensors"]) > 10


def test_pooling_and_classifier_metadata(converted):
    """What makes them pooled, spelled out (the digests above cover it too)."""
    emb = gguf_digest(converted("qwen3-embedding", "f16"))["keys"]
    assert emb["qwen3.pooling_type"] == 3  # last token
    assert emb["tokenizer.ggml.add_eos_token"] is True and emb["tokenizer.ggml.eos_token_id"] == 151643
    rr = gguf_digest(converted("qwen3-reranker", "f16"))
    assert rr["keys"]["qwen3.pooling_type"] == 4 and rr["keys"]["qwen3.classifier.output_labels"] == ["yes", "no"]
    assert "{query}" in rr["keys"]["tokenizer.chat_template.rerank"] and rr["keys"]["tokenizer.chat_templates"] == ["rerank"]
    assert rr["tensors"]["cls.output.weight"][1] == [256, 2] and "output.weight" not in rr["tensors"]
    untied = gguf_digest(converted("qwen3-reranker-untied", "f16"))["tensors"]
    assert "cls.output.weight" in untied and "output.weight" not in untied  # the lm_head is the classifier only


def test_qwen3model_and_bad_reranker(ckpts, tmp_path):
    """A checkpoint saved as the headless Qwen3Model converts like Qwen3ForCausalLM's; a reranker whose
    tokenizer lacks "yes" is refused in one line, before anything is written."""
    import shutil

    from edge_qwen.convert.checkpoint import open_checkpoint

    m = tmp_path / "qwen3model"
    shutil.copytree(ckpts["qwen3-embedding"], m)
    cfg = json.loads((m / "config.json").read_text())
    (m / "config.json").write_text(json.dumps({**cfg, "architectures": ["Qwen3Model"]}))
    ck = open_checkpoint(m)
    assert ck.arch.name == "Qwen3Model" and ck.tensors["model.layers.1.mlp.up_proj.weight"].name == "layers.1.mlp.up_proj.weight"
    bad = tmp_path / "tiny-qwen3-reranker-bad"
    shutil.copytree(ckpts["qwen3-reranker"], bad)
    tok = json.loads((bad / "tokenizer.json").read_text(encoding="utf-8"))
    del tok["model"]["vocab"]["yes"]
    (bad / "tokenizer.json").write_text(json.dumps(tok, ensure_ascii=False), encoding="utf-8")
    out = tmp_path / "bad.gguf"
    r = CliRunner().invoke(main, ["convert", str(bad), "-o", str(out), "-q"])
    assert r.exit_code != 0 and "no token 'yes'" in r.output and len(r.output.strip().splitlines()) == 1, r.output
    assert not out.exists() and not list(tmp_path.glob("bad.gguf*"))


def test_checkpoints_are_what_transformers_loads(ckpts):
    import torch
    import transformers

    for arch, cls in (("qwen3-embedding", transformers.AutoModel), ("qwen3-reranker", transformers.Qwen3ForCausalLM),
                      ("qwen3-reranker-untied", transformers.Qwen3ForCausalLM)):
        _m, info = cls.from_pretrained(ckpts[arch], dtype=torch.bfloat16, output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], (arch, info)


# --- serving ---

@pytest.fixture(scope="module")
def pooled_server(converted, llm):
    from edge_qwen.serve.app import ServerThread, create_app

    models = {"qwen2.5": llm, "embed": converted("qwen3-embedding", "f16"),
              "rerank": converted("qwen3-reranker", "f16")}
    with ServerThread(create_app(models, n_threads=2)) as url:
        yield url


def _transformers_embedding(folder: Path, text: str) -> np.ndarray:
    """Qwen3-Embedding as its model card computes it: last token's hidden state (the tokenizer appends
    <|endoftext|>), L2-normalized."""
    import torch
    from tokenizers import Tokenizer
    from transformers import AutoModel

    ids = Tokenizer.from_file(str(folder / "tokenizer.json")).encode(text).ids
    assert ids[-1] == 151643
    model = AutoModel.from_pretrained(folder, dtype=torch.float32)
    with torch.no_grad():
        h = model(torch.tensor([ids])).last_hidden_state[0, -1].numpy().astype(np.float64)
    return h / np.linalg.norm(h)


def test_embeddings_last_token_and_query_instruction(pooled_server, ckpts):
    import openai

    client = openai.OpenAI(base_url=f"{pooled_server}/v1", api_key="x", max_retries=0)
    docs = ["The quick brown fox jumps over the lazy dog.", "北京是中国的首都。"]
    got = client.embeddings.create(model="embed", input=docs)
    vecs = [np.asarray(d.embedding) for d in got.data]
    assert len(vecs[0]) == 256 and abs(np.linalg.norm(vecs[0]) - 1) < 1e-5
    for text, v in zip(docs, vecs):  # f16 GGUF vs the bf16 checkpoint in float32: the same vector
        assert float(v @ _transformers_embedding(ckpts["qwen3-embedding"], text)) > 0.999
    q = client.embeddings.create(model="embed", input="What is the capital of China?",
                                 extra_body={"input_type": "query"}).data[0].embedding
    raw = client.embeddings.create(model="embed", input=QUERY_PROMPT + "What is the capital of China?").data[0].embedding
    assert np.allclose(q, raw, atol=1e-6)
    task = client.embeddings.create(model="embed", input="capital of China",
                                    extra_body={"instruction": "Find the city"}).data[0].embedding
    raw = client.embeddings.create(model="embed", input="Instruct: Find the city\nQuery:capital of China").data[0].embedding
    assert np.allclose(task, raw, atol=1e-6)
    with pytest.raises(openai.BadRequestError, match="instruction is for queries"):
        client.embeddings.create(model="embed", input="x", extra_body={"instruction": "t", "input_type": "document"})
    with pytest.raises(openai.BadRequestError, match="is a reranker"):
        client.embeddings.create(model="rerank", input="x")


def test_rerank_equals_llama_server(pooled_server, converted):
    """/v1/rerank on the tiny reranker gives llama-server --rerank's scores (recorded), to 1e-4."""
    import httpx

    ref = DATA["llama_server_rerank"]
    assert gguf_digest(converted("qwen3-reranker", "f16"))["tensors"] == ref["tensors"]  # the same GGUF
    for q, want in zip(ref["queries"], ref["answers"]):
        r = httpx.post(f"{pooled_server}/v1/rerank", json={"model": "rerank", **q}, timeout=120)
        assert r.status_code == 200, r.text
        body = r.json()
        got = {x["index"]: x["relevance_score"] for x in body["results"]}
        assert [x["relevance_score"] for x in body["results"]] == sorted(got.values(), reverse=True)
        for item in want["results"]:
            assert abs(got[item["index"]] - item["relevance_score"]) < 1e-4, (q["query"], item, got)
        assert body["usage"]["prompt_tokens"] == want["prompt_tokens"]
    q = ref["queries"][0]
    for path in ("/rerank", "/reranking", "/v1/reranking"):
        r = httpx.post(f"{pooled_server}{path}", json={"model": "rerank", **q, "top_n": 2, "return_documents": True})
        assert r.status_code == 200 and len(r.json()["results"]) == 2, r.text
        top = r.json()["results"][0]
        assert top["document"]["text"] == q["documents"][top["index"]]
    r = httpx.post(f"{pooled_server}/v1/rerank", json={"model": "qwen2.5", **q})
    assert r.status_code == 400 and "not a reranker" in r.json()["error"]["message"]
    r = httpx.post(f"{pooled_server}/v1/rerank", json={"model": "rerank", "query": "x", "documents": []})
    assert r.status_code == 400


def test_embedding_model_asked_to_chat(pooled_server, converted):
    import openai

    client = openai.OpenAI(base_url=f"{pooled_server}/v1", api_key="x", max_retries=0)
    for name in ("embed", "rerank"):
        with pytest.raises(openai.BadRequestError, match="not a chat model") as e:
            client.chat.completions.create(model=name, messages=[{"role": "user", "content": "hi"}])
        assert e.value.status_code == 400
    r = CliRunner().invoke(main, ["chat", str(converted("qwen3-embedding", "f16")), "hello"])
    assert r.exit_code != 0 and r.output.startswith("Error: ") and "not a chat model" in r.output, r.output
    assert len(r.output.strip().splitlines()) == 1 and "Traceback" not in r.output


# --- retrieval ---

def test_index_and_ask_with_embedding_and_reranker(converted, tmp_path, isolated_home, default_model):
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "paris.md").write_text("Paris is the capital of France. The Eiffel Tower stands in Paris.\n")
    (docs / "rice.md").write_text("把米洗净，加水，用电饭锅煮二十分钟，米饭就好了。\n")
    (docs / "bananas.md").write_text("Bananas are rich in potassium and grow in warm countries.\n")
    emb, rr = converted("qwen3-embedding", "f16"), converted("qwen3-reranker", "f16")
    r = CliRunner().invoke(main, ["index", "add", "kb", str(docs), "--embed-model", str(emb), "-m", str(default_model),
                                  "-q"])
    assert r.exit_code == 0, r.output
    from edge_qwen.engine.pooled import Reranker
    from edge_qwen.rag.embed import Embedder
    from edge_qwen.rag.index import DocIndex

    embedder, reranker = Embedder(emb), Reranker(rr)
    question = "What is the capital of France?"
    with DocIndex.open("kb") as ix:
        hits = ix.search(question, 3, embedder=embedder, reranker=reranker)
        fused = ix.search(question, 20, embedder=embedder)  # the candidates the reranker reorders
    scores, _ = reranker.score(question, [h.text for h in hits])
    assert [h.score for h in hits] == scores == sorted(scores, reverse=True)  # the reranker's order
    assert len(hits) == 3 and {h.chunk_id for h in hits} <= {h.chunk_id for h in fused}
    r = CliRunner().invoke(main, ["ask", "-i", "kb", question, "--embed-model", str(emb), "--rerank-model", str(rr),
                                  "-m", str(default_model), "-n", "16", "-k", "2", "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.output)
    assert len(out["sources"]) == 2
    r = CliRunner().invoke(main, ["ask", "-i", "kb", question, "--rerank-model", str(emb), "-m", str(default_model)])
    assert r.exit_code != 0 and "not a reranker" in r.output, r.output


def test_known_models_list_the_current_qwen_repos():
    r = CliRunner().invoke(main, ["models", "--known", "--json"])
    assert r.exit_code == 0, r.output
    known = {m["repo"]: m for m in json.loads(r.output)}
    for family in ("Qwen3.5", "Qwen3.6", "Qwen3-VL", "Qwen3-Next", "Qwen3-Embedding", "Qwen3-Reranker"):
        assert any(m["family"] == family for m in known.values()), family
    assert known["Qwen/Qwen3-Embedding-0.6B-GGUF"]["format"] == "gguf"
    assert known["Qwen/Qwen3-Reranker-0.6B"]["kind"] == "rerank" and known["Qwen/Qwen3-Reranker-0.6B"]["license"]
    assert all(m["license"] and m["params_b"] > 0 for m in known.values())
    r = CliRunner().invoke(main, ["models", "--known"])
    assert r.exit_code == 0 and "Qwen/Qwen3-VL-8B-Instruct-GGUF" in r.output and "not checked against the Hub" in r.output
