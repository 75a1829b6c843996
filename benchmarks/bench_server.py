"""Server benchmark: `edge-qwen serve` against llama-cpp-python's own `llama_cpp.server`.

Both servers run as subprocesses on the same GGUF, the same context size and thread count,
on different ports; at each concurrency level (1, 4, 16 streaming clients, greedy, short
outputs) ours runs first, then theirs, so slow drift of a shared machine hits both alike.
Figures per level: time to first token (p50), tokens/s per client, aggregate tokens/s, and
p50/p99 request latency; ratios are ours / theirs (for latencies lower is better).

    python benchmarks/bench_server.py [--model PATH] [--max-tokens 32] [--levels 1,4,16] [--out result.json]
    pytest benchmarks/bench_server.py --benchmark-only -s      # the same, as a pytest-benchmark entry
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

TOPICS = ["a lighthouse", "a robot", "the moon", "a river", "a library", "a dragon", "a violin", "a desert",
          "a train", "a garden", "a volcano", "a clock", "a ship", "a forest", "a city", "a snowflake"]
FIGURES = [("ttft_p50_s", "TTFT p50 (s)", "lower"), ("client_tok_s", "tok/s per client", "higher"),
           ("aggregate_tok_s", "aggregate tok/s", "higher"), ("latency_p50_s", "latency p50 (s)", "lower"),
           ("latency_p99_s", "latency p99 (s)", "lower")]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile (q in [0, 100]) of a non-empty list."""
    xs = sorted(values)
    k = (len(xs) - 1) * q / 100.0
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


@contextmanager
def _server(name: str, cmd: list[str], port: int, log: Path):
    """Start a server subprocess, wait until /v1/models answers, stop it afterwards."""
    import httpx

    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    try:
        deadline = time.monotonic() + 180
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {proc.returncode}; see {log}")
            try:
                if httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{name} did not start within 180 s; see {log}")
            time.sleep(0.3)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


async def _one(client: Any, url: str, prompt: str, max_tokens: int) -> dict[str, float]:
    body = {"model": "qwen2.5", "messages": [{"role": "user", "content": prompt}], "stream": True,
            "temperature": 0, "max_tokens": max_tokens}
    t0 = time.perf_counter()
    first, tokens = None, 0
    async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"{url}: HTTP {r.status_code}: {(await r.aread())[:300]!r}")
        async for line in r.aiter_lines():
            if not line.startswith("data: {"):
                continue
            delta = json.loads(line[6:])["choices"]
            if delta and delta[0].get("delta", {}).get("content"):
                tokens += 1  # one streamed piece per token on both servers
                if first is None:
                    first = time.perf_counter()
    end = time.perf_counter()
    return {"ttft": (first or end) - t0, "latency": end - t0, "tokens": tokens}


async def _level(url: str, clients: int, per_client: int, max_tokens: int) -> dict[str, Any]:
    import httpx

    async def client_loop(c: int, http: Any) -> tuple[list[dict], float]:
        t0, results = time.perf_counter(), []
        for i in range(per_client):
            topic = TOPICS[(c * per_client + i) % len(TOPICS)]
            results.append(await _one(http, url, f"Write a story about {topic}.", max_tokens))
        return results, time.perf_counter() - t0

    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as http:
        t0 = time.perf_counter()
        done = await asyncio.gather(*(client_loop(c, http) for c in range(clients)))
        wall = time.perf_counter() - t0
    return {"requests": [r for results, _ in done for r in results],
            "client_rates": [sum(r["tokens"] for r in res) / t for res, t in done], "wall": wall, "clients": clients}


def summarize(runs: list[dict[str, Any]]) -> dict[str, float]:
    """The figures of one server at one level, pooled over its rounds."""
    reqs = [r for run in runs for r in run["requests"]]
    rates = [x for run in runs for x in run["client_rates"]]
    total, wall = sum(r["tokens"] for r in reqs), sum(run["wall"] for run in runs)
    return {"clients": runs[0]["clients"], "requests": len(reqs), "tokens": total, "wall_s": wall,
            "round_walls_s": [round(run["wall"], 2) for run in runs],
            "ttft_p50_s": _percentile([r["ttft"] for r in reqs], 50),
            "client_tok_s": sum(rates) / len(rates),
            "aggregate_tok_s": total / wall,
            "latency_p50_s": _percentile([r["latency"] for r in reqs], 50),
            "latency_p99_s": _percentile([r["latency"] for r in reqs], 99)}


def run_benchmark(model: str | Path | None = None, levels: tuple[int, ...] = (1, 4, 16), max_tokens: int = 32,
                  n_ctx: int = 4096, n_threads: int | None = None, min_requests: int = 4, rounds: int = 2,
                  log_dir: str | Path | None = None) -> dict[str, Any]:
    """Run both servers over `levels`; return {"config", "ours": [...], "llama_cpp_server": [...]}.

    Each round sends max(min_requests, clients) requests, spread evenly over the clients.
    Rounds alternate ours/theirs as A B B A ..., so a machine that slows down or speeds up
    during the run (other jobs) weighs on both servers alike; figures pool all rounds.
    """
    import tempfile

    from edge_qwen.device import physical_cores
    from edge_qwen.store import resolve_model

    path = resolve_model(model)
    threads = n_threads or physical_cores()
    logs = Path(log_dir or tempfile.mkdtemp(prefix="bench_server_"))
    p1, p2 = _free_port(), _free_port()
    ours_cmd = [sys.executable, "-c", "from edge_qwen.cli import main; main()", "serve", str(path), "--port", str(p1),
                "--ctx", str(n_ctx), "--threads", str(threads), "--max-queue", str(max(levels) * 2), "--quiet"]
    theirs_cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(path), "--port", str(p2),
                  "--n_ctx", str(n_ctx), "--n_threads", str(threads), "--n_threads_batch", str(threads),
                  # Their default interrupts a running stream when a new request arrives; the
                  # comparison needs every request answered in full, as ours does.
                  "--interrupt_requests", "False"]
    out: dict[str, Any] = {"config": {"model": str(path), "max_tokens": max_tokens, "n_ctx": n_ctx,
                                      "n_threads": threads, "levels": list(levels), "rounds": rounds,
                                      "cpu_count": os.cpu_count()},
                           "ours": [], "llama_cpp_server": []}
    with _server("edge-qwen serve", ours_cmd, p1, logs / "ours.log") as ours, \
            _server("llama_cpp.server", theirs_cmd, p2, logs / "theirs.log") as theirs:
        for url in (ours, theirs):  # warm-up: first-request costs (page-in, allocations) are not measured
            asyncio.run(_level(url, 1, 1, 4))
        for clients in levels:
            per_client = max(1, -(-min_requests // clients))
            runs: dict[str, list] = {"ours": [], "llama_cpp_server": []}
            for i in range(rounds):
                order = [("ours", ours), ("llama_cpp_server", theirs)]
                for key, url in (order if i % 2 == 0 else order[::-1]):
                    runs[key].append(asyncio.run(_level(url, clients, per_client, max_tokens)))
            for key, got in runs.items():
                out[key].append(summarize(got))
                row = out[key][-1]
                print(f"[bench_server] {clients:>2} clients {key:>16}: ttft p50 {row['ttft_p50_s']:.2f}s, "
                      f"{row['aggregate_tok_s']:.1f} tok/s aggregate, p99 {row['latency_p99_s']:.2f}s",
                      file=sys.stderr, flush=True)
    return out


def ratios(result: dict[str, Any]) -> list[dict[str, float]]:
    """Per level: ours / theirs for each figure (and whether ours is within 5% of theirs)."""
    rows = []
    for a, b in zip(result["ours"], result["llama_cpp_server"]):
        row: dict[str, Any] = {"clients": a["clients"]}
        for key, _, better in FIGURES:
            r = a[key] / b[key] if b[key] else float("inf")
            row[key] = r
            row[key + "_ok"] = r >= 0.95 if better == "higher" else r <= 1.05
        rows.append(row)
    return rows


def format_table(result: dict[str, Any]) -> str:
    """A markdown table: one row per level and server, then the ratio row."""
    head = "| clients | server | " + " | ".join(label for _, label, _ in FIGURES) + " |"
    lines = [head, "|" + "---|" * (len(FIGURES) + 2)]
    for a, b, r in zip(result["ours"], result["llama_cpp_server"], ratios(result)):
        for name, row in (("edge-qwen", a), ("llama_cpp.server", b)):
            lines.append(f"| {row['clients']} | {name} | " + " | ".join(f"{row[k]:.3f}" for k, _, _ in FIGURES) + " |")
        lines.append(f"| {r['clients']} | ratio ours/theirs | " + " | ".join(
            f"{r[k]:.2f}{'' if r[k + '_ok'] else ' ✗'}" for k, _, _ in FIGURES) + " |")
    c = result["config"]
    lines.append(f"\nmodel {Path(c['model']).name}, max_tokens {c['max_tokens']}, greedy, streaming, "
                 f"n_ctx {c['n_ctx']}, {c['n_threads']} threads, {c['cpu_count']} CPUs, {c['rounds']} rounds each (ABBA). "
                 "✗ marks a figure where ours is more than 5% worse.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="GGUF path or store name (default: the default model)")
    ap.add_argument("--levels", default="1,4,16", help="comma-separated client counts")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--min-requests", type=int, default=4, help="requests per round and level, at least")
    ap.add_argument("--rounds", type=int, default=2, help="rounds per server and level (alternating A B B A)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=None, help="write the result as JSON here")
    ap.add_argument("--force", action="store_true", help="overwrite --out")
    args = ap.parse_args(argv)
    result = run_benchmark(args.model, tuple(int(x) for x in args.levels.split(",")), args.max_tokens,
                           n_threads=args.threads, min_requests=args.min_requests, rounds=args.rounds)
    print(format_table(result))
    if args.out:
        from edge_qwen.files import atomic_output

        with atomic_output(args.out, force=args.force) as tmp:
            tmp.write_text(json.dumps({**result, "ratios": ratios(result)}, indent=2))
    return 0


def test_server_vs_llama_cpp_server(benchmark):
    """pytest-benchmark entry: one full run (1, 4, 16 clients); ratios go to extra_info.

    $EDGE_QWEN_BENCH_THREADS sets the threads of both servers (on a machine shared with other
    jobs, 1 thread avoids llama.cpp's threads spinning on each other).
    """
    threads = int(os.environ["EDGE_QWEN_BENCH_THREADS"]) if os.environ.get("EDGE_QWEN_BENCH_THREADS") else None
    result = benchmark.pedantic(run_benchmark, kwargs={"max_tokens": 32, "n_threads": threads}, rounds=1,
                                iterations=1)
    print("\n" + format_table(result))
    for r in ratios(result):
        for key, _, _ in FIGURES:
            benchmark.extra_info[f"c{r['clients']}_{key}_ratio"] = round(r[key], 3)
    assert all(a["tokens"] > 0 for a in result["ours"] + result["llama_cpp_server"])


if __name__ == "__main__":
    sys.exit(main())
