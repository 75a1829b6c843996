"""The sweep's outputs: Markdown table, CSV, JSON and PNG plots, plus the machine they ran on.

Kept apart from edge_qwen.bench.sweep so the measuring and the presenting can change separately;
every figure here is read from the measured rows, nothing is computed anew except unit
conversions.
"""

from __future__ import annotations

import csv
import io
import json
import os
import platform
import sys
from pathlib import Path
from typing import Any

from ..files import atomic_output

MB = 1_000_000

# key, header, formatter (None value -> "-")
COLUMNS: list[tuple[str, str, Any]] = [
    ("type", "Type", str),
    ("size_bytes", "Size (MB)", lambda v: f"{v / MB:.1f}"),
    ("bpw", "Bits/weight", lambda v: f"{v:.2f}"),
    ("load_s", "Load (s)", lambda v: f"{v:.2f}"),
    ("pp_tps", "Prompt tok/s", lambda v: f"{v:.1f}"),
    ("tg_tps", "Gen tok/s", lambda v: f"{v:.1f}"),
    ("tg_ratio", "Gen × ref", lambda v: f"{v:.2f}"),
    ("peak_rss_bytes", "Peak RSS (MB)", lambda v: f"{v / MB:.0f}"),
    ("ppl", "PPL", lambda v: f"{v:.4f}"),
    ("ppl_delta_pct", "ΔPPL %", lambda v: f"{v:+.2f}"),
    ("kl_mean", "KL mean", lambda v: f"{v:.5f}"),
    ("kl_median", "KL median", lambda v: f"{v:.5f}"),
    ("kl_p99", "KL p99", lambda v: f"{v:.4f}"),
    ("kl_max", "KL max", lambda v: f"{v:.3f}"),
    ("same_top", "Same top %", lambda v: f"{100 * v:.2f}"),
    ("json_valid", "JSON valid %", lambda v: f"{100 * v:.0f}"),
    ("task_accuracy", "Task acc. %", lambda v: f"{100 * v:.0f}"),
]
CSV_KEYS = ["type", "reference", "size_bytes", "n_params", "bpw", "load_s", "pp_tokens", "pp_tps", "pp_ratio",
            "tg_tokens", "tg_tps", "tg_ratio", "peak_rss_bytes", "ppl", "ppl_delta_pct", "kl_mean", "kl_median",
            "kl_p99", "kl_max", "same_top", "json_valid", "task_accuracy", "n_tasks", "n_chunks", "n_scored",
            "n_threads"]


def environment() -> dict[str, Any]:
    """Hardware and library versions of this machine, recorded with every sweep."""
    import gguf  # noqa: F401  (its version is read via importlib.metadata)
    import llama_cpp
    import numpy
    import psutil

    from .. import __version__

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    from importlib.metadata import PackageNotFoundError, version

    def ver(pkg: str) -> str:
        try:
            return version(pkg)
        except PackageNotFoundError:
            return "not installed"

    return {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "ram_bytes": psutil.virtual_memory().total,
        "os": f"{platform.system()} {platform.release()}",
        "python": sys.version.split()[0],
        "edge_qwen": __version__,
        "llama_cpp_python": llama_cpp.__version__,
        "gguf": ver("gguf"),
        "numpy": numpy.__version__,
        "llguidance": ver("llguidance"),
        "gpu_offload": bool(llama_cpp.llama_supports_gpu_offload()),
        "llama_system_info": llama_cpp.llama_print_system_info().decode("utf-8", "replace").strip(),
    }


def _cell(row: dict[str, Any], key: str, fmt: Any) -> str:
    v = row.get(key)
    return "-" if v is None else fmt(v)


def markdown_table(rows: list[dict[str, Any]], columns: list[tuple[str, str, Any]] = COLUMNS) -> str:
    """A GitHub Markdown table of `rows` (the reference row marked "(ref)")."""
    lines = ["| " + " | ".join(h for _, h, _ in columns) + " |",
             "|" + "|".join(" --- " if k == "type" else " ---: " for k, _, _ in columns) + "|"]
    for r in rows:
        cells = [_cell(r, k, f) for k, _, f in columns]
        if r.get("reference"):
            cells[0] += " (ref)"
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def markdown(rows: list[dict[str, Any]], env: dict[str, Any], settings: dict[str, Any], quick: bool) -> str:
    """results.md: the table, how it was measured and on what."""
    s = settings
    return (
        f"# Quantization sweep{' (quick)' if quick else ''}\n\n"
        + markdown_table(rows)
        + "\n"
        f"Reference: `{rows[0]['stamp']['reference']}` ({rows[0]['type']}). Perplexity and KL divergence: "
        f"{rows[1].get('n_chunks', '-') if len(rows) > 1 else '-'} chunks of {s['eval_ctx']} tokens of the "
        f"shipped evaluation corpus, second half of each chunk scored ({rows[1].get('n_scored', '-') if len(rows) > 1 else '-'} "
        "positions), KL(reference ‖ type) in nats. Speed: prompt processing of a "
        f"{s['prompt_tokens']}-token prompt, generation of up to {s['gen_tokens']} tokens, greedy, "
        f"{rows[0].get('n_threads', '-')} threads, after a warm-up. Peak RSS: the high-water mark of a "
        "process that loaded only that model and generated. Extraction: "
        f"{rows[0].get('n_tasks', '-')} structured-extraction tasks under their JSON schema, temperature 0.\n\n"
        "Machine: " + ", ".join(f"{k}={v / 2**30:.1f}GiB" if k == "ram_bytes" else f"{k}={v}"
                                for k, v in env.items() if k != "llama_system_info")
        + f"\n\nllama.cpp: `{env.get('llama_system_info', '')}`\n"
    )


def write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    """results.csv: one row per type, raw numbers (bytes, tokens/s, nats, fractions)."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_KEYS, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: r.get(k) for k in CSV_KEYS})
    with atomic_output(path, force=True) as tmp:
        tmp.write_text(buf.getvalue(), encoding="utf-8")


def plot(rows: list[dict[str, Any]], out: Path) -> list[Path]:
    """quality_vs_size.png and speed_vs_size.png (matplotlib, Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    size = [r["size_bytes"] / MB for r in rows]
    labels = [r["type"] for r in rows]
    paths = []

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.2))
    q = [(s, r["kl_mean"], t) for s, r, t in zip(size, rows, labels) if r.get("kl_mean") and not r.get("reference")]
    if q:
        a1.scatter([x for x, _, _ in q], [y for _, y, _ in q], color="tab:red")
        for x, y, t in q:
            a1.annotate(t, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        a1.set_yscale("log")
    a1.set(xlabel="file size (MB)", ylabel="mean KL vs reference (nats, log)", title="Quality vs size")
    p = [(s, r["ppl"], t) for s, r, t in zip(size, rows, labels) if r.get("ppl")]
    a2.scatter([x for x, _, _ in p], [y for _, y, _ in p], color="tab:blue")
    for x, y, t in p:
        a2.annotate(t, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    a2.set(xlabel="file size (MB)", ylabel="perplexity (eval corpus)", title="Perplexity vs size")
    for a in (a1, a2):
        a.grid(alpha=0.3)
    fig.tight_layout()
    paths.append(_save_fig(fig, out / "quality_vs_size.png"))
    plt.close(fig)

    fig, (b1, b2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, key, title in ((b1, "pp_tps", "Prompt processing"), (b2, "tg_tps", "Generation")):
        ax.scatter(size, [r.get(key) or 0 for r in rows], color="tab:green")
        for x, r, t in zip(size, rows, labels):
            ax.annotate(t, (x, r.get(key) or 0), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.set(xlabel="file size (MB)", ylabel="tokens/s", title=f"{title} speed vs size")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    paths.append(_save_fig(fig, out / "speed_vs_size.png"))
    plt.close(fig)
    return paths


def _save_fig(fig: Any, path: Path) -> Path:
    with atomic_output(path, force=True) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    return path


def write_all(rows: list[dict[str, Any]], out: Path, settings: dict[str, Any], quick: bool) -> dict[str, Path]:
    """Write results.md, results.csv, results.json and both plots into `out`."""
    env = environment()
    paths = {"md": out / "results.md", "csv": out / "results.csv", "json": out / "results.json"}
    with atomic_output(paths["md"], force=True) as tmp:
        tmp.write_text(markdown(rows, env, settings, quick), encoding="utf-8")
    write_csv(rows, paths["csv"])
    doc = {"environment": env, "settings": settings, "quick": quick, "rows": rows}
    with atomic_output(paths["json"], force=True) as tmp:
        tmp.write_text(json.dumps(doc, ensure_ascii=False, indent=1), encoding="utf-8")
    q, s = plot(rows, out)
    paths.update(quality_plot=q, speed_plot=s)
    return paths


def load_results(out: str | os.PathLike) -> list[dict[str, Any]]:
    """The rows of a finished sweep folder (its results.json)."""
    from ..errors import EdgeQwenError

    p = Path(out)
    f = p / "results.json" if p.is_dir() else p
    if not f.is_file():
        raise EdgeQwenError(f"{f} does not exist; run `edge-qwen bench` with --out {p} first")
    try:
        return json.loads(f.read_text(encoding="utf-8"))["rows"]
    except (ValueError, KeyError, TypeError):
        raise EdgeQwenError(f"{f} is not a results.json written by `edge-qwen bench`; run the sweep again") from None
