"""The quantization trade-off sweep: quantize an f16 model to each type and measure it.

For each type, in one run on one machine: file size and bits per weight; load time,
prompt-processing and generation speed, peak resident memory and structured-extraction
validity/accuracy (measured in a subprocess per model, so memory is that model's alone);
perplexity, KL divergence against the reference and same-top-token rate (the lockstep
evaluator, edge_qwen.bench.evaluate). Each type's result is saved to `<out>/types/<TYPE>.json` as
soon as it is measured, so an interrupted sweep resumes where it stopped; the tables and
plots (edge_qwen.bench.report) are rebuilt from those files at the end.

`recommend` picks the lowest-KL type whose memory need fits a RAM budget.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..errors import EdgeQwenError

DEFAULT_TYPES = ("Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q4_0", "Q3_K_M", "Q2_K", "IQ4_XS")
QUICK_TYPES = ("Q8_0", "Q4_K_M")
RESULT_VERSION = 1


@dataclass(frozen=True)
class SweepSettings:
    """How much work one type gets; results are only comparable (and resumable) under equal settings."""

    eval_ctx: int          # tokens per perplexity/KL chunk (second half scored)
    eval_chunks: int       # chunks spread over the evaluation corpus
    prompt_tokens: int     # prompt-processing measurement
    gen_tokens: int        # generation measurement
    n_tasks: int | None    # extraction tasks (None: all)
    worker_ctx: int = 1024


FULL = SweepSettings(eval_ctx=512, eval_chunks=6, prompt_tokens=512, gen_tokens=128, n_tasks=None)
QUICK = SweepSettings(eval_ctx=256, eval_chunks=2, prompt_tokens=256, gen_tokens=32, n_tasks=3, worker_ctx=512)


class BenchError(EdgeQwenError):
    """A sweep that cannot run or resume as asked."""

    code = "bench_error"


# ----------------------------------------------------------------------------------------------
# measurements of one model, run in a subprocess (python -m edge_qwen.bench.sweep <spec> <out>)

def _peak_rss_bytes() -> int:
    """This process's resident high-water mark.

    On Linux it is VmHWM, the peak of this address space alone: ru_maxrss would carry over the
    parent's peak across fork+exec (the kernel keeps the larger of the two), so a worker started
    by a sweep that had two models loaded would report the sweep's memory, not its own.
    """
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def _prompt_of(llm: Any, n_tokens: int) -> list[dict]:
    """Chat messages whose rendered prompt is about `n_tokens` long, cut from the eval corpus."""
    from .evaluate import default_corpus

    overhead = len(llm.tokenize(llm.render([{"role": "user", "content": ""}])))
    body = llm.tokenize(default_corpus(), special=False)[:max(n_tokens - overhead, 1)]
    return [{"role": "user", "content": llm.detokenize(body)}]


def measure_model(path: str | os.PathLike, settings: SweepSettings, n_threads: int | None = None) -> dict[str, Any]:
    """Load time, speeds, peak RSS and extraction scores of one GGUF, in this process.

    Meant to run in a fresh subprocess (see `_measure_in_subprocess`): peak RSS is the
    process's high-water mark, so it is the model's own only in a process of its own.
    """
    from .. import EdgeQwen
    from .extraction import run_tasks

    t0 = time.perf_counter()
    llm = EdgeQwen(path, n_ctx=settings.worker_ctx, n_threads=n_threads)
    load_s = time.perf_counter() - t0
    try:
        # Warm-up: fault the mmapped weights in, so the timings below measure compute, not disk.
        llm.chat([{"role": "user", "content": "Hi"}], temperature=0, max_tokens=2)
        last = None
        llm.llama.reset()  # forget the warm-up's KV prefix: the whole prompt is processed and timed
        for last in llm.generate(_prompt_of(llm, settings.prompt_tokens), temperature=0, max_tokens=1):
            pass
        t = last.timings
        pp_tokens = t.prompt_tokens - t.cached_tokens
        pp_tps = pp_tokens / (t.prompt_ms / 1000.0)
        count = [{"role": "user", "content": "Count from 1 to 500, separated by commas. Write every number."}]
        llm.llama.reset()
        for last in llm.generate(count, temperature=0, max_tokens=settings.gen_tokens):
            pass
        g = last.timings
        peak = _peak_rss_bytes()  # read before the extraction tasks load llguidance's tables
        extraction = run_tasks(llm, settings.n_tasks)
    finally:
        llm.close()
    return {
        "load_s": load_s,
        "pp_tokens": pp_tokens, "pp_tps": pp_tps,
        "tg_tokens": g.completion_tokens, "tg_tps": g.tokens_per_s,
        "peak_rss_bytes": peak,
        "json_valid": extraction["json_valid"], "task_accuracy": extraction["task_accuracy"],
        "n_tasks": extraction["n_tasks"], "answers": extraction["answers"],
        "n_threads": llm.n_threads,
    }


def _measure_in_subprocess(path: Path, settings: SweepSettings, workdir: Path) -> dict[str, Any]:
    from ..files import partial_path

    # partial names: a sweep killed while measuring leaves files the next write here removes
    spec = partial_path(workdir / f"measure-{path.stem}.json")
    out = partial_path(workdir / f"measured-{path.stem}.json")
    spec.write_text(json.dumps({"path": str(path), "settings": asdict(settings)}), encoding="utf-8")
    try:
        proc = subprocess.run([sys.executable, "-m", "edge_qwen.bench.sweep", str(spec), str(out)],
                              capture_output=True, text=True)
        if proc.returncode != 0 or not out.exists():
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
            raise BenchError(f"measuring {path} failed in its subprocess (exit {proc.returncode}): "
                             + " | ".join(tail))
        return json.loads(out.read_text(encoding="utf-8"))
    finally:
        for f in (spec, out):
            f.unlink(missing_ok=True)


# ----------------------------------------------------------------------------------------------
# the sweep

def _quantize(src: Path, out: Path, qtype: str, imatrix: str | os.PathLike | None, quiet: bool) -> None:
    from ..quant.quantize import quantize

    quantize(src, out, qtype=qtype, imatrix=imatrix, force=True, quiet=True)


def _reference_label(info: Any) -> str:
    from ..quant.types import quant_type

    try:
        return quant_type(info.file_type).name if info.file_type is not None else "REF"
    except EdgeQwenError:
        return "REF"


def _load_done(path: Path, stamp: dict[str, Any]) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        row = json.loads(path.read_text(encoding="utf-8"))
    except ValueError:
        return None  # unreadable: measure again
    if not isinstance(row, dict):
        return None  # not a row (damaged by hand): measure again
    if row.get("stamp") != stamp:
        raise BenchError(f"{path} was measured with other settings or another reference model than this run "
                         f"({row.get('stamp')} vs {stamp}); use another --out folder or resume=False to measure again")
    return row


def _save_row(path: Path, row: dict[str, Any]) -> None:
    from ..files import atomic_output

    with atomic_output(path, force=True) as tmp:
        tmp.write_text(json.dumps(row, ensure_ascii=False, indent=1), encoding="utf-8")


def _check_writable(out: Path, mdir: Path, n_params: int, qtypes: list[Any], keep_models: bool) -> None:
    """Fail before any quantizing when the results folder cannot be written or the models cannot fit.

    Each quantized model is deleted once measured (unless `keep_models`), so the largest one
    must fit; with `keep_models`, all of them. Sizes are nominal bits per weight (a lower bound).
    """
    from ..files import check_free_space, check_output, write_error

    try:
        (out / "types").mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise write_error(e, out / "types") from None
    check_output(out / "types" / ".probe", force=True)  # read-only folder: refused here; stale partials go
    sizes = [int(n_params * q.bits_per_weight / 8) for q in qtypes]
    check_free_space(mdir / "model.gguf", sum(sizes) if keep_models else max(sizes))


def run_sweep(f16_path: str | os.PathLike, types: Any = DEFAULT_TYPES, out_dir: str | os.PathLike = "bench",
              quick: bool = False, imatrix: str | os.PathLike | None = None, resume: bool = True,
              quiet: bool = False, keep_models: bool = False,
              models_dir: str | os.PathLike | None = None) -> list[dict[str, Any]]:
    """Quantize `f16_path` to each type in `types`, measure everything, write the reports.

    Returns one row per type, the reference first. Outputs in `out_dir`: results.md,
    results.csv, results.json, quality_vs_size.png, speed_vs_size.png and types/<TYPE>.json
    (the per-type results a resumed sweep reuses). Quantized files live in `models_dir`
    (default out_dir/models) while measured and are deleted after unless `keep_models`.
    """
    from . import report as bench_report
    from .evaluate import lockstep, summarize
    from ..gguf_file import check_gguf
    from .metrics import bits_per_weight
    from ..progress import progress
    from ..quant.types import quant_types

    ref = Path(f16_path)
    info = check_gguf(ref)
    qtypes = [q for q in quant_types(types) if not q.is_float]
    if not qtypes:
        raise BenchError(f"no quantized types to measure in {types!r}; give e.g. --types Q8_0,Q4_K_M")
    settings = QUICK if quick else FULL
    out = Path(out_dir)
    mdir = Path(models_dir) if models_dir is not None else out / "models"
    _check_writable(out, mdir, info.n_params, qtypes, keep_models)
    stamp = {"version": RESULT_VERSION, "reference": ref.name, "reference_size": info.size,
             "settings": asdict(settings), "imatrix": Path(imatrix).name if imatrix else None}
    ref_label = _reference_label(info)
    names = [ref_label] + [q.name for q in qtypes]
    done = {n: (_load_done(out / "types" / f"{n}.json", stamp) if resume else None) for n in names}
    todo = [n for n in names if done[n] is None]
    per_type = 2 + settings.eval_chunks
    bar = progress(total=sum(1 if n == ref_label else per_type for n in todo), desc="bench", unit="step",
                   quiet=quiet)
    try:
        for name in todo:
            bar.set_postfix_str(name)
            if name == ref_label:
                path = ref
            else:
                path = mdir / f"{ref.stem}-{name}.gguf"
                path.parent.mkdir(parents=True, exist_ok=True)
                if not path.is_file():  # a file under its final name is complete (atomic_output)
                    _quantize(ref, path, name, imatrix, quiet)
                bar.update(1)
            row: dict[str, Any] = {"type": name, "reference": name == ref_label, "stamp": stamp}
            qinfo = check_gguf(path)
            row.update(size_bytes=qinfo.size, n_params=qinfo.n_params, shape=model_shape(path),
                       bpw=bits_per_weight(qinfo.size, qinfo.n_params), tensor_types=qinfo.tensor_types)
            row.update(_measure_in_subprocess(path, settings, out))
            bar.update(1)
            if name != ref_label:
                chunks = []
                for c in lockstep(ref, path, n_ctx=settings.eval_ctx, n_chunks=settings.eval_chunks):
                    chunks.append(c)
                    bar.update(1)
                row.update(summarize(chunks))
                if not keep_models:
                    path.unlink(missing_ok=True)
            _save_row(out / "types" / f"{name}.json", row)
            done[name] = row
    finally:
        bar.close()
        if mdir.is_dir() and not any(mdir.iterdir()):
            mdir.rmdir()
    rows = [done[n] for n in names]
    _fill_reference(rows)
    bench_report.write_all(rows, out, settings=asdict(settings), quick=quick)
    return rows


def _fill_reference(rows: list[dict[str, Any]]) -> None:
    """Give the reference row its quality columns: its own perplexity (as measured beside every
    type, identical each time) and zero divergence from itself; add speed ratios to it."""
    ref = rows[0]
    ppls = [r["ppl_ref"] for r in rows[1:] if "ppl_ref" in r]
    if ppls:
        ref.update(ppl=ppls[0], ppl_ref=ppls[0], kl_mean=0.0, kl_median=0.0, kl_p99=0.0, kl_max=0.0,
                   same_top=1.0, n_chunks=rows[1].get("n_chunks"), n_scored=rows[1].get("n_scored"))
    for r in rows:
        r["pp_ratio"] = r["pp_tps"] / ref["pp_tps"] if ref.get("pp_tps") else None
        r["tg_ratio"] = r["tg_tps"] / ref["tg_tps"] if ref.get("tg_tps") else None
        if "ppl" in r and "ppl" in ref:
            r["ppl_delta_pct"] = 100.0 * (r["ppl"] / ref["ppl"] - 1.0)


# ----------------------------------------------------------------------------------------------
# recommend

N_UBATCH = 512
MIB = 1 << 20


def model_shape(path: str | os.PathLike) -> dict[str, int]:
    """The hyperparameters the memory estimate needs, from a GGUF header."""
    from ..gguf_file import read_header

    meta, tensors, _ = read_header(path)
    arch = meta.get("general.architecture", "qwen2")
    n_embd = int(meta[f"{arch}.embedding_length"])
    n_head = int(meta[f"{arch}.attention.head_count"])
    emb = next((shape for name, shape, _, _ in tensors if name == "token_embd.weight"), None)
    from ..device import attention_layers, recurrent_state_bytes

    return {"n_layer": int(meta[f"{arch}.block_count"]), "n_head": n_head,
            "n_head_kv": int(meta.get(f"{arch}.attention.head_count_kv", n_head)),
            "head_dim": int(meta.get(f"{arch}.attention.key_length", n_embd // n_head)),
            "n_embd": n_embd, "n_vocab": int(emb[1]) if emb else 151936,
            # a hybrid model: KV cells in its attention layers only, a recurrent state per sequence
            "n_layer_kv": attention_layers(meta), "recurrent_bytes": recurrent_state_bytes(meta)}


def kv_cache_bytes(shape: dict[str, int], n_ctx: int, parallel: int = 1) -> int:
    """f16 K and V for every attention layer (2 * n_layer_kv * n_ctx * n_head_kv * head_dim * 2 bytes) per
    slot, plus each slot's recurrent state (hybrid models): `parallel` slots of n_ctx tokens."""
    kv = 2 * shape.get("n_layer_kv", shape["n_layer"]) * n_ctx * shape["n_head_kv"] * shape["head_dim"] * 2
    return (kv + shape.get("recurrent_bytes", 0)) * parallel


def compute_buffer_bytes(shape: dict[str, int], n_ctx: int, n_ubatch: int = N_UBATCH) -> int:
    """llama.cpp's CPU compute buffer: the larger of the logits of one ubatch and the attention
    scores of one ubatch against the whole context, plus a few MiB for the rest of the graph.
    Checked against the sizes llama.cpp 0.3.36 reports for the 0.5B model (300 MiB at n_ctx
    512, 302 at 4096, 489 at 16384; this gives 305, 305 and 488)."""
    logits = shape["n_vocab"] * n_ubatch * 4
    scores = n_ctx * n_ubatch * (shape["n_head"] * 4 + 4)
    return max(logits, scores) + 8 * MIB


def recommend(source: str | os.PathLike | list[dict[str, Any]], max_ram_bytes: int, n_ctx: int = 4096,
              quiet: bool = False, parallel: int = 1) -> dict[str, Any]:
    """The lowest-KL type whose memory need (file + KV cache for n_ctx + compute buffer) fits.

    `source` is a sweep folder / results.json, the rows `run_sweep` returned, or an f16 GGUF
    (then a quick sweep of all default types runs, or resumes, under the store's bench folder).
    `parallel` slots each hold n_ctx tokens of KV cache and, on a hybrid model, their own recurrent state.
    Returns {"choice", "n_ctx", "max_ram_bytes", "candidates": [...]} (candidates sorted by KL);
    raises BenchError, with the smallest need, when nothing fits.
    """
    from .report import load_results

    if not isinstance(max_ram_bytes, int) or max_ram_bytes <= 0:
        raise BenchError(f"the RAM budget must be a positive number of bytes, got {max_ram_bytes!r}")
    if not isinstance(n_ctx, int) or n_ctx < 16:
        raise BenchError(f"n_ctx must be an integer of at least 16, got {n_ctx!r}")
    if isinstance(source, list):
        rows = source
    else:
        p = Path(source)
        if p.is_file() and p.suffix == ".gguf":
            from ..store import home

            rows = run_sweep(p, DEFAULT_TYPES, home() / "bench" / f"{p.stem}-quick", quick=True, quiet=quiet)
        else:
            rows = load_results(p)
    if not isinstance(rows, list) or not rows or not all(isinstance(r, dict) for r in rows):
        raise BenchError(f"{source if not isinstance(source, list) else 'the rows given'} has no measured types "
                         "(not results written by `edge-qwen bench`); run the sweep again")
    shape = rows[0].get("shape")
    if shape is None:
        raise BenchError("these results carry no model shape (made by an older edge-qwen); run the sweep again")
    try:  # a results.json edited or damaged by hand: one line, not a KeyError
        kv, compute = kv_cache_bytes(shape, n_ctx, parallel), compute_buffer_bytes(shape, n_ctx)
        cands = []
        for r in rows:
            need = r["size_bytes"] + kv + compute
            cands.append({"type": r["type"], "reference": bool(r.get("reference")), "size_bytes": r["size_bytes"],
                          "kv_bytes": kv, "compute_bytes": compute, "need_bytes": need,
                          "peak_rss_bytes": r.get("peak_rss_bytes"), "kl_mean": r.get("kl_mean"),
                          "ppl": r.get("ppl"), "task_accuracy": r.get("task_accuracy"),
                          "fits": need <= max_ram_bytes})
        cands.sort(key=lambda c: (c["kl_mean"] if c["kl_mean"] is not None else float("inf"), c["size_bytes"]))
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise BenchError(f"{source if not isinstance(source, list) else 'the rows given'} holds damaged results "
                         f"({type(e).__name__}: {e}); run the sweep again") from None
    fitting = [c for c in cands if c["fits"]]
    if not fitting:
        small = min(cands, key=lambda c: c["need_bytes"])
        raise BenchError(
            f"no measured type fits in {max_ram_bytes / 1e6:.0f} MB with a {n_ctx}-token context: the smallest, "
            f"{small['type']}, needs {small['need_bytes'] / 1e6:.0f} MB (file {small['size_bytes'] / 1e6:.0f} MB + "
            f"KV cache {kv / 1e6:.0f} MB + compute {compute / 1e6:.0f} MB); raise --max-ram or lower --ctx")
    return {"choice": fitting[0]["type"], "n_ctx": n_ctx, "max_ram_bytes": max_ram_bytes, "parallel": parallel,
            "recurrent_bytes": int(shape.get("recurrent_bytes", 0)) * parallel, "candidates": cands}


def _worker_main(argv: list[str]) -> int:
    spec_path, out_path = argv
    spec = json.loads(Path(spec_path).read_text(encoding="utf-8"))
    result = measure_model(spec["path"], SweepSettings(**spec["settings"]))
    Path(out_path).write_text(json.dumps(result, ensure_ascii=False), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(_worker_main(sys.argv[1:]))
