"""JSON-constrained decoding speed: free text vs our llguidance mask vs llama-cpp-python's GBNF path.

All runs use one loaded default model, greedy, the KV cache emptied before each run, and
alternate in order round by round so load on a shared machine hits every side alike. Rates
are generated tokens per second of generation time (prompt evaluation excluded), medians
over rounds, and reported as ratios against free decoding measured in the same run:

- mask only:       our constraint with fast-forward off (every token sampled under the mask);
                   target >= 0.95 of free decoding.
- mask + forward:  our constraint as shipped: tokens the grammar forces are decoded in one
                   batch with the sampled token; on a schema with many fixed keys the output
                   rate must beat free text (target > 1.0x, 1.3x hoped for).

Each ratio is printed twice: the ratio of the median rates, and the median of the per-round
ratios (each round runs every side once, close in time, so it cancels load that changes from
round to round). The time spent inside the JSON engine (mask_logits + commit) is measured
per token as well: against free decoding's time per token it bounds what the mask can cost,
whatever the machine's load.
- GBNF:            llama-cpp-python create_chat_completion(response_format={"type":
                   "json_object", "schema": S}) (llama.cpp's grammar sampler; REFERENCE 0.59x).

Grammar setup per request (make_constraint on a cached model, new schema and repeated schema)
is measured too (target <= 50 ms).

    pytest benchmarks/bench_json.py --benchmark-only -s      # pytest-benchmark
    python benchmarks/bench_json.py [rounds] [only]           # the same, printed; `only` keeps the sides
                                                              # whose name contains one of its comma-
                                                              # separated parts, e.g. "record" or "free,mask"
"""

from __future__ import annotations

import os
import statistics
import sys
import time

import pytest

ROUNDS = int(os.environ.get("EDGE_QWEN_BENCH_ROUNDS", "3"))

# ~150 tokens of JSON either way: a list the model fills with ten entries.
LIST_PROMPT = "List 10 students with their name, age and major as JSON."
LIST_SCHEMA = {
    "type": "object",
    "properties": {"students": {"type": "array", "minItems": 10, "maxItems": 10, "items": {
        "type": "object",
        "properties": {"name": {"type": "string", "maxLength": 30}, "age": {"type": "integer"},
                       "major": {"type": "string", "maxLength": 30}},
        "required": ["name", "age", "major"], "additionalProperties": False}}},
    "required": ["students"], "additionalProperties": False,
}

# A record with many fixed, descriptive keys and short values: what fast-forward is for.
RECORD_PROMPT = "Create a student record for Li Lei as JSON."
RECORD_SCHEMA = {
    "type": "object",
    "properties": {
        "student_full_name": {"type": "string", "maxLength": 30},
        "student_identification_number": {"type": "integer", "minimum": 0},
        "date_of_birth": {"type": "string", "format": "date"},
        "home_city_of_residence": {"type": "string", "maxLength": 20},
        "current_grade_level": {"type": "integer", "minimum": 1, "maximum": 12},
        "is_currently_enrolled": {"type": "boolean"},
        "favorite_school_subject": {"enum": ["mathematics", "physics", "chemistry", "history", "literature"]},
        "number_of_completed_courses": {"type": "integer", "minimum": 0},
        "has_received_scholarship": {"type": "boolean"},
        "primary_emergency_contact_relationship": {"enum": ["mother", "father", "guardian", "sibling"]},
    },
    "additionalProperties": False,
}
RECORD_SCHEMA["required"] = list(RECORD_SCHEMA["properties"])
MAX_TOKENS = 160


def _messages(prompt: str) -> list[dict]:
    return [{"role": "user", "content": prompt}]


class Timed:
    """A constraint that adds up the time spent in it (mask_logits and commit): the JSON engine's own cost."""

    def __init__(self, inner):
        self.inner = inner
        self.seconds = 0.0

    def mask_logits(self, logits) -> None:
        t = time.perf_counter()
        self.inner.mask_logits(logits)
        self.seconds += time.perf_counter() - t

    def commit(self, token_id: int) -> list[int]:
        t = time.perf_counter()
        forced = self.inner.commit(token_id)
        self.seconds += time.perf_counter() - t
        return forced

    def __getattr__(self, name: str):
        return getattr(self.inner, name)


def ours(llm, prompt: str, schema: dict | None, fast_forward: bool = True) -> dict:
    """One greedy generation through the shared decode loop; tokens, generation seconds, text, and the
    seconds spent in the constraint itself."""
    from edge_qwen.engine.generate import SamplingParams, decode
    from edge_qwen.engine.json_constraint import make_constraint

    llm.llama.reset()  # no KV reuse: every side evaluates the whole prompt
    prompt_ids = llm.tokenize(llm.render(_messages(prompt)))
    constraint = None
    if schema is not None:
        constraint = Timed(make_constraint(llm, {"type": "json_object", "schema": schema}, fast_forward=fast_forward))
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS)
    parts, last = [], None
    for chunk in decode(llm.llama, prompt_ids, params, pieces=llm._pieces, constraint=constraint):
        parts.append(chunk.text)
        last = chunk
    t = last.timings
    forced = constraint.forced_tokens if constraint is not None else 0
    return {"tokens": t.completion_tokens, "seconds": t.gen_ms / 1e3, "text": "".join(parts),
            "forced": forced, "finish": last.finish_reason,
            "constraint_seconds": constraint.seconds if constraint is not None else 0.0}


def gbnf(llm, prompt: str, schema: dict) -> dict:
    """llama-cpp-python's own JSON-schema path (GBNF grammar sampler), streamed and timed alike."""
    llm.llama.reset()
    parts, t_first = [], None
    stream = llm.llama.create_chat_completion(_messages(prompt), temperature=0, max_tokens=MAX_TOKENS, stream=True,
                                              response_format={"type": "json_object", "schema": schema})
    for chunk in stream:
        piece = chunk["choices"][0]["delta"].get("content") or ""
        if piece and t_first is None:
            t_first = time.perf_counter()  # first token out: prompt evaluation is behind us
        parts.append(piece)
    t_end = time.perf_counter()
    text = "".join(parts)
    n = len(llm.tokenize(text, special=False))
    return {"tokens": n - 1, "seconds": t_end - t_first, "text": text, "forced": 0, "finish": None}


SIDES = {
    "free (list prompt)": lambda llm: ours(llm, LIST_PROMPT, None),
    "mask only (list schema)": lambda llm: ours(llm, LIST_PROMPT, LIST_SCHEMA, fast_forward=False),
    "mask + forward (list schema)": lambda llm: ours(llm, LIST_PROMPT, LIST_SCHEMA),
    "llama-cpp-python GBNF (list schema)": lambda llm: gbnf(llm, LIST_PROMPT, LIST_SCHEMA),
    "free (record prompt)": lambda llm: ours(llm, RECORD_PROMPT, None),
    "mask only (record schema)": lambda llm: ours(llm, RECORD_PROMPT, RECORD_SCHEMA, fast_forward=False),
    "mask + forward (record schema)": lambda llm: ours(llm, RECORD_PROMPT, RECORD_SCHEMA),
}


def compare(llm, rounds: int = ROUNDS, only: str = "") -> dict:
    """Run every side (or those whose name contains `only`) `rounds` times, rotating the order.

    `only` is comma-separated: a side runs when its name contains one of the parts.
    Returns median tokens/s per side and the ratios to free text that the measured sides allow.
    """
    names = [n for n in SIDES if any(o in n for o in only.split(","))]
    rates: dict[str, list[float]] = {n: [] for n in names}
    last: dict[str, dict] = {}
    load_before = os.getloadavg()[0]  # reported beside the rates: a busy machine moves them
    ours(llm, RECORD_PROMPT, RECORD_SCHEMA)  # warm-up: page in weights, build the tokenizer tables
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            out = SIDES[name](llm)
            rates[name].append(out["tokens"] / out["seconds"])
            last[name] = out
            print(f"  round {r + 1}/{rounds} {name}: {out['tokens']} tokens, {rates[name][-1]:.1f} tok/s",
                  file=sys.stderr, flush=True)
    tps = {n: statistics.median(v) for n, v in rates.items()}
    out: dict = {"load": load_before, "load_after": os.getloadavg()[0], "tps": tps,
                 "best": {n: max(v) for n, v in rates.items()}, "last": last, "rounds": rounds,
                 "paired": {}, "overhead": {}}
    for key, side, base in RATIOS:
        if side in tps and base in tps:
            out[key] = tps[side] / tps[base]
            # Each round runs every side once, close in time: the median of the per-round ratios
            # cancels load that changes from round to round on a shared machine.
            out["paired"][key] = statistics.median(a / b for a, b in zip(rates[side], rates[base]))
    for name, o in last.items():
        if o.get("constraint_seconds"):
            out["overhead"][name] = o["constraint_seconds"] * 1e3 / o["tokens"]
    return out


# (result key, side, baseline side): every ratio is against free decoding of the same prompt.
RATIOS = [
    ("ratio_mask", "mask only (list schema)", "free (list prompt)"),
    ("ratio_gbnf", "llama-cpp-python GBNF (list schema)", "free (list prompt)"),
    ("ratio_ff_list", "mask + forward (list schema)", "free (list prompt)"),
    ("ratio_mask_record", "mask only (record schema)", "free (record prompt)"),
    ("ratio_ff_record", "mask + forward (record schema)", "free (record prompt)"),
]


def setup_times(llm, n: int = 50) -> dict:
    """make_constraint milliseconds: a schema seen for the first time, and a repeated one."""
    from edge_qwen.engine.json_constraint import make_constraint

    make_constraint(llm, {"type": "json_object"})  # tokenizer tables built once per model
    cold = []
    for i in range(n):  # a distinct schema each time: compiled from scratch
        schema = dict(RECORD_SCHEMA, title=f"record {i} {time.time_ns()}")
        t = time.perf_counter()
        make_constraint(llm, {"type": "json_object", "schema": schema})
        cold.append((time.perf_counter() - t) * 1e3)
    warm = []
    for _ in range(n):
        t = time.perf_counter()
        make_constraint(llm, {"type": "json_object", "schema": RECORD_SCHEMA})
        warm.append((time.perf_counter() - t) * 1e3)
    return {"new_schema_ms": statistics.median(cold), "new_schema_max_ms": max(cold),
            "cached_schema_ms": statistics.median(warm)}


def report(r: dict, s: dict) -> str:
    lines = [f"greedy, max {MAX_TOKENS} tokens, {r['rounds']} rotating rounds; load average "
             f"{r['load']:.2f} before, {r['load_after']:.2f} after, on {os.cpu_count()} CPUs",
             (f"{'decoding':40s} {'tokens':>6s} {'forced':>6s} {'median tok/s':>12s} {'best tok/s':>10s} "
              f"{'JSON engine ms/token':>20s}")]
    for name, tps in r["tps"].items():
        out = r["last"][name]
        over = r["overhead"].get(name)
        lines.append(f"{name:40s} {out['tokens']:6d} {out['forced']:6d} {tps:12.1f} {r['best'][name]:10.1f} "
                     + (f"{over:20.3f}" if over is not None else f"{'-':>20s}"))
    targets = {"ratio_mask": ">= 0.95", "ratio_mask_record": ">= 0.95", "ratio_gbnf": "REFERENCE.md: 0.59",
               "ratio_ff_record": "> 1.0", "ratio_ff_list": ""}
    lines.append("ratio (median of rates; median of per-round ratios; target)")
    for key, side, base in RATIOS:
        if key in r:
            lines.append(f"{side} / {base}: {r[key]:.3f}; paired {r['paired'][key]:.3f}  ({targets.get(key, '')})")
    free = r["tps"].get("free (list prompt)")
    for name in ("mask only (list schema)", "mask only (record schema)"):
        if free and name in r["overhead"]:
            ms_free = 1e3 / free
            lines.append(f"{name}: the JSON engine's {r['overhead'][name]:.3f} ms/token against {ms_free:.1f} ms/token "
                         f"of free decoding bounds the mask's slowdown at {ms_free / (ms_free + r['overhead'][name]):.3f}x")
    lines += [
        f"grammar setup: new schema {s['new_schema_ms']:.2f} ms (max {s['new_schema_max_ms']:.2f}), "
        f"cached schema {s['cached_schema_ms']:.3f} ms  (target <= 50 ms)",
    ]
    return "\n".join(lines)


@pytest.fixture(scope="module")
def llm():
    from edge_qwen import EdgeQwen

    with EdgeQwen(n_ctx=2048) as model:
        yield model


@pytest.mark.parametrize("side", list(SIDES))
def test_decode(benchmark, llm, side):
    """Each decoding side alone (pytest-benchmark's table); tokens/s in extra_info."""
    fn = SIDES[side]
    fn(llm)  # warm-up
    out = benchmark.pedantic(fn, args=(llm,), rounds=ROUNDS, iterations=1)
    benchmark.extra_info.update(tokens=out["tokens"], forced=out["forced"], tokens_per_s=out["tokens"] / out["seconds"])


def test_ratios(benchmark, llm):
    """All sides interleaved in one measurement; the ratios land in extra_info and are printed."""
    result = benchmark.pedantic(compare, args=(llm,), rounds=1, iterations=1)
    setup = setup_times(llm)
    benchmark.extra_info.update({k: v for k, v in result.items() if k.startswith("ratio")}, **setup)
    print("\n" + report(result, setup))


def test_grammar_setup_new_schema(benchmark, llm):
    from edge_qwen.engine.json_constraint import make_constraint

    make_constraint(llm, {"type": "json_object"})
    counter = iter(range(10**9))

    def new_schema():
        schema = dict(RECORD_SCHEMA, title=f"record {next(counter)} {time.time_ns()}")
        return make_constraint(llm, {"type": "json_object", "schema": schema})

    benchmark(new_schema)


def test_grammar_setup_cached_schema(benchmark, llm):
    from edge_qwen.engine.json_constraint import make_constraint

    benchmark(make_constraint, llm, {"type": "json_object", "schema": RECORD_SCHEMA})


if __name__ == "__main__":
    from edge_qwen import EdgeQwen

    with EdgeQwen(n_ctx=2048) as model:
        res = compare(model, int(sys.argv[1]) if len(sys.argv) > 1 else ROUNDS, sys.argv[2] if len(sys.argv) > 2 else "")
        st = setup_times(model)
    print(report(res, st))
    for side, out in res["last"].items():
        print(f"\n--- {side} ({out['finish']}):\n{out['text'][:400]}")
