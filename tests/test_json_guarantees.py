"""What can still fail after generation never reaches a client half-sent, and never as a 500.

On the real default model: exact decimal multipleOf and exact dates in generated answers,
schemas guaranteed by validation are held back until they validate (streams included), retries
are reported in usage, and a schema no answer can satisfy ends in a clear 422 after the budget.
"""

from __future__ import annotations

import json

import jsonschema
import pytest

from edge_qwen.engine.json_constraint import make_constraint
from edge_qwen.engine.json_retry import MAX_RETRIES, RetriesExhausted

pytestmark = pytest.mark.slow


def ask(llm, prompt, schema, stream=False, max_tokens=60):
    return llm.chat([{"role": "user", "content": prompt}], temperature=0, max_tokens=max_tokens, stream=stream,
                    response_format={"type": "json_object", "schema": schema})


def test_multiple_of_cents_is_answered(llm):
    s = {"type": "object", "properties": {"price": {"type": "number", "multipleOf": 0.01, "minimum": 0}},
         "required": ["price"], "additionalProperties": False}
    r = ask(llm, "A coffee costs 19.99 dollars. Give its price as JSON.", s)
    assert r["choices"][0]["finish_reason"] == "stop"
    assert json.loads(r["choices"][0]["message"]["content"])["price"] == 19.99


def test_int64_and_uint64_fields_are_answered(llm):
    # Real schemas (protobuf and Go generators) bound integers by their machine range, and list
    # uint64 values in enums: neither may turn a schema away.
    s = {"type": "object", "properties": {
        "id": {"type": "integer", "minimum": -2 ** 63, "maximum": 2 ** 63 - 1},
        "size": {"type": "integer", "minimum": 0, "maximum": 2 ** 64 - 1},
        "mask": {"enum": [2 ** 64 - 1, 0]}},
        "required": ["id", "size", "mask"], "additionalProperties": False}
    r = ask(llm, "Give a record with id 42, size 1024 and mask 0 as JSON.", s)
    assert r["choices"][0]["finish_reason"] == "stop"
    v = json.loads(r["choices"][0]["message"]["content"])
    assert isinstance(v["id"], int) and 0 <= v["size"] < 2 ** 64 and v["mask"] in (2 ** 64 - 1, 0)


def test_date_is_a_real_date(llm):
    s = {"type": "object", "properties": {"d": {"type": "string", "format": "date"}}, "required": ["d"],
         "additionalProperties": False}
    r = ask(llm, "Give the date 2023-02-29 as JSON.", s)  # no such day: the grammar rules it out
    d = json.loads(r["choices"][0]["message"]["content"])["d"]
    assert d != "2023-02-29"
    jsonschema.validate({"d": d}, s, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER)
    assert not make_constraint(llm, {"type": "json_object", "schema": s}).needs_validation  # streams as it goes


def test_validated_schema_streams_only_a_checked_answer(llm):
    s = {"type": "object", "properties": {"tags": {"type": "array", "items": {"enum": ["a", "b", "c"]},
                                                   "uniqueItems": True, "minItems": 2, "maxItems": 3}},
         "required": ["tags"], "additionalProperties": False}
    assert make_constraint(llm, {"type": "json_object", "schema": s}).needs_validation
    chunks = list(ask(llm, "Tag this post with a and b, as JSON.", s, stream=True))
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    jsonschema.validate(json.loads(text), s)
    usage = chunks[-1]["usage"]
    assert usage["json_retries"] >= 0 and usage["json_retry_tokens"] >= 0
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


def test_unsatisfiable_validation_ends_in_422_after_the_budget(llm):
    # The grammar allows short strings; `not` refuses every string: each attempt fails validation.
    s = {"type": "string", "maxLength": 4, "not": {"type": "string"}}
    with pytest.raises(RetriesExhausted) as e:
        ask(llm, "Say hi as a JSON string.", s, max_tokens=12)
    assert e.value.status == 422 and e.value.param == "response_format"
    assert f"{MAX_RETRIES + 1} attempts" in str(e.value) and "not at /not" in str(e.value)
    chunks = ask(llm, "Say hi as a JSON string.", s, stream=True, max_tokens=12)
    with pytest.raises(RetriesExhausted):
        got = [c["choices"][0]["delta"].get("content") for c in chunks]
        pytest.fail(f"content was streamed before validation: {got}")


def test_overlapping_one_of_is_accepted_and_checked(llm):
    s = {"type": "object", "properties": {"v": {"oneOf": [{"type": "integer", "minimum": 10},
                                                        {"type": "integer", "maximum": 5}]}},
         "required": ["v"], "additionalProperties": False}
    c = make_constraint(llm, {"type": "json_object", "schema": s})
    assert c.needs_validation and any("oneOf" in v for v in c.plan.validated)
    r = ask(llm, "Give v = 42 as JSON.", s)
    jsonschema.validate(json.loads(r["choices"][0]["message"]["content"]), s)
    assert "json_retries" in r["usage"]


@pytest.mark.parametrize("text, says", [
    ('{"type": "object", "properties": {', ["not valid JSON", "line 1 column", "fix the file"]),
    ("[1, 2]", ["holds a JSON array", "must hold one object"]),
    (b"\xff\xfe{}", ["not UTF-8", "save the schema as UTF-8"]),
    ('{"type": "objekt", "properties": {"a": {"minimum": "z"}}}',
     ["invalid JSON schema at /type", "invalid JSON schema at /properties/a/minimum", "Fix or remove"]),
    ('{"properties": {"a": {"$ref": "https://example.com/a.json"}}}',
     ["remote $ref 'https://example.com/a.json' at /properties/a/$ref", "inline it under $defs"]),
    ('{"x-guidance": {"lenient": true}}', ["lenient=true at /x-guidance/lenient", "allowed:"]),
])
def test_cli_schema_file_errors_name_the_file_and_the_fix(tmp_path, text, says):
    """`edge-qwen chat --schema FILE`: the file is checked before the model loads; one line, no traceback,
    naming the file (never `response_format`, which a CLI user never typed) and what to change."""
    from click.testing import CliRunner

    from edge_qwen.cli import main

    path = tmp_path / "my-schema.json"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    r = CliRunner().invoke(main, ["chat", "--schema", str(path), "-p", "hi"])
    assert r.exit_code != 0 and "Traceback" not in r.output, r.output
    assert "my-schema.json" in r.output and "response_format" not in r.output, r.output
    for fragment in says:
        assert fragment in r.output, (fragment, r.output)


def test_cli_schema_the_engine_refuses_names_the_file(tmp_path, default_model):
    """A schema only llguidance can refuse (after the model loads) still names the file and the fix."""
    from click.testing import CliRunner

    from edge_qwen.cli import main

    path = tmp_path / "contradiction.json"
    path.write_text('{"allOf": [{"type": "string"}, {"type": "integer"}]}')
    r = CliRunner().invoke(main, ["chat", str(default_model), "--schema", str(path), "-n", "5", "hi"])
    assert r.exit_code == 1 and "Traceback" not in r.output, r.output
    assert f"--schema {path}" in r.output and "response_format" not in r.output
    assert "Unsatisfiable" in r.output and "fix the keywords that contradict each other" in r.output
