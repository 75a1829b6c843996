"""Quantization: every llama.cpp type on a tiny model, recipe controls, provenance, bad input."""

from __future__ import annotations

import ctypes
import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from edge_qwen.cli import main
from edge_qwen.errors import EdgeQwenError, ModelFileError, OutputExistsError
from edge_qwen.files import sha256_file
from edge_qwen.gguf_file import check_gguf, read_header
from edge_qwen.quant.imatrix import ImatrixError, compute_imatrix
from edge_qwen.quant.imatrix_collect import llama_log
from edge_qwen.quant.types import (ALIASES, QUANT_TYPES, TENSOR_TYPES, QuantTypeError, format_table, quant_type,
                                   quant_types, tensor_type)
from edge_qwen.quant.quantize import default_output_name, parse_overrides, quantize


@pytest.fixture(scope="module")
def tiny_f16(tiny_checkpoint, tmp_path_factory) -> Path:
    """The tiny random Qwen2 checkpoint converted by edge-qwen to an f16 GGUF (hidden 256: K-quants apply)."""
    from edge_qwen.convert.writer import convert

    return convert(tiny_checkpoint, tmp_path_factory.mktemp("tinyq") / "tiny-f16.gguf", outtype="f16", quiet=True)


@pytest.fixture(scope="module")
def tiny_imatrix(tiny_f16, tmp_path_factory) -> Path:
    """An importance matrix of the tiny model over the shipped calibration corpus (2 chunks of 128)."""
    im = compute_imatrix(tiny_f16, "default", n_ctx=128, chunks=2, quiet=True)
    return im.save(tmp_path_factory.mktemp("tinyim") / "tiny.imatrix.gguf")


def _types(path: Path) -> dict[str, str]:
    import gguf

    _, tensors, _ = read_header(path)
    return {name: gguf.GGMLQuantizationType(t).name for name, _s, t, _o in tensors}


def _load_and_run(path: Path) -> dict[str, str]:
    """Load a quantized file with llama.cpp, evaluate a few tokens, return its metadata."""
    import numpy as np
    from llama_cpp import Llama

    llm = Llama(str(path), n_ctx=64, n_batch=64, n_threads=2, logits_all=True, verbose=False)
    toks = llm.tokenize("def add(a, b):".encode(), add_bos=False, special=True)
    llm.eval(toks)
    assert np.isfinite(np.asarray(llm.scores[: len(toks)])).all()
    meta = dict(llm.metadata)
    llm.close()
    return meta


# --- the type table --------------------------------------------------------------------------

def test_table_matches_llama_cpp():
    import gguf
    import llama_cpp

    ftypes = {n[len("LLAMA_FTYPE_"):]: getattr(llama_cpp, n) for n in dir(llama_cpp) if n.startswith("LLAMA_FTYPE_")}
    ftypes.pop("GUESSED")
    # NVFP4 is in llama.h but this build's quantizer refuses it, so the table leaves it out.
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftypes.pop("MOSTLY_NVFP4")
    errors: list[str] = []
    with llama_log(lambda level, line: errors.append(line)):
        assert llama_cpp.llama_model_quantize(b"/nonexistent.gguf", b"/nonexistent-out.gguf", ctypes.byref(params)) != 0
    assert any("invalid output file type 39" in e for e in errors)
    assert {quant_type(n).ftype for n in ftypes} == set(ftypes.values())  # every ftype llama.cpp has
    for name, value in ftypes.items():
        assert quant_type(name).ftype == value
    from llama_cpp._ggml import libggml

    libggml.ggml_type_name.restype = ctypes.c_char_p
    libggml.ggml_blck_size.restype = ctypes.c_int64
    libggml.ggml_type_size.restype = ctypes.c_size_t
    for t in TENSOR_TYPES.values():  # ggml's own names and block sizes for our numbers
        assert libggml.ggml_type_name(t.ggml_type).decode().upper() == t.name
        assert (libggml.ggml_blck_size(t.ggml_type), libggml.ggml_type_size(t.ggml_type)) == (t.block, t.block_bytes)
        known = {q.name: q for q in gguf.GGMLQuantizationType}
        if t.name in known:  # gguf-py does not know the newest types yet
            assert gguf.GGML_QUANT_SIZES[known[t.name]] == (t.block, t.block_bytes)


def test_names_any_case_aliases_and_unknown():
    assert quant_type("q4_k_m") is QUANT_TYPES["Q4_K_M"]
    assert quant_type("MOSTLY_Q4_K_M") is quant_type("llama_ftype_mostly_q4_k_m") is quant_type("Q4-K-M")
    assert quant_type("q4_k") is QUANT_TYPES[ALIASES["Q4_K"]]
    assert quant_type("ALL_F32").name == "F32" and quant_type("15").name == "Q4_K_M"
    assert [q.name for q in quant_types("q8_0, Q6_K,q8_0")] == ["Q8_0", "Q6_K"]
    assert tensor_type("q6_k").ggml_type == 14 and tensor_type("f16").name == "F16"
    with pytest.raises(QuantTypeError, match=r"unknown quantization type 'Q9_K'; valid types: .*IQ2_XXS.*Q4_K_M"):
        quant_type("Q9_K")
    with pytest.raises(QuantTypeError, match="valid tensor types"):
        tensor_type("Q4_K_M")  # a file type, not a tensor type
    for need in ("IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ2_M", "IQ3_XXS", "IQ3_XS", "IQ3_S", "IQ3_M",
                 "Q2_K_S"):
        assert quant_type(need).needs_imatrix
    assert not any(quant_type(n).needs_imatrix for n in ("Q4_K_M", "Q8_0", "IQ4_XS", "IQ4_NL", "Q2_K", "F16"))


def test_list_command():
    r = CliRunner().invoke(main, ["quantize", "--list"])
    assert r.exit_code == 0
    for name in QUANT_TYPES:
        assert re.search(rf"^{name}\s", r.output, re.M), name
    assert re.search(r"^IQ2_XXS\s+19\s+IQ2_XXS\s+2\.06\s+required", r.output, re.M)
    assert re.search(r"^Q4_K_M\s+15\s+Q4_K\s+4\.50\s+-", r.output, re.M)
    assert r.output.strip() == format_table().strip()


def test_default_output_names():
    assert default_output_name("m/x-f16.gguf", "Q4_K_M") == "x-q4_k_m.gguf"
    assert default_output_name("x-BF16.gguf", "q8_0") == "x-q8_0.gguf"
    assert default_output_name("model.gguf", "IQ2_XXS") == "model-iq2_xxs.gguf"
    assert default_output_name("qwen-q4_k_m.gguf", "Q3_K_S") == "qwen-q3_k_s.gguf"
    assert parse_overrides(["attn_v=q8_0", r"blk\.0\..*=Q6_K"]) == [("attn_v", 8), (r"blk\.0\..*", 14)]
    with pytest.raises(QuantTypeError, match="PATTERN=TYPE"):
        parse_overrides(["attn_v"])
    with pytest.raises(QuantTypeError, match="not a valid regular expression"):
        parse_overrides({"blk.(": "Q8_0"})


# --- every type, on the tiny model -------------------------------------------------------------

def test_every_type_runs(tiny_f16, tiny_imatrix, tmp_path):
    n_tensors = len(read_header(tiny_f16)[1])
    src_hash = sha256_file(tiny_f16)
    for q in QUANT_TYPES.values():
        res = quantize(tiny_f16, tmp_path / f"t-{q.name}.gguf", q.name,
                       imatrix=tiny_imatrix if q.needs_imatrix else None, quiet=True)
        f = res.files[0]
        assert f.path.is_file() and f.size == f.path.stat().st_size, q.name
        assert sum(f.tensor_types.values()) == n_tensors, q.name  # every tensor's log line was seen
        main_type = "Q8_0" if q.name == "MXFP4_MOE" else q.tensor_type  # no experts in a dense model
        assert main_type in f.tensor_types, (q.name, f.tensor_types)
        meta = _load_and_run(f.path)
        assert meta["general.quantize.type"] == q.name
        assert int(meta["general.file_type"]) == q.ftype
        assert meta["general.quantize.source_sha256"] == src_hash
        f.path.unlink()


def test_several_types_in_one_call_cli(tiny_f16, tmp_path):
    out = tmp_path / "outs"
    r = CliRunner().invoke(main, ["quantize", str(tiny_f16), "--type", "q8_0,Q4_K_M,q6_k", "-o", str(out), "-q"])
    assert r.exit_code == 0, r.output
    made = sorted(p.name for p in out.iterdir())
    assert made == ["tiny-q4_k_m.gguf", "tiny-q6_k.gguf", "tiny-q8_0.gguf"]
    assert r.output.count("wrote ") == 3
    assert set(_types(out / "tiny-q4_k_m.gguf").values()) >= {"Q4_K", "Q6_K", "F32"}
    # default name beside the input, and no overwrite without --force
    res = quantize(tiny_f16, None, "Q8_0", quiet=True)
    assert res.path == tiny_f16.with_name("tiny-q8_0.gguf")
    with pytest.raises(OutputExistsError, match="--force"):
        quantize(tiny_f16, None, "Q8_0", quiet=True)
    quantize(tiny_f16, None, "Q8_0", quiet=True, force=True)
    res.path.unlink()


# --- recipe controls ---------------------------------------------------------------------------

def test_embedding_output_override_and_pure(tiny_f16, tmp_path):
    res = quantize(tiny_f16, tmp_path / "r.gguf", "Q4_K_M", embedding_type="Q8_0", output_type="q5_k",
                   overrides=[r"attn_v=Q8_0", r"blk\.1\.ffn_down=IQ4_NL"], quiet=True)
    t = _types(res.path)
    assert t["token_embd.weight"] == "Q8_0" and t["output.weight"] == "Q5_K"
    assert t["blk.0.attn_v.weight"] == t["blk.1.attn_v.weight"] == "Q8_0"
    assert t["blk.1.ffn_down.weight"] == "IQ4_NL"
    assert t["blk.0.attn_q.weight"] == "Q4_K" and t["blk.0.attn_norm.weight"] == "F32"
    meta, _, _ = read_header(res.path)
    assert "token_embd=Q8_0" in meta["general.quantize.recipe"] and "attn_v=Q8_0" in meta["general.quantize.recipe"]

    mixed = _types(quantize(tiny_f16, tmp_path / "mix.gguf", "Q4_K_M", quiet=True).path)
    pure = _types(quantize(tiny_f16, tmp_path / "pure.gguf", "Q4_K_M", pure=True, quiet=True).path)
    assert "Q6_K" in mixed.values()  # the mix gives some tensors more bits
    weights = [n for n in pure if not n.endswith(("norm.weight", ".bias"))]
    # --pure: every weight Q4_K except output/embedding, which llama.cpp always decides itself
    assert {pure[n] for n in weights if not n.startswith(("output", "token_embd"))} == {"Q4_K"}


def test_dry_run_writes_nothing_and_predicts_size(tiny_f16, tiny_imatrix, tmp_path):
    before = set(tiny_f16.parent.iterdir())
    r = CliRunner().invoke(main, ["quantize", str(tiny_f16), "--type", "Q4_K_M,IQ2_XXS", "--dry-run"])
    assert r.exit_code == 0, r.output
    assert set(tiny_f16.parent.iterdir()) == before
    assert re.search(r"Q4_K_M: would be [\d.]+ MiB \(\d+ bytes", r.output)
    assert "IQ2_XXS" in r.output and "needs an importance matrix" in r.output
    for qt, im in (("Q4_K_M", None), ("IQ2_XXS", tiny_imatrix), ("Q3_K_S", None)):
        dry = quantize(tiny_f16, qtype=qt, imatrix=im, dry_run=True, quiet=True).files[0]
        real = quantize(tiny_f16, tmp_path / f"{qt}.gguf", qt, imatrix=im, quiet=True).files[0]
        assert dry.path is None and dry.tensor_types == real.tensor_types
        assert abs(dry.size - real.size) <= 32, (qt, dry.size, real.size)  # exact but for header padding


# --- provenance --------------------------------------------------------------------------------

def test_provenance_keys(tiny_f16, tiny_imatrix, tmp_path):
    res = quantize(tiny_f16, tmp_path / "p.gguf", "IQ3_XXS", imatrix=tiny_imatrix, quiet=True)
    meta, _, _ = read_header(res.path)
    assert meta["general.quantize.source_sha256"] == sha256_file(tiny_f16) == res.source_sha256
    assert meta["general.quantize.source_file"] == "tiny-f16.gguf"
    assert meta["general.quantize.type"] == "IQ3_XXS"
    assert meta["general.quantize.imatrix_sha256"] == sha256_file(tiny_imatrix) == res.imatrix_sha256
    assert meta["general.quantize.calibration"] == "default"
    assert meta["quantize.imatrix.file"] == tiny_imatrix.name and meta["quantize.imatrix.chunks_count"] == 2
    assert meta["general.file_type"] == 23
    from edge_qwen.quant.imatrix import load_imatrix

    mem = load_imatrix(tiny_imatrix)
    mem.path = None  # as if computed in memory and never saved
    kept, _, _ = read_header(quantize(tiny_f16, tmp_path / "m.gguf", "Q4_K_M", imatrix=mem, quiet=True).path)
    assert kept["general.quantize.imatrix_sha256"] == f"data:{mem.digest()}"
    plain, _, _ = read_header(quantize(tiny_f16, tmp_path / "n.gguf", "Q8_0", quiet=True).path)
    assert plain["general.quantize.imatrix_sha256"] == "none" and plain["general.quantize.calibration"] == "none"


# --- bad input ---------------------------------------------------------------------------------

def _cli_fails(args: list[str], pattern: str) -> str:
    r = CliRunner().invoke(main, args)
    assert r.exit_code != 0, r.output
    assert r.exception is None or isinstance(r.exception, SystemExit), r.exception
    assert "Traceback" not in r.output and re.search(pattern, r.output), r.output
    return r.output


def test_bad_input(tiny_f16, default_model, tmp_path):
    work = tmp_path / "bad"
    work.mkdir()
    not_gguf = work / "x.gguf"
    not_gguf.write_bytes(b"PK\x03\x04 not a model at all")
    cut = work / "cut.gguf"
    cut.write_bytes(tiny_f16.read_bytes()[: tiny_f16.stat().st_size // 2])
    before = set(work.iterdir())
    _cli_fails(["quantize", str(not_gguf), "--type", "Q4_K_M"], "not a GGUF file")
    _cli_fails(["quantize", str(cut), "--type", "Q4_K_M"], "truncated")
    _cli_fails(["quantize", str(tiny_f16), "--type", "Q4_K_Z", "-o", str(work / "o.gguf")],
               r"unknown quantization type 'Q4_K_Z'; valid types: .*Q4_K_M")
    _cli_fails(["quantize", str(tiny_f16), "--type", "IQ2_XXS", "-o", str(work / "o.gguf")],
               r"IQ2_XXS needs an importance matrix.*--imatrix")
    _cli_fails(["quantize", str(default_model), "--type", "Q3_K_S", "-o", str(work / "o.gguf")],
               r"already quantized .*--allow-requantize")
    _cli_fails(["quantize", str(tiny_f16), "--type", "Q8_0", "--embedding-type", "Q4_K_M", "-o", str(work / "o.gguf")],
               "unknown tensor type")
    _cli_fails(["quantize"], "give the GGUF model")
    assert set(work.iterdir()) == before  # nothing left behind
    with pytest.raises(ModelFileError, match="already quantized"):
        quantize(default_model, work / "o.gguf", "Q8_0", quiet=True)
    with pytest.raises(ImatrixError, match="not both"):
        quantize(tiny_f16, work / "o.gguf", "Q4_K_M", imatrix=work / "x.gguf", calibration="default", quiet=True)
    with pytest.raises(EdgeQwenError, match="is the input file"):
        quantize(tiny_f16, tiny_f16, "Q8_0", quiet=True, force=True)
    assert set(work.iterdir()) == before


def test_imatrix_for_another_model_is_refused(tiny_f16, default_model, tmp_path):
    im = compute_imatrix(default_model, "default", n_ctx=32, chunks=1, quiet=True)  # 24 blocks, 896-wide rows
    path = im.save(tmp_path / "big.imatrix.gguf")
    before = set(tmp_path.iterdir())
    _cli_fails(["quantize", str(tiny_f16), "--type", "IQ3_XXS", "--imatrix", str(path), "-o", str(tmp_path / "o.gguf")],
               r"made for another model: \d+ of its 168 tensors .* are not in .*tiny-f16.gguf")
    # same names (blocks 0 and 1 exist in both), wrong row lengths
    im.sums = {k: v for k, v in im.sums.items() if k.startswith(("blk.0.", "blk.1."))}
    im.counts = {k: im.counts[k] for k in im.sums}
    with pytest.raises(ImatrixError, match=r"made for another model: tensor 'blk\.[01]\.\w+\.weight' has (896|4864) "
                                           r"values but .* needs (256|512)"):
        quantize(tiny_f16, tmp_path / "o.gguf", "IQ3_XXS", imatrix=im, quiet=True)
    assert set(tmp_path.iterdir()) == before


def test_requantize_allowed_on_request(default_model):
    # the real 0.5B: a dry run of re-quantizing Q4_K_M (mostly Q5_0 + Q8_0) to Q8_0
    res = quantize(default_model, qtype="Q8_0", allow_requantize=True, dry_run=True, quiet=True)
    f = res.files[0]
    assert f.tensor_types == {"Q8_0": 170, "F32": 121}
    assert 8.4 < f.bits_per_weight < 8.7


def test_convert_and_quantize_then_inspect(tiny_checkpoint, tmp_path):
    from edge_qwen.quant.quantize import convert_and_quantize

    res = convert_and_quantize(tiny_checkpoint, tmp_path, "Q8_0,Q4_K_M", quiet=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny-qwen2-q4_k_m.gguf", "tiny-qwen2-q8_0.gguf"]
    assert res.source_sha256 and len(res.files) == 2  # the f16 intermediate was hashed, then removed
    r = CliRunner().invoke(main, ["inspect", str(res.files[1].path)])
    assert r.exit_code == 0, r.output
    for text in ("general.quantize.type", "Q4_K_M", "general.quantize.source_sha256", res.source_sha256):
        assert text in r.output, text


def test_source_hash_is_remembered_across_processes(tiny_f16, isolated_home, tmp_path):
    import json
    import os

    from edge_qwen.quant import provenance as prov

    src = tmp_path / "copy-f16.gguf"
    src.write_bytes(tiny_f16.read_bytes())
    res = quantize(src, tmp_path / "a.gguf", "Q8_0", quiet=True)
    store = json.loads((isolated_home / "cache" / "sha256.json").read_text())
    assert store[os.path.realpath(src)]["sha256"] == res.source_sha256 == sha256_file(src)
    prov._hash_cache.clear()  # a new process: found in the store, not hashed again
    assert prov.cached_sha256(src) == res.source_sha256
    src.write_bytes(src.read_bytes())  # rewritten: new mtime, so the remembered hash no longer applies
    os.utime(src, ns=(1, 1))
    assert prov.cached_sha256(src) is None
    prov.forget_sha256(src)
    assert os.path.realpath(src) not in json.loads((isolated_home / "cache" / "sha256.json").read_text())


def test_convert_and_quantize_never_touches_a_file_named_like_its_intermediate(tiny_checkpoint, tmp_path):
    """`convert --type` writes its f16 intermediate under a temporary name: a user's own
    `<name>-f16.gguf` beside the output is neither refused nor replaced (with or without --force)."""
    mine = tmp_path / "tiny-qwen2-f16.gguf"
    mine.write_bytes(b"my own f16 file")
    out = tmp_path / "tiny-q8_0.gguf"
    for extra in ([], ["--force"]):
        r = CliRunner().invoke(main, ["convert", str(tiny_checkpoint), "--type", "Q8_0", "-o", str(out), "-q", *extra])
        assert r.exit_code == 0, r.output
        assert mine.read_bytes() == b"my own f16 file"
        assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny-q8_0.gguf", "tiny-qwen2-f16.gguf"]
    info = check_gguf(out)
    assert info.metadata["general.quantize.source_file"] == "tiny-qwen2-f16.gguf"  # the name, not the temporary one
    r = CliRunner().invoke(main, ["convert", str(tiny_checkpoint), "--type", "Q8_0", "-o", str(out)])
    assert r.exit_code == 1 and "already exists; pass --force" in r.output  # refused before converting
