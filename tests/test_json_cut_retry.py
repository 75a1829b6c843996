"""A JSON answer cut at max_tokens is retried once under a stricter variant of its schema.

The variant (json_normalize.strict_variant) only adds keywords, so whatever it accepts the
schema as sent accepts too; it stays satisfiable where an allOf combines objects. Also here:
the exact rewrites that let llguidance compile schemas it refused for "circular references
with sibling keys" (a single-branch allOf merged, a type implied by every anyOf branch, a
property implied by the patternProperties its name matches).
"""

from __future__ import annotations

import json

import jsonschema
import pytest

from edge_qwen.engine.json_normalize import (CUT_RETRY_MAX_ITEMS, CUT_RETRY_MAX_LENGTH, plan_schema,
                                             close_open_objects, strict_variant)


def _compiles(grammar: dict) -> str:
    from llguidance import LLMatcher

    g = LLMatcher.grammar_from_json_schema(grammar, defaults={"whitespace_pattern": "[ ]?"})
    return LLMatcher.validate_grammar(g) or "ok"


def test_strict_variant_closes_open_objects_and_bounds_strings_and_arrays():
    s = {"type": "object", "properties": {
        "name": {"type": "string"}, "tags": {"type": "array", "items": {"type": "string", "pattern": "^[a-z]+$"}},
        "meta": {"type": "object", "properties": {"k": {"type": "integer"}}},
        "map": {"type": "object", "additionalProperties": {"type": "string", "minLength": 200}},
        "code": {"type": "string", "enum": ["a", "b"]}}, "required": ["name"]}
    g, changes = strict_variant(plan_schema(s).grammar)
    assert g["additionalProperties"] is False and g["properties"]["meta"]["additionalProperties"] is False
    assert "additionalProperties" in g["properties"]["map"] and g["properties"]["map"]["additionalProperties"] != False
    assert g["properties"]["name"]["maxLength"] == CUT_RETRY_MAX_LENGTH
    assert g["properties"]["tags"]["maxItems"] == CUT_RETRY_MAX_ITEMS
    assert "maxLength" not in g["properties"]["tags"]["items"]  # a pattern decides its length
    assert "maxLength" not in g["properties"]["map"]["additionalProperties"]  # minLength 200 > the bound
    assert "maxLength" not in g["properties"]["code"]
    assert changes == ["2 open objects closed", "1 strings bounded", "1 arrays bounded"]
    # Only keywords are added: a value of the variant is a value of the schema.
    for value in ({"name": "x"}, {"name": "x", "tags": ["a"], "meta": {"k": 1}, "map": {"q": "z" * 200}}):
        jsonschema.validate(value, g)
        jsonschema.validate(value, s)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"name": "x", "type": "object"}, g)  # the schema-copying extra key
    assert _compiles(g) == "ok"


def test_strict_variant_leaves_what_allof_combines_open():
    s = {"$defs": {"base": {"type": "object", "properties": {"id": {"type": "integer"}}}},
         "allOf": [{"$ref": "#/$defs/base"}, {"type": "object", "properties": {"name": {"type": "string"}}},
                   {"required": ["id", "name"]}]}
    g, _ = strict_variant(plan_schema(s).grammar)
    assert "additionalProperties" not in g["$defs"]["base"]
    assert all("additionalProperties" not in b for b in g["allOf"])
    jsonschema.validate({"id": 1, "name": "a"}, g)  # still satisfiable
    # required names a key outside properties: closing it would leave no value
    g2, _ = strict_variant({"type": "object", "properties": {"a": {}}, "required": ["b"]})
    assert "additionalProperties" not in g2


def test_strict_variant_narrows_nothing_under_not_and_closes_what_allof_members_hold():
    # under `not`, a bound would widen what the schema accepts; values inside enum/default are data
    s = {"type": "object", "properties": {"code": {"type": "string", "not": {"type": "string", "pattern": "^x"}},
                                           "kind": {"enum": [{"type": "string"}]}},
         "allOf": [{"properties": {"inner": {"type": "object", "properties": {"k": {"type": "string"}}}}}]}
    g, _ = strict_variant(s)
    assert g["properties"]["code"]["not"] == s["properties"]["code"]["not"]
    assert g["properties"]["kind"]["enum"] == [{"type": "string"}]
    assert "additionalProperties" not in g and "additionalProperties" not in g["allOf"][0]  # combined: open
    assert g["allOf"][0]["properties"]["inner"]["additionalProperties"] is False  # a value of its own: closed
    # a schema that refers to itself as a whole ($ref "#") beside other keys stays open at the root
    rec = {"type": "object", "properties": {"child": {"$ref": "#", "description": "x"}, "n": {"type": "integer"}}}
    assert close_open_objects(rec)["additionalProperties"] is False  # a $ref with annotations only
    rec2 = {"type": "object", "properties": {"child": {"$ref": "#", "required": ["n"]}, "n": {"type": "integer"}}}
    assert "additionalProperties" not in close_open_objects(rec2)


def test_single_branch_allof_is_merged_exactly():
    s = {"type": "object", "allOf": [{"properties": {"a": {"type": "integer"}}, "required": ["a"]}]}
    g = plan_schema(s).grammar
    assert "allOf" not in g and g["required"] == ["a"] and g["type"] == "object"
    # keywords that read each other stay apart: additionalProperties here, properties in the branch
    s2 = {"additionalProperties": False, "allOf": [{"properties": {"a": {}}}]}
    assert plan_schema(s2).grammar["allOf"] == [{"properties": {"a": {}}}]
    for value, ok in (({"a": 1}, True), ({}, False), ({"a": "x"}, False)):
        assert jsonschema.Draft202012Validator(g).is_valid(value) is ok is jsonschema.Draft202012Validator(s).is_valid(value)


def test_circular_refs_beside_patterns_compile():
    """Washington Post's ANS schemas: credits (properties `by` = the `^[a-z]*` pattern's schema) refer
    back to the author; related content's `redirect` also matches `.*`. llguidance refused both."""
    item = {"type": "array", "items": {"anyOf": [{"$ref": "#/definitions/author"}, {"type": "null"}]}}
    s = {"$schema": "http://json-schema.org/draft-04/schema#", "type": "object",
         "allOf": [{"properties": {"body": {"$ref": "#/definitions/author"}}}],
         "definitions": {
             "author": {"type": "object", "properties": {"credits": {"$ref": "#/definitions/credits"},
                                                         "related": {"$ref": "#/definitions/related"}}},
             "credits": {"type": "object", "patternProperties": {"^[a-z]*": item},
                         "properties": {"by": {**item, "title": "By"}}},
             "related": {"type": "object", "patternProperties": {".*": item},
                         "properties": {"redirect": {"type": "array", "maxItems": 1,
                                                    "items": {"$ref": "#/definitions/author"}}}}}}
    plain = plan_schema(s)
    assert "circular references with sibling keys" in _compiles(plain.grammar)
    assert any("'by', the same as patternProperties" in d for d in plain.dropped)
    relaxed = plan_schema(s, relax_circular=True)
    assert _compiles(relaxed.grammar) == "ok"
    assert any("property 'redirect' beside patternProperties '.*'" in v for v in relaxed.validated)
    assert not relaxed.exact  # the grammar is a superset there: validation checks the rest


@pytest.mark.slow
def test_cut_answer_is_retried_under_the_strict_variant(llm):
    """Non-streamed: an answer cut at max_tokens gets one retry under the variant (compact, closed,
    bounded); usage says so. Streamed: never held back for this, never retried."""
    s = {"type": "object", "properties": {"city": {"type": "string"}, "country": {"type": "string"}},
         "required": ["city"]}
    msgs = [{"role": "user", "content": "Describe Paris as JSON with many details: " + json.dumps(s)}]
    kw = dict(temperature=0, max_tokens=10, response_format={"type": "json_object", "schema": s})
    r = llm.chat(msgs, **kw)
    u = r["usage"]
    assert u["json_cut_retries"] == 1 and u["json_retries"] == 1 and u["json_retry_tokens"] > 0
    content, finish = r["choices"][0]["message"]["content"], r["choices"][0]["finish_reason"]
    if finish == "stop":  # the retry finished: valid against the schema as sent, compact
        jsonschema.validate(json.loads(content), s)
        assert ", " not in content and ": " not in content.replace('": "', '":"')
    else:  # cut again: the first answer stands, as it was
        assert finish == "length" and u["completion_tokens"] == 10
    chunks = list(llm.chat(msgs, stream=True, **kw))
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert "json_cut_retries" not in chunks[-1]["usage"]
