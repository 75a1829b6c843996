"""Schema checks before generation and the validation after it.

`check_schema` (and `check_depth`) are the entry points json_constraint uses before any token is
generated; the planning itself (which keywords the grammar enforces, which are no-ops, which
only validation guarantees, which block the schema) lives in json_normalize.plan_schema.
`validate_output` checks a finished answer with jsonschema: the schema's own draft, every format
checked, and `multipleOf` in exact decimal arithmetic on the number as written (jsonschema's own
float division rejects 19.99 as a multiple of 0.01, which the grammar rightly produces).
"""

from __future__ import annotations

import json
import logging
from decimal import Decimal, InvalidOperation
from typing import Any

import jsonschema

from ..errors import ConstraintViolation, SchemaError
from . import json_normalize as _n
from .json_normalize import SchemaPlan, plan_schema, pointer as _pointer

log = logging.getLogger("edge_qwen.json")

MAX_SCHEMA_DEPTH = _n.MAX_SCHEMA_DEPTH


def check_depth(schema: Any, param: str = "response_format", limit: int = MAX_SCHEMA_DEPTH) -> None:
    """Raise SchemaError when the schema document nests deeper than `limit` (checked without recursion)."""
    problem = _n.depth_problem(schema, limit)
    if problem is not None:
        raise SchemaError(f"{param}: {problem}", param=param)


def check_schema(schema: Any, param: str = "response_format") -> dict:
    """Check `schema` and return the form the grammar compiles (see json_normalize.plan_schema).

    Raises one SchemaError naming every blocker with its JSON path.
    """
    return _n.plan_schema(schema, param).grammar


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
        text = "oneOf with branches that can overlap cannot be enforced"
    if len(text) > 400:  # llguidance can quote large parts of the schema; the first part says what failed
        log.info("JSON engine error: %s", text)
        text = text[:400] + " ..."
    return SchemaError(f"{param}: the schema cannot be enforced: {text}; {_advice(text)}", param=param)


def _advice(text: str) -> str:
    """What to change for an llguidance compile error (its messages say what failed, not what to do)."""
    lower = text.lower()
    if "unsatisfiable" in lower:
        return "no JSON value can match it: fix the keywords that contradict each other"
    if "patternpropert" in lower and "disjoint" in lower:
        return "make the patternProperties patterns disjoint (no key may match two of them)"
    if "oneof" in lower:
        return "use anyOf if either branch may match"
    if "$ref" in lower or "pointer" in lower or "reference" in lower:
        return "point every $ref at a subschema inside this document (#/$defs/...)"
    if "integer range" in lower or "float range" in lower:
        return (f"keep numeric bounds (minimum, maximum, exclusive...) between -{_n.HUGE_BOUND} and {_n.HUGE_BOUND}, "
                "or drop the ones that exclude only numbers no answer needs")
    if "regex" in lower or "pattern" in lower or "lookaround" in lower:
        return "simplify the pattern (no look-around, back-references or unbounded nested repeats)"
    if "limit" in lower or "too large" in lower or "too many" in lower:
        return "make the schema smaller (fewer alternatives, shorter enums and patterns)"
    return "change or remove that part of the schema (docs/json.md lists what is enforced)"


class _Number(float):
    """A float that remembers the text it was parsed from, for exact decimal checks."""

    __slots__ = ("text",)

    def __new__(cls, text: str):
        obj = super().__new__(cls, text)
        obj.text = text
        return obj


def _decimal(value: Any) -> Decimal:
    if isinstance(value, _Number):
        return Decimal(value.text)
    if isinstance(value, float):
        return Decimal(repr(value))  # the shortest decimal that reads back as this float: what was written
    return Decimal(value)


def _multiple_of(validator: Any, divisor: Any, instance: Any, schema: Any) -> Any:
    """multipleOf in decimal arithmetic on the number as written: 19.99 is a multiple of 0.01.

    jsonschema divides floats (19.99 / 0.01 = 1998.9999999999998) and rejects it; the grammar
    (llguidance) uses decimals, so the check after generation must too.
    """
    if not validator.is_type(instance, "number"):
        return
    try:
        quotient = _decimal(instance) / _decimal(divisor)
        ok = quotient == quotient.to_integral_value()
    except (InvalidOperation, ValueError, OverflowError):
        ok = False
    if not ok:
        yield jsonschema.ValidationError(f"{instance!r} is not a multiple of {divisor}")


def _validator(schema: dict) -> Any:
    """A validator for `schema`: its own draft, exact multipleOf, every format we accept checked."""
    cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
    exact = jsonschema.validators.extend(cls, {"multipleOf": _multiple_of})
    # One format checker for every draft: the formats the grammar enforces are checked whatever
    # $schema says (draft-04's own checker skips "date", "time", "uuid"...).
    return exact(schema, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER)


def parse_output(text: str) -> Any:
    """json.loads, keeping each number's text (for decimal checks); ConstraintViolation if not JSON."""
    try:
        return json.loads(text, parse_float=_Number)
    except ValueError as exc:
        raise ConstraintViolation(
            f"constrained output is not valid JSON ({exc}); this is a bug in the JSON engine: {text[:200]!r}"
        ) from None


def first_error(value: Any, schema: dict) -> Any:
    """The most relevant jsonschema error of `value` against `schema`, or None when it is valid.

    RecursionError (an answer nested deeper than Python's validator can follow) propagates.
    """
    return jsonschema.exceptions.best_match(_validator(schema).iter_errors(value))


def validate_output(text: str, schema: dict | None) -> Any:
    """Parse constrained output and validate it against `schema` (None: any JSON object).

    Raises ConstraintViolation when the output is not JSON or does not validate; the message
    names the JSON path. Numbers come back as plain floats and ints.
    """
    value = parse_output(text)
    if schema is None:
        if not isinstance(value, dict):
            raise ConstraintViolation(f"json_object output is not an object: {text[:200]!r}")
        return json.loads(text)
    try:
        error = first_error(value, schema)
    except RecursionError:
        # Output nested deeper than Python's validator can follow (a recursive schema): the grammar
        # produced it, so it stands; only this second check is skipped.
        log.warning("skipped re-validating constrained output: nested too deeply for jsonschema")
        return json.loads(text)
    if error is not None:
        where = _pointer([str(p) for p in error.absolute_path])
        raise ConstraintViolation(
            f"constrained output violates the schema at {where}: {error.message}; {text[:200]!r}"
        )
    return json.loads(text)
