"""Record llama.cpp's references for the tiny Qwen3-Embedding / Qwen3-Reranker checkpoints
(tests/embed_models.py) in tests/data/llamacpp_reference_embed.json.

    python tests/make_llamacpp_reference_embed.py --llama-cpp DIR [--llama-server BIN [--scores-only]] [--work DIR]

DIR is the `vendor/llama.cpp` folder of llama-cpp-python 0.3.36's sdist. For each checkpoint and
outtype (f16, bf16, q8_0) llama.cpp's convert_hf_to_gguf.py (run from DIR, with its own gguf-py)
and edge-qwen convert it; the digest of llama.cpp's file is recorded and any difference from
edge-qwen's printed. With --llama-server (a llama-server binary built from the same tree), the
reranker's f16 GGUF made by edge-qwen is served by `llama-server --rerank` and its scores for
RERANK_QUERIES are recorded with the command line, for tests/test_embed_rerank.py to compare
edge-qwen's /v1/rerank against. Needs torch and transformers (the test extra).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))

from embed_models import EMBED_ARCHS, make_embed_checkpoint  # noqa: E402
from family_models import digest_diff, gguf_digest  # noqa: E402
from make_llamacpp_reference import VERSION, _run  # noqa: E402

OUTTYPES = ("f16", "bf16", "q8_0")
REFERENCE = HERE / "data" / "llamacpp_reference_embed.json"

# What the reranker is asked (English and Chinese; the documents deliberately mixed).
RERANK_QUERIES = [
    {"query": "What is the capital of France?",
     "documents": ["Paris is the capital and largest city of France.", "The Great Wall is in China.",
                   "Bananas are rich in potassium.", "巴黎是法国的首都。"]},
    {"query": "如何煮米饭？",
     "documents": ["把米洗净，加水，用电饭锅煮二十分钟。", "Rice is cooked by boiling it in water.",
                   "The stock market fell today."]},
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.loads(r.read())


def llama_server_scores(server: Path, gguf: Path) -> dict:
    """Start `llama-server --rerank` on `gguf`, ask RERANK_QUERIES, return the command and the scores."""
    port = _free_port()
    cmd = [str(server), "-m", str(gguf), "--rerank", "--host", "127.0.0.1", "--port", str(port), "-t", "2",
           "-c", "2048", "-np", "1", "--no-webui"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(600):
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                if proc.poll() is not None:
                    raise SystemExit(f"llama-server exited: {proc.stderr.read()[-3000:]}")
                time.sleep(0.5)
        answers = []
        for q in RERANK_QUERIES:
            res = _post(f"http://127.0.0.1:{port}/v1/rerank", {**q, "top_n": len(q["documents"])})
            answers.append({"results": sorted(res["results"], key=lambda r: r["index"]),
                            "prompt_tokens": res["usage"]["prompt_tokens"]})
    finally:
        proc.terminate()
        proc.wait(30)
    shown = ["llama-server", "-m", "RERANKER-f16.gguf", *cmd[3:]]
    return {"command": " ".join(shown), "queries": RERANK_QUERIES, "answers": answers}


def _sentencepiece_stub(work: Path) -> dict[str, str]:
    """The environment for llama.cpp's converter when sentencepiece is not installed.

    Its Qwen2/Qwen3 vocabulary code imports sentencepiece before it looks for a tokenizer.model
    (which Qwen does not ship) and falls back to the BPE tokenizer.json only on FileNotFoundError;
    an importable stand-in lets it reach that fallback, which is what runs for Qwen anyway.
    """
    import importlib.util

    env = dict(os.environ)
    if importlib.util.find_spec("sentencepiece") is None:
        stub = work / "stubs"
        stub.mkdir(exist_ok=True)
        (stub / "sentencepiece.py").write_text("class SentencePieceProcessor:  # never used: Qwen has no tokenizer.model\n"
                                               "    pass\n")
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(stub), env.get("PYTHONPATH")) if p)
    return env


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--llama-cpp", type=Path, required=True, help="vendor/llama.cpp of the llama-cpp-python sdist")
    ap.add_argument("--llama-server", type=Path, help="llama-server built from the same tree (records rerank scores)")
    ap.add_argument("--work", type=Path, help="scratch folder (default: a temporary one)")
    ap.add_argument("--archs", default=",".join(EMBED_ARCHS))
    ap.add_argument("--scores-only", action="store_true",
                    help="with --llama-server: only (re)record the rerank scores, no converter comparison")
    args = ap.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="llamacpp-ref-embed-"))
    work.mkdir(parents=True, exist_ok=True)
    converter = args.llama_cpp / "convert_hf_to_gguf.py"
    reference = json.loads(REFERENCE.read_text()) if REFERENCE.is_file() else {}
    reference["llama_cpp_python"] = VERSION
    reference.setdefault("files", {})
    failures = 0
    os.environ.update(_sentencepiece_stub(work))  # the children inherit it
    for arch in [] if args.scores_only else args.archs.split(","):
        ckpt = make_embed_checkpoint(work, arch)
        for outtype in OUTTYPES:
            key = f"{arch}-{outtype}"
            ref_out, our_out = work / f"ref-{key}.gguf", work / f"ours-{key}.gguf"
            ref_t, ref_mb = _run([sys.executable, str(converter), str(ckpt), "--outtype", outtype,
                                  "--outfile", str(ref_out)], cwd=args.llama_cpp)
            code = ("import sys; from edge_qwen.convert.writer import convert; "
                    f"convert(sys.argv[1], sys.argv[2], outtype={outtype!r}, force=True, quiet=True)")
            our_t, our_mb = _run([sys.executable, "-W", "ignore", "-c", code, str(ckpt), str(our_out)])
            ref_digest = gguf_digest(ref_out)
            diff = digest_diff(gguf_digest(our_out), ref_digest)
            reference["files"][key] = ref_digest
            print(f"{key:32s} llama.cpp {ref_t:5.1f} s {ref_mb:5d} MiB | edge-qwen {our_t:5.1f} s {our_mb:5d} MiB"
                  f" | {len(ref_digest['tensors'])} tensors, {'identical' if not diff else f'{len(diff)} DIFFERENCES'}",
                  flush=True)
            for line in diff:
                print("   ", line)
            failures += bool(diff)
            ref_out.unlink()
            if not (arch == "qwen3-reranker" and outtype == "f16" and args.llama_server):
                our_out.unlink()
    if args.llama_server:
        gguf = work / "ours-qwen3-reranker-f16.gguf"
        if args.scores_only:
            from edge_qwen.convert.writer import convert

            convert(make_embed_checkpoint(work, "qwen3-reranker"), gguf, outtype="f16", force=True, quiet=True)
        rerank = llama_server_scores(args.llama_server, gguf)
        rerank["tensors"] = gguf_digest(gguf)["tensors"]
        reference["llama_server_rerank"] = rerank
        print(json.dumps(rerank["answers"], indent=1))
    REFERENCE.parent.mkdir(exist_ok=True)
    REFERENCE.write_text(json.dumps(reference, indent=1, sort_keys=True, ensure_ascii=False) + "\n")
    print(f"wrote {REFERENCE}; {failures} file(s) differ")


if __name__ == "__main__":
    main()
