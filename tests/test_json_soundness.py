"""The grammar is sound: valid answers get through token by token, invalid ones never do.

JSONSchemaBench's maskbench (valid and invalid instances per real-world schema) is not on PyPI,
and CI reaches PyPI only, so this test builds its own cases the same way: a few hundred schemas
drawn (seeded) from the features real schemas use most (closed and open objects, required
subsets, nested objects and arrays, enums and consts, string lengths, patterns and formats,
integer and decimal bounds and multipleOf, anyOf, oneOf, $defs/$ref, and the keywords only
validation guarantees: not, uniqueItems, if/then, dependentRequired), each with valid instances
built from the schema and invalid ones made by mutating them; jsonschema labels every instance.
Valid instances also come from hypothesis-jsonschema (derandomized). On a local copy of the
real maskbench, `python benchmarks/bench_jsonschemabench.py --data DIR maskbench` runs the same check.

Every valid instance must be accepted by our constraint (the real model's tokens, one at a time,
then the final validation); every invalid one must be refused by the grammar or the validation.
Schemas whose plan is grammar-exact (they stream unvalidated) must refuse invalid instances in the
grammar itself.
"""

from __future__ import annotations

import copy
import json
import random
import string

import pytest

from edge_qwen.engine.json_constraint import make_constraint, replay
from edge_qwen.engine.json_schema import first_error

N_SCHEMAS = 300
FORMATS = {"date": ["2024-02-29", "1999-12-31"], "date-time": ["2023-06-01T12:30:00Z", "2000-01-01T00:00:00.5+05:30"],
           "time": ["23:59:59Z", "08:00:00-07:00"], "email": ["li.lei@example.com"], "ipv4": ["192.168.0.1"],
           "ipv6": ["2001:db8::1"], "uuid": ["123e4567-e89b-12d3-a456-426614174000"],
           "hostname": ["api.example.com", "localhost"], "uri": ["https://example.com/a?b=c#d"]}
BAD_FORMATS = {"date": "2023-02-29", "date-time": "2023-06-01T24:00:00Z", "time": "23:59:60Z", "email": "nobody",
               "ipv4": "256.1.1.1", "ipv6": "2001:db8:::1", "uuid": "123e4567e89b12d3a456426614174000",
               "hostname": "-bad-.example", "uri": "no scheme here"}
WORDS = ["alpha", "beta", "gamma", "李雷", "delta", "omega", "name", "city", "price", "tags", "id", "kind"]


class Gen:
    """Seeded random schemas with one valid instance each (built alongside the schema)."""

    def __init__(self, seed: int):
        self.r = random.Random(seed)

    def string(self) -> tuple[dict, str]:
        r = self.r
        kind = r.choice(["plain", "plain", "enum", "format", "pattern", "const"])
        if kind == "enum":
            vals = r.sample(WORDS, 3)
            return {"enum": vals}, r.choice(vals)
        if kind == "const":
            return {"const": "v1"}, "v1"
        if kind == "format":
            fmt = r.choice(sorted(FORMATS))
            return {"type": "string", "format": fmt}, r.choice(FORMATS[fmt])
        if kind == "pattern":
            return {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{2,4}$"}, "ABC-123"
        lo, hi = r.choice([(0, 20), (1, 8), (3, 40)])
        value = "".join(r.choice(string.ascii_letters + " 中文") for _ in range(r.randint(lo, min(hi, 10))))
        return {"type": "string", "minLength": lo, "maxLength": hi}, value

    def number(self) -> tuple[dict, object]:
        r = self.r
        if r.random() < 0.5:
            lo = r.randint(-10, 10)
            s = {"type": "integer", "minimum": lo, "maximum": lo + r.randint(1, 1000)}
            if r.random() < 0.3:
                s["multipleOf"] = 5
                return s, (lo // 5 + 1) * 5
            return s, lo + 1
        step = r.choice([0.01, 0.5, 0.25])
        s = {"type": "number", "minimum": 0, "exclusiveMaximum": 1000, "multipleOf": step}
        return s, {0.01: 19.99, 0.5: 2.5, 0.25: 0.75}[step]

    def value(self, depth: int) -> tuple[dict, object]:
        r = self.r
        kind = r.choice(["string", "number", "boolean", "null", "string", "number"]
                        + (["object", "array", "anyOf", "oneOf"] if depth < 3 else []))
        if kind == "string":
            return self.string()
        if kind == "number":
            return self.number()
        if kind == "boolean":
            return {"type": "boolean"}, r.random() < 0.5
        if kind == "null":
            return {"type": ["string", "null"]}, None
        if kind == "object":
            return self.obj(depth + 1)
        if kind == "array":
            item, v = self.value(depth + 1)
            s = {"type": "array", "items": item, "minItems": 1, "maxItems": 4}
            if r.random() < 0.2 and isinstance(v, (int, str)) and not isinstance(v, bool):
                s["uniqueItems"] = True  # left to validation
                return s, [v]
            return s, [v, v] if r.random() < 0.5 else [v]
        a, va = self.string()
        b, vb = self.number()
        return {kind: [a, b]}, r.choice([va, vb])  # oneOf of a string and a number: disjoint

    def obj(self, depth: int = 0) -> tuple[dict, dict]:
        r = self.r
        names = r.sample(WORDS, r.randint(1, 5))
        props, value = {}, {}
        for n in names:
            props[n], value[n] = self.value(depth)
        required = [n for n in names if r.random() < 0.7]
        for n in names:
            if n not in required and r.random() < 0.5:
                del value[n]
        s = {"type": "object", "properties": props, "required": required}
        if r.random() < 0.6:
            s["additionalProperties"] = False
        extra = r.random()
        if extra < 0.08 and names[0] in value and props[names[0]].get("type") == "boolean":
            s["not"] = {"required": ["__never__"]}  # validation only
        elif extra < 0.16 and len(names) > 1 and names[1] in required:
            s["dependentRequired"] = {names[0]: [names[1]]}
        return s, value

    def case(self) -> tuple[dict, object]:
        if self.r.random() < 0.15:  # shared definitions reached through $ref
            item, v = self.obj(1)
            return {"$defs": {"item": item}, "type": "object", "properties": {"items": {
                "type": "array", "items": {"$ref": "#/$defs/item"}, "maxItems": 3}}, "required": ["items"]}, {"items": [v]}
        return self.obj()


def mutations(schema: dict, value: object, r: random.Random) -> list[object]:
    """Instances near `value` that a schema usually rejects (jsonschema decides)."""
    out: list[object] = [None, "text", 12345678901234567890, [value], {}]
    if isinstance(value, dict):
        for k in list(value)[:3]:
            v = copy.deepcopy(value)
            del v[k]
            out.append(v)
            w = copy.deepcopy(value)
            w[k] = {"wrong": True} if not isinstance(value[k], dict) else 7
            out.append(w)
        out.append({**value, "unexpected_key": 1})
        for k, sub in schema.get("properties", {}).items():
            if sub.get("format") in BAD_FORMATS:
                out.append({**value, k: BAD_FORMATS[sub["format"]]})
            if sub.get("type") == "number":
                out.append({**value, k: 19.995})
            if sub.get("type") == "integer":
                out.append({**value, k: sub["maximum"] + 1})
            if sub.get("type") == "array" and sub.get("uniqueItems") and value.get(k):
                out.append({**value, k: value[k] * 2})
    return out


def cases(n: int = N_SCHEMAS, seed: int = 11):
    gen = Gen(seed)
    for _ in range(n):
        schema, valid = gen.case()
        if first_error(valid, schema) is not None:
            continue  # the generator's instance is not valid after all (e.g. an enum repeat): skip it
        invalid = [m for m in mutations(schema, valid, gen.r) if first_error(m, schema) is not None]
        yield schema, valid, invalid


@pytest.mark.slow
def test_generated_schemas_are_sound(llm):
    bad, counts = [], {"valid": 0, "invalid": 0, "grammar": 0, "validation": 0, "exact": 0}
    for schema, valid, invalid in cases():
        exact = not make_constraint(llm, {"type": "json_object", "schema": schema}).needs_validation
        counts["exact"] += exact
        verdict = replay(llm, schema, valid)
        counts["valid"] += 1
        if verdict != "accepted":
            bad.append(("valid refused", verdict, schema, valid))
        for inst in invalid:
            verdict = replay(llm, schema, inst)
            counts["invalid"] += 1
            counts[verdict if verdict != "accepted" else "grammar"] += verdict != "accepted"
            if verdict == "accepted" or (exact and verdict != "grammar"):
                bad.append(("invalid let through" if verdict == "accepted" else "exact grammar relied on validation",
                            verdict, schema, inst))
    assert counts["valid"] >= 250 and counts["invalid"] >= 1000, counts
    assert 0 < counts["exact"] < counts["valid"], counts  # both kinds of plan are exercised
    assert not bad, f"{len(bad)} unsound verdicts of {counts}, e.g. " + json.dumps(bad[:3], ensure_ascii=False)[:1500]


@pytest.mark.slow
def test_hypothesis_instances_are_accepted(llm):
    """Valid instances hypothesis-jsonschema finds (odd strings, big numbers, edge dates) pass the grammar."""
    from hypothesis import HealthCheck, assume, given, settings, strategies as st
    from hypothesis_jsonschema import from_schema

    schemas = [
        {"type": "object", "properties": {"d": {"type": "string", "format": "date"},
                                          "s": {"type": "string", "maxLength": 12},
                                          "t": {"type": "string", "format": "date-time"}},
         "required": ["d", "s", "t"], "additionalProperties": False},
        {"type": "array", "items": {"type": "integer", "minimum": -1000, "maximum": 10 ** 12}, "maxItems": 5},
        {"type": "object", "properties": {"price": {"type": "number", "multipleOf": 0.01, "minimum": 0,
                                                    "maximum": 10 ** 6}},
         "required": ["price"], "additionalProperties": False},
        {"type": "array", "items": {"enum": ["a", "b", "c", 1, None]}, "uniqueItems": True},
        {"type": "object", "properties": {"id": {"type": "string", "format": "uuid"},
                                          "ip": {"type": "string", "format": "ipv4"}},
         "required": ["id", "ip"], "additionalProperties": False},
    ]

    @settings(max_examples=150, derandomize=True, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(st.data())
    def check(data):
        i = data.draw(st.integers(0, len(schemas) - 1))
        # Properties are generated in schema order (docs/json.md); these schemas list them sorted.
        value = json.loads(json.dumps(data.draw(from_schema(schemas[i])), sort_keys=True))
        # hypothesis-jsonschema does not know every format (it draws any string for uuid): jsonschema labels.
        assume(first_error(value, schemas[i]) is None)
        assert replay(llm, schemas[i], value) == "accepted", (schemas[i], value)

    check()
