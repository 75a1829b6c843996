"""JSON-constrained output on the real default model: always parses, always validates.

Schema checking and response_format parsing are tested without a model; everything else
runs greedy generations through EdgeQwen.chat (the one decode loop) on the default model.
"""

from __future__ import annotations

import json
import re

import jsonschema
import pytest

from edge_qwen.errors import ConstraintViolation, RequestError, SchemaError
from edge_qwen.engine.json_constraint import ANY_OBJECT, make_constraint, model_tables, parse_response_format
from edge_qwen.engine.json_normalize import DATE_RE, generation_order, plan_schema
from edge_qwen.engine.json_schema import check_schema, validate_output


def obj(props: dict, required: list[str] | None = None, **extra) -> dict:
    """A closed object schema (no extra keys keeps greedy answers short)."""
    return {"type": "object", "properties": props, "required": list(props) if required is None else required,
            "additionalProperties": False, **extra}


NAME = {"type": "string", "maxLength": 40}

# (id, prompt, schema): at least 20 varied schemas, each must produce parseable, valid JSON.
SCHEMAS = [
    ("person", "Describe the student Li Lei in JSON.",
     obj({"name": NAME, "age": {"type": "integer", "minimum": 0, "maximum": 120}})),
    ("nested", "Give Li Lei's student record and his school as JSON.",
     obj({"student": obj({"name": NAME, "grade": {"type": "integer", "minimum": 1, "maximum": 12}}),
          "school": obj({"name": NAME, "city": NAME})})),
    ("array_items", "List two or three students with their ages as JSON.",
     obj({"students": {"type": "array", "items": obj({"name": NAME, "age": {"type": "integer", "minimum": 5,
                                                                             "maximum": 99}}),
                       "minItems": 2, "maxItems": 3}})),
    ("enum", "Pick a T-shirt color and size for Li Lei, as JSON.",
     obj({"color": {"enum": ["red", "green", "blue"]}, "size": {"enum": ["S", "M", "L", "XL"]}})),
    ("int_bounds", "Give a date in the 2020s as JSON with year, month and day.",
     obj({"year": {"type": "integer", "minimum": 2020, "maximum": 2029},
          "month": {"type": "integer", "minimum": 1, "maximum": 12},
          "day": {"type": "integer", "minimum": 1, "maximum": 28}})),
    ("optional_required", "Describe a book as JSON: title is required, subtitle is optional.",
     obj({"title": NAME, "subtitle": NAME, "pages": {"type": "integer", "minimum": 1, "maximum": 5000}},
         required=["title"])),
    ("format_date", "When was Li Lei born? Answer as JSON with an ISO date.",
     obj({"name": NAME, "birthday": {"type": "string", "format": "date"}})),
    ("format_email", "Give Li Lei's contact email as JSON.",
     obj({"email": {"type": "string", "format": "email", "maxLength": 60}})),
    ("pattern", "Give a product code like ABC-1234 as JSON.",
     obj({"code": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{4}$"}})),
    ("ref_defs", "Give a line segment from (0, 0) to (3, 4) as JSON.",
     {"$defs": {"point": obj({"x": {"type": "number"}, "y": {"type": "number"}})},
      **obj({"start": {"$ref": "#/$defs/point"}, "end": {"$ref": "#/$defs/point"}})}),
    ("any_of", "Give Li Lei's student id as JSON (a number or a string).",
     obj({"id": {"anyOf": [{"type": "integer", "minimum": 0}, {"type": "string", "maxLength": 12}]}})),
    ("const", "Describe the student Li Lei in JSON.",
     obj({"kind": {"const": "student"}, "version": {"const": 2}, "name": NAME})),
    ("booleans", "Is Li Lei a student, and does he own a car? Answer as JSON.",
     obj({"is_student": {"type": "boolean"}, "has_car": {"type": "boolean"}})),
    ("nulls", "Li Lei has no middle name. Describe his names as JSON.",
     obj({"first_name": NAME, "middle_name": {"type": ["string", "null"], "maxLength": 20},
          "nickname": {"type": "null"}})),
    ("chinese", "用JSON描述学生李雷：姓名和城市。",
     obj({"姓名": {"type": "string", "maxLength": 10}, "城市": {"enum": ["北京", "上海", "广州"]}})),
    ("number_exclusive", "Give Li Lei's GPA on a 4-point scale as JSON.",
     obj({"gpa": {"type": "number", "exclusiveMinimum": 0, "maximum": 4}})),
    ("array_of_enums", "Tag this article about Python web servers with one to three tags, as JSON.",
     obj({"tags": {"type": "array", "items": {"enum": ["python", "web", "database", "ai", "security"]},
                   "minItems": 1, "maxItems": 3}})),
    ("root_array", "Give three to five lucky numbers between 1 and 100 as a JSON array.",
     {"type": "array", "items": {"type": "integer", "minimum": 1, "maximum": 100}, "minItems": 3, "maxItems": 5}),
    ("format_uuid", "Give a new order a UUID as JSON.",
     obj({"order_id": {"type": "string", "format": "uuid"}})),
    ("string_lengths", "Summarize what Python is in a few words, as JSON.",
     obj({"summary": {"type": "string", "minLength": 5, "maxLength": 40}})),
    ("one_of_disjoint", "Give the price of a coffee as JSON.",
     obj({"price": {"oneOf": [{"type": "number", "minimum": 0}, {"type": "string", "maxLength": 10}]}})),
    ("nested_arrays", "Give a 2x2 matrix of small integers as JSON.",
     obj({"matrix": {"type": "array", "items": {"type": "array", "items": {"type": "integer"}, "minItems": 2,
                                                  "maxItems": 2}, "minItems": 2, "maxItems": 2}})),
    ("prefix_items", "Give Li Lei's name and age as a JSON pair.",
     obj({"pair": {"type": "array", "prefixItems": [NAME, {"type": "integer", "minimum": 0, "maximum": 120}],
                   "items": False, "minItems": 2}})),
    ("multiple_of", "Round Li Lei's height in cm to a multiple of 5, as JSON.",
     obj({"height_cm": {"type": "integer", "multipleOf": 5, "minimum": 100, "maximum": 250}})),
    ("map_pattern_properties", "Give the scores of up to three students as a JSON map from name to score.",
     {"type": "object", "patternProperties": {"^[A-Za-z ]{1,20}$": {"type": "integer", "minimum": 0,
                                                                       "maximum": 100}},
      "additionalProperties": False, "maxProperties": 3}),
    ("mixed_chinese_keys", "用JSON描述一本书：书名、作者和页数。",
     obj({"书名": {"type": "string", "maxLength": 20}, "作者": {"type": "string", "maxLength": 10},
          "页数": {"type": "integer", "minimum": 1, "maximum": 2000}})),
]


def ask(llm, prompt: str, response_format: dict | None, max_tokens: int = 160, **kw):
    return llm.chat([{"role": "user", "content": prompt}], temperature=0, max_tokens=max_tokens,
                    response_format=response_format, **kw)


def content(r: dict) -> str:
    return r["choices"][0]["message"]["content"]


# ---------------------------------------------------------------- no model needed


def test_response_format_forms():
    s = obj({"a": NAME})
    assert parse_response_format(None) is None
    assert parse_response_format({"type": "text"}) is None
    assert parse_response_format({"type": "json_object"}) is ANY_OBJECT
    assert parse_response_format({"type": "json_object", "schema": s}) == s
    openai = {"type": "json_schema", "json_schema": {"name": "x", "schema": s, "strict": True}}
    assert parse_response_format(openai) == s


@pytest.mark.parametrize("bad", [
    "json", {"type": "xml"}, {"type": "json_schema"}, {"type": "json_schema", "json_schema": {"schema": {}, "x": 1}},
    {"type": "json_object", "json_schema": {}}, {"type": "json_schema", "json_schema": {"name": 3, "schema": {}}},
    {"type": "json_schema", "json_schema": {"name": "a", "schema": {}, "strict": "yes"}}, {"type": "text", "schema": {}},
])
def test_bad_response_format_is_request_error(bad):
    with pytest.raises(RequestError) as e:
        parse_response_format(bad)
    assert e.value.param == "response_format" and "response_format" in str(e.value)


@pytest.mark.parametrize("schema, named", [
    ({"type": "array", "items": {"type": "integer"}, "uniqueItems": True}, ["uniqueItems at /uniqueItems"]),
    ({"not": {"type": "string"}}, ["not at /not"]),
    (obj({"a": {"type": "integer"}}, **{"if": {"required": ["a"]}, "then": {"required": ["a"]}}), ["if", "then"]),
    ({"type": "object", "dependentRequired": {"a": ["b"]}}, ["dependentRequired"]),
    ({"type": "array", "contains": {"type": "integer"}, "minContains": 1}, ["contains", "minContains"]),
    ({"type": "object", "propertyNames": {"maxLength": 3}}, ["propertyNames"]),
    ({"type": "object", "unevaluatedProperties": False}, ["unevaluatedProperties"]),
    ({"type": "string", "format": "iri"}, ["format 'iri'"]),
    (obj({"x": {"type": "array", "items": {"type": "string", "not": {"const": ""}}, "uniqueItems": True}}),
     ["not at /properties/x/items/not", "uniqueItems at /properties/x/uniqueItems"]),
    (obj({"a": NAME, "b": NAME}, required=["a"], maxProperties=1), ["maxProperties beside optional properties"]),
    ({"type": "string", "pattern": "(?=a)b"}, ["pattern with look-around at /pattern"]),
    # int64 bounds: llguidance's range regexes overflow on them; they exclude only numbers no model writes
    (obj({"v": {"type": "integer", "minimum": -2 ** 63, "maximum": 2 ** 63 - 1}}),
     ["minimum -9223372036854775808 (beyond the grammar's number ranges) at /properties/v/minimum",
      "maximum 9223372036854775807 (beyond the grammar's number ranges) at /properties/v/maximum"]),
    ({"type": "number", "minimum": 0, "exclusiveMaximum": 1e19}, ["exclusiveMaximum 1e+19"]),
    ({"$schema": "http://json-schema.org/draft-04/schema#", "type": "integer", "minimum": -2 ** 63,
      "exclusiveMinimum": True}, ["exclusiveMinimum -9223372036854775808"]),
])
def test_keywords_the_grammar_cannot_express_are_left_to_validation(schema, named):
    plan = plan_schema(schema)
    assert not plan.exact
    listed = "; ".join(plan.validated)
    for word in named:
        assert word in listed
    grammar = json.dumps(plan.grammar)
    for key in ("uniqueItems", '"not"', "propertyNames", "dependentRequired", "contains", '"if"'):
        assert key not in grammar


@pytest.mark.parametrize("schema, dropped", [
    ({"type": "integer", "format": "int32"}, "format 'int32' on a non-string"),
    ({"type": "string", "format": "topic"}, "format 'topic' (an annotation"),
    ({"type": "array", "items": {"type": "integer"}, "additionalItems": False}, "additionalItems beside"),
    (obj({"a": NAME, "b": NAME}, required=["a"], maxProperties=2), "maxProperties implied"),
    ({"type": "array", "uniqueItems": False}, "uniqueItems"),
])
def test_no_op_keywords_are_dropped_and_stay_exact(schema, dropped):
    plan = plan_schema(schema)
    assert plan.exact and any(dropped in d for d in plan.dropped), plan.dropped


def test_required_properties_are_generated_first():
    s = {"type": "object", "required": ["c", "b"], "properties": {
        "a": {"type": "string"}, "b": {"type": "object", "properties": {"x": {}, "y": {}}, "required": ["y"]},
        "c": {"type": "integer"}, "d": {}}}
    grammar = plan_schema(s).grammar
    assert list(grammar["properties"]) == ["b", "c", "a", "d"]  # required in schema order, then optional
    assert list(grammar["properties"]["b"]["properties"]) == ["y", "x"]
    assert s["properties"].keys() == {"a", "b", "c", "d"} and list(s["properties"])[0] == "a"  # validation copy kept
    # The same value with its keys in the order the grammar writes them; unknown keys last.
    value = {"z": 0, "a": "x", "d": None, "c": 1, "b": {"x": 1, "y": 2, "w": 3}}
    ordered = generation_order(grammar, value)
    assert ordered == value and list(ordered) == ["b", "c", "a", "d", "z"] and list(ordered["b"]) == ["y", "x", "w"]


def test_generation_order_follows_refs_branches_and_patterns():
    s = {"$defs": {"pt": {"type": "object", "properties": {"x": {}, "y": {}}, "required": ["y"]}},
         "anyOf": [{"properties": {"k": {}, "s": {}}, "required": ["s"]},
                   {"properties": {"k": {}, "n": {}, "m": {"$ref": "#/$defs/pt"}}, "required": ["m"]}],
         "patternProperties": {"^p_": {"$ref": "#/$defs/pt"}}}
    grammar = plan_schema(s).grammar
    ordered = generation_order(grammar, {"p_1": {"x": 1, "y": 2}, "k": 1, "n": 2, "m": {"x": 1, "y": 2}})
    assert list(ordered) == ["m", "k", "n", "p_1"]  # the anyOf branch that lists these keys
    assert list(ordered["m"]) == ["y", "x"] and list(ordered["p_1"]) == ["y", "x"]


def test_rewrites_to_2020_12_forms():
    d4 = {"$schema": "http://json-schema.org/draft-04/schema#", "type": "number", "minimum": 0,
          "exclusiveMinimum": True}
    assert plan_schema(d4).grammar == {"type": "number", "exclusiveMinimum": 0}
    d7 = {"$schema": "http://json-schema.org/draft-07/schema#", "type": "array", "items": [{"type": "string"}],
          "additionalItems": {"type": "integer"}}
    assert plan_schema(d7).grammar == {"type": "array", "prefixItems": [{"type": "string"}], "items": {"type": "integer"}}


def test_every_blocker_is_named_in_one_message():
    s = {"type": "object", "properties": {"a": {"$ref": "https://example.com/a.json"}, "b": {"minimum": "zero"},
                                          "c": {"not": {"type": "null"}}},
         "x-guidance": {"lenient": True, "item_separator": ";"}}
    with pytest.raises(SchemaError) as e:
        check_schema(s)
    msg = str(e.value)
    for word in ("remote $ref 'https://example.com/a.json' at /properties/a/$ref", "/properties/b/minimum",
                 "lenient", "item_separator"):
        assert word in msg, msg
    assert "not at" not in msg  # `not` is not a blocker: validation guarantees it


def test_remote_refs_into_one_document_are_one_line_with_every_path():
    props = {f"p{i}": {"$ref": f"http://json-schema.org/draft-04/schema#/properties/k{i}"} for i in range(12)}
    with pytest.raises(SchemaError) as e:
        check_schema({"type": "object", "properties": props})
    msg = str(e.value)
    assert "12 remote $refs into 'http://json-schema.org/draft-04/schema'" in msg, msg
    assert all(f"/properties/p{i}/$ref" in msg for i in range(12)) and msg.count("inline them under $defs") == 1


def test_refs_into_keys_that_are_no_keywords_are_planned_too():
    # Real schemas keep subschemas under their own keys (`#/refs/...`, `#/$defs/group/item`) and
    # point $refs there: what those subschemas hold must be planned like any other.
    s = {"type": "object", "refs": {"input": {"type": "string", "not": {"enum": ["x"]}}},
         "$defs": {"group": {"type": "object", "item": {"type": "array", "items": {"type": "integer"},
                                                         "uniqueItems": True}}},
         "properties": {"a": {"$ref": "#/refs/input"}, "b": {"$ref": "#/$defs/group/item"}},
         "x-note": {"not": "an annotation nobody points at"}}
    plan = plan_schema(s)
    listed = "; ".join(plan.validated)
    assert "not at /refs/input/not" in listed and "uniqueItems at /$defs/group/item/uniqueItems" in listed
    grammar = json.dumps(plan.grammar)
    assert '"uniqueItems"' not in grammar and '"not": {' not in grammar
    assert plan.grammar["x-note"] == {"not": "an annotation nobody points at"}  # kept as it was


@pytest.mark.slow
def test_refs_into_keys_that_are_no_keywords_compile(llm):
    # llguidance follows the $ref into `refs`; a `not` left there would be "Unimplemented keys".
    s = {"type": "object", "refs": {"input": {"type": "string", "not": {"enum": ["x"]}}},
         "properties": {"a": {"$ref": "#/refs/input"}, "n": {"type": "integer", "minimum": -2 ** 63}},
         "required": ["a", "n"]}
    c = make_constraint(llm, {"type": "json_object", "schema": s})
    assert c.needs_validation


@pytest.mark.parametrize("xg, ok", [
    ({"item_separator": ", ", "key_separator": ": "}, True),
    ({"item_separator": r"\s{0,2},\s{0,2}"}, False),  # \s is Unicode whitespace: not JSON's
    ({"item_separator": "[ ]?,[ ]{0,2}", "whitespace_pattern": "[ ]?"}, True),
    ({"item_separator": ";"}, False), ({"key_separator": "="}, False), ({"item_separator": ",,"}, False),
    ({"item_separator": ",?"}, False), ({"key_separator": ":|,"}, False), ({"whitespace_pattern": " *"}, False),
    ({"whitespace_pattern": "x?"}, False), ({"whitespace_flexible": True}, False), ({"whitespace_flexible": False}, True),
])
def test_x_guidance_keeps_output_json(xg, ok):
    s = {"type": "array", "items": {"type": "integer"}, "x-guidance": xg}
    if ok:
        check_schema(s)
    else:
        with pytest.raises(SchemaError, match="x-guidance"):
            check_schema(s)


def test_multiple_of_is_exact_decimal():
    s = {"type": "number", "multipleOf": 0.01}
    assert validate_output("19.99", s) == 19.99
    assert validate_output("0.3", {"multipleOf": 0.1}) == 0.3
    with pytest.raises(ConstraintViolation, match="multiple"):
        validate_output("19.995", s)
    with pytest.raises(ConstraintViolation, match="multiple"):
        validate_output("19.990000000000000001", s)  # the same float as 19.99, but not as written


def test_date_grammar_and_check_agree():
    import datetime

    rx = re.compile(f"^{DATE_RE}$")
    fc = jsonschema.Draft202012Validator.FORMAT_CHECKER
    day = datetime.date(1, 1, 1)
    for y in (0, 1, 1900, 2000, 2023, 2024, 2100, 2400, 9999):
        for m in range(0, 14):
            for d in range(0, 33):
                text = f"{y:04d}-{m:02d}-{d:02d}"
                assert bool(rx.match(text)) == fc.conforms(text, "date"), text
    assert day.isoformat() == "0001-01-01" and rx.match("0001-01-01")
    assert plan_schema({"type": "string", "format": "date"}).grammar["pattern"] == f"^{DATE_RE}$"


@pytest.mark.parametrize("schema, fragment", [
    ({"type": "strin"}, "invalid JSON schema"),
    ({"type": "object", "properties": {"a": {"minimum": "zero"}}}, "/properties/a/minimum"),
    ({"type": "object", "required": "a"}, "invalid JSON schema"),
    ([1, 2], "must be an object"),
])
def test_invalid_schema_is_schema_error(schema, fragment):
    with pytest.raises(SchemaError) as e:
        check_schema(schema)
    assert fragment in str(e.value)


def test_keyword_names_inside_properties_are_not_keywords():
    # A property called "not" or "if" is data, not the keyword.
    s = obj({"not": {"type": "boolean"}, "if": NAME, "uniqueItems": {"type": "integer"}})
    assert check_schema(s) == s
    # uniqueItems: false constrains nothing and is accepted (dropped for the engine).
    assert "uniqueItems" not in check_schema({"type": "array", "uniqueItems": False})


def test_validate_output_raises_on_bad_output():
    s = obj({"a": {"type": "integer", "maximum": 3}})
    assert validate_output('{"a": 2}', s) == {"a": 2}
    with pytest.raises(ConstraintViolation, match="at /a"):
        validate_output('{"a": 7}', s)
    with pytest.raises(ConstraintViolation, match="not valid JSON"):
        validate_output('{"a": 2', s)
    with pytest.raises(ConstraintViolation, match="not an object"):
        validate_output("[1]", None)


# ---------------------------------------------------------------- on the real model


@pytest.mark.slow
@pytest.mark.parametrize("name, prompt, schema", SCHEMAS, ids=[s[0] for s in SCHEMAS])
def test_schema_output_parses_and_validates(llm, name, prompt, schema):
    r = ask(llm, prompt, {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}})
    text = content(r)
    assert r["choices"][0]["finish_reason"] == "stop", text
    value = json.loads(text)
    jsonschema.validate(value, schema, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER)
    # Whitespace is bounded: one space, or one newline plus at most 24 spaces, per place.
    assert not re.search(r"\s{26,}|\n\s*\n", text), text


@pytest.mark.slow
def test_json_object_mode_gives_an_object(llm):
    r = ask(llm, "List three fruits and their colors as JSON.", {"type": "json_object"}, max_tokens=200)
    assert r["choices"][0]["finish_reason"] == "stop"
    assert isinstance(json.loads(content(r)), dict)


@pytest.mark.slow
def test_llama_cpp_python_form(llm):
    s = obj({"city": NAME, "population_millions": {"type": "number", "minimum": 0}})
    r = ask(llm, "Describe Beijing as JSON.", {"type": "json_object", "schema": s})
    assert r["choices"][0]["finish_reason"] == "stop"
    jsonschema.validate(json.loads(content(r)), s)


@pytest.mark.slow
def test_text_format_is_unconstrained(llm):
    assert make_constraint(llm, {"type": "text"}) is None
    assert make_constraint(llm, None) is None


@pytest.mark.slow
def test_max_tokens_cut_is_length_not_valid_json(llm):
    s = obj({"students": {"type": "array", "items": obj({"name": NAME, "age": {"type": "integer"}}),
                          "minItems": 5, "maxItems": 5}})
    r = ask(llm, "List five students with their ages as JSON.", {"type": "json_object", "schema": s}, max_tokens=12)
    assert r["choices"][0]["finish_reason"] == "length"
    assert r["usage"]["completion_tokens"] == 12
    with pytest.raises(ValueError):
        json.loads(content(r))


@pytest.mark.slow
@pytest.mark.parametrize("response_format", [
    {"type": "json_object", "schema": {"type": "array", "items": {"$ref": "https://example.com/item.json"}}},
    {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object", "x-guidance": {"lenient": True}}}},
])
def test_chat_refuses_unsupported_schema_before_generating(llm, response_format):
    with pytest.raises(SchemaError) as e:
        ask(llm, "hi", response_format)
    assert e.value.param == "response_format"


@pytest.mark.slow
@pytest.mark.parametrize("schema, fragment, advice", [
    ({"allOf": [{"type": "string"}, {"type": "integer"}]}, "Unsatisfiable", "fix the keywords that contradict"),
    ({"type": "object", "patternProperties": {"^a": {"type": "integer"}, "^ab": {"type": "string"}}}, "disjoint",
     "make the patternProperties patterns disjoint"),
    # a huge bound on the restrictive side stays in the grammar, which cannot build its range
    ({"type": "integer", "minimum": 2 ** 60}, "integer range", "keep numeric bounds"),
])
def test_engine_errors_become_schema_errors(llm, schema, fragment, advice):
    # These pass jsonschema's metaschema; llguidance itself refuses them: the message says what failed
    # and what to change.
    with pytest.raises(SchemaError) as e:
        make_constraint(llm, {"type": "json_object", "schema": schema})
    assert fragment in str(e.value) and advice in str(e.value)


@pytest.mark.slow
def test_chinese_stream_never_breaks_a_character(llm):
    s = obj({"姓名": {"type": "string", "maxLength": 10}, "简介": {"type": "string", "maxLength": 30}})
    chunks = list(llm.chat([{"role": "user", "content": "用JSON介绍学生李雷，包括姓名和一句中文简介。"}],
                           temperature=0, max_tokens=120, stream=True,
                           response_format={"type": "json_object", "schema": s}))
    pieces = [c["choices"][0]["delta"].get("content", "") for c in chunks]
    assert all("\ufffd" not in p for p in pieces)
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    value = json.loads("".join(pieces))
    jsonschema.validate(value, s)
    assert re.search(r"[\u4e00-\u9fff]", value["姓名"] + value["简介"])


@pytest.mark.slow
def test_fixed_keys_are_forced_and_masked(llm):
    """Replaying a known answer: the schema's keys come back from commit(), and the mask forbids the rest."""
    import numpy as np

    s = obj({"student_name": NAME, "student_age": {"type": "integer"}})
    c = make_constraint(llm, {"type": "json_object", "schema": s})
    answer = llm.tokenize('{"student_name": "Li Lei", "student_age": 20}', special=False)
    forced_text, i, masked = "", 0, []
    while i < len(answer):
        logits = np.zeros(llm.llama.n_vocab(), dtype=np.float32)
        c.mask_logits(logits)
        assert np.isfinite(logits[answer[i]])  # the real answer is always allowed
        masked.append(int(np.isinf(logits).sum()))
        forced = c.commit(answer[i])
        i += 1
        assert answer[i:i + len(forced)] == forced  # forced tokens follow the model's own tokenization
        forced_text += llm.detokenize(forced)
        i += len(forced)
    assert c.is_finished()
    assert masked[0] > 151_000  # the answer must open with "{": almost every token is masked
    assert min(masked) < 10_000  # inside a free string almost every token is allowed
    assert "student_name" in forced_text and "student_age" in forced_text
    assert c.forced_tokens >= 4 and c.finalize(llm.detokenize(answer), "stop") == {"student_name": "Li Lei",
                                                                                    "student_age": 20}


@pytest.mark.slow
def test_tokenizer_tables_cached_per_model(llm):
    assert model_tables(llm) is model_tables(llm)
    rf = {"type": "json_object", "schema": obj({"a": NAME})}
    a, b = make_constraint(llm, rf), make_constraint(llm, rf)
    assert a is not b and a._matcher is not b._matcher  # each request gets its own matcher state
