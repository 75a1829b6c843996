"""The quantization sweep on the real default model: files, KL ordering, reproducibility,
resume, recommend and the CLI. One quick sweep per module (3 types, 2 chunks of 256 tokens,
32 generated tokens, 3 extraction tasks)."""

from __future__ import annotations

import csv
import json

import pytest
from click.testing import CliRunner

from edge_qwen.bench.sweep import (BenchError, compute_buffer_bytes, kv_cache_bytes, model_shape, recommend,
                             run_sweep)
from edge_qwen.cli import main
from edge_qwen.cli._bench import parse_size
from edge_qwen.errors import EdgeQwenError, ModelFileError

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def f16(default_model, tmp_path_factory):
    """An f16 GGUF of the default model (dequantized by llama.cpp's quantizer), deleted afterwards."""
    from edge_qwen.quant.quantize import quantize

    out = tmp_path_factory.mktemp("f16") / "qwen2.5-coder-0.5b-instruct-f16.gguf"
    quantize(default_model, out, qtype="F16", allow_requantize=True, quiet=True)
    yield out
    out.unlink(missing_ok=True)


@pytest.fixture(scope="module")
def sweep(f16, tmp_path_factory):
    """A quick sweep of Q8_0 and Q2_K, then resumed with Q4_K_M added (only Q4_K_M is measured)."""
    out = tmp_path_factory.mktemp("bench") / "out"
    first = run_sweep(f16, ["Q8_0", "Q2_K"], out, quick=True, quiet=True)
    stamps = {p.name: p.stat().st_mtime_ns for p in (out / "types").glob("*.json")}
    second = run_sweep(f16, "Q8_0,Q4_K_M,Q2_K", out, quick=True, quiet=True)
    return {"out": out, "first": first, "second": second, "stamps": stamps}


def by_type(rows):
    return {r["type"]: r for r in rows}


def test_outputs_are_written(sweep):
    out = sweep["out"]
    for name in ("results.md", "results.csv", "results.json"):
        assert (out / name).stat().st_size > 100
    for name in ("quality_vs_size.png", "speed_vs_size.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(out.glob("**/.*partial*")) and not (out / "models").exists()  # quantized files deleted
    rows = list(csv.DictReader((out / "results.csv").open(encoding="utf-8")))
    assert [r["type"] for r in rows] == ["F16", "Q8_0", "Q4_K_M", "Q2_K"]
    doc = json.loads((out / "results.json").read_text(encoding="utf-8"))
    env = doc["environment"]
    assert env["llama_cpp_python"] == "0.3.36" and env["cpu_count"] >= 1 and env["ram_bytes"] > 0
    md = (out / "results.md").read_text(encoding="utf-8")
    assert "| F16 (ref) |" in md and "| Q2_K |" in md and "llama_cpp_python=0.3.36" in md


def test_every_measurement_is_present_and_sane(sweep):
    rows = by_type(sweep["second"])
    ref = rows["F16"]
    for name, r in rows.items():
        assert r["size_bytes"] > 100_000_000 and r["load_s"] > 0
        assert r["pp_tps"] > 0 and r["tg_tps"] > 0 and r["tg_tokens"] > 0
        assert r["peak_rss_bytes"] > 200_000_000
        assert 0 <= r["json_valid"] <= 1 and 0 <= r["task_accuracy"] <= 1 and r["n_tasks"] == 3
        assert r["ppl"] > 1 and 0 <= r["same_top"] <= 1
        assert r["kl_mean"] <= r["kl_p99"] <= r["kl_max"] and r["kl_median"] <= r["kl_max"]
    assert 15.9 < ref["bpw"] < 16.1 and ref["kl_mean"] == 0
    assert rows["Q8_0"]["bpw"] < ref["bpw"] and rows["Q2_K"]["size_bytes"] < rows["Q4_K_M"]["size_bytes"]
    # each worker's memory is its own model's, not the sweep's (which had two models loaded)
    assert rows["Q2_K"]["peak_rss_bytes"] < rows["Q8_0"]["peak_rss_bytes"] < ref["peak_rss_bytes"]
    # KL measured on 2 chunks x 255 scored positions
    assert rows["Q8_0"]["n_scored"] == 2 * 127


def test_kl_orders_the_types(sweep):
    rows = by_type(sweep["second"])
    assert rows["Q8_0"]["kl_mean"] < rows["Q4_K_M"]["kl_mean"] < rows["Q2_K"]["kl_mean"]
    assert rows["Q8_0"]["same_top"] >= rows["Q2_K"]["same_top"]
    assert rows["Q2_K"]["ppl"] > rows["F16"]["ppl"]


def test_perplexity_is_reproducible(sweep):
    # the reference was evaluated afresh beside each of the three types: same inputs, same numbers
    refs = {f"{r['ppl_ref']:.4g}" for r in sweep["second"][1:]}
    assert len(refs) == 1
    first, second = by_type(sweep["first"]), by_type(sweep["second"])
    assert f"{first['Q2_K']['ppl']:.4g}" == f"{second['Q2_K']['ppl']:.4g}"


def test_resume_measures_only_new_types(sweep, f16, monkeypatch):
    out = sweep["out"]
    after = {p.name: p.stat().st_mtime_ns for p in (out / "types").glob("*.json")}
    for name, ns in sweep["stamps"].items():
        assert after[name] == ns, f"{name} was measured again instead of resumed"
    assert set(after) == {"F16.json", "Q8_0.json", "Q2_K.json", "Q4_K_M.json"}
    # fully resumed: nothing is quantized or measured, the reports are rebuilt from types/*.json
    import edge_qwen.bench.sweep as bench

    def boom(*a, **k):
        raise AssertionError("a finished type was measured again")

    monkeypatch.setattr(bench, "_quantize", boom)
    monkeypatch.setattr(bench, "_measure_in_subprocess", boom)
    r = CliRunner().invoke(main, ["bench", str(f16), "--types", "Q8_0,Q4_K_M,Q2_K", "--out", str(out), "--quick",
                                  "--quiet"])
    assert r.exit_code == 0, r.output
    assert "| Q4_K_M |" in r.output


def test_resume_refuses_results_of_other_settings(sweep, f16):
    with pytest.raises(BenchError, match="other settings"):
        run_sweep(f16, ["Q8_0"], sweep["out"], quick=False, quiet=True)


def test_memory_estimate(f16):
    shape = model_shape(f16)
    assert shape == {"n_layer": 24, "n_head": 14, "n_head_kv": 2, "head_dim": 64, "n_embd": 896, "n_vocab": 151936,
                     "n_layer_kv": 24, "recurrent_bytes": 0}  # attention only: no recurrent state
    assert kv_cache_bytes(shape, 4096) == 2 * 24 * 4096 * 2 * 64 * 2 == 50_331_648  # llama.cpp says 48.00 MiB
    # llama.cpp 0.3.36 reports 302.00 MiB at 4096 and 489.26 MiB at 16384 for this model
    assert abs(compute_buffer_bytes(shape, 4096) / 2**20 - 302.0) < 5
    assert abs(compute_buffer_bytes(shape, 16384) / 2**20 - 489.26) < 5


def test_recommend_picks_lowest_kl_that_fits(sweep):
    out = sweep["out"]
    rows = by_type(sweep["second"])
    big = recommend(out, 100_000_000_000)
    assert big["choice"] == "F16" and all(c["fits"] for c in big["candidates"])
    assert [c["type"] for c in big["candidates"]] == ["F16", "Q8_0", "Q4_K_M", "Q2_K"]
    extra = big["candidates"][0]["need_bytes"] - rows["F16"]["size_bytes"]
    # a budget just under Q8_0's need leaves Q4_K_M; just under Q4_K_M's leaves Q2_K
    assert recommend(out, rows["Q8_0"]["size_bytes"] + extra - 1)["choice"] == "Q4_K_M"
    assert recommend(out, rows["Q4_K_M"]["size_bytes"] + extra - 1)["choice"] == "Q2_K"
    assert recommend(out, rows["Q4_K_M"]["size_bytes"] + extra)["choice"] == "Q4_K_M"
    # a longer context needs more memory: the same budget then fits a smaller type
    assert recommend(out, 1_300_000_000)["choice"] == "Q8_0"
    assert recommend(out, 1_300_000_000, n_ctx=16384)["choice"] == "Q4_K_M"
    with pytest.raises(BenchError, match="no measured type fits.*Q2_K.*--max-ram"):
        recommend(out, 300_000_000)


def test_recommend_cli(sweep):
    out = str(sweep["out"])
    # f16 needs 1266 + 50 (KV at 4096) + 320 (compute) MB: over 1.5 GB; Q8_0 needs 1046 MB
    r = CliRunner().invoke(main, ["recommend", out, "--max-ram", "1.5GB"])
    assert r.exit_code == 0, r.output
    assert "Recommended: Q8_0" in r.output and "| **Q8_0** |" in r.output and "| F16 (ref) |" in r.output
    r = CliRunner().invoke(main, ["recommend", out, "--max-ram", "900MB", "--ctx", "2048"])
    assert r.exit_code == 0 and "Recommended: Q4_K_M" in r.output
    r = CliRunner().invoke(main, ["recommend", out, "--max-ram", "100MB"])
    assert r.exit_code != 0 and "no measured type fits" in r.output and "Traceback" not in r.output
    r = CliRunner().invoke(main, ["recommend", out, "--max-ram", "lots"])
    assert r.exit_code == 2 and "1.5GB" in r.output


def test_parse_size():
    assert parse_size("1.5GB") == 1_500_000_000
    assert parse_size("800MB") == 800_000_000
    assert parse_size("2GiB") == 2 * 2**30
    assert parse_size("123") == 123
    for bad in ("", "GB", "1.5XB", "0MB", "-1GB"):
        with pytest.raises(Exception, match="size|zero"):
            parse_size(bad)


def test_bad_inputs_are_refused(tmp_path, f16):
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a model at all")
    with pytest.raises(ModelFileError, match="not a GGUF"):
        run_sweep(junk, ["Q8_0"], tmp_path / "o", quick=True, quiet=True)
    with pytest.raises(EdgeQwenError, match="Q9_9"):
        run_sweep(f16, ["Q9_9"], tmp_path / "o", quick=True, quiet=True)
    with pytest.raises(BenchError, match="no quantized types"):
        run_sweep(f16, ["F16"], tmp_path / "o", quick=True, quiet=True)
    with pytest.raises(EdgeQwenError, match="does not exist"):
        recommend(tmp_path / "nothing-here", 10**9)
    r = CliRunner().invoke(main, ["bench", str(junk), "--quick", "--out", str(tmp_path / "o2")])
    assert r.exit_code == 1 and "not a GGUF" in r.output and "Traceback" not in r.output


def test_lockstep_against_itself_is_exact(f16):
    from edge_qwen.bench.evaluate import evaluate

    r = evaluate(f16, f16, n_ctx=128, n_chunks=1)
    assert r["kl_max"] == 0.0 and r["same_top"] == 1.0 and r["ppl"] == r["ppl_ref"]
    assert r["n_scored"] == 63
