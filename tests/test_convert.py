"""Conversion on the tiny random checkpoint: every outtype loads in llama.cpp and computes what
transformers computes; the tensor table, provenance, inspect, and every kind of bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from edge_qwen.cli import main
from edge_qwen.convert.writer import OUTTYPES, convert

TEXT = "<|im_start|>user\n你好, def add(a, b): return a + b 🙂🚀 12345 the quick fox<|im_end|>\n<tool_call>"


def _gguf_tensors(path: Path) -> dict[str, np.ndarray]:
    import gguf

    r = gguf.GGUFReader(str(path))
    return {t.name: gguf.quants.dequantize(t.data, t.tensor_type).reshape(tuple(reversed(t.shape.tolist())))
            for t in r.tensors}


def _llama_logits(path: Path, ids: list[int]) -> np.ndarray:
    import llama_cpp

    llm = llama_cpp.Llama(str(path), n_ctx=128, n_batch=128, logits_all=True, verbose=False, n_threads=2)
    try:
        llm.eval(ids)
        return np.array(llm.scores[: len(ids)], dtype=np.float32)
    finally:
        llm.close()


@pytest.fixture(scope="module")
def tiny_ggufs(tiny_checkpoint, tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("tiny_gguf")
    return {t: convert(tiny_checkpoint, out / f"tiny-{t}.gguf", outtype=t, quiet=True) for t in OUTTYPES}


@pytest.fixture(scope="module")
def hf_tiny(tiny_checkpoint):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoint, dtype=torch.float32)
    model.eval()
    return model, AutoTokenizer.from_pretrained(tiny_checkpoint)


def _hf_logits(model, ids: list[int]) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


@pytest.mark.parametrize("outtype,tol,agree", [("f32", 0.005, 1.0), ("f16", 0.005, 1.0), ("bf16", 0.03, 0.9),
                                               ("q8_0", 0.15, 0.85)])
def test_every_outtype_matches_transformers(tiny_ggufs, hf_tiny, outtype, tol, agree):
    model, tok = hf_tiny
    ids = tok(TEXT)["input_ids"]
    import llama_cpp

    vocab = llama_cpp.Llama(str(tiny_ggufs[outtype]), vocab_only=True, verbose=False)
    assert vocab.tokenize(TEXT.encode(), add_bos=False, special=True) == ids
    ours, ref = _llama_logits(tiny_ggufs[outtype], ids), _hf_logits(model, ids)
    assert ours.shape == ref.shape
    # the bf16 weights are exact in f32/f16/bf16 files, so only kernel rounding differs (bf16
    # kernels round activations too, flipping near-ties of random logits); q8_0 quantizes
    assert np.abs(ours - ref).max() < tol * np.abs(ref).max()
    assert (ours.argmax(1) == ref.argmax(1)).mean() >= agree


def test_tensor_types_and_exact_values(tiny_checkpoint, tiny_ggufs):
    from edge_qwen.convert.checkpoint import open_checkpoint
    from edge_qwen.gguf_file import check_gguf

    import gguf

    from edge_qwen.convert.checkpoint import expected_tensors

    ckpt = open_checkpoint(tiny_checkpoint)
    files = {t: _gguf_tensors(p) for t, p in tiny_ggufs.items()}
    assert len(files["f32"]) == 2 + 1 + 2 * 12  # embd, norm, output + 12 per block
    q8 = gguf.GGMLQuantizationType.Q8_0
    for hf_name, ref in ckpt.tensors.items():
        gname, values = expected_tensors(ckpt.config)[hf_name][0], ref.read()
        assert np.array_equal(files["f32"][gname], values), gname  # bf16 -> f32 is exact
        assert np.array_equal(files["bf16"][gname], values), gname
        if values.ndim == 1:  # norms and biases stay f32 in every file
            assert all(np.array_equal(f[gname], values) for f in files.values()), gname
            continue
        assert np.array_equal(files["f16"][gname], values.astype(np.float16).astype(np.float32)), gname
        want_q8 = gguf.quants.dequantize(gguf.quants.quantize(values, q8), q8)
        assert np.array_equal(files["q8_0"][gname], want_q8), gname
    types = {t: check_gguf(p).tensor_types for t, p in tiny_ggufs.items()}
    assert types["f32"] == {"F32": 27}
    assert types["f16"] == {"F32": 11, "F16": 16} and types["bf16"] == {"F32": 11, "BF16": 16}
    assert types["q8_0"] == {"F32": 11, "Q8_0": 16}
    assert check_gguf(tiny_ggufs["q8_0"]).metadata["general.file_type"] == 7


def test_tied_and_sharded_checkpoint(tmp_path, tiny_ggufs, tiny_checkpoint):
    from conftest import make_tiny_checkpoint

    tied = make_tiny_checkpoint(tmp_path / "tied", tied=True, max_shard_size="1MB", seed=1)
    assert (tied / "model.safetensors.index.json").is_file()
    out = convert(tied, tmp_path / "tied.gguf", outtype="f32", quiet=True)
    names = set(_gguf_tensors(out))
    assert "output.weight" not in names and "token_embd.weight" in names
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tied, dtype=torch.float32)
    ids = list(range(5, 40))
    ours, ref = _llama_logits(out, ids), _hf_logits(model, ids)
    assert np.abs(ours - ref).max() < 0.02 * np.abs(ref).max()


def test_rope_scaling_and_provenance(tmp_path, tiny_checkpoint):
    from edge_qwen.gguf_file import check_gguf

    # a hub-cache style path gives repo + revision; README front matter gives the license
    rev = "0123456789abcdef0123456789abcdef01234567"
    snap = tmp_path / "hf" / "models--acme--tiny-qwen" / "snapshots" / rev
    shutil.copytree(tiny_checkpoint, snap)
    cfg = json.loads((snap / "config.json").read_text())
    cfg["rope_scaling"] = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 2048}
    (snap / "config.json").write_text(json.dumps(cfg))
    (snap / "README.md").write_text("---\nlicense: apache-2.0\n---\n# tiny\n")
    meta = check_gguf(convert(snap, tmp_path / "p.gguf", quiet=True)).metadata
    assert meta["qwen2.rope.scaling.type"] == "yarn" and meta["qwen2.rope.scaling.factor"] == 4.0
    assert meta["qwen2.rope.scaling.original_context_length"] == 2048
    assert meta["qwen2.rope.freq_base"] == 1_000_000.0  # from transformers 5's rope_parameters
    assert meta["general.source.repo_url"] == "https://huggingface.co/acme/tiny-qwen"
    assert meta["edge_qwen.source.repo"] == "acme/tiny-qwen" and meta["edge_qwen.source.revision"] == rev
    assert meta["general.license"] == "apache-2.0" and len(meta["edge_qwen.source.sha256"]) == 64
    assert meta["edge_qwen.outtype"] == "f16"


def test_cli_convert_and_inspect(tmp_path, tiny_checkpoint):
    out = tmp_path / "cli.gguf"
    r = CliRunner().invoke(main, ["convert", str(tiny_checkpoint), "-o", str(out), "--outtype", "q8_0"])
    assert r.exit_code == 0, r.output
    assert r.output.strip() == f"wrote {out}"  # no progress bar when not a terminal
    r = CliRunner().invoke(main, ["inspect", str(out)])
    assert r.exit_code == 0, r.output
    assert "Q8_0 16" in r.output and "bits/weight" in r.output and "edge_qwen.source.sha256" in r.output
    r = CliRunner().invoke(main, ["inspect", str(out), "--json"])
    info = json.loads(r.output)
    assert info["tensor_types"] == {"F32": 11, "Q8_0": 16} and 8.0 < info["bits_per_weight"] < 10
    assert info["provenance"]["edge_qwen.outtype"] == "q8_0"


def test_rebuild_cli_roundtrip(tmp_path, tiny_ggufs):
    out = tmp_path / "rebuilt"
    r = CliRunner().invoke(main, ["rebuild", str(tiny_ggufs["f32"]), str(out), "--dtype", "f32", "--quiet"])
    assert r.exit_code == 0, r.output
    again = convert(out, tmp_path / "again.gguf", outtype="f32", quiet=True)
    a, b = _gguf_tensors(tiny_ggufs["f32"]), _gguf_tensors(again)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    r = CliRunner().invoke(main, ["rebuild", str(tiny_ggufs["f32"]), str(out)])
    assert r.exit_code != 0 and "--force" in r.output


# --- bad input: one clear line, non-zero exit, nothing under the output name -------------------

def _break(kind: str, folder: Path) -> None:
    def edit_json(name, fn):
        p = folder / name
        obj = json.loads(p.read_text())
        fn(obj)
        p.write_text(json.dumps(obj))

    if kind == "no_config":
        (folder / "config.json").unlink()
    elif kind == "architecture":
        edit_json("config.json", lambda c: c.update(architectures=["LlamaForCausalLM"], model_type="llama"))
    elif kind == "missing_shard":
        next(folder.glob("model-00002-of-*.safetensors")).unlink()
    elif kind == "truncated_shard":
        p = next(folder.glob("model-00001-of-*.safetensors"))
        p.write_bytes(p.read_bytes()[:-1000])
    elif kind == "shape":
        edit_json("config.json", lambda c: c.update(intermediate_size=768))
    elif kind in ("dtype", "unmapped"):
        import torch
        from safetensors.torch import load_file, save_file

        p = next(folder.glob("model-00001-of-*.safetensors"))
        tensors = load_file(p)
        if kind == "dtype":
            name = next(n for n in tensors if "q_proj.weight" in n)
            tensors[name] = tensors[name].to(torch.float64)
        else:
            tensors["model.layers.0.mlp.adapter.weight"] = torch.zeros(4, 4, dtype=torch.bfloat16)
            edit_json("model.safetensors.index.json",
                      lambda i: i["weight_map"].update({"model.layers.0.mlp.adapter.weight": p.name}))
        save_file(tensors, p, metadata={"format": "pt"})
    elif kind == "tokenizer":
        edit_json("tokenizer.json", lambda t: t["pre_tokenizer"]["pretokenizers"][0]["pattern"].update(
            Regex=r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"))
    elif kind == "config_value":
        edit_json("config.json", lambda c: c.update(rms_norm_eps="tiny"))
    elif kind == "no_tokenizer":
        (folder / "tokenizer.json").unlink()


BAD = {
    "no_config": "no config.json",
    "architecture": "LlamaForCausalLM is not supported",
    "missing_shard": "is missing",
    "truncated_shard": "truncated",
    "shape": "implies",
    "dtype": "F64",
    "unmapped": "model.layers.0.mlp.adapter.weight",
    "tokenizer": "pre-tokenizer",
    "no_tokenizer": "no tokenizer.json",
    "config_value": "fix config.json",
}


@pytest.fixture(scope="module")
def sharded_tiny(tmp_path_factory) -> Path:
    from conftest import make_tiny_checkpoint

    return make_tiny_checkpoint(tmp_path_factory.mktemp("sharded") / "tiny", max_shard_size="1MB")


@pytest.mark.parametrize("kind", list(BAD))
def test_bad_checkpoint_is_refused(kind, sharded_tiny, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(sharded_tiny, src)
    _break(kind, src)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    r = CliRunner().invoke(main, ["convert", str(src), "-o", str(out_dir / "m.gguf")])
    assert r.exit_code != 0
    assert r.output.startswith("Error: ") and len(r.output.strip().splitlines()) == 1, r.output
    assert BAD[kind] in r.output, r.output
    assert not isinstance(r.exception, Exception) or isinstance(r.exception, SystemExit)  # no traceback
    assert list(out_dir.iterdir()) == []


def test_existing_output_and_unknown_sources(tmp_path, tiny_checkpoint, isolated_home):
    out = tmp_path / "m.gguf"
    out.write_bytes(b"keep me")
    r = CliRunner().invoke(main, ["convert", str(tiny_checkpoint), "-o", str(out)])
    assert r.exit_code != 0 and "--force" in r.output and out.read_bytes() == b"keep me"
    r = CliRunner().invoke(main, ["convert", str(tiny_checkpoint), "-o", str(out), "--force", "-q"])
    assert r.exit_code == 0 and out.read_bytes()[:4] == b"GGUF" and r.output == ""
    r = CliRunner().invoke(main, ["convert", "acme/never-pulled", "-o", str(tmp_path / "x.gguf")])
    assert r.exit_code != 0 and "edge-qwen pull acme/never-pulled" in r.output
    assert not (tmp_path / "x.gguf").exists()
    r = CliRunner().invoke(main, ["convert", str(tmp_path / "nowhere"), "-o", str(tmp_path / "x.gguf")])
    assert r.exit_code != 0 and "neither a checkpoint folder" in r.output


def test_convert_pulled_repo_id(tiny_checkpoint, isolated_home, monkeypatch, tmp_path):
    """SRC as a repo id: pulled over real HTTP from the local Hub stand-in, then converted offline."""
    import sys

    import huggingface_hub.constants

    from edge_qwen.gguf_file import check_gguf
    from edge_qwen.hub import pull

    sys.path.insert(0, str(Path(__file__).parent))
    from hubstub import HubStub

    stub = HubStub().start()
    try:
        files = {p.name: p.read_bytes() for p in tiny_checkpoint.iterdir() if p.is_file()}
        files["README.md"] = b"---\nlicense: mit\n---\n"
        commit = stub.add_commit("acme/tiny-qwen2", files)
        monkeypatch.setenv("HF_ENDPOINT", stub.endpoint)
        monkeypatch.setenv("HF_HUB_OFFLINE", "0")
        registry = tmp_path / "agent_harnesses.json"  # keeps huggingface_hub from fetching its registry
        registry.write_text('{"standardEnvVars": [], "harnesses": {}}')
        monkeypatch.setattr(huggingface_hub.constants, "AGENT_HARNESSES_PATH", str(registry))
        pull("acme/tiny-qwen2", quiet=True)
    finally:
        stub.stop()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "pulled.gguf"
    r = CliRunner().invoke(main, ["convert", "acme/tiny-qwen2", "-o", str(out), "-q"])
    assert r.exit_code == 0, r.output
    meta = check_gguf(out).metadata
    assert meta["edge_qwen.source.repo"] == "acme/tiny-qwen2" and meta["edge_qwen.source.revision"] == commit
    assert meta["general.source.repo_url"] == "https://huggingface.co/acme/tiny-qwen2"
    assert meta["general.license"] == "mit" and meta["general.name"] == "tiny-qwen2"
    r = CliRunner().invoke(main, ["convert", "acme/tiny-qwen2", "-q"])  # default output: the store, named after the repo
    assert r.exit_code == 0, r.output
    assert (isolated_home / "models" / "tiny-qwen2-f16.gguf").is_file()


def test_finetune_tokenizer_variant(tiny_checkpoint, tmp_path):
    """A Qwen2.5 fine-tune's tokenizer (extra special token, no normalizer, its own template) converts
    by structure, not by a hash of known tokenizers, and llama.cpp then tokenizes like transformers."""
    import llama_cpp
    from transformers import AutoTokenizer

    src = tmp_path / "finetune"
    shutil.copytree(tiny_checkpoint, src)
    tok = json.loads((src / "tokenizer.json").read_text())
    tok["normalizer"] = None
    new_id = max(a["id"] for a in tok["added_tokens"]) + 1
    tok["added_tokens"].append({"id": new_id, "content": "<|think|>", "single_word": False, "lstrip": False,
                                "rstrip": False, "normalized": False, "special": True})
    (src / "tokenizer.json").write_text(json.dumps(tok, ensure_ascii=False))
    (src / "chat_template.jinja").write_text("{% for m in messages %}<|think|>{{ m['content'] }}{% endfor %}")
    out = convert(src, tmp_path / "ft.gguf", quiet=True)
    text = "<|think|>plan: 先想一想 then answer<|im_end|>"
    want = AutoTokenizer.from_pretrained(src)(text, add_special_tokens=False)["input_ids"]
    assert new_id in want
    llm = llama_cpp.Llama(str(out), vocab_only=True, verbose=False)
    assert llm.tokenize(text.encode(), add_bos=False, special=True) == want
    from edge_qwen.gguf_file import check_gguf

    assert "<|think|>" in check_gguf(out).metadata["tokenizer.chat_template"]


def test_cli_convert_and_quantize_in_one_step(tmp_path, tiny_checkpoint):
    from edge_qwen.gguf_file import check_gguf

    out = tmp_path / "q" / "tiny-q4_k_m.gguf"
    r = CliRunner().invoke(main, ["convert", str(tiny_checkpoint), "-o", str(out), "--type", "Q4_K_M", "-q"])
    assert r.exit_code == 0, r.output
    info = check_gguf(out)
    assert info.file_type == 15  # LLAMA_FTYPE_MOSTLY_Q4_K_M
    assert info.metadata["general.quantize.type"] == "Q4_K_M"
    assert sorted(p.name for p in out.parent.iterdir()) == ["tiny-q4_k_m.gguf"]  # f16 intermediate removed
    r = CliRunner().invoke(main, ["convert", str(tiny_checkpoint), "-o", str(tmp_path / "x.gguf"), "--imatrix", "m.imatrix"])
    assert r.exit_code != 0 and "--type" in r.output
