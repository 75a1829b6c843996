"""Qwen3.5 / Qwen3-Coder's XML tool calls, read into OpenAI's JSON arguments.

Those models are trained (their chat templates say so) to call a function as

    <tool_call>
    <function=get_weather>
    <parameter=city>
    Paris
    </parameter>
    </function>
    </tool_call>

Each parameter's value is raw text on its own lines: a string parameter keeps it as it is
(quotes, newlines and all), any other type is read as JSON (numbers, booleans, objects,
arrays), falling back to the text when it is not JSON, as vLLM's qwen3_coder parser does. The
tool's schema then validates the assembled arguments (ToolCallParser), so a call that does not
validate is never returned.
"""

from __future__ import annotations

import json
from typing import Any

PARAM_OPEN, PARAM_CLOSE, FUNCTION_CLOSE = "<parameter=", "</parameter>", "</function>"
MAX_VALUE_CHARS = 1 << 20


def xml_value(schema: Any, key: str, raw: str) -> Any:
    """The JSON value of parameter `key` written as `raw` text, by the tool's parameters `schema`."""
    prop = schema.get("properties", {}).get(key, {}) if isinstance(schema, dict) else {}
    kinds = prop.get("type") if isinstance(prop, dict) else None
    kinds = [kinds] if isinstance(kinds, str) else kinds if isinstance(kinds, list) else []
    if kinds and all(k == "string" for k in kinds):
        return raw
    try:
        return json.loads(raw)
    except ValueError:
        return raw


class XmlCall:
    """One call being read after its `<function=NAME>`: feed it text as it streams.

    `feed` returns (JSON pieces of the arguments completed by this text, text it could not use
    yet, state): "more" (waiting for text), "done" (`</function>` read; the rest follows it) or
    "bad" (something that is not a parameter: not a call after all).
    """

    def __init__(self, schema: Any):
        self.schema = schema
        self.n = 0

    def feed(self, text: str) -> tuple[list[str], str, str]:
        pieces: list[str] = []
        while True:
            s = text.lstrip()
            if s.startswith(PARAM_OPEN):
                head = s.find(">")
                end = s.find(PARAM_CLOSE, head + 1) if head >= 0 else -1
                if end < 0:
                    return pieces, text, "bad" if len(s) > MAX_VALUE_CHARS else "more"
                key = s[len(PARAM_OPEN):head].strip()
                raw = s[head + 1:end]
                raw = raw[1:] if raw.startswith("\n") else raw  # the value sits on lines of its own
                raw = raw[:-1] if raw.endswith("\n") else raw
                value = xml_value(self.schema, key, raw)
                pieces.append(("{" if self.n == 0 else ", ") + json.dumps(key, ensure_ascii=False) + ": "
                              + json.dumps(value, ensure_ascii=False))
                self.n += 1
                text = s[end + len(PARAM_CLOSE):]
                continue
            if s.startswith(FUNCTION_CLOSE):
                pieces.append("{}" if self.n == 0 else "}")
                return pieces, s[len(FUNCTION_CLOSE):], "done"
            if s and not PARAM_OPEN.startswith(s) and not FUNCTION_CLOSE.startswith(s):
                return pieces, "", "bad"
            return pieces, text, "more"


def _lit(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)


def xml_call_grammar(names: list[str], schemas: dict[str, Any]) -> str:
    """The Lark grammar (llguidance's syntax) of one XML call after `<tool_call>` and its newline,
    through `</function>`: one of the offered functions, its required parameters in schema order,
    then its optional ones, each at most once. A string parameter is one line of text without
    `<` (enum strings: one of them); any other parameter is a JSON value of its schema (%json)."""
    lines = ["start: " + " | ".join(f"f{i}" for i in range(len(names)))]
    for i, name in enumerate(names):
        schema = schemas[name] if isinstance(schemas[name], dict) else {}
        props = schema.get("properties") or {}
        required = set(schema.get("required") or [])
        order = [k for k in props if k in required] + [k for k in props if k not in required]
        body = []
        for j, key in enumerate(order):
            rule = f"p{i}_{j}"
            body.append(rule if key in required else rule + "?")
            lines.append(f"{rule}: {_lit(PARAM_OPEN + key + '>' + chr(10))} v{i}_{j} {_lit(chr(10) + PARAM_CLOSE + chr(10))}")
            prop = props[key] if isinstance(props[key], dict) else {}
            enum = prop.get("enum")
            if prop.get("type") == "string" and isinstance(enum, list) and enum and all(isinstance(e, str) for e in enum):
                lines.append(f"v{i}_{j}: " + " | ".join(_lit(e) for e in enum))
            elif prop.get("type") == "string":
                lines.append(f"v{i}_{j}: /[^<\\n]*/")
            else:
                lines.append(f"v{i}_{j}: %json " + json.dumps(prop or {}, ensure_ascii=False))
        lines.append(f"f{i}: {_lit('<function=' + name + '>' + chr(10))} {' '.join(body)} {_lit(FUNCTION_CLOSE)}")
    return "\n".join(lines) + "\n"


def make_xml_constraint(llm: Any, tools: Any) -> Any:
    """The constraint of one XML call (a JsonConstraint over xml_call_grammar: the same decode-loop
    protocol, masks and forced tokens). SchemaError naming the tools when llguidance refuses it."""
    from llguidance import LLMatcher

    from ..errors import SchemaError
    from .json_constraint import JsonConstraint, model_tables

    tables = model_tables(llm)
    try:
        grammar = LLMatcher.grammar_from_lark(xml_call_grammar(tools.names, tools.schemas))
        matcher = LLMatcher(tables.tokenizer, grammar, log_level=0)
    except ValueError as e:
        raise SchemaError(f"tools: the XML call grammar of these tools cannot be compiled ({e})", param="tools") from None
    if matcher.is_error():
        raise SchemaError(f"tools: the XML call grammar of these tools cannot be compiled ({matcher.get_error()})",
                          param="tools")
    c = JsonConstraint(tables, matcher, None)
    c.check_start()
    return c
