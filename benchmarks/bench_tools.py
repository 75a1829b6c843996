"""Tool calls on 30 varied schemas: does every returned call parse and validate, in every mode?

    python benchmarks/bench_tools.py [--max-tokens 160] [--out benchmarks/results/tools.json]

For each case of tests/tool_cases.py, on the default model at temperature 0:
- "free": the tools in the prompt and nothing constrained (what parsing alone would get): how
  the model starts a call (<tool_call>, bare `{"name"`, a ```json fence, or no call) and how
  many of its calls parse and validate;
- "auto", "required", "named" (tool_choice naming the expected function): through EdgeQwen.chat,
  the calls we return, each re-checked here with jsonschema.
Prints one table; every constrained mode must show 0 invalid calls.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def start_kind(text: str) -> str:
    s = text.lstrip()
    if s.startswith("<tool_call>"):
        return "tag"
    if s.startswith("{"):
        return "bare"
    if s.startswith("```") and "{" in s[:20]:
        return "fenced"
    if "<tool_call>" in s:
        return "text+tag"
    return "none"


def check(call: dict, tools: list[dict]) -> bool:
    import jsonschema

    schemas = {t["function"]["name"]: t["function"].get("parameters", {"type": "object"}) for t in tools}
    name = call["function"]["name"]
    if name not in schemas:
        return False
    try:
        args = json.loads(call["function"]["arguments"])
        jsonschema.validate(args, schemas[name], format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER)
    except (ValueError, jsonschema.ValidationError):
        return False
    return True


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--max-tokens", type=int, default=160)
    ap.add_argument("--limit", type=int, default=30, help="run only the first N cases")
    ap.add_argument("--out", type=Path, default=None, help="write the per-case results as JSON here")
    args = ap.parse_args()

    from tool_cases import CASES

    from edge_qwen import EdgeQwen
    from edge_qwen.engine.tool_calls import parse_reply, parse_tools

    llm = EdgeQwen(None, n_ctx=4096)
    rows, t0 = [], time.perf_counter()
    totals = {m: {"cases": 0, "with_call": 0, "calls": 0, "invalid": 0, "right_name": 0}
              for m in ("free", "auto", "required", "named")}
    kinds: dict[str, int] = {}
    for i, (tools, prompt, target) in enumerate(CASES[:args.limit]):
        msgs = [{"role": "user", "content": prompt}]
        row = {"case": i, "target": target, "n_tools": len(tools)}
        free = parse_tools(tools)
        free.constrain = False
        text = "".join(c.text for c in llm.generate(msgs, tools=free, temperature=0, max_tokens=args.max_tokens))
        kind = start_kind(text)
        kinds[kind] = kinds.get(kind, 0) + 1
        # What parsing alone (no constraint) would hand back: calls found by the same parser.
        _, found = parse_reply(text, parse_tools(tools))
        raw_calls = _raw_calls(text)
        row["free"] = {"start": kind, "calls_found": len(raw_calls), "valid": len(found), "text": text[:300]}
        t = totals["free"]
        t["cases"] += 1
        t["with_call"] += bool(raw_calls)
        t["calls"] += len(raw_calls)
        t["invalid"] += len(raw_calls) - len(found)
        t["right_name"] += any(c.name == target for c in found)
        for mode, choice in (("auto", "auto"), ("required", "required"),
                             ("named", {"type": "function", "function": {"name": target}})):
            r = llm.chat(msgs, tools=tools, tool_choice=choice, temperature=0, max_tokens=args.max_tokens)
            calls = r["choices"][0]["message"].get("tool_calls") or []
            bad = [c for c in calls if not check(c, tools)]
            t = totals[mode]
            t["cases"] += 1
            t["with_call"] += bool(calls)
            t["calls"] += len(calls)
            t["invalid"] += len(bad)
            t["right_name"] += any(c["function"]["name"] == target for c in calls)
            row[mode] = {"calls": calls, "invalid": len(bad), "finish": r["choices"][0]["finish_reason"],
                         "content": r["choices"][0]["message"].get("content")}
        rows.append(row)
        print(f"case {i:2d} {target:18s} free={kind:8s} "
              + " ".join(f"{m}={len(row[m]['calls'])}/{row[m]['invalid']}bad" for m in ("auto", "required", "named")),
              file=sys.stderr, flush=True)
    llm.close()
    elapsed = time.perf_counter() - t0
    print(f"\n{len(rows)} cases, default model, temperature 0, max_tokens {args.max_tokens}, {elapsed:.0f} s "
          "(machine shared with other work)\n")
    print("| mode | replies with a call | calls | invalid calls | expected function called |")
    print("| --- | --- | --- | --- | --- |")
    for mode, t in totals.items():
        label = {"free": "no constraint (parse only)", "auto": "auto", "required": "required",
                 "named": "named function"}[mode]
        print(f"| {label} | {t['with_call']}/{t['cases']} | {t['calls']} | {t['invalid']} | "
              f"{t['right_name']}/{t['cases']} |")
    print("\nHow the unconstrained model starts its reply: "
          + ", ".join(f"{k} {v}" for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.out.with_suffix(".tmp")
        tmp.write_text(json.dumps({"totals": totals, "starts": kinds, "rows": rows}, ensure_ascii=False, indent=1))
        tmp.replace(args.out)
    if any(totals[m]["invalid"] for m in ("auto", "required", "named")):
        sys.exit(1)


def _raw_calls(text: str) -> list[str]:
    """Every span that looks like a call object (`{"name"` ... balanced) in free text."""
    out, i = [], 0
    while True:
        j = text.find('"name"', i)
        if j < 0:
            return out
        k = text.rfind("{", 0, j)
        if k < 0:
            i = j + 6
            continue
        depth, end = 0, -1
        for p in range(k, len(text)):
            if text[p] == "{":
                depth += 1
            elif text[p] == "}":
                depth -= 1
                if depth == 0:
                    end = p + 1
                    break
        out.append(text[k:end] if end > 0 else text[k:])
        i = end if end > 0 else len(text)


if __name__ == "__main__":
    main()
