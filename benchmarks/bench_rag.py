"""Documents benchmark on the default model (a script, not part of the test suite):

1. retrieval hit@3 on the 40-question, 32-file Chinese/English corpus (tests/rag_corpus.py);
2. answer accuracy on the same questions with RAG (edge-qwen ask --index) and without (the
   bare question to the model);
3. step-by-step (reasoning="step_by_step") against plain answers on 30 arithmetic word problems,
   15 English and 15 Chinese;
4. long context: peak RSS and decode tok/s at 4K, 16K and 32K context for f16 and q8_0 KV
   (each configuration in its own process, the prompt filling `--fill` of the context, default 90%).

    python benchmarks/bench_rag.py [--part retrieval,answers,cot,long] [--out benchmarks/results/rag.json]

The machine's CPU may be shared: compare figures measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

# (question, answer) pairs: whole-number answers.
WORD_PROBLEMS = [
    ("Tom has 3 boxes with 12 apples each. He gives away 7 apples. How many apples does he have left?", 29),
    ("A train travels 60 km per hour for 3 hours, then 40 km per hour for 2 hours. How many km does it travel?", 260),
    ("Anna buys 4 notebooks at 3 dollars each and a pen for 2 dollars. How many dollars does she spend?", 14),
    ("A class has 28 students. 3/4 of them passed the test. How many students passed?", 21),
    ("A baker makes 5 trays of 24 cookies and sells 87 cookies. How many cookies are left?", 33),
    ("There are 9 rows of chairs with 15 chairs in each row. 17 chairs are empty. How many chairs are taken?", 118),
    ("Ben is 4 years older than Sara. Sara is twice as old as Leo, who is 6. How old is Ben?", 16),
    ("A shop sells pencils in packs of 8. How many packs are needed for 100 pencils?", 13),
    ("A rectangle is 12 cm long and 7 cm wide. What is its perimeter in cm?", 38),
    ("Mia reads 18 pages a day. How many pages does she read in 2 weeks?", 252),
    ("A farmer has 45 chickens and 23 cows. How many legs do the animals have in total?", 182),
    ("A tank holds 500 liters. It is filled at 35 liters per minute for 12 minutes. How many liters are still missing?", 80),
    ("Jack had 120 dollars. He spent a quarter on a game and 30 dollars on food. How many dollars are left?", 60),
    ("A bus has 52 seats. 3 buses carry 140 people. How many seats are empty?", 16),
    ("Lucy saves 15 dollars a week. After how many weeks does she have 195 dollars?", 13),
    ("小明有5支铅笔，又买了8支，送给同学3支，还剩几支？", 10),
    ("一本书有240页，小红每天看30页，几天能看完？", 8),
    ("妈妈买了3千克苹果，每千克12元，付了50元，应找回多少元？", 14),
    ("一个班有男生23人，女生比男生多5人，这个班一共有多少人？", 51),
    ("工厂每天生产150个零件，一周（7天）生产多少个零件？", 1050),
    ("一辆汽车每小时行驶80千米，4小时后还差60千米到达，两地相距多少千米？", 380),
    ("学校买了6箱粉笔，每箱48盒，用掉了130盒，还剩多少盒？", 158),
    ("长方形的长是15米，宽是8米，它的面积是多少平方米？", 120),
    ("小刚今年9岁，爸爸的年龄是他的4倍还少2岁，爸爸今年几岁？", 34),
    ("果园里有苹果树120棵，梨树的棵数是苹果树的一半，两种树一共有多少棵？", 180),
    ("一支钢笔18元，一个书包的价钱是钢笔的5倍，书包多少元？", 90),
    ("图书馆有故事书360本，借出去125本，又买来80本，现在有多少本？", 315),
    ("一根绳子长50米，剪去12米后，剩下的平均分成4段，每段多少米？", 9),
    ("每个盒子装6个鸡蛋，100个鸡蛋最多能装满几个盒子？", 16),
    ("小华家上个月用电210度，这个月比上个月少用35度，两个月一共用电多少度？", 385),
]


def _last_number(text: str) -> int | None:
    nums = re.findall(r"-?\d[\d,]*(?:\.\d+)?", text.replace("，", ","))
    if not nums:
        return None
    try:
        return int(float(nums[-1].replace(",", "")))
    except ValueError:
        return None


def part_retrieval_and_answers(llm, count, do_answers: bool) -> dict:
    from rag_corpus import QUESTIONS, write_corpus

    from edge_qwen.rag.answer import ask
    from edge_qwen.rag.index import DocIndex, build

    root = write_corpus(Path(tempfile.mkdtemp()) / "corpus")
    build("bench", [root], count)
    out: dict = {"questions": len(QUESTIONS)}
    with DocIndex.open("bench") as ix:
        hits = sum(f in [Path(h.path).relative_to(root).as_posix() for h in ix.search(q, 3)] for q, f, _ in QUESTIONS)
    out["hit_at_3"] = hits / len(QUESTIONS)
    if not do_answers:
        return out
    rag_ok = bare_ok = cited_ok = 0
    t0 = time.time()
    for q, f, fact in QUESTIONS:
        r = ask(llm, q, "bench", max_tokens=96)
        norm = lambda s: s.replace(",", "").replace(" ", "")  # noqa: E731
        rag_ok += r.found and norm(fact) in norm(r.answer)
        cited_ok += any(c["path"].endswith(f) for c in r.citations)
        b = llm.chat([{"role": "user", "content": q}], temperature=0, max_tokens=96)["choices"][0]["message"]["content"]
        bare_ok += norm(fact) in norm(b)
    out.update(answer_accuracy_rag=rag_ok / len(QUESTIONS), answer_accuracy_no_rag=bare_ok / len(QUESTIONS),
               cites_right_file=cited_ok / len(QUESTIONS), seconds=round(time.time() - t0))
    return out


def part_cot(llm) -> dict:
    plain = steps = 0
    rows = []
    t0 = time.time()
    for q, want in WORD_PROBLEMS:
        zh = any("\u4e00" <= c <= "\u9fff" for c in q)
        ask_num = q + ("只回答一个数字。" if zh else " Answer with a number only.")
        a = llm.chat([{"role": "user", "content": ask_num}], temperature=0, max_tokens=32)["choices"][0]["message"]["content"]
        s = llm.chat([{"role": "user", "content": q}], temperature=0, max_tokens=320,
                     reasoning="step_by_step")["choices"][0]["message"]["content"]
        plain += _last_number(a) == want
        steps += _last_number(s) == want
        rows.append({"q": q, "want": want, "plain": a, "steps": s})
    n = len(WORD_PROBLEMS)
    return {"problems": n, "plain_accuracy": plain / n, "step_by_step_accuracy": steps / n,
            "seconds": round(time.time() - t0), "rows": rows}


def _long_worker(n_ctx: int, kv_type: str, fill_ratio: float = 0.9) -> dict:
    import psutil

    from edge_qwen import EdgeQwen

    llm = EdgeQwen(None, n_ctx=n_ctx, kv_type=kv_type)
    base = (Path(__file__).resolve().parent.parent / "edge_qwen" / "data" / "eval_corpus.txt").read_text(encoding="utf-8")
    ids = llm.tokenize(base, special=False)
    fill = int(n_ctx * fill_ratio)
    text = llm.detokenize((ids * (fill // len(ids) + 1))[:fill - 64])
    t = time.time()
    last = None
    for c in llm.generate([{"role": "user", "content": text}], temperature=0, max_tokens=32):
        last = c
    tm = last.timings
    rss = psutil.Process().memory_info().rss
    peak = getattr(psutil.Process().memory_info(), "peak_wset", None)
    try:  # Linux: VmHWM is the peak resident set
        peak = int(re.search(r"VmHWM:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1)) * 1024
    except (OSError, AttributeError):
        peak = peak or rss
    return {"n_ctx": n_ctx, "kv_type": kv_type, "fill": fill_ratio, "prompt_tokens": tm.prompt_tokens, "prefill_s": round(tm.prompt_ms / 1000, 1),
            "decode_tok_s": round(tm.tokens_per_s, 1), "peak_rss_mb": round(peak / 1e6), "kv_mib": round(llm.kv_cache_bytes / 2**20),
            "wall_s": round(time.time() - t, 1)}


def part_long(sizes=(4096, 16384, 32768), kv_types=("f16", "q8_0"), fill: float = 0.9) -> list[dict]:
    rows = []
    for n in sizes:
        for kv in kv_types:
            r = subprocess.run([sys.executable, __file__, "--long-worker", f"{n},{kv},{fill}"], capture_output=True,
                               text=True)
            line = [ln for ln in r.stdout.splitlines() if ln.startswith("{")]
            rows.append(json.loads(line[-1]) if line else {"n_ctx": n, "kv_type": kv, "error": r.stderr[-400:]})
            print(rows[-1], flush=True)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--part", default="retrieval,answers,cot,long")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "rag.json"))
    ap.add_argument("--long-worker", default=None)
    ap.add_argument("--sizes", default="4096,16384,32768", help="context sizes of the long part")
    ap.add_argument("--fill", type=float, default=0.9, help="share of the context the long part's prompt fills")
    a = ap.parse_args()
    if a.long_worker:
        n, kv, fill = a.long_worker.split(",")
        print(json.dumps(_long_worker(int(n), kv, float(fill))))
        return 0
    os.environ.setdefault("EDGE_QWEN_HOME", tempfile.mkdtemp())  # the bench index stays out of the user's store
    parts = set(a.part.split(","))
    result: dict = {"note": "2 shared CPU cores; compare figures within this run"}
    if parts & {"retrieval", "answers", "cot"}:
        from edge_qwen import EdgeQwen
        from edge_qwen.store import default_model_path

        from edge_qwen.rag.tokens import token_counter

        llm = EdgeQwen(default_model_path(), n_ctx=4096)
        count = token_counter(default_model_path())
        if parts & {"retrieval", "answers"}:
            result["rag"] = part_retrieval_and_answers(llm, count, "answers" in parts)
            print(json.dumps(result["rag"]), flush=True)
        if "cot" in parts:
            result["cot"] = part_cot(llm)
            print(json.dumps({k: v for k, v in result["cot"].items() if k != "rows"}), flush=True)
        llm.close()
    if "long" in parts:
        result["long_context"] = part_long(tuple(int(x) for x in a.sizes.split(",")), fill=a.fill)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, ensure_ascii=False, indent=2), encoding="utf-8")
    print(f"results in {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
