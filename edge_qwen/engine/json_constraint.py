"""JSON output that is always valid: llguidance token masks plus fast-forward of forced tokens.

The decode loop (edge_qwen.engine.generate) drives a constraint through four calls per request:

    c = make_constraint(llm, response_format)        # None for free text
    c.mask_logits(logits)                            # before sampling: disallowed tokens -> -inf
    forced = c.commit(token)                         # after sampling: tokens the grammar forces next
    c.is_finished()                                  # root value closed: stop with "stop"
    c.finalize(text, finish_reason)                  # "stop": parse + jsonschema, or raise

The loop feeds `[token] + forced` to the model in one llama_decode batch, so the keys, quotes
and colons a schema fixes cost one forward pass together instead of one pass each: that is
why constrained output can be produced faster than free text.

Per model, the llguidance tokenizer (built from the llama.cpp vocab, about 1 s) is cached;
per schema, the compiled matcher is cached and deep-copied per request (microseconds).
"""

from __future__ import annotations

import dataclasses
import json
import threading
import warnings
import weakref
from collections import OrderedDict
from typing import Any

from ..errors import ConstraintViolation, RequestError, SchemaError
from .json_normalize import SchemaPlan, generation_order, plan_schema, strict_variant
from .json_schema import check_depth, engine_error, engine_limit, validate_output

# Whitespace the grammar allows at each place JSON allows it: one optional space. Compact-only
# JSON changes what the model says (REFERENCE.md: "List 10 students" -> {"students":[]}), while
# one optional space keeps its answers; newlines and indents (pretty-printing) cost a token or
# two per line and cut long answers at max_tokens, and unbounded whitespace lets the model run
# away. The pattern is matched at most once per place, so the bound holds.
WHITESPACE_PATTERN = r"[ ]?"
# The retry of an answer cut at max_tokens (strict_variant, edge_qwen.engine.json_retry) is compact:
# every space costs a token there, and the first answer has shown the room is short.
CUT_RETRY_WHITESPACE = ""

# Any JSON object: {"type": "json_object"} without a schema.
ANY_OBJECT: dict = {"type": "object"}

_MATCHER_CACHE_SIZE = 128
_lock = threading.Lock()
_checked: OrderedDict[str, SchemaPlan] = OrderedDict()  # schema text -> its plan (plan_schema)
_tables: "weakref.WeakKeyDictionary[Any, _ModelTables]" = weakref.WeakKeyDictionary()


class _ModelTables:
    """llguidance tables tied to one loaded model: its tokenizer and compiled schemas."""

    def __init__(self, llama: Any):
        import llama_cpp
        from llguidance.llamacpp import lltokenizer_from_vocab

        vocab = llama_cpp.llama_model_get_vocab(llama.model)
        # <|im_end|> ends an assistant turn in ChatML; it is the token a finished JSON answer
        # may be followed by. The tokenizer keeps a pointer to the vocab, so these tables
        # live exactly as long as the Llama object (weak key) and are never shared across loads.
        self.eos = llama.token_eos()
        self.n_vocab = llama.n_vocab()
        with warnings.catch_warnings():
            # llguidance calls llama-cpp-python's deprecated llama_token_get_attr once per token:
            # 151,936 DeprecationWarnings that cost seconds when warnings are recorded (pytest).
            warnings.simplefilter("ignore", DeprecationWarning)
            self.tokenizer = lltokenizer_from_vocab(vocab, n_vocab=self.n_vocab, eos_token=self.eos)
        self.matchers: OrderedDict[str, Any] = OrderedDict()

    def matcher(self, plan: SchemaPlan, schema_text: str, param: str, whitespace: str = WHITESPACE_PATTERN) -> Any:
        """A fresh matcher for `plan.grammar` (the schema's JSON text is `schema_text`): compiled once, then
        deep-copied. A `oneOf` llguidance cannot prove disjoint is compiled as `anyOf` and left to
        validation (recorded in `plan.validated`)."""
        key = whitespace + "\0" + schema_text  # the whitespace rule is part of the grammar
        with _lock:
            cached = self.matchers.get(key)
            if cached is not None:
                self.matchers.move_to_end(key)
                template, coerced = cached
                if coerced:
                    _note_coerced(plan)
                return template.deep_copy()
        template = self._compile(plan.grammar, param, {}, whitespace)
        coerced = False
        if isinstance(template, str) and "coerce_one_of" in template:
            coerced = True
            _note_coerced(plan)
            template = self._compile(plan.grammar, param, {"coerce_one_of": True}, whitespace)
        if isinstance(template, str):
            raise engine_error(template, param)
        with _lock:
            self.matchers[key] = (template, coerced)
            while len(self.matchers) > _MATCHER_CACHE_SIZE:
                self.matchers.popitem(last=False)
        return template.deep_copy()

    def _compile(self, grammar_schema: dict, param: str, options: dict, whitespace: str = WHITESPACE_PATTERN) -> Any:
        """An LLMatcher for `grammar_schema`, or llguidance's error message."""
        from llguidance import LLMatcher

        try:
            # As JSON text: llguidance converts a dict through 64-bit numbers and fails on an
            # integer beyond them (an `enum` of uint64 values); its JSON parser takes any.
            grammar = LLMatcher.grammar_from_json_schema(
                json.dumps(grammar_schema, allow_nan=False), defaults={"whitespace_pattern": whitespace},
                overrides=options or None)
        except ValueError as exc:
            raise engine_error(str(exc), param) from None
        template = LLMatcher(self.tokenizer, grammar, log_level=0)
        return template.get_error() if template.is_error() else template


def _note_coerced(plan: SchemaPlan) -> None:
    paths = ", ".join(plan.one_of_paths) or "(root)"
    note = f"oneOf whose branches can overlap at {paths} (compiled as anyOf)"
    if note not in plan.validated:
        plan.validated.append(note)


def _llama_of(llm: Any) -> Any:
    """The llama_cpp.Llama behind `llm` (an EdgeQwen, or a Llama itself)."""
    import llama_cpp

    if isinstance(llm, llama_cpp.Llama):
        return llm
    for name in ("llama", "_llama", "_llm", "model"):
        inner = getattr(llm, name, None)
        if isinstance(inner, llama_cpp.Llama):
            return inner
    raise TypeError(f"make_constraint needs an EdgeQwen or llama_cpp.Llama, got {type(llm).__name__}")


def model_tables(llm: Any) -> _ModelTables:
    """The cached llguidance tables of a model (built on first use, about 1 s)."""
    llama = _llama_of(llm)
    with _lock:
        tables = _tables.get(llama)
    if tables is None:
        tables = _ModelTables(llama)  # built outside the lock: ~1 s, and idempotent
        with _lock:
            tables = _tables.setdefault(llama, tables)
    return tables


def parse_response_format(response_format: Any, param: str = "response_format") -> dict | None:
    """Normalise a response_format to the JSON schema to enforce, or None for free text.

    Accepted: None / {"type": "text"}; {"type": "json_object"} (any object); the OpenAI form
    {"type": "json_schema", "json_schema": {"name", "schema", "strict"}}; the llama-cpp-python
    form {"type": "json_object", "schema": S}. Anything else raises RequestError.
    """
    if response_format is None:
        return None
    if not isinstance(response_format, dict):
        raise RequestError(
            f"{param} must be an object like {{\"type\": \"json_object\"}}, got {type(response_format).__name__}",
            param=param,
        )
    kind = response_format.get("type")
    allowed = {"text": {"type"}, "json_object": {"type", "schema"}, "json_schema": {"type", "json_schema"}}
    if kind not in allowed:
        raise RequestError(
            f"{param}.type must be 'text', 'json_object' or 'json_schema', got {json.dumps(kind)}",
            param=param,
        )
    extra = set(response_format) - allowed[kind]
    if extra:
        raise RequestError(
            f"{param} of type {kind!r} does not take {', '.join(sorted(map(repr, extra)))}", param=param
        )
    if kind == "text":
        return None
    if kind == "json_object":
        schema = response_format.get("schema")
        return ANY_OBJECT if schema is None else schema
    spec = response_format.get("json_schema")
    if not isinstance(spec, dict):
        raise RequestError(
            f"{param}.json_schema must be an object with 'name' and 'schema', got {json.dumps(spec)[:60]}",
            param=param,
        )
    unknown = set(spec) - {"name", "schema", "strict", "description"}
    if unknown:
        raise RequestError(
            f"{param}.json_schema has unknown keys {', '.join(sorted(map(repr, unknown)))}; "
            "expected name, schema, strict, description",
            param=param,
        )
    name = spec.get("name")
    if name is not None and not isinstance(name, str):
        raise RequestError(f"{param}.json_schema.name must be a string, got {json.dumps(name)}", param=param)
    if "strict" in spec and not isinstance(spec["strict"], bool):
        raise RequestError(
            f"{param}.json_schema.strict must be true or false, got {json.dumps(spec['strict'])}", param=param
        )
    # strict=false is still enforced: we never hand back output that does not match.
    schema = spec.get("schema")
    return ANY_OBJECT if schema is None else schema


class JsonConstraint:
    """One request's grammar state: masks logits, records tokens, forces what the schema fixes."""

    def __init__(self, tables: _ModelTables, matcher: Any, plan: SchemaPlan | None, fast_forward: bool = True):
        import numpy as np

        self._np = np
        self._matcher = matcher
        self.plan = plan  # None: any JSON object
        self._schema = None if plan is None else plan.validation
        self._fast_forward = fast_forward
        self._tables = tables
        self._template = matcher.deep_copy()  # the start state, for fresh()
        self._n_vocab = tables.n_vocab
        self._eos = tables.eos
        self._bitmask = np.full((1, (tables.n_vocab + 31) // 32), -1, dtype=np.int32)
        self._disallowed_bits = np.empty_like(self._bitmask)
        self._mask_ready = False  # the bitmask already holds the next token's mask (see check_start)
        self.sampled_tokens = 0
        self.forced_tokens = 0

    def _fill_mask(self) -> None:
        """Compute the bitmask of the tokens allowed next (SchemaError if the engine fails on this schema)."""
        from llguidance.numpy import fill_next_token_bitmask

        fill_next_token_bitmask(self._matcher, self._bitmask)
        if self._matcher.is_error():
            raise engine_limit(self._matcher.get_error())

    def check_start(self) -> None:
        """Compute the first token's mask now, before the prompt runs; the first mask_logits reuses it."""
        self._fill_mask()
        self._mask_ready = True

    def mask_logits(self, logits: Any) -> None:
        """Set the logits of tokens the grammar does not allow next to -inf, in place."""
        np = self._np
        if not self._mask_ready:
            self._fill_mask()
        self._mask_ready = False
        n = min(len(logits), self._n_vocab)
        # One bit per token, little-endian within each 32-bit word. Inverting the 19 KB bitmask
        # and unpacking straight to the disallowed tokens costs half of unpacking the allowed ones
        # and inverting 152 K bools (about 0.2 ms a token instead of 0.4 on this model).
        np.invert(self._bitmask, out=self._disallowed_bits)
        disallowed = np.unpackbits(self._disallowed_bits.view(np.uint8), count=n, bitorder="little").view(bool)
        logits[:n][disallowed] = -np.inf
        if len(logits) > n:
            logits[n:] = -np.inf

    def commit(self, token_id: int) -> list[int]:
        """Record the sampled token; return the tokens the grammar forces next (already recorded)."""
        self._mask_ready = False  # the grammar state moves on: the next mask is a new one
        m = self._matcher
        if not m.consume_token(int(token_id)):
            if m.is_error() and m.get_error():  # the engine failed on this schema, not on a bad token
                raise engine_limit(m.get_error())
            raise ConstraintViolation(
                f"JSON engine rejected sampled token {token_id}: {m.get_error() or 'not allowed here'}; "
                "the loop must call mask_logits before sampling"
            )
        self.sampled_tokens += 1
        if m.is_stopped() or not self._fast_forward:
            return []
        forced = m.compute_ff_tokens()
        if forced:
            if not m.consume_tokens(forced):
                raise engine_limit(m.get_error() or "it rejected its own forced tokens")
            self.forced_tokens += len(forced)
        return list(forced)

    def is_finished(self) -> bool:
        """True once the root JSON value has closed (only end-of-turn may follow)."""
        return self._matcher.is_stopped()

    def is_eos(self, token_id: int) -> bool:
        """Whether `token_id` is the end-of-turn token the grammar allows after the root value."""
        return int(token_id) == self._eos

    def finalize(self, text: str, finish_reason: str) -> Any:
        """Check the finished output: for "stop", parse and validate it (ConstraintViolation if not).

        For "length" (cut by max_tokens) nothing is claimed and None is returned.
        """
        if finish_reason != "stop":
            return None
        if not self._matcher.is_accepting():
            raise ConstraintViolation(
                "generation stopped before the JSON value was complete (a stop string inside the JSON?); "
                f"the output is not valid: {text[:200]!r}"
            )
        try:
            return validate_output(text, self._schema)
        except ConstraintViolation as exc:
            if self.needs_validation:  # an answer the grammar could not rule out: the caller may retry
                raise AnswerInvalid(str(exc), validated=tuple(self.plan.validated)) from None
            raise ConstraintViolation(f"{exc}; this is a bug in the JSON engine") from None

    @property
    def needs_validation(self) -> bool:
        """True when part of the schema is guaranteed only by validating the finished answer."""
        return self.plan is not None and not self.plan.exact

    def fresh(self) -> "JsonConstraint":
        """A new constraint for the same schema, at the start (for another attempt)."""
        c = JsonConstraint(self._tables, self._template.deep_copy(), self.plan, self._fast_forward)
        c.cut_retry = self.cut_retry
        return c

    cut_retry = False  # True on the constraint of a cut answer's retry (strict())

    @property
    def retries_cuts(self) -> bool:
        """True when an answer cut at max_tokens may be retried under strict() (a schema, not any object)."""
        return self.plan is not None and not self.cut_retry

    def strict(self) -> "JsonConstraint | None":
        """The constraint of a cut answer's retry: json_normalize.strict_variant of the grammar, compact.

        It accepts a subset of what this constraint accepts and validates against the same schema
        (`plan.validation`), so its answers keep every guarantee. None when the variant cannot
        be compiled (an object closed where the schema needed it open): no such retry then.
        """
        if self.plan is None:
            return None
        plan = self.plan
        if plan.strict is None:
            grammar, changes = strict_variant(plan.grammar)
            plan.strict = dataclasses.replace(plan, grammar=grammar, strict=None, strict_changes=changes,
                                              validated=list(plan.validated))
        text = json.dumps(plan.strict.grammar, ensure_ascii=False, separators=(",", ":"))
        try:
            matcher = self._tables.matcher(plan.strict, text, "response_format", whitespace=CUT_RETRY_WHITESPACE)
            c = JsonConstraint(self._tables, matcher, plan.strict, self._fast_forward)
            c.check_start()
        except SchemaError:
            return None
        c.cut_retry = True
        return c


class AnswerInvalid(ConstraintViolation):
    """A finished answer failed the validation that guarantees the keywords the grammar cannot enforce.

    Raised by finalize() only for schemas with such keywords; edge_qwen.engine.json_retry
    catches it and generates again, within its budget.
    """

    def __init__(self, message: str, validated: tuple[str, ...] = ()):
        super().__init__(message)
        self.validated = validated


def make_constraint(llm: Any, response_format: Any, param: str = "response_format", *,
                    fast_forward: bool = True) -> JsonConstraint | None:
    """Build the JSON constraint for one request, or None when `response_format` asks for free text.

    `llm` is an EdgeQwen (or a llama_cpp.Llama). Raises RequestError for a malformed
    response_format and SchemaError for an invalid schema or keywords the engine cannot enforce.
    `fast_forward=False` makes commit() return no forced tokens (the model samples every
    token under the mask; the benchmark uses it to measure the mask alone).
    """
    schema = parse_response_format(response_format, param)
    if schema is None:
        return None
    any_object = schema is ANY_OBJECT
    check_depth(schema, param)  # before json.dumps, which would recurse into any depth
    try:
        # Property order is generation order, so the cache keys keep it (no sort_keys).
        text = json.dumps(schema, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise SchemaError(f"{param}: the schema is not plain JSON ({exc})", param=param) from None
    with _lock:
        plan = _checked.get(text)
    if plan is None:
        # The metaschema check costs milliseconds: once per schema. ANY_OBJECT needs no plan.
        plan = plan_schema(schema, param)
        with _lock:
            _checked[text] = plan
            while len(_checked) > _MATCHER_CACHE_SIZE:
                _checked.popitem(last=False)
    tables = model_tables(llm)
    grammar_text = json.dumps(plan.grammar, ensure_ascii=False, separators=(",", ":"))
    try:
        matcher = tables.matcher(plan, grammar_text, param)
    except SchemaError as exc:
        # llguidance cannot intersect a property with a pattern schema that refers back to it:
        # plan again with the grammar enforcing one side (a superset), validation checking both.
        if "circular references with sibling keys" not in str(exc):
            raise
        relaxed = plan_schema(schema, param, relax_circular=True)
        if relaxed.grammar == plan.grammar:
            raise
        plan = relaxed
        with _lock:
            _checked[text] = plan
        grammar_text = json.dumps(plan.grammar, ensure_ascii=False, separators=(",", ":"))
        matcher = tables.matcher(plan, grammar_text, param)
    constraint = JsonConstraint(tables, matcher, None if any_object else plan, fast_forward=fast_forward)
    constraint.check_start()  # a schema the engine cannot even start on fails here, before the prompt runs
    return constraint


def replay(llm: Any, schema: dict, value: Any) -> str:
    """Feed `value`, written as the model would write it, through the constraint for `schema`.

    Objects are written with their keys in generation order (json_normalize.generation_order:
    required properties first, then optional ones, then others), as the model writes them.
    Returns "accepted" (every token allowed by the grammar and the answer validates), "grammar"
    (a token refused, or the value left unfinished) or "validation" (the grammar let it through,
    the final validation refused it). The grammar-soundness test and benchmark use it: a valid
    value must be "accepted", an invalid one must not be. SchemaError if the schema is refused.
    """
    c = make_constraint(llm, {"type": "json_object", "schema": schema}, fast_forward=False)
    if c.plan is not None:  # keys in the order the grammar writes them (the same JSON value)
        value = generation_order(c.plan.grammar, value)
    text = json.dumps(value, ensure_ascii=False, separators=(", ", ": "))
    tokens = _llama_of(llm).tokenize(text.encode("utf-8"), add_bos=False, special=False)
    m = c._matcher
    if not m.consume_tokens(tokens) or not m.is_accepting():
        return "grammar"
    try:
        c.finalize(text, "stop")
    except ConstraintViolation:
        return "validation"
    return "accepted"


__all__ = [
    "ANY_OBJECT",
    "AnswerInvalid",
    "JsonConstraint",
    "SchemaError",
    "WHITESPACE_PATTERN",
    "make_constraint",
    "model_tables",
    "parse_response_format",
    "replay",
]
