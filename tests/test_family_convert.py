"""The Qwen family beyond Qwen2: Qwen3, Qwen2-MoE, Qwen3-MoE and Qwen2.5-VL (text model + vision
tower) convert to files tensor-identical to llama.cpp's own converter, and then quantize (with
an importance matrix), inspect, load and generate in llama.cpp.

The reference is RECORDED: tests/data/llamacpp_reference.json holds, for each tiny checkpoint
of tests/family_models.py and each outtype, the type, shape and sha256 of every tensor and the
hyper-parameter keys of the file llama.cpp's convert_hf_to_gguf.py (llama-cpp-python 0.3.36's
sdist) wrote; tests/make_llamacpp_reference.py re-runs llama.cpp's converter and rewrites it.
Recorded, because running llama.cpp's converter here costs the sdist download plus 20-40 s
per file (torch, transformers and the 151k-token tokenizer load in every run), several minutes
for the 20 files; the checkpoints are made from numpy's frozen legacy random stream, so the
hashes hold on every machine.
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from functools import lru_cache

from family_models import ARCHS, digest_diff, make_family_checkpoint
from family_models import gguf_digest as _digest

from edge_qwen.cli import main
from edge_qwen.convert.writer import convert

gguf_digest = lru_cache(maxsize=None)(_digest)  # each converted file is hashed once per module
REFERENCE = json.loads((Path(__file__).parent / "data" / "llamacpp_reference.json").read_text())["files"]
# What CI converts and compares (all 20 recorded files would add ~1 min): every architecture in
# f16 and q8_0, the (small) vision tower in all four; f32 and bf16 of the text models are in the
# recorded reference and checked by tests/make_llamacpp_reference.py.
CASES = ([(a, t) for a in ARCHS for t in ("f16", "q8_0")] + [("qwen2vl-mmproj", t) for t in ("f32", "f16", "bf16", "q8_0")])


@pytest.fixture(scope="module")
def family(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("family")
    return {a: make_family_checkpoint(root / f"tiny-{a}", a) for a in ARCHS}


@pytest.fixture(scope="module")
def converted(family, tmp_path_factory):
    """(arch, outtype) -> our GGUF, converted once per module and kept for the later tests."""
    root = tmp_path_factory.mktemp("family_gguf")
    cache: dict[tuple[str, str], Path] = {}

    def get(arch: str, outtype: str) -> Path:
        if (arch, outtype) not in cache:
            text = arch.removesuffix("-mmproj")
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the tied-head warning, tested on its own below
                cache[arch, outtype] = convert(family[text], root / f"{arch}-{outtype}.gguf", outtype=outtype,
                                               quiet=True, mmproj=arch.endswith("-mmproj"))
        return cache[arch, outtype]

    return get


@pytest.mark.parametrize("arch,outtype", CASES)
def test_tensor_identical_to_llamacpp(converted, arch, outtype):
    ours = gguf_digest(converted(arch, outtype))
    ref = REFERENCE[f"{arch}-{outtype}"]
    assert digest_diff(ours, ref) == []
    assert len(ours["tensors"]) == len(ref["tensors"]) > 10


def test_checkpoints_are_what_transformers_loads(family):
    """The tiny checkpoints hold exactly the tensors transformers expects (no missing, no unexpected)."""
    import torch
    import transformers

    classes = {"qwen3": "Qwen3ForCausalLM", "qwen2moe": "Qwen2MoeForCausalLM", "qwen3moe": "Qwen3MoeForCausalLM",
               "qwen2vl": "Qwen2_5_VLForConditionalGeneration"}
    for arch, folder in family.items():
        cls = getattr(transformers, classes[arch])
        _model, info = cls.from_pretrained(folder, dtype=torch.bfloat16, output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"], (arch, info)
        assert not info["mismatched_keys"], (arch, info)


# --- the four differences llama.cpp's converter showed (issue 14), each on the published form ---

def test_control_looking_tokens_are_control(converted):
    """Qwen's published tokenizer marks <|fim_prefix|> ... <|file_sep|> not special; llama.cpp's
    converter stores them CONTROL and so do we (the token arrays are in the digest too)."""
    import gguf
    import llama_cpp

    path = converted("qwen3", "f16")
    r = gguf.GGUFReader(str(path))
    types = r.fields["tokenizer.ggml.token_type"].contents()
    tokens = r.fields["tokenizer.ggml.tokens"].contents()
    for i in range(151659, 151665):
        assert tokens[i].startswith("<|") and types[i] == gguf.TokenType.CONTROL, (i, tokens[i])
    # <think> and <tool_response> are not special and do not look like control tokens
    assert [types[tokens.index(t)] for t in ("<think>", "</think>", "<tool_response>")] == [gguf.TokenType.USER_DEFINED] * 3
    llm = llama_cpp.Llama(str(path), vocab_only=True, verbose=False)
    ids = llm.tokenize("<|fim_prefix|>def f():<|fim_suffix|><think>x</think>".encode(), add_bos=False, special=True)
    assert ids[0] == 151659 and 151661 in ids and 151667 in ids and 151668 in ids


def test_finetune_control_looking_token(tmp_path, family):
    """A fine-tune's added `<|ft_token|>` (special: false) is CONTROL, as llama.cpp's converter makes it."""
    import gguf

    src = tmp_path / "ft"
    shutil.copytree(family["qwen3moe"], src)
    tok = json.loads((src / "tokenizer.json").read_text())
    tok["added_tokens"].append({"id": 151669, "content": "<|ft_token|>", "single_word": False, "lstrip": False,
                                "rstrip": False, "normalized": False, "special": False})
    tok["added_tokens"].append({"id": 151670, "content": "<ft_plain>", "single_word": False, "lstrip": False,
                                "rstrip": False, "normalized": False, "special": False})
    (src / "tokenizer.json").write_text(json.dumps(tok, ensure_ascii=False))
    r = gguf.GGUFReader(str(convert(src, tmp_path / "ft.gguf", outtype="q8_0", quiet=True)))
    types = r.fields["tokenizer.ggml.token_type"].contents()
    assert types[151669] == gguf.TokenType.CONTROL and types[151670] == gguf.TokenType.USER_DEFINED


def test_stored_tied_head_is_kept_with_a_warning(family, tmp_path):
    """tie_word_embeddings: true with a stored lm_head.weight: llama.cpp keeps it as output.weight,
    and so do we, saying that transformers would use the embedding instead."""
    import gguf

    with pytest.warns(UserWarning, match="stored lm_head.weight differs"):
        path = convert(family["qwen3"], tmp_path / "tied.gguf", outtype="f32", quiet=True)
    r = gguf.GGUFReader(str(path))
    t = {x.name: x for x in r.tensors}
    from edge_qwen.convert.checkpoint import open_checkpoint

    ckpt = open_checkpoint(family["qwen3"])
    assert ckpt.tied
    head = np.asarray(t["output.weight"].data).reshape(ckpt.tensors["lm_head.weight"].shape)
    assert np.array_equal(head, ckpt.tensors["lm_head.weight"].read())
    assert not np.array_equal(head, np.asarray(t["token_embd.weight"].data).reshape(head.shape))
    assert "output.weight" in REFERENCE["qwen3-f16"]["tensors"]  # llama.cpp's file has it too


def test_yarn_extras_are_written(converted):
    keys = REFERENCE["qwen3-f16"]["keys"]
    ours = gguf_digest(converted("qwen3", "f16"))["keys"]
    for k, v in {"qwen3.rope.scaling.type": "yarn", "qwen3.rope.scaling.factor": 4.0,
                 "qwen3.rope.scaling.original_context_length": 1024, "qwen3.rope.scaling.yarn_attn_factor": 1.2,
                 "qwen3.rope.scaling.yarn_beta_fast": 24.0, "qwen3.rope.scaling.yarn_beta_slow": 2.0}.items():
        assert ours[k] == keys[k] == v, k


def test_vocab_json_and_merges_txt(family, converted, tmp_path):
    """qwen2moe's tiny checkpoint ships vocab.json + merges.txt and no tokenizer.json (llama.cpp
    converts it; its token arrays are in the compared digest). Same arrays as from tokenizer.json."""
    folder = family["qwen2moe"]
    assert not (folder / "tokenizer.json").exists() and (folder / "merges.txt").is_file()
    a = gguf_digest(converted("qwen2moe", "f16"))["keys"]
    b = gguf_digest(converted("qwen3moe", "f16"))["keys"]  # a tokenizer.json checkpoint (+4 Qwen3 tokens)
    assert a["tokenizer.ggml.merges"] == b["tokenizer.ggml.merges"] and a["tokenizer.ggml.pre"] == "qwen2"
    src = tmp_path / "other"
    shutil.copytree(folder, src)
    cfg = json.loads((src / "tokenizer_config.json").read_text())
    cfg["tokenizer_class"] = "GPT2Tokenizer"  # another split regex: cannot be reproduced
    (src / "tokenizer_config.json").write_text(json.dumps(cfg))
    r = CliRunner().invoke(main, ["convert", str(src), "-o", str(tmp_path / "x.gguf")])
    assert r.exit_code != 0 and r.output.startswith("Error: ") and "GPT2Tokenizer" in r.output, r.output


# --- quantize, imatrix, inspect, load and generate -----------------------------------------------

@pytest.mark.parametrize("arch", ARCHS)
def test_quantize_imatrix_inspect_and_generate(converted, arch, tmp_path):
    import llama_cpp

    from edge_qwen.convert.writer import inspect_gguf
    from edge_qwen.quant.quantize import quantize

    f16 = converted(arch, "f16")
    res = quantize(f16, tmp_path / f"{arch}-q4_k_m.gguf", qtype="Q4_K_M", calibration="default", chunks=1,
                   quiet=True)
    q4 = res.files[0].path
    info = inspect_gguf(q4)
    arch_name = {"qwen2vl": "qwen2vl", "qwen3": "qwen3", "qwen2moe": "qwen2moe", "qwen3moe": "qwen3moe"}[arch]
    assert info["architecture"] == arch_name and info["file_type"] == 15 and "Q4_K" in info["tensor_types"]
    imatrix = next(tmp_path.glob("*.imatrix.gguf"))
    assert imatrix.stat().st_size > 0
    if "moe" in arch:  # the expert tensors were quantized with their per-expert importances
        assert any("ffn_down_exps" in k for k in _imatrix_names(imatrix))
    for path in (f16, q4):
        llm = llama_cpp.Llama(str(path), n_ctx=128, n_threads=2, verbose=False)
        try:
            out = llm.create_completion("The capital of France is", max_tokens=6, temperature=0.0)
            again = llm.create_completion("The capital of France is", max_tokens=6, temperature=0.0)
        finally:
            llm.close()
        assert out["usage"]["completion_tokens"] > 0
        assert out["choices"][0]["text"] == again["choices"][0]["text"]  # greedy is deterministic


def _imatrix_names(path: Path) -> list[str]:
    import gguf

    return [t.name for t in gguf.GGUFReader(str(path)).tensors]


def test_runtime_loads_the_family(converted):
    """EdgeQwen (our runtime, not just llama.cpp) accepts every family architecture."""
    from edge_qwen import EdgeQwen

    m = EdgeQwen(converted("qwen3moe", "q8_0"), n_ctx=256)
    try:
        reply = m.chat([{"role": "user", "content": "hi"}], max_tokens=4, temperature=0.0)
    finally:
        m.close()
    assert reply is not None


# --- bad input ------------------------------------------------------------------------------------

def _edit_config(folder: Path, fn) -> None:
    cfg = json.loads((folder / "config.json").read_text())
    fn(cfg)
    (folder / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("arch,change,message", [
    ("qwen3moe", lambda c: c.update(mlp_only_layers=[1]), "mlp_only_layers"),
    ("qwen3moe", lambda c: c.pop("moe_intermediate_size"), "moe_intermediate_size"),
    ("qwen2vl", lambda c: c["vision_config"].update(fullatt_block_indexes=[0, 3]), "fullatt_block_indexes"),
    ("qwen3", lambda c: c.update(architectures=["Qwen5ForCausalLM"], model_type="qwen5"),  # a future Qwen
     "Qwen5ForCausalLM is not supported"),
])
def test_bad_family_checkpoint(family, tmp_path, arch, change, message):
    src = tmp_path / "src"
    shutil.copytree(family[arch], src)
    _edit_config(src, change)
    args = ["convert", str(src), "-o", str(tmp_path / "x.gguf")] + (["--mmproj"] if arch == "qwen2vl" else [])
    r = CliRunner().invoke(main, args)
    assert r.exit_code != 0 and r.output.startswith("Error: ") and len(r.output.strip().splitlines()) == 1, r.output
    assert message in r.output, r.output
    assert not (tmp_path / "x.gguf").exists()


def test_mmproj_needs_a_vl_checkpoint(family, tmp_path):
    r = CliRunner().invoke(main, ["convert", str(family["qwen3"]), "--mmproj", "-o", str(tmp_path / "m.gguf")])
    assert r.exit_code != 0 and "no vision tower" in r.output, r.output
    src = tmp_path / "vl"
    shutil.copytree(family["qwen2vl"], src)
    (src / "preprocessor_config.json").unlink()
    r = CliRunner().invoke(main, ["convert", str(src), "--mmproj", "-o", str(tmp_path / "m.gguf")])
    assert r.exit_code != 0 and "preprocessor_config.json" in r.output, r.output
    r = CliRunner().invoke(main, ["convert", str(src), "--mmproj", "--type", "Q4_K_M"])
    assert r.exit_code != 0 and "--mmproj" in r.output, r.output
