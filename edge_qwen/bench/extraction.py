"""Structured-extraction tasks with known answers: does a quantized model still get facts right?

The tasks ship in edge_qwen/data/extraction_tasks.json (English and Chinese, each with a JSON
schema and the expected values). A model answers each under the schema constraint at
temperature 0; an answer is *valid* when it parses and matches the schema, *correct* when
every expected field matches.
"""

from __future__ import annotations

import json
import re
from importlib import resources
from typing import Any

from ..errors import EdgeQwenError

_TRAILING = re.compile(r"[\s.,;:!?。，；：！？]+$")


def load_tasks(limit: int | None = None) -> dict[str, Any]:
    """The shipped task set: {"system": str, "tasks": [...]}, optionally only the first `limit` tasks."""
    raw = resources.files("edge_qwen").joinpath("data/extraction_tasks.json").read_text(encoding="utf-8")
    data = json.loads(raw)
    if limit is not None:
        if limit < 1:
            raise EdgeQwenError(f"the number of extraction tasks must be at least 1, got {limit}")
        data["tasks"] = data["tasks"][:limit]
    return data


def _norm(value: Any) -> Any:
    if isinstance(value, str):
        return _TRAILING.sub("", value.strip()).casefold()
    return value


def value_matches(expected: Any, got: Any) -> bool:
    """Whether one extracted value equals the expected one (lenient on case and final punctuation)."""
    if isinstance(expected, bool) or isinstance(got, bool):
        return expected is got
    if isinstance(expected, (int, float)):
        return isinstance(got, (int, float)) and abs(float(got) - float(expected)) < 1e-9
    if isinstance(expected, list):
        return isinstance(got, list) and sorted(map(str, map(_norm, expected))) == sorted(map(str, map(_norm, got)))
    return isinstance(got, str) and _norm(expected) == _norm(got)


def score_answer(text: str, schema: dict, expected: dict) -> tuple[bool, bool]:
    """(valid, correct) for one model answer."""
    import jsonschema

    try:
        obj = json.loads(text)
        jsonschema.validate(obj, schema)
    except (ValueError, jsonschema.ValidationError):
        return False, False
    return True, all(value_matches(v, obj.get(k)) for k, v in expected.items())


def run_tasks(llm: Any, limit: int | None = None, max_tokens: int = 160) -> dict[str, Any]:
    """Answer the shipped tasks with an EdgeQwen model; return rates and per-task answers."""
    data = load_tasks(limit)
    answers = []
    for task in data["tasks"]:
        messages = [{"role": "system", "content": data["system"]}, {"role": "user", "content": task["prompt"]}]
        fmt = {"type": "json_schema", "json_schema": {"name": task["id"].replace("-", "_"), "schema": task["schema"]}}
        try:
            reply = llm.chat(messages, temperature=0, max_tokens=max_tokens, response_format=fmt)
            text = reply["choices"][0]["message"]["content"]
        except EdgeQwenError as e:  # an answer cut off by max_tokens, or rejected by validation
            text = f"<error: {e.message}>"
        valid, correct = score_answer(text, task["schema"], task["expected"])
        answers.append({"id": task["id"], "valid": valid, "correct": correct, "answer": text})
    n = len(answers)
    return {
        "json_valid": sum(a["valid"] for a in answers) / n,
        "task_accuracy": sum(a["correct"] for a in answers) / n,
        "n_tasks": n,
        "answers": answers,
    }
