"""From the JSON schema a user sends to the grammar llguidance compiles: one walk, one verdict.

`plan_schema` reads the schema once and sorts every keyword into one of four kinds:

- **grammar**: llguidance turns it into token masks (most of JSON Schema);
- **no-op**: it constrains nothing here (`format: int32` on an integer, an unknown format,
  `additionalItems` beside a schema-form `items`, `uniqueItems: false`, a `maxProperties` that a
  closed object already implies): dropped from the grammar, harmless to validation;
- **validated**: the grammar cannot express it (`not`, `if`/`then`/`else`, `dependencies`,
  `uniqueItems`, `propertyNames`, overlapping `oneOf`, formats such as `uri-reference`):
  it is left out of the grammar (which then accepts a superset), and the finished answer is
  checked with jsonschema and regenerated within a bounded budget (edge_qwen.engine.json_retry);
- **blocker**: it cannot be enforced at all (a remote `$ref`, an invalid schema, a size limit):
  the schema is refused with one SchemaError naming every blocker with its JSON path.

Some rewrites make the grammar exact where llguidance's own rule is looser than the check
that follows: `format: date`/`date-time`/`time` become patterns that know month lengths and leap
years (llguidance allows 2023-02-29 and second 60, jsonschema does not), `hostname` gets
fqdn's rules (labels, length), draft-04 boolean `exclusiveMinimum` and draft-07 tuple `items`
take their 2020-12 forms. The schema as sent is kept for validation, so these rewrites can only
make the grammar stricter or equal, never change what counts as valid.
"""

from __future__ import annotations

import copy
import json
import re
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote

from ..errors import SchemaError

# ---------------------------------------------------------------- tables

# Keywords the grammar leaves to validation (llguidance 1.9 answers "Unimplemented keys").
VALIDATED_KEYWORDS = frozenset({
    "not", "if", "then", "else", "dependencies", "dependentRequired", "dependentSchemas",
    "propertyNames", "uniqueItems", "contains", "minContains", "maxContains",
    "unevaluatedProperties", "unevaluatedItems",
})

# Keywords that cannot be enforced or checked here: the schema is refused.
BLOCKED_KEYWORDS = {
    "$dynamicRef": "dynamic references are not supported; use $ref",
    "$recursiveRef": "recursive references are not supported; use $ref",
}

# Formats llguidance enforces and jsonschema checks the same way (or more loosely): kept as is.
GRAMMAR_FORMATS = frozenset({"email", "ipv4", "ipv6", "uuid", "uri", "duration"})

_DAY31 = r"(?:0[13578]|1[02])-(?:0[1-9]|[12][0-9]|3[01])"
_DAY30 = r"(?:0[469]|11)-(?:0[1-9]|[12][0-9]|30)"
_FEB = r"02-(?:0[1-9]|1[0-9]|2[0-8])"
_YEAR = r"(?:[0-9]{3}[1-9]|[0-9]{2}[1-9][0-9]|[0-9][1-9][0-9]{2}|[1-9][0-9]{3})"  # 0001-9999: no year 0
_LEAP = r"(?:[0-9]{2}(?:0[48]|[2468][048]|[13579][26])|(?:0[48]|[2468][048]|[13579][26])00)"
DATE_RE = rf"(?:{_YEAR}-(?:{_DAY31}|{_DAY30}|{_FEB})|{_LEAP}-02-29)"
# RFC 3339 full-time as rfc3339-validator checks it: no leap second 60.
TIME_RE = r"(?:[01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9](?:\.[0-9]+)?(?:[zZ]|[+-](?:[01][0-9]|2[0-3]):[0-5][0-9])"
_LABEL = r"[a-zA-Z0-9](?:[a-zA-Z0-9-]{0,61}[a-zA-Z0-9])?"
HOSTNAME_RE = rf"(?:{_LABEL}\.)*{_LABEL}"  # fqdn's preferred name syntax; no trailing dot

# Formats the grammar enforces through an exact pattern of ours: (pattern, maxLength or None).
PATTERN_FORMATS = {
    "date": (DATE_RE, None),
    "date-time": (rf"{DATE_RE}[tT]{TIME_RE}", None),
    "time": (TIME_RE, None),
    "hostname": (HOSTNAME_RE, 253),
}

# Formats jsonschema checks (with jsonschema[format-nongpl] installed) that no grammar here
# enforces: left to validation. Every other format is an annotation and is dropped.
VALIDATED_FORMATS = frozenset({
    "uri-reference", "iri", "iri-reference", "idn-email", "idn-hostname", "regex", "json-pointer",
    "relative-json-pointer", "uri-template",
})

# Keywords whose value is one subschema / a map of subschemas / a list of subschemas.
_SUB = ("additionalProperties", "items", "additionalItems", "contains", "not", "if", "then", "else",
        "propertyNames", "unevaluatedProperties", "unevaluatedItems")
_SUB_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
_SUB_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
# Keywords whose values are data, never subschemas.
_LITERALS = frozenset({"enum", "const", "default", "examples", "required"})
# Applicators whose subschemas apply to the same instance value (validation work adds up).
_SAME_PLACE = ("allOf", "anyOf", "oneOf", "not", "if", "then", "else")

MAX_SCHEMA_DEPTH = 64
MAX_FANOUT = 20_000  # subschemas one value can be checked against, $refs followed
MAX_REF_CHAIN = 100  # $refs followed one inside another at one value

_X_GUIDANCE_KEYS = ("item_separator", "key_separator", "whitespace_pattern", "whitespace_flexible")
_LOOKAROUND = ("(?=", "(?!", "(?<=", "(?<!")
# llguidance turns numeric bounds into regexes through 64-bit arithmetic, and fails on the int64
# range itself (`minimum: -9223372036854775808`) or a float bound such as 1e19. A bound of this
# magnitude or more on the permissive side (a minimum far below zero, a maximum far above) only
# excludes numbers a model never writes: it is left to validation. 2^53: where doubles stop being
# exact integers.
HUGE_BOUND = 2 ** 53
_BOUNDS = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")


@dataclass
class SchemaPlan:
    """What to compile and what to check for one schema.

    `validation` is the schema as sent (the answer is checked against it); `grammar` is what
    llguidance compiles; `validated` names, with JSON paths, each keyword only validation
    guarantees (empty: the grammar alone is exact); `dropped` the no-op keywords removed.
    """

    validation: dict
    grammar: dict
    validated: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    one_of_paths: list[str] = field(default_factory=list)
    options: dict = field(default_factory=dict)
    strict: "SchemaPlan | None" = None  # strict_variant's plan, made on a cut answer's first retry
    strict_changes: list[str] = field(default_factory=list)  # what strict_variant changed (on that plan)

    @property
    def exact(self) -> bool:
        """True when the grammar alone guarantees a valid answer (no keyword left to validation)."""
        return not self.validated


def pointer(path: list[str] | tuple[str, ...]) -> str:
    """A JSON pointer for `path` ("(root)" for the root)."""
    return "/" + "/".join(str(p).replace("~", "~0").replace("/", "~1") for p in path) if path else "(root)"


# ---------------------------------------------------------------- size checks (iterative)


def depth_problem(schema: Any, limit: int = MAX_SCHEMA_DEPTH) -> str | None:
    """A message when the document nests deeper than `limit` (checked without recursion)."""
    stack = [(schema, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > limit:
            return (f"the JSON schema is nested more than {limit} levels deep; flatten it "
                    "(use $defs and $ref for repeated parts)")
        children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else ()
        stack.extend((c, depth + 1) for c in children if isinstance(c, (dict, list)))
    return None


def _local_refs(root: Any) -> list[str]:
    """Every local "#/..." $ref string in `root` (iteratively: schemas can be deep)."""
    refs, stack = [], [root]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith("#/"):
                refs.append(ref)
            stack.extend(v for k, v in node.items() if k not in _LITERALS and isinstance(v, (dict, list)))
        elif isinstance(node, list):
            stack.extend(v for v in node if isinstance(v, (dict, list)))
    return refs


def _ref_parts(ref: str) -> list[str]:
    """The keys of a local "#/a/b" $ref, JSON-pointer escapes (~1, ~0) undone."""
    return [part.replace("~1", "/").replace("~0", "~") for part in ref[2:].split("/")]


def resolve_local(root: Any, ref: str) -> Any:
    """The subschema a local "#/a/b" (or "#") $ref points at, or None."""
    if ref == "#":
        return root
    if not ref.startswith("#/"):
        return None
    node = root
    for part in _ref_parts(ref):
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return None
    return node


def fanout_problem(schema: Any) -> str | None:
    """A message when one value would be checked against too many subschemas.

    A validator checks a value against every subschema that applies at that place: allOf /
    anyOf / oneOf branches, not, if/then/else and $ref targets, transitively. A small schema can
    make that exponential (each level an allOf of two $refs to the next). Properties and items
    apply to other values, bounded by the answer's size, so they are not summed. Counted with
    memoization; a $ref already on the path (recursion) adds nothing.
    """
    def same_place(node: dict) -> list[Any]:
        out = []
        for key in _SAME_PLACE:
            v = node.get(key)
            if isinstance(v, dict):
                out.append(v)
            elif isinstance(v, list):
                out.extend(s for s in v if isinstance(s, dict))
        ref = node.get("$ref")
        if isinstance(ref, str):
            target = resolve_local(schema, ref)
            if isinstance(target, dict):
                out.append(target)
        return out

    cost: dict[int, int] = {}
    chain: dict[int, int] = {}
    # Every dict in the document is a start; post-order DFS over same-place edges.
    starts: list[Any] = []
    stack: list[Any] = [schema]
    while stack:
        n = stack.pop()
        if isinstance(n, dict):
            starts.append(n)
            stack.extend(v for v in n.values() if isinstance(v, (dict, list)))
        elif isinstance(n, list):
            stack.extend(v for v in n if isinstance(v, (dict, list)))
    for start in starts:
        if id(start) in cost:
            continue
        on_path: set[int] = set()
        work: list[tuple[dict, bool]] = [(start, False)]
        while work:
            node, done = work.pop()
            key = id(node)
            if done:
                on_path.discard(key)
                kids = [k for k in same_place(node) if id(k) in cost]
                cost[key] = min(MAX_FANOUT + 1, 1 + sum(cost[id(k)] for k in kids))
                chain[key] = 1 + max((chain[id(k)] for k in kids if "$ref" in node), default=0) \
                    if "$ref" in node else max((chain[id(k)] for k in kids), default=0)
                continue
            if key in cost or key in on_path:
                continue
            on_path.add(key)
            work.append((node, True))
            work.extend((k, False) for k in same_place(node) if id(k) not in cost and id(k) not in on_path)
        if cost[id(start)] > MAX_FANOUT:
            return (f"one value would be checked against more than {MAX_FANOUT} subschemas (allOf/anyOf/"
                    "oneOf of $refs, level after level); simplify the schema")
        if chain[id(start)] > MAX_REF_CHAIN:
            return f"the schema chains more than {MAX_REF_CHAIN} $refs one inside another; flatten it"
    return None


# ---------------------------------------------------------------- x-guidance


def _ws_tokens(pattern: str) -> list[str] | None:
    """The tokens of a regex built only from JSON whitespace, ',' and ':', bounded quantifiers,
    groups and alternation; None for anything else (any other character could leave JSON)."""
    ws_escapes = {r"\x20": " ", r"\x0A": "\n", r"\x0a": "\n", r"\x0D": "\r", r"\x0d": "\r", r"\x09": "\t",
                  r"\n": "\n", r"\r": "\r", r"\t": "\t", r"\u0020": " "}
    out, i = [], 0
    while i < len(pattern):
        ch = pattern[i]
        if ch == "\\":
            for esc, lit in ws_escapes.items():
                if pattern.startswith(esc, i):
                    out.append(lit)
                    i += len(esc)
                    break
            else:
                return None
            continue
        if ch in " \n\r\t,:|?()":
            out.append("(" if pattern.startswith("(?:", i) else ch)
            i += 3 if pattern.startswith("(?:", i) else 1
        elif ch == "[":
            j = pattern.find("]", i)
            inner = pattern[i + 1:j] if j > 0 else None
            if inner is None or not inner:
                return None
            chars = _ws_tokens(inner)
            if chars is None or any(c not in " \n\r\t" for c in chars):
                return None  # a class of whitespace only (no ranges, no negation)
            out.append(" ")
            i = j + 1
        elif ch == "{":
            j = pattern.find("}", i)
            body = pattern[i + 1:j] if j > 0 else ""
            lo, _, hi = body.partition(",")
            if not lo.isdigit() or (body.count(",") and not hi.isdigit()):
                return None  # {m} or {m,n}; {m,} is unbounded
            out.append("{}")
            i = j + 1
        else:
            return None  # * + . ^ $ letters ... : unbounded or not whitespace
    return out


def _separator_ok(pattern: Any, sep: str) -> bool:
    """Whether a separator regex matches only JSON whitespace around exactly one `sep`."""
    if not isinstance(pattern, str):
        return False
    toks = _ws_tokens(pattern)
    if toks is None or toks.count(sep) != 1 or ("," if sep == ":" else ":") in toks:
        return False
    depth, at = 0, -1
    for k, t in enumerate(toks):
        depth += t == "("
        depth -= t == ")"
        if t == sep:
            at = k
            if depth:
                return False  # inside a group it could repeat or be skipped
        if t == "|" and depth == 0:
            return False
    return not (at + 1 < len(toks) and toks[at + 1] in ("?", "{}"))


def _whitespace_ok(pattern: Any) -> bool:
    toks = _ws_tokens(pattern) if isinstance(pattern, str) else None
    return toks is not None and "," not in toks and ":" not in toks


def x_guidance_problems(xg: Any) -> list[str]:
    """Blockers in the top-level x-guidance options: only those that keep the output bounded JSON."""
    if not isinstance(xg, dict):
        return ["x-guidance at /x-guidance must be an object"]
    problems = []
    for key, value in xg.items():
        where = f"/x-guidance/{key}"
        if key not in _X_GUIDANCE_KEYS:
            problems.append(f"x-guidance option {key}={json.dumps(value)} at {where} (it would loosen the "
                            f"constraint; allowed: {', '.join(_X_GUIDANCE_KEYS)})")
        elif key == "whitespace_flexible" and value is not False:
            problems.append(f"x-guidance whitespace_flexible={json.dumps(value)} at {where} (unbounded "
                            "whitespace; give a bounded whitespace_pattern)")
        elif key == "whitespace_pattern" and not _whitespace_ok(value):
            problems.append(f"x-guidance whitespace_pattern {json.dumps(value)} at {where} (only spaces, tabs "
                            r"and newlines with bounded repeats, e.g. '[ ]?' or '\n[ ]{0,8}')")
        elif key in ("item_separator", "key_separator") and not _separator_ok(value, "," if key[0] == "i" else ":"):
            sep = "," if key[0] == "i" else ":"
            problems.append(f"x-guidance {key} {json.dumps(value)} at {where} (the output would not be JSON: "
                            f"use {sep!r} with optional bounded whitespace, e.g. {sep + ' '!r})")
    return problems


# ---------------------------------------------------------------- the walk


def _draft(schema: dict) -> str:
    uri = schema.get("$schema")
    if not isinstance(uri, str):
        return "2020-12"
    for d in ("draft-03", "draft-04", "draft-06", "draft-07", "2019-09"):
        if d in uri:
            return d
    return "2020-12"


class _Walk:
    def __init__(self, root: dict, relax: bool = False):
        self.root = root
        self.relax = relax  # see plan_schema's relax_circular
        self.draft = _draft(root)
        self.blockers: list[str] = []
        self.validated: list[str] = []
        self.dropped: list[str] = []
        self.one_of: list[str] = []
        self.remote: dict[str, list[tuple[str, str]]] = {}  # document -> ($ref, where), for one line each
        # Where local $refs point, and every prefix of those places: a $ref may point into any key
        # (`#/refs/element`, `#/$defs/plugins/extractor_shared`), not only into $defs.
        self.targets: set[tuple[str, ...]] = set()
        self.prefixes: set[tuple[str, ...]] = set()
        for ref in _local_refs(root):
            parts = tuple(_ref_parts(unquote(ref)))
            self.targets.add(parts)
            self.prefixes.update(parts[:i] for i in range(len(parts)))

    def _container(self, value: Any, path: list[str]) -> Any:
        """The value of a key that is no keyword (an annotation, or a folder of subschemas that
        $refs point into): the subschemas a $ref targets take their grammar form, the rest is kept."""
        place = tuple(path)
        if place in self.targets and isinstance(value, dict):
            return self.schema(value, path)
        if place not in self.prefixes:
            return value
        if isinstance(value, dict):
            return {k: self._container(v, path + [k]) for k, v in value.items()}
        if isinstance(value, list):
            return [self._container(v, path + [str(i)]) for i, v in enumerate(value)]
        return value

    def remote_blockers(self) -> list[str]:
        """One line per remote document: every $ref into it named by path, the advice once."""
        lines = []
        for doc, refs in self.remote.items():
            if len(refs) == 1:
                lines.append(f"remote $ref {refs[0][0]!r} at {refs[0][1]}; inline it under $defs")
                continue
            wheres = ", ".join(w for _, w in refs[:40]) + (f" and {len(refs) - 40} more" if len(refs) > 40 else "")
            lines.append(f"{len(refs)} remote $refs into {doc!r} at {wheres}; inline them under $defs")
        return lines

    def schema(self, node: Any, path: list[str]) -> Any:
        """The grammar form of subschema `node` at `path` (booleans and non-dicts pass as they are)."""
        if not isinstance(node, dict):
            return node
        out: dict = {}
        where = lambda key: pointer(path + [key])  # noqa: E731
        types = node.get("type")
        types = {types} if isinstance(types, str) else set(types) if isinstance(types, list) else None
        may_be_string = types is None or "string" in types
        if "$ref" in node and self.draft in ("draft-03", "draft-04", "draft-06", "draft-07"):
            # Before 2019-09 a $ref's sibling keywords are ignored: the grammar ignores them too
            # (llguidance would intersect them, and cannot when the $ref is recursive).
            ignored = [k for k in node if k not in ("$ref", "definitions", "$defs")]
            if ignored:
                self.dropped.append(f"{', '.join(ignored)} beside $ref (ignored before 2019-09) at {pointer(path)}")
            node = {k: v for k, v in node.items() if k not in ignored}
        for key, value in node.items():
            if key in VALIDATED_KEYWORDS:
                if key == "uniqueItems" and (value is False or _at_most_one_item(node)):
                    self.dropped.append(f"uniqueItems at {where(key)}")
                elif key in ("then", "else") and "if" not in node:
                    self.dropped.append(f"{key} without if at {where(key)}")
                elif key in ("minContains", "maxContains") and "contains" not in node:
                    self.dropped.append(f"{key} without contains at {where(key)}")
                else:
                    self.validated.append(f"{key} at {where(key)}")
                continue
            if key in BLOCKED_KEYWORDS:
                self.blockers.append(f"{key} at {where(key)}: {BLOCKED_KEYWORDS[key]}")
                continue
            if key == "$ref" and isinstance(value, str) and not value.startswith("#"):
                self.remote.setdefault(value.split("#")[0], []).append((value, where(key)))
                continue
            if key == "format" and isinstance(value, str):
                self._format(node, value, may_be_string, where(key), out)
                continue
            if key == "additionalItems":
                if not isinstance(node.get("items"), list) or self.draft == "2020-12":
                    self.dropped.append(f"additionalItems beside a schema-form items at {where(key)}")
                continue  # the tuple form is rewritten with items below
            if key == "items" and isinstance(value, list):
                out["prefixItems"] = [self.schema(s, path + [key, str(i)]) for i, s in enumerate(value)]
                if "additionalItems" in node:
                    out["items"] = self.schema(node["additionalItems"], path + ["additionalItems"])
                continue
            if key in ("exclusiveMinimum", "exclusiveMaximum") and isinstance(value, bool):
                bound = node.get("minimum" if key == "exclusiveMinimum" else "maximum")
                if value and isinstance(bound, (int, float)) and not isinstance(bound, bool):
                    self._bound(key, bound, where(key), out)  # draft-04: the bound itself becomes exclusive
                continue
            if key in ("minimum", "maximum") and node.get("exclusiveM" + key[1:]) is True:
                continue  # replaced by the exclusive bound above
            if key in _BOUNDS and isinstance(value, (int, float)) and not isinstance(value, bool):
                self._bound(key, value, where(key), out)
                continue
            if key in ("minProperties", "maxProperties"):
                self._count(node, key, value, where(key), out)
                continue
            if key == "pattern" and isinstance(value, str) and any(s in value for s in _LOOKAROUND):
                self.validated.append(f"pattern with look-around at {where(key)}")
                continue
            if key == "oneOf" and isinstance(value, list):
                self.one_of.append(where(key))
            if key in _SUB:
                out[key] = self.schema(value, path + [key])
            elif key in _SUB_MAPS and isinstance(value, dict):
                out[key] = {k: self.schema(v, path + [key, k]) for k, v in value.items()}
            elif key in _SUB_LISTS and isinstance(value, list):
                out[key] = [self.schema(v, path + [key, str(i)]) for i, v in enumerate(value)]
            elif key in _LITERALS:
                out[key] = value
            else:
                out[key] = self._container(value, path + [key])
        self._drop_implied_type(node, out, path)
        self._drop_implied_properties(out, path)
        return _required_first(_merge_all_of(out))

    def _drop_implied_properties(self, out: dict, path: list[str]) -> None:
        """A property whose schema is the same as that of a `patternProperties` pattern its name
        matches (up to annotations) must satisfy that pattern schema anyway: its own schema becomes
        `{}` in the grammar (llguidance would intersect the two, and cannot when they refer back
        to this object: "circular references with sibling keys")."""
        props, patterns = out.get("properties"), out.get("patternProperties")
        if not isinstance(props, dict) or not isinstance(patterns, dict):
            return
        for name, sub in props.items():
            if not isinstance(sub, dict) or not sub:
                continue
            for pat, psub in patterns.items():
                try:
                    hit = re.search(pat, name) is not None
                except re.error:
                    continue
                if hit and isinstance(psub, dict) and _without_annotations(sub) == _without_annotations(psub):
                    props[name] = {}
                    self.dropped.append(f"the schema of property {name!r}, the same as patternProperties "
                                        f"{pat!r}, at {pointer(path + ['properties', name])}")
                    break
                if hit and self.relax:
                    props[name] = {}  # the grammar enforces the pattern's schema only: a superset
                    self.validated.append(f"property {name!r} beside patternProperties {pat!r} that its name "
                                          f"matches (circular $ref) at {pointer(path + ['properties', name])}")
                    break

    def _drop_implied_type(self, node: dict, out: dict, path: list[str]) -> None:
        """Drop a `type` that every `anyOf`/`oneOf` branch (or the `$ref` target) beside it already implies.

        It constrains nothing then, and llguidance cannot intersect it with a recursive `$ref`
        ("circular references with sibling keys": `{"anyOf": [{"$ref": "#/definitions/author"}, ...],
        "type": "object"}` where the author refers back to this place).
        """
        declared = _type_set(out.get("type"))
        if declared is None:
            return
        def implied(sub: Any) -> bool:
            types = self._types_of(sub, 0)
            return types is not None and all(t in declared or (t == "integer" and "number" in declared)
                                             for t in types)
        for key in ("anyOf", "oneOf"):
            branches = node.get(key)
            if isinstance(branches, list) and branches and all(implied(b) for b in branches):
                del out["type"]
                self.dropped.append(f"type beside {key} whose every branch implies it at {pointer(path + ['type'])}")
                return
        if isinstance(out.get("$ref"), str) and implied({"$ref": out["$ref"]}):
            del out["type"]
            self.dropped.append(f"type beside a $ref that implies it at {pointer(path + ['type'])}")

    def _types_of(self, node: Any, depth: int) -> set[str] | None:
        """The JSON types every value valid against `node` has, as far as `type`, `$ref`, `enum`,
        `const`, `anyOf`/`oneOf` tell (None: not known)."""
        if not isinstance(node, dict) or depth > MAX_REF_CHAIN:
            return None
        ref = node.get("$ref")
        old = self.draft in ("draft-03", "draft-04", "draft-06", "draft-07")
        if isinstance(ref, str) and (old or "type" not in node):
            target = self._types_of(resolve_local(self.root, ref), depth + 1)
            if old or target is not None:
                return target
        types = _type_set(node.get("type"))
        if types is not None:
            return types
        for key in ("anyOf", "oneOf"):
            branches = node.get(key)
            if isinstance(branches, list) and branches:
                sets = [self._types_of(b, depth + 1) for b in branches]
                return None if any(t is None for t in sets) else set().union(*sets)
        return None

    def _bound(self, key: str, value: float, where: str, out: dict) -> None:
        """A numeric bound into the grammar, unless it is a huge one on the permissive side (HUGE_BOUND)."""
        lower = key in ("minimum", "exclusiveMinimum")
        if (value <= -HUGE_BOUND) if lower else (value >= HUGE_BOUND):
            self.validated.append(f"{key} {value} (beyond the grammar's number ranges) at {where}")
        else:
            out[key] = value

    def _format(self, node: dict, fmt: str, may_be_string: bool, where: str, out: dict) -> None:
        if not may_be_string:
            self.dropped.append(f"format {fmt!r} on a non-string at {where}")
        elif fmt in GRAMMAR_FORMATS:
            out["format"] = fmt
        elif fmt in PATTERN_FORMATS and "pattern" not in node:
            regex, max_len = PATTERN_FORMATS[fmt]
            out["pattern"] = f"^{regex}$"
            if max_len is not None:
                out["maxLength"] = min(max_len, node.get("maxLength", max_len))
        elif fmt in PATTERN_FORMATS or fmt in VALIDATED_FORMATS:
            self.validated.append(f"format {fmt!r} at {where}")
        else:
            self.dropped.append(f"format {fmt!r} (an annotation: not checked) at {where}")

    def _count(self, node: dict, key: str, value: Any, where: str, out: dict) -> None:
        props = node.get("properties") if isinstance(node.get("properties"), dict) else {}
        required = set(node.get("required") or []) if isinstance(node.get("required"), list) else set()
        closed = node.get("additionalProperties") is False and not node.get("patternProperties")
        if key == "minProperties" and value == 0:
            self.dropped.append(f"minProperties 0 at {where}")
        elif key == "maxProperties" and closed and len(props) <= value:
            self.dropped.append(f"maxProperties implied by the closed object at {where}")
        elif props and not set(props) <= required:
            self.validated.append(f"{key} beside optional properties at {where}")
        else:
            out[key] = value


def _required_first(out: dict) -> dict:
    """Put the required properties before the optional ones (each group in schema order).

    llguidance generates properties in the order of `properties`. With required ones first (as
    llama.cpp's GBNF converter does), the model writes what must be there, then may close the
    object: a schema that lists many optional properties ahead of a required one no longer walks
    the model through them. Only the generation order changes; JSON objects are unordered, so
    every answer is as valid as before.
    """
    props, required = out.get("properties"), out.get("required")
    if not isinstance(props, dict) or not isinstance(required, list) or len(props) < 2:
        return out
    must = [k for k in props if k in required]
    if not must or len(must) == len(props):
        return out
    out["properties"] = {**{k: props[k] for k in must}, **{k: v for k, v in props.items() if k not in must}}
    return out


def generation_order(grammar: Any, value: Any) -> Any:
    """`value` with every object's keys in the order the grammar generates them.

    The grammar writes the properties each (sub)schema lists in its `properties` (required
    first, see `_required_first`), then any other key. JSON objects are unordered, so this is the
    same value as the model would write it; the soundness checks replay values in this order.
    Best effort through `$ref` and `allOf` (their `properties` merged in order) and `anyOf`/`oneOf`
    (the branch that lists most of the object's keys).
    """
    root = grammar

    def schemas_at(node: Any, v: Any, seen: frozenset = frozenset()) -> list[dict]:
        """`node` and every subschema that applies to `v` at the same place, in order of appearance."""
        if not isinstance(node, dict) or id(node) in seen:
            return []
        seen = seen | {id(node)}
        # llguidance intersects a schema's keywords in the order they are written: the
        # properties of an applicator written before `properties` come first.
        out = [] if "properties" in node else [node]
        for key, sub in node.items():
            if key == "properties":
                out.append(node)
            elif key == "$ref" and isinstance(sub, str):
                out += schemas_at(resolve_local(root, sub), v, seen)
            elif key == "allOf" and isinstance(sub, list):
                for branch in sub:
                    out += schemas_at(branch, v, seen)
            elif key in ("anyOf", "oneOf") and isinstance(sub, list) and sub:
                def fit(branch: Any) -> int:
                    listed = {k for s in schemas_at(branch, v, seen) if isinstance(s.get("properties"), dict)
                              for k in s["properties"]}
                    return len(listed & set(v)) if isinstance(v, dict) else 0
                out += schemas_at(max(sub, key=fit), v, seen)  # max keeps the first of equals
        return out

    def walk(node: Any, v: Any, depth: int) -> Any:
        if depth > MAX_SCHEMA_DEPTH * 4:
            return v
        here = schemas_at(node, v)
        if isinstance(v, dict):
            order: dict[str, Any] = {}
            for s in here:
                if isinstance(s.get("properties"), dict):
                    for k, sub in s["properties"].items():
                        order.setdefault(k, sub)
            known = [k for k in order if k in v]
            rest = [k for k in v if k not in order]
            extra = next((s["additionalProperties"] for s in here if isinstance(s.get("additionalProperties"), dict)),
                         None)
            patterns = [(pat, sub) for s in here if isinstance(s.get("patternProperties"), dict)
                        for pat, sub in s["patternProperties"].items()]

            def other(k: str) -> Any:
                for pat, sub in patterns:
                    try:
                        if re.search(pat, k):
                            return sub
                    except re.error:
                        continue
                return extra

            return {**{k: walk(order[k], v[k], depth + 1) for k in known},
                    **{k: walk(other(k), v[k], depth + 1) for k in rest}}
        if isinstance(v, list):
            prefix = next((s["prefixItems"] for s in here if isinstance(s.get("prefixItems"), list)), [])
            items = next((s["items"] for s in here if isinstance(s.get("items"), dict)), None)
            return [walk(prefix[i] if i < len(prefix) else items, x, depth + 1) for i, x in enumerate(v)]
        return v

    return walk(grammar, value, 0)


# The stricter variant a cut answer is retried under (edge_qwen.engine.json_retry): strings and
# arrays with no upper bound get these, each only where the schema's own lower bound allows it.
CUT_RETRY_MAX_LENGTH = 64
CUT_RETRY_MAX_ITEMS = 5


# Schema-valued keywords: (keyword, whether its schemas constrain the same value as the schema
# beside them). "same" means they share that value's keys: such a member is not closed on its
# own ("inner": only when the schema beside it lists properties).
_SUBSCHEMAS = (("items", False), ("additionalItems", False), ("contains", False), ("propertyNames", False),
               ("unevaluatedItems", False), ("unevaluatedProperties", False), ("prefixItems", False),
               ("additionalProperties", False), ("properties", False), ("patternProperties", False),
               ("allOf", True), ("if", True), ("then", True), ("else", True), ("dependentSchemas", True),
               ("anyOf", "inner"), ("oneOf", "inner"))
# An object schema whose allowed keys may come from elsewhere: left as it is.
_KEYS_FROM_ELSEWHERE = ("additionalProperties", "patternProperties", "unevaluatedProperties", "propertyNames",
                        "allOf", "anyOf", "oneOf", "$ref", "if", "dependentSchemas", "dependencies")
_NOT_SUBSCHEMAS = ("not", "enum", "const", "default", "examples")  # values, or a subschema that must not narrow
# Keywords that say something about a schema but constrain nothing.
ANNOTATIONS = frozenset({"title", "description", "default", "examples", "$comment", "deprecated", "readOnly",
                         "writeOnly"})


def close_open_objects(schema: Any) -> Any:
    """`schema` with every object that lists `properties` but leaves `additionalProperties` unsaid
    closed to those properties (`additionalProperties: false`), for generating values.

    JSON Schema lets such an object hold any other key, and the small models fill that room
    with copies of the schema itself (`{"properties": {"version": "1.2.3"}}` for a function
    without parameters, `"type": "object", "description": ...` inside an answer until
    max_tokens): valid, but not what anyone asked for. Used for tool-call arguments (a
    function's parameters are its signature), Ollama's `format` schemas, and the retry of a JSON
    answer cut at max_tokens (strict_variant). Whatever is generated is still validated against
    the schema as sent. Left open: an object schema without `properties` (a free-form object);
    objects that say `additionalProperties` (or patternProperties...) or whose keys may come from a
    combinator or `$ref` beside them; objects whose `required` or `minProperties` needs undeclared
    keys; every member that shares its value with other schemas (allOf, then/else, and anyOf/oneOf
    members beside `properties`), and the `$ref` targets such members or a `$ref` with siblings
    point to; everything under `not`. The input is not changed; subschemas left as they are may
    be shared with it.
    """
    return _close(schema)[0]


def _close(schema: Any) -> tuple[Any, int]:
    """close_open_objects and how many objects it closed."""
    if not isinstance(schema, dict):
        return schema, 0
    shared_refs: set[str] = set()  # $ref targets that share their value with other keys
    closed = 0

    def walk(node: Any, shared: bool, ptr: str) -> Any:
        """`shared`: other schemas constrain the same value's keys (do not close this one)."""
        nonlocal closed
        if not isinstance(node, dict):
            return node
        out = dict(node)
        ref = out.get("$ref")
        if isinstance(ref, str) and (shared or set(out) - ANNOTATIONS - {"$ref"}):
            shared_refs.add(ref)
        inner = shared or isinstance(out.get("properties"), dict)
        for k, same in _SUBSCHEMAS:
            sub, flag = out.get(k), inner if same == "inner" else same
            if isinstance(sub, dict) and k in ("properties", "patternProperties", "dependentSchemas"):
                out[k] = {name: walk(v, flag, f"{ptr}/{k}/{name}") for name, v in sub.items()}
            elif isinstance(sub, dict):
                out[k] = walk(sub, flag, f"{ptr}/{k}")
            elif isinstance(sub, list):
                out[k] = [walk(v, flag, f"{ptr}/{k}/{i}") for i, v in enumerate(sub)]
        for k in ("$defs", "definitions"):
            if isinstance(out.get(k), dict):
                out[k] = {n: walk(v, f"{ptr}/{k}/{n}" in shared_refs, f"{ptr}/{k}/{n}") for n, v in out[k].items()}
        props = out.get("properties")
        if isinstance(props, dict) and not shared and not any(k in out for k in _KEYS_FROM_ELSEWHERE):
            required = out.get("required", [])
            need = out.get("minProperties", 0)
            if (isinstance(required, list) and all(r in props for r in required)
                    and isinstance(need, int) and need <= len(props)):
                out["additionalProperties"] = False
                closed += 1
        return out

    walk(schema, False, "#")  # first pass: which $ref targets are shared
    closed = 0
    return walk(schema, "#" in shared_refs, "#"), closed


def strict_variant(grammar: Any) -> tuple[Any, list[str]]:
    """A copy of `grammar` that accepts a subset of its values, for retrying an answer cut at max_tokens.

    The small model tends to copy the schema itself (`"type": "object", "description": ...`) as
    extra keys into objects whose `additionalProperties` is left open, or to repeat digits, items
    and nesting until max_tokens: answers that are valid JSON Schema but never end. The variant
    closes every object that lists `properties` and says nothing of `additionalProperties` or
    `patternProperties` (`additionalProperties: false`), bounds strings without length, pattern,
    format, enum or const to CUT_RETRY_MAX_LENGTH characters and arrays without `maxItems` to
    CUT_RETRY_MAX_ITEMS items. Keywords are added, none removed, and nothing under `not` (or inside
    enum, const, default, examples) is touched. Which objects stay open, because closing them could
    leave no value at all: close_open_objects. Returns the copy and what it changed.
    """
    if not isinstance(grammar, dict):
        return grammar, []
    root, closed = _close(grammar)
    root = copy.deepcopy(root)
    stack: list[Any] = [root]
    nodes: list[dict] = []
    while stack:
        n = stack.pop()
        if isinstance(n, dict):
            nodes.append(n)
            stack.extend(v for k, v in n.items() if isinstance(v, (dict, list)) and k not in _NOT_SUBSCHEMAS)
        elif isinstance(n, list):
            stack.extend(v for v in n if isinstance(v, (dict, list)))
    strings = arrays = 0
    for n in nodes:
        types = n.get("type")
        types = {types} if isinstance(types, str) else set(types) if isinstance(types, list) else set()
        free = not any(k in n for k in ("enum", "const", "pattern", "format", "maxLength", "$ref", "anyOf", "oneOf",
                                        "allOf"))
        if types == {"string"} and free and (n.get("minLength") or 0) <= CUT_RETRY_MAX_LENGTH:
            n["maxLength"] = CUT_RETRY_MAX_LENGTH
            strings += 1
        if (types == {"array"} and "maxItems" not in n and (n.get("minItems") or 0) <= CUT_RETRY_MAX_ITEMS
                and len(n.get("prefixItems") or []) <= CUT_RETRY_MAX_ITEMS and "contains" not in n):
            n["maxItems"] = CUT_RETRY_MAX_ITEMS
            arrays += 1
    changes = [f"{k} {what}" for k, what in ((closed, "open objects closed"), (strings, "strings bounded"),
                                             (arrays, "arrays bounded")) if k]
    return root, changes


# Keywords that read each other within one schema object: merged only when one side has them all.
_INTERACTING = (frozenset({"properties", "patternProperties", "additionalProperties", "unevaluatedProperties"}),
                frozenset({"items", "prefixItems", "additionalItems", "unevaluatedItems"}),
                frozenset({"if", "then", "else"}), frozenset({"contains", "minContains", "maxContains"}))


def _merge_all_of(out: dict) -> dict:
    """Merge `allOf` branches into the schema beside them where that means the same (an exact rewrite).

    `{"type": "object", "allOf": [{"properties": ...}]}` (how many generated schemas wrap their
    body) is what llguidance must intersect, and it cannot when a property refers back to the
    root ("circular references with sibling keys"). A branch is merged when it shares no keyword
    with the schema (or the same value), neither holds `$ref`, `$defs` or `definitions`, and of each group of
    keywords that read each other (`properties`/`additionalProperties`..., `items`/`prefixItems`...,
    `if`/`then`/`else`, `contains`...) only one side has any: the conjunction is then the same.
    """
    branches = out.get("allOf")
    if not isinstance(branches, list):
        return out
    kept = []
    for branch in branches:
        here = set(out) - {"allOf"}
        ok = (isinstance(branch, dict) and not ({"$ref", "$defs", "definitions", "$id", "id", "allOf"} & set(branch))
              and "$ref" not in out
              and all(out[k] == v for k, v in branch.items() if k in here)
              and all(not (g & here and g & set(branch)) for g in _INTERACTING))
        if ok:
            out.update(branch)
        else:
            kept.append(branch)
    if kept:
        out["allOf"] = kept
    else:
        del out["allOf"]
    return out


def _without_annotations(schema: dict) -> dict:
    return {k: v for k, v in schema.items() if k not in ANNOTATIONS}


def _type_set(value: Any) -> set[str] | None:
    if isinstance(value, str):
        return {value}
    if isinstance(value, list) and value and all(isinstance(t, str) for t in value):
        return set(value)
    return None


def _at_most_one_item(node: dict) -> bool:
    return isinstance(node.get("maxItems"), int) and node["maxItems"] <= 1


def metaschema_problems(schema: dict) -> list[str]:
    """Every place the schema breaks its metaschema (jsonschema's check_schema), one line each."""
    import jsonschema

    cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
    meta = cls(cls.META_SCHEMA)
    out: list[str] = []
    try:
        errors = sorted(meta.iter_errors(schema), key=lambda e: [str(p) for p in e.path])
    except RecursionError:
        return ["the JSON schema is too deeply nested to check; flatten it"]
    for err in errors:
        # The deepest cause says most (anyOf/oneOf failures have their branches as context).
        leaf = min(err.context, key=lambda e: -len(e.absolute_path)) if err.context else err
        line = f"invalid JSON schema at {pointer([str(p) for p in leaf.absolute_path])}: {leaf.message[:200]}"
        if line not in out:
            out.append(line)
    return out


def plan_schema(schema: Any, param: str = "response_format", relax_circular: bool = False) -> SchemaPlan:
    """Check `schema` and plan how it is enforced (see the module docstring).

    `relax_circular` (after llguidance refused the plain plan for "circular references with
    sibling keys"): a property whose name also matches a `patternProperties` pattern gets only the
    pattern's schema in the grammar (llguidance would intersect the two), and validation checks both.

    Raises one SchemaError that lists every blocker with its JSON path: an invalid schema
    (each metaschema error), size limits, remote or dynamic references, unsafe x-guidance options.
    """
    if not isinstance(schema, dict):
        raise SchemaError(f"{param}: the JSON schema must be an object such as {{\"type\": \"object\", ...}}, "
                          f"got {json.dumps(schema)[:60]}", param=param)
    deep = depth_problem(schema)
    if deep is not None:  # the other checks recurse: nothing else can safely be said
        raise SchemaError(f"{param}: {deep}", param=param)
    blockers = metaschema_problems(schema)
    size = fanout_problem(schema)
    if size is not None:
        blockers.append(size)
    walk = _Walk(schema, relax_circular)
    grammar = walk.schema(copy.deepcopy(schema), [])
    if "x-guidance" in schema:
        blockers += x_guidance_problems(schema["x-guidance"])
    blockers += walk.blockers + walk.remote_blockers()
    if blockers:
        listed = "; ".join(blockers[:20]) + (f"; and {len(blockers) - 20} more" if len(blockers) > 20 else "")
        raise SchemaError(f"{param}: the schema cannot be enforced: {listed}. Fix or remove these "
                          "(they are refused rather than ignored)", param=param)
    grammar.pop("$schema", None)  # the grammar copy is in 2020-12 form now (tuple items, exclusive bounds)
    return SchemaPlan(validation=schema, grammar=grammar, validated=walk.validated, dropped=walk.dropped,
                      one_of_paths=walk.one_of)


__all__ = ["SchemaPlan", "plan_schema", "strict_variant", "close_open_objects", "CUT_RETRY_MAX_LENGTH", "CUT_RETRY_MAX_ITEMS", "pointer", "generation_order", "DATE_RE", "TIME_RE", "HOSTNAME_RE"]
