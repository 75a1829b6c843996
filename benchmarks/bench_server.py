"""Server benchmark: `edge-qwen serve --parallel N` against llama.cpp's `llama-server --parallel N`
and llama-cpp-python's `llama_cpp.server`, in one run.

Every server runs as a subprocess on the same GGUF, the same thread count and the same context
per slot (ours `--ctx C --parallel N`; llama-server `-c C*N -np N`; llama_cpp.server has one
sequence, `--n_ctx C`), on different ports. At each concurrency level (1, 4, 16 streaming
clients, greedy, `--requests-per-client` replies each) the servers take turns, the order
reversed every round, so slow drift of a shared machine hits all alike. Figures per level:
aggregate tokens/s, tokens/s per client, TTFT p50/p95, latency p50/p99; ratios are ours / theirs
(for latencies lower is better). llama-server is a reference binary built outside the repo
(docs/bench.md), never a dependency; without `--llama-server` it is left out.

Two more figures, from edge-qwen alone:
- `--batched-bench PATH`: llama.cpp's own `llama-batched-bench` decode speed at the same batch
  sizes, the limit of this machine; ours at 16 clients is reported as a fraction of it.
- the mixed batch: half the clients ask for JSON under a schema, half for free text, all at
  once; every JSON answer is validated and constrained tok/s is compared with free tok/s.

    python benchmarks/bench_server.py --llama-server /tmp/ref/.../llama-server \\
        --batched-bench /tmp/ref/.../llama-batched-bench [--parallel 16] [--max-tokens 64] [--out r.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import socket
import subprocess
import sys
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

TOPICS = ["a lighthouse", "a robot", "the moon", "a river", "a library", "a dragon", "a violin", "a desert",
          "a train", "a garden", "a volcano", "a clock", "a ship", "a forest", "a city", "a snowflake"]
FIGURES = [("aggregate_tok_s", "aggregate tok/s", "higher"), ("client_tok_s", "tok/s per client", "higher"),
           ("ttft_p50_s", "TTFT p50 (s)", "lower"), ("ttft_p95_s", "TTFT p95 (s)", "lower"),
           ("latency_p50_s", "latency p50 (s)", "lower"), ("latency_p99_s", "latency p99 (s)", "lower")]
CITY_SCHEMA = {"type": "object", "properties": {"city": {"type": "string"}, "country": {"type": "string"},
                                                "population": {"type": "integer"},
                                                "landmarks": {"type": "array", "items": {"type": "string"}}},
               "required": ["city", "country", "population", "landmarks"], "additionalProperties": False}


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
def _server(name: str, cmd: list[str], port: int, log: Path, env: dict[str, str] | None = None):
    """Start a server subprocess, wait until it answers, stop it afterwards."""
    import httpx

    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})})
    try:
        deadline = time.monotonic() + 300
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {proc.returncode}; see {log}")
            try:
                if httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{name} did not start within 300 s; see {log}")
            time.sleep(0.3)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


async def _one(client: Any, url: str, messages: list[dict], max_tokens: int, **extra: Any) -> dict[str, Any]:
    import httpx

    try:
        return await _one_try(client, url, messages, max_tokens, **extra)
    except httpx.RemoteProtocolError:
        # A kept-alive connection the server closed as the request went out (seen once from
        # llama-server): sent again on a fresh connection, and counted.
        r = await _one_try(client, url, messages, max_tokens, **extra)
        return {**r, "resent": 1}


async def _one_try(client: Any, url: str, messages: list[dict], max_tokens: int, **extra: Any) -> dict[str, Any]:
    body = {"model": "qwen2.5", "messages": messages, "stream": True, "temperature": 0, "max_tokens": max_tokens,
            **extra}
    t0 = time.perf_counter()
    first, pieces, usage, text = None, 0, None, []
    async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"{url}: HTTP {r.status_code}: {(await r.aread())[:300]!r}")
        async for line in r.aiter_lines():
            if not line.startswith("data: {"):
                continue
            event = json.loads(line[6:])
            usage = event.get("usage") or usage
            choices = event.get("choices")
            content = choices[0].get("delta", {}).get("content") if choices else None
            if content:
                pieces += 1
                text.append(content)
                if first is None:
                    first = time.perf_counter()
    end = time.perf_counter()
    # The true token count where the server reports it; else one streamed piece per token.
    tokens = int(usage["completion_tokens"]) if usage and usage.get("completion_tokens") else pieces
    return {"ttft": (first or end) - t0, "latency": end - t0, "tokens": tokens, "text": "".join(text)}


async def _level(url: str, clients: int, per_client: int, max_tokens: int) -> dict[str, Any]:
    import httpx

    async def client_loop(c: int, http: Any) -> tuple[list[dict], float]:
        t0, results = time.perf_counter(), []
        for i in range(per_client):
            topic = TOPICS[(c * per_client + i) % len(TOPICS)]
            results.append(await _one(http, url, [{"role": "user", "content": f"Write a story about {topic}."}],
                                      max_tokens))
        return results, time.perf_counter() - t0

    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(timeout=900, limits=limits) as http:
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
            "aggregate_tok_s": total / wall, "client_tok_s": sum(rates) / len(rates),
            "ttft_p50_s": _percentile([r["ttft"] for r in reqs], 50),
            "ttft_p95_s": _percentile([r["ttft"] for r in reqs], 95),
            "latency_p50_s": _percentile([r["latency"] for r in reqs], 50),
            "latency_p99_s": _percentile([r["latency"] for r in reqs], 99), "resent": sum(r.get("resent", 0) for r in reqs)}


async def _mixed(url: str, clients: int, max_tokens: int) -> dict[str, Any]:
    """Half the clients JSON under CITY_SCHEMA, half free text, all at once; validity and speeds."""
    import httpx
    import jsonschema

    fmt = {"type": "json_schema", "json_schema": {"name": "city", "schema": CITY_SCHEMA}}
    cities = ["Paris", "Tokyo", "Cairo", "Lima", "Oslo", "Delhi", "Rome", "Quito"]

    async def one(i: int, http: Any) -> dict[str, Any]:
        if i % 2 == 0:
            msgs = [{"role": "user", "content": f"Describe {cities[i % len(cities)]} as JSON with three landmarks."}]
            r = await _one(http, url, msgs, max_tokens, response_format=fmt, stream_options={"include_usage": True})
            try:
                jsonschema.validate(json.loads(r["text"]), CITY_SCHEMA)
                r["valid"] = True
            except (ValueError, jsonschema.ValidationError):
                r["valid"] = False
            r["kind"] = "json"
        else:
            msgs = [{"role": "user", "content": f"Describe {cities[i % len(cities)]} in a few sentences."}]
            r = await _one(http, url, msgs, max_tokens, stream_options={"include_usage": True})
            r["kind"] = "free"
        r["tok_s"] = r["tokens"] / max(r["latency"] - r["ttft"], 1e-6)
        return r

    async with httpx.AsyncClient(timeout=900) as http:
        rs = await asyncio.gather(*(one(i, http) for i in range(clients)))
    js, free = [r for r in rs if r["kind"] == "json"], [r for r in rs if r["kind"] == "free"]
    j_rate = sum(r["tok_s"] for r in js) / len(js)
    f_rate = sum(r["tok_s"] for r in free) / len(free)
    return {"clients": clients, "json_valid": sum(r["valid"] for r in js), "json_requests": len(js),
            "json_tok_s": j_rate, "free_tok_s": f_rate, "ratio": j_rate / f_rate if f_rate else float("inf")}


def batched_bench(binary: str, model: str, threads: int, levels: tuple[int, ...], n_gen: int = 64) -> dict[int, float]:
    """llama.cpp's own batched decode speed (S_TG tok/s) per batch size: this machine's limit."""
    cmd = [binary, "-m", model, "-c", str(max(levels) * (128 + n_gen) + 256), "-b", "2048", "-ub", "512",
           "-npp", "128", "-ntg", str(n_gen), "-npl", ",".join(map(str, levels)), "-t", str(threads)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=1800).stdout
    rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in out.splitlines()
            if line.strip().startswith("|")]
    head = next(r for r in rows if "S_TG t/s" in r)
    b, s_tg = head.index("B"), head.index("S_TG t/s")
    return {int(r[b]): float(r[s_tg]) for r in rows if r is not head and re.fullmatch(r"\d+", r[b] or "")}


def run_benchmark(model: str | Path | None = None, levels: tuple[int, ...] = (1, 4, 16), max_tokens: int = 64,
                  n_ctx: int = 2048, n_threads: int | None = None, parallel: int | None = None,
                  requests_per_client: int = 2, rounds: int = 1, llama_server: str | None = None,
                  batched_bench_bin: str | None = None, baseline_src: str | None = None, mixed_clients: int = 8,
                  log_dir: str | Path | None = None, skip: tuple[str, ...] = (),
                  serve_args: tuple[str, ...] = ()) -> dict[str, Any]:
    """Run every server over `levels`; return {"config", "servers": {name: [per level]}, ...}."""
    import tempfile

    from edge_qwen.device import physical_cores
    from edge_qwen.store import resolve_model

    path = str(resolve_model(model))
    threads = n_threads or physical_cores()
    np_ = parallel or max(levels)
    logs = Path(log_dir or tempfile.mkdtemp(prefix="bench_server_"))
    cmds: dict[str, tuple[list[str], int, dict[str, str] | None]] = {}
    p = _free_port()
    cmds["edge-qwen"] = ([sys.executable, "-c", "from edge_qwen.cli import main; main()", "serve", path, "--port",
                          str(p), "--ctx", str(n_ctx), "--threads", str(threads), "--parallel", str(np_),
                          "--max-queue", str(max(levels) * 2), "--quiet", *serve_args], p, None)
    if baseline_src:  # the same command on an older checkout: the single-sequence engine it replaced
        p = _free_port()
        # -P: `python -c` would put the working directory (this checkout, when run from its root)
        # ahead of PYTHONPATH, and the "before" server would run today's code.
        cmds["edge-qwen before"] = ([sys.executable, "-P", "-c", "from edge_qwen.cli import main; main()", "serve", path,
                                     "--port", str(p), "--ctx", str(n_ctx), "--threads", str(threads),
                                     "--max-queue", str(max(levels) * 2), "--quiet"], p, {"PYTHONPATH": baseline_src})
    if llama_server:
        p = _free_port()
        cmds["llama-server"] = ([llama_server, "-m", path, "--port", str(p), "-c", str(n_ctx * np_), "-np", str(np_),
                                 "-t", str(threads), "-tb", str(threads), "--no-webui"], p, None)
    p = _free_port()
    # Through our CPU guard (edge_qwen.device.guard_cpu_kernels): on an AMX CPU their server would
    # otherwise crash in llama.cpp's AMX kernels, as anything built by GCC does (llama.cpp#20824).
    cmds["llama_cpp.server"] = ([sys.executable, "-c", "import runpy, sys; from edge_qwen.device import "
                                 "guard_cpu_kernels; guard_cpu_kernels(); sys.argv[0] = 'llama_cpp.server'; "
                                 "runpy.run_module('llama_cpp.server', run_name='__main__')", "--model", path, "--port", str(p),
                                 "--n_ctx", str(n_ctx), "--n_threads", str(threads), "--n_threads_batch", str(threads),
                                 # Their default interrupts a running stream when a new request arrives; the
                                 # comparison needs every request answered in full, as ours does.
                                 "--interrupt_requests", "False"], p, None)
    for name in skip:  # e.g. the one-at-a-time llama_cpp.server on a machine too busy to wait for it
        cmds.pop(name, None)
    out: dict[str, Any] = {"config": {"model": path, "max_tokens": max_tokens, "n_ctx_per_slot": n_ctx,
                                      "parallel": np_, "n_threads": threads, "levels": list(levels),
                                      "rounds": rounds, "requests_per_client": requests_per_client, "serve_args": list(serve_args),
                                      "cpu_count": os.cpu_count(), "load_before": os.getloadavg()},
                           "servers": {name: [] for name in cmds}}
    with ExitStack() as stack:
        urls = {name: stack.enter_context(_server(name, cmd, port, logs / f"{name.replace(' ', '_')}.log", env))
                for name, (cmd, port, env) in cmds.items()}
        for url in urls.values():  # warm-up: first-request costs (page-in, allocations) are not measured
            asyncio.run(_level(url, 1, 1, 4))
        for clients in levels:
            runs: dict[str, list] = {name: [] for name in urls}
            for i in range(rounds):
                order = list(urls.items())
                for name, url in (order if i % 2 == 0 else order[::-1]):
                    runs[name].append(asyncio.run(_level(url, clients, requests_per_client, max_tokens)))
            for name, got in runs.items():
                out["servers"][name].append(summarize(got))
                row = out["servers"][name][-1]
                print(f"[bench_server] {clients:>2} clients {name:>16}: {row['aggregate_tok_s']:.1f} tok/s aggregate, "
                      f"ttft p50 {row['ttft_p50_s']:.2f}s, p99 {row['latency_p99_s']:.2f}s", file=sys.stderr, flush=True)
        if mixed_clients:
            out["mixed"] = asyncio.run(_mixed(urls["edge-qwen"], mixed_clients, 2 * max_tokens))
            print(f"[bench_server] mixed: {out['mixed']}", file=sys.stderr, flush=True)
    if batched_bench_bin:
        out["batched_bench"] = batched_bench(batched_bench_bin, path, threads, levels, max_tokens)
        print(f"[bench_server] llama-batched-bench S_TG: {out['batched_bench']}", file=sys.stderr, flush=True)
    out["config"]["load_after"] = os.getloadavg()
    return out


def ratios(result: dict[str, Any], ref: str) -> list[dict[str, float]]:
    """Per level: edge-qwen / `ref` for each figure."""
    rows = []
    for a, b in zip(result["servers"]["edge-qwen"], result["servers"][ref]):
        rows.append({"clients": a["clients"], **{key: (a[key] / b[key] if b[key] else float("inf"))
                                                 for key, _, _ in FIGURES}})
    return rows


def format_table(result: dict[str, Any]) -> str:
    """Markdown: one row per level and server, then edge-qwen's ratio to each reference."""
    head = "| clients | server | " + " | ".join(label for _, label, _ in FIGURES) + " |"
    lines = [head, "|" + "---|" * (len(FIGURES) + 2)]
    refs = [n for n in result["servers"] if n != "edge-qwen"]
    by_ref = {ref: ratios(result, ref) for ref in refs}
    for k, row in enumerate(result["servers"]["edge-qwen"]):
        for name in result["servers"]:
            r = result["servers"][name][k]
            lines.append(f"| {r['clients']} | {name} | " + " | ".join(f"{r[key]:.2f}" for key, _, _ in FIGURES) + " |")
        for ref in refs:
            q = by_ref[ref][k]
            lines.append(f"| {row['clients']} | ratio edge-qwen / {ref} | "
                         + " | ".join(f"{q[key]:.2f}x" for key, _, _ in FIGURES) + " |")
    c = result["config"]
    lines.append(f"\nmodel {Path(c['model']).name}, {c['max_tokens']} tokens per reply, greedy, streaming, "
                 f"{c['requests_per_client']} requests per client, n_ctx {c['n_ctx_per_slot']} per slot, "
                 f"--parallel {c['parallel']}, {c['n_threads']} threads, {c['cpu_count']} CPUs, {c['rounds']} round(s); "
                 f"load average {c['load_before'][0]:.1f} before, {c['load_after'][0]:.1f} after.")
    bb = result.get("batched_bench")
    if bb:
        ours = {r["clients"]: r["aggregate_tok_s"] for r in result["servers"]["edge-qwen"]}
        lines.append("llama-batched-bench decode limit (S_TG tok/s): " + ", ".join(
            f"batch {b}: {v:.1f} (edge-qwen {ours.get(b, 0) / v:.2f}x of it)" for b, v in sorted(bb.items())))
    m = result.get("mixed")
    if m:
        lines.append(f"mixed batch ({m['clients']} clients, half JSON under a schema): {m['json_valid']}/"
                     f"{m['json_requests']} JSON answers valid; constrained {m['json_tok_s']:.1f} tok/s vs free "
                     f"{m['free_tok_s']:.1f} tok/s per request = {m['ratio']:.2f}x")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="GGUF path or store name (default: the default model)")
    ap.add_argument("--levels", default="1,4,16", help="comma-separated client counts")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--ctx", type=int, default=2048, help="context per slot")
    ap.add_argument("--parallel", type=int, default=None, help="slots of edge-qwen and llama-server (default: max level)")
    ap.add_argument("--requests-per-client", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=1, help="rounds per server and level (order reversed each round)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--llama-server", default=None, help="path of a llama-server binary (reference)")
    ap.add_argument("--batched-bench", default=None, help="path of a llama-batched-bench binary (the limit)")
    ap.add_argument("--baseline-src", default=None, help="an older edge-qwen source tree to compare with (PYTHONPATH)")
    ap.add_argument("--mixed-clients", type=int, default=8, help="clients of the mixed JSON/free batch (0: skip)")
    ap.add_argument("--skip", default="", help="comma-separated servers to leave out (e.g. llama_cpp.server)")
    ap.add_argument("--serve-args", default="", help="extra arguments of edge-qwen serve, e.g. '--flash-attn'")
    ap.add_argument("--out", default=None, help="write the result as JSON here")
    ap.add_argument("--force", action="store_true", help="overwrite --out")
    args = ap.parse_args(argv)
    result = run_benchmark(args.model, tuple(int(x) for x in args.levels.split(",")), args.max_tokens, args.ctx,
                           args.threads, args.parallel, args.requests_per_client, args.rounds, args.llama_server,
                           args.batched_bench, args.baseline_src, args.mixed_clients,
                           skip=tuple(x for x in args.skip.split(",") if x), serve_args=tuple(args.serve_args.split()))
    print(format_table(result))
    if args.out:
        from edge_qwen.files import atomic_output

        with atomic_output(args.out, force=args.force) as tmp:
            refs = [n for n in result["servers"] if n != "edge-qwen"]
            tmp.write_text(json.dumps({**result, "ratios": {r: ratios(result, r) for r in refs}}, indent=2))
    return 0


def test_server_vs_references(benchmark):
    """pytest-benchmark entry: one full run; edge-qwen / llama_cpp.server ratios go to extra_info.

    $EDGE_QWEN_LLAMA_SERVER and $EDGE_QWEN_BATCHED_BENCH point at the reference binaries (optional);
    $EDGE_QWEN_BENCH_THREADS sets the threads of every server.
    """
    threads = int(os.environ["EDGE_QWEN_BENCH_THREADS"]) if os.environ.get("EDGE_QWEN_BENCH_THREADS") else None
    result = benchmark.pedantic(run_benchmark, kwargs={
        "n_threads": threads, "llama_server": os.environ.get("EDGE_QWEN_LLAMA_SERVER"),
        "batched_bench_bin": os.environ.get("EDGE_QWEN_BATCHED_BENCH")}, rounds=1, iterations=1)
    print("\n" + format_table(result))
    for ref in (n for n in result["servers"] if n != "edge-qwen"):
        for r in ratios(result, ref):
            for key, _, _ in FIGURES:
                benchmark.extra_info[f"{ref}_c{r['clients']}_{key}_ratio"] = round(r[key], 3)
    assert all(row["tokens"] > 0 for rows in result["servers"].values() for row in rows)
    if "mixed" in result:
        assert result["mixed"]["json_valid"] == result["mixed"]["json_requests"]


if __name__ == "__main__":
    sys.exit(main())
