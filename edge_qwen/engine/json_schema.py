"""Which JSON schemas the constraint engine can enforce, checked before any token is generated.

A schema reaches the engine only if (1) it is a valid JSON schema (jsonschema's check_schema),
and (2) every validation keyword in it is one llguidance turns into grammar. Keywords that
llguidance 1.9 cannot enforce are refused here with their JSON paths, never dropped silently
(the pain point of llama.cpp's GBNF converter). Annotations (title, description, default,
examples, ...) carry no constraint and pass. After generation, `validate_output` checks the
text with jsonschema, so a mismatch between this table and the engine shows up as a
ConstraintViolation instead of a quietly wrong answer.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from ..errors import ConstraintViolation, SchemaError

log = logging.getLogger("edge_qwen.json")

# Validation keywords llguidance 1.9.1 does not turn into grammar (it answers
# "Unimplemented keys" for them); listed here so the error can name every place at once.
UNSUPPORTED_KEYWORDS = frozenset(
    {
        "not",
        "if",
        "then",
        "else",
        "dependentSchemas",
        "dependentRequired",
        "dependencies",
        "contains",
        "minContains",
        "maxContains",
        "uniqueItems",
        "propertyNames",
        "unevaluatedProperties",
        "unevaluatedItems",
        "additionalItems",
        "$dynamicRef",
        "$dynamicAnchor",
        "$recursiveRef",
        "$recursiveAnchor",
    }
)

# String formats llguidance enforces (docs/json_schema.md); any other format is refused.
SUPPORTED_FORMATS = frozenset(
    {"date-time", "time", "date", "duration", "email", "hostname", "ipv4", "ipv6", "uuid", "uri"}
)

# llguidance's own extension key; only the options that keep output bounded and exact pass.
_X_GUIDANCE_ALLOWED = {"item_separator", "key_separator", "whitespace_pattern", "whitespace_flexible"}

# Keywords whose value is one subschema / a map of subschemas / a list of subschemas:
# the walk follows only these, so a property *named* "not" is never mistaken for a keyword.
_SUBSCHEMA = ("additionalProperties", "items", "additionalItems", "contains", "not", "if", "then",
              "else", "propertyNames", "unevaluatedProperties", "unevaluatedItems")
_SUBSCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
_SUBSCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")


def _pointer(path: list[str]) -> str:
    return "/" + "/".join(p.replace("~", "~0").replace("/", "~1") for p in path) if path else "(root)"


def _walk(node: Any, path: list[str], problems: list[str]) -> None:
    """Collect 'keyword at /json/pointer' for every keyword the engine cannot enforce."""
    if not isinstance(node, dict):
        return
    for key, value in node.items():
        where = _pointer(path + [key])
        if key == "uniqueItems" and value is False:
            continue  # no constraint at all; stripped before compiling (see normalize_schema)
        if key in UNSUPPORTED_KEYWORDS:
            problems.append(f"{key} at {where}")
        elif key == "items" and isinstance(value, list):
            problems.append(f"items as a list (draft-07 tuple form) at {where}; use prefixItems")
        elif key in ("exclusiveMinimum", "exclusiveMaximum") and isinstance(value, bool):
            problems.append(f"boolean {key} (draft-04) at {where}; give the bound as a number")
        elif key == "format" and isinstance(value, str) and value not in SUPPORTED_FORMATS:
            problems.append(f"format {value!r} at {where} (supported: {', '.join(sorted(SUPPORTED_FORMATS))})")
        elif key == "$ref" and isinstance(value, str) and not value.startswith("#"):
            problems.append(f"remote $ref {value!r} at {where}; inline it under $defs")
    for key in _SUBSCHEMA:
        if key in node:
            _walk(node[key], path + [key], problems)
    for key in _SUBSCHEMA_MAPS:
        if isinstance(node.get(key), dict):
            for name, sub in node[key].items():
                _walk(sub, path + [key, name], problems)
    for key in _SUBSCHEMA_LISTS:
        if isinstance(node.get(key), list):
            for i, sub in enumerate(node[key]):
                _walk(sub, path + [key, str(i)], problems)


def _strip_noops(node: Any) -> Any:
    """A copy without `uniqueItems: false` (no constraint, but llguidance rejects the key)."""
    if isinstance(node, dict):
        return {k: _strip_noops(v) for k, v in node.items() if not (k == "uniqueItems" and v is False)}
    if isinstance(node, list):
        return [_strip_noops(v) for v in node]
    return node


MAX_SCHEMA_DEPTH = 64  # nesting of objects/arrays in the schema document itself


def check_depth(schema: Any, param: str = "response_format", limit: int = MAX_SCHEMA_DEPTH) -> None:
    """Raise SchemaError when the schema document nests deeper than `limit` (checked without recursion)."""
    stack = [(schema, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > limit:
            raise SchemaError(f"{param}: the JSON schema is nested more than {limit} levels deep; "
                              "flatten it (use $defs and $ref for repeated parts)", param=param)
        children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else ()
        stack.extend((c, depth + 1) for c in children if isinstance(c, (dict, list)))


MAX_EXPANDED_NODES = 20_000  # subschemas visited with local $refs expanded
MAX_REF_CHAIN = 100  # $refs followed one inside another


def _resolve_local(root: Any, ref: str) -> Any:
    """The subschema a local "#/a/b" (or "#") $ref points at, or None."""
    if ref == "#":
        return root
    if not ref.startswith("#/"):
        return None  # an anchor or a remote reference: not followed here
    node = root
    for part in ref[2:].split("/"):
        part = part.replace("~1", "/").replace("~0", "~")
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return None
    return node


def check_expansion(schema: Any, param: str = "response_format") -> None:
    """Raise SchemaError when the schema's local $refs expand into more work than a request may cost.

    A small schema can describe exponential work: each level an allOf of two $refs to the next
    doubles what a validator must visit; a chain of hundreds of $refs nests that deep. Recursion
    (a $ref already being expanded on the path) is not followed again, so recursive schemas pass.
    """
    stack: list[tuple[Any, tuple[str, ...]]] = [(schema, ())]
    visited = 0
    while stack:
        node, active = stack.pop()
        visited += 1
        if visited > MAX_EXPANDED_NODES:
            raise SchemaError(f"{param}: the JSON schema's $refs expand to more than {MAX_EXPANDED_NODES} "
                              "subschemas (e.g. allOf of several $refs, level after level); simplify it", param=param)
        if isinstance(node, list):
            stack.extend((v, active) for v in node if isinstance(v, (dict, list)))
            continue
        if not isinstance(node, dict):
            continue
        ref = node.get("$ref")
        if isinstance(ref, str) and ref not in active:
            if len(active) >= MAX_REF_CHAIN:
                raise SchemaError(f"{param}: the JSON schema chains more than {MAX_REF_CHAIN} $refs one inside "
                                  "another; flatten it", param=param)
            target = _resolve_local(schema, ref)
            if isinstance(target, (dict, list)):
                stack.append((target, active + (ref,)))
        stack.extend((v, active) for k, v in node.items() if k != "$ref" and isinstance(v, (dict, list)))


def check_schema(schema: Any, param: str = "response_format") -> dict:
    """Check that `schema` is a valid JSON schema the engine can enforce; return it ready to compile.

    Raises SchemaError naming the problem: not an object, invalid per its metaschema,
    or keywords that cannot be enforced (all of them, with their JSON paths).
    """
    import jsonschema

    if not isinstance(schema, dict):
        raise SchemaError(
            f"{param}: the JSON schema must be an object such as {{\"type\": \"object\", ...}}, "
            f"got {json.dumps(schema)[:60]}",
            param=param,
        )
    check_depth(schema, param)
    check_expansion(schema, param)
    cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
    try:
        cls.check_schema(schema)
    except RecursionError:
        raise SchemaError(f"{param}: the JSON schema is too deeply nested to check; flatten it", param=param) from None
    except jsonschema.SchemaError as exc:
        where = _pointer([str(p) for p in exc.path])
        raise SchemaError(
            f"{param}: invalid JSON schema at {where}: {exc.message}; fix the schema", param=param
        ) from None
    problems: list[str] = []
    _walk(schema, [], problems)
    xg = schema.get("x-guidance")
    if xg is not None:
        if not isinstance(xg, dict):
            problems.append("x-guidance must be an object")
        else:
            for key, value in xg.items():
                if key not in _X_GUIDANCE_ALLOWED or (key == "whitespace_flexible" and value is not False):
                    problems.append(f"x-guidance option {key}={json.dumps(value)} (it would loosen the constraint)")
    if problems:
        raise SchemaError(
            f"{param}: the schema uses keywords the JSON engine cannot enforce: {'; '.join(problems)}. "
            "Remove or rewrite them (they are refused rather than ignored)",
            param=param,
        )
    return _strip_noops(schema)


def engine_limit(message: str, param: str = "response_format") -> SchemaError:
    """An llguidance failure while generating (a size or lexer limit hit by this schema) as a 400.

    The engine's message carries its whole state; only its first line is shown, the rest is logged.
    """
    log.info("JSON engine failure: %s", message)
    first = (message.strip().splitlines() or ["unknown error"])[0][:200]
    return SchemaError(f"{param}: the JSON engine hit a limit on this schema while generating ({first}); "
                       "simplify the schema (fewer optional properties or anyOf branches, simpler patterns)",
                       param=param)


def engine_error(message: str, param: str = "response_format") -> SchemaError:
    """Turn an llguidance grammar error into a SchemaError with advice the user can act on."""
    text = " ".join(message.split())
    if "oneOf" in text and "coerce_one_of" in text:
        text = "oneOf with branches that can overlap cannot be enforced; use anyOf if either branch may match"
    return SchemaError(f"{param}: the schema cannot be enforced: {text}", param=param)


def validate_output(text: str, schema: dict | None) -> Any:
    """Parse constrained output and validate it against `schema` (None: any JSON object).

    Raises ConstraintViolation: output that left the engine invalid is a bug, never an answer.
    """
    import jsonschema

    try:
        value = json.loads(text)
    except ValueError as exc:
        raise ConstraintViolation(
            f"constrained output is not valid JSON ({exc}); this is a bug in the JSON engine: {text[:200]!r}"
        ) from None
    if schema is None:
        if not isinstance(value, dict):
            raise ConstraintViolation(f"json_object output is not an object: {text[:200]!r}")
        return value
    cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
    validator = cls(schema, format_checker=cls.FORMAT_CHECKER)
    try:
        error = jsonschema.exceptions.best_match(validator.iter_errors(value))
    except RecursionError:
        # Output nested deeper than Python's validator can follow (a recursive schema): the grammar
        # produced it, so it stands; only this second check is skipped.
        log.warning("skipped re-validating constrained output: nested too deeply for jsonschema")
        return value
    if error is not None:
        where = _pointer([str(p) for p in error.absolute_path])
        raise ConstraintViolation(
            f"constrained output violates the schema at {where}: {error.message}; "
            f"this is a bug in the JSON engine: {text[:200]!r}"
        )
    return value
