"""Qwen's tool calls, in one place: checking tools, the call grammar, the constraint, the parser.

Qwen2.5 is trained to answer a call as

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

(`<tool_call>` is one token, 151657), one block per call, after optional text. The 0.5B model
often writes the bare JSON object without the tag. Parsing alone is therefore fragile, so every
call is generated under the JSON constraint engine against the schema
{"name": const NAME, "arguments": PARAMETERS} (an anyOf over the offered tools):

- tool_choice "required" or a named function: constrained from the first token (the mask lets
  only `<tool_call>` through, then the JSON grammar takes over);
- "auto": free text until the model starts a call, either with the `<tool_call>` token anywhere
  or with `{` as the first character of the reply; from there the call is constrained;
- "none": no tools in the prompt's grammar, plain text.

`ToolCallConstraint` implements the decode loop's Constraint protocol; `ToolCallParser` turns
the streamed text back into content and calls (OpenAI-shaped deltas when streaming), and
re-validates every call with jsonschema, so a call that does not validate is never returned.
"""

from __future__ import annotations

import dataclasses
import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

from ..errors import ConstraintViolation, RequestError, SchemaError
from .json_normalize import ANNOTATIONS, close_open_objects
from .json_schema import check_schema, validate_output

OPEN_TAG = "<tool_call>"
CLOSE_TAG = "</tool_call>"
XML_FUNCTION = "<function="  # Qwen3.5 / Qwen3-Coder write calls as XML (engine/tool_calls_xml.py)
TOOL_CHOICES = ("none", "auto", "required")
_NAME = re.compile(r'^[^\s"\\<>]{1,64}$')
_ANY_OBJECT = {"type": "object"}


# -- request side: tools, tool_choice, history ---------------------------------------------------
@dataclass
class Tools:
    """The checked tools of one request and how the model may use them."""

    specs: list[dict[str, Any]]               # OpenAI-shaped {"type": "function", "function": {...}}
    schemas: dict[str, dict[str, Any]]        # name -> checked parameters schema
    choice: str = "auto"                      # "none" | "auto" | "required" (a named function: "required")
    names: list[str] = field(default_factory=list)   # the functions the model may call now
    parallel: bool = True
    constrain: bool = True                    # False: tools in the prompt, output left free (measurement only)

    withdrawn: list[str] = field(default_factory=list)  # answered already this turn (see for_turn)

    @property
    def offered(self) -> bool:
        """Whether the tools are in the prompt (tool_choice is not "none")."""
        return self.choice != "none"

    @property
    def active(self) -> bool:
        """Whether the model may call a tool now (offered, and some function left to call)."""
        return self.offered and bool(self.names)

    def for_turn(self, messages: Any) -> Tools:
        """These tools for the reply that follows `messages`, with the repeat guard applied.

        With tool_choice "auto", a function that takes no arguments and was already called and
        answered since the last user message is withdrawn: calling it again could only repeat the
        call whose result the model holds, and small models do exactly that in a loop (until the
        client's chain limit). It stays in the prompt and callable on the next user turn. Functions
        with arguments are left callable (a second call with other arguments is legitimate)."""
        if self.choice != "auto" or not isinstance(messages, list):
            return self
        answered: set[str] = set()
        for m in reversed(messages):
            if not isinstance(m, dict) or m.get("role") == "user":
                break
            if m.get("role") == "assistant" and isinstance(m.get("tool_calls"), list):
                for call in m["tool_calls"]:
                    fn = call.get("function") if isinstance(call, dict) else None
                    if isinstance(fn, dict) and isinstance(fn.get("name"), str):
                        answered.add(fn["name"])
        gone = [n for n in self.names if n in answered and _takes_no_arguments(self.schemas[n])]
        if not gone:
            return self
        return dataclasses.replace(self, names=[n for n in self.names if n not in gone], withdrawn=gone)

    def call_schema(self) -> dict[str, Any]:
        """The JSON schema of one call: {"name": const, "arguments": parameters}, an anyOf over the names."""
        branches, defs = [], {}
        for i, name in enumerate(self.names):
            params = _hoist_defs(close_open_objects(self.schemas[name]), f"t{i}_", defs)
            branches.append({"type": "object", "properties": {"name": {"const": name}, "arguments": params},
                             "required": ["name", "arguments"], "additionalProperties": False})
        schema: dict[str, Any] = branches[0] if len(branches) == 1 else {"anyOf": branches}
        if defs:
            schema = {**schema, "$defs": defs}
        return schema


def _takes_no_arguments(schema: Any) -> bool:
    """Whether the only arguments `schema` admits are {} (as generated: closed objects, see below)."""
    closed = close_open_objects(schema)
    if not isinstance(closed, dict) or set(closed) - ANNOTATIONS - {"$ref", "type", "properties",
                                                                     "additionalProperties", "required"}:
        return False
    return (closed.get("type", "object") == "object" and not closed.get("properties")
            and closed.get("additionalProperties") is False and not closed.get("required"))


def _hoist_defs(params: dict[str, Any], prefix: str, defs: dict[str, Any]) -> dict[str, Any]:
    """`params` with its $defs/definitions moved into `defs` under `prefix` and its local $refs rewritten,
    so several tools' schemas can live in one document."""
    local = {**params.get("definitions", {}), **params.get("$defs", {})}
    root_name = prefix + "_root"

    def rewrite(node: Any) -> Any:
        if isinstance(node, list):
            return [rewrite(v) for v in node]
        if not isinstance(node, dict):
            return node
        out = {}
        for k, v in node.items():
            if k in ("$defs", "definitions") and node is params:
                continue
            if k == "$ref" and isinstance(v, str):
                if v == "#":
                    v = "#/$defs/" + root_name
                    defs.setdefault(root_name, None)
                else:
                    for head in ("#/$defs/", "#/definitions/"):
                        if v.startswith(head):
                            v = "#/$defs/" + prefix + v[len(head):]
                out[k] = v
            else:
                out[k] = rewrite(v)
        return out

    body = rewrite(params)
    for name, sub in local.items():
        defs[prefix + name] = rewrite(sub)
    if root_name in defs:
        defs[root_name] = body
    return body


def parse_tools(tools: Any, tool_choice: Any = None, parallel_tool_calls: Any = None,
                param: str = "tools") -> Tools | None:
    """Check OpenAI-shaped `tools` and `tool_choice`; None when no tools are given.

    Raises RequestError for a malformed tool, a repeated name or an unknown tool in
    tool_choice, and SchemaError for `parameters` that are not a schema the engine can enforce
    (named by its place, e.g. tools[2].function.parameters).
    """
    if tools is None or tools == []:
        if tool_choice not in (None, "none", "auto"):
            raise RequestError("tool_choice is set but no tools are given; send tools or leave tool_choice out",
                               param="tool_choice")
        return None
    if not isinstance(tools, list):
        raise RequestError(f"{param} must be a list of {{'type': 'function', 'function': {{...}}}} objects",
                           param=param)
    specs, schemas = [], {}
    for i, tool in enumerate(tools):
        where = f"{param}[{i}]"
        if not isinstance(tool, dict):
            raise RequestError(f"{where} must be an object like {{'type': 'function', 'function': {{'name': ...}}}}",
                               param=where)
        if tool.get("type", "function") != "function":
            raise RequestError(f"{where}.type is {tool.get('type')!r}: only 'function' tools are served", param=where)
        fn = tool.get("function", tool if "name" in tool else None)
        if not isinstance(fn, dict):
            raise RequestError(f"{where}.function must be an object with 'name' and 'parameters'",
                               param=f"{where}.function")
        name = fn.get("name")
        if not isinstance(name, str) or not _NAME.match(name):
            raise RequestError(f"{where}.function.name must be 1-64 characters without spaces, quotes, backslashes "
                               f"or angle brackets, got {json.dumps(name)}", param=f"{where}.function.name")
        if name in schemas:
            raise RequestError(f"{where}.function.name {name!r} is given twice; give each tool a unique name",
                               param=f"{where}.function.name")
        description = fn.get("description")
        if description is not None and not isinstance(description, str):
            raise RequestError(f"{where}.function.description must be a string", param=f"{where}.function.description")
        params = fn.get("parameters")
        ppath = f"{where}.function.parameters"
        if params is None:
            params = dict(_ANY_OBJECT)
        if not isinstance(params, dict):
            raise SchemaError(f"{ppath} must be a JSON schema object such as {{'type': 'object', 'properties': ...}}",
                              param=ppath)
        check_schema(params, ppath)  # the JSON issue's rules: refused, never dropped silently
        checked = params  # the user's schema: what the parser validates every call against
        if checked.get("type", "object") != "object" and "anyOf" not in checked and "$ref" not in checked:
            raise SchemaError(f"{ppath} must describe an object (\"type\": \"object\"): arguments are a JSON object",
                              param=ppath)
        schemas[name] = checked
        spec_fn = {"name": name, **({"description": description} if description else {}), "parameters": params}
        specs.append({"type": "function", "function": spec_fn})
    names = list(schemas)
    choice = "auto"
    if tool_choice is None or tool_choice == "auto":
        pass
    elif tool_choice in ("none", "required"):
        choice = tool_choice
    elif isinstance(tool_choice, dict):
        fn = tool_choice.get("function") if tool_choice.get("type", "function") == "function" else None
        name = fn.get("name") if isinstance(fn, dict) else tool_choice.get("name")
        if not isinstance(name, str):
            raise RequestError('tool_choice must be "none", "auto", "required" or {"type": "function", '
                               '"function": {"name": ...}}', param="tool_choice")
        if name not in schemas:
            raise RequestError(f"tool_choice names the function {name!r}, which is not among the tools "
                               f"({', '.join(names)}); name one of them", param="tool_choice")
        choice, names = "required", [name]
    else:
        raise RequestError(f'tool_choice must be "none", "auto", "required" or {{"type": "function", "function": '
                           f'{{"name": ...}}}}, got {json.dumps(tool_choice)[:80]}', param="tool_choice")
    if parallel_tool_calls is not None and not isinstance(parallel_tool_calls, bool):
        raise RequestError("parallel_tool_calls must be true or false", param="parallel_tool_calls")
    return Tools(specs, schemas, choice, names, parallel_tool_calls is not False)


def prepare_history(messages: list[dict[str, Any]], param: str = "messages") -> list[dict[str, Any]]:
    """Messages with tool calls made ready for Qwen's template; checks the tool-call history.

    An assistant message's `tool_calls[].function.arguments` may be a JSON string (OpenAI) or an
    object (Ollama); the template wants an object. Every `tool` message must answer a call
    made earlier: its `tool_call_id` must be the id of an assistant tool call (when the caller's
    API has ids), otherwise it is refused, since the model could not tell what it answers.
    """
    out, ids, made = [], set(), 0
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            out.append(m)  # validate_messages names it
            continue
        m = dict(m)
        role = m.get("role")
        calls = m.get("tool_calls")
        if role == "assistant" and calls:
            if not isinstance(calls, list):
                raise RequestError(f"{param}[{i}].tool_calls must be a list", param=f"{param}[{i}].tool_calls")
            fixed = []
            for j, call in enumerate(calls):
                where = f"{param}[{i}].tool_calls[{j}]"
                fn = call.get("function") if isinstance(call, dict) else None
                if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
                    raise RequestError(f"{where} must be {{'id', 'type': 'function', 'function': {{'name', "
                                       f"'arguments'}}}}", param=where)
                args = fn.get("arguments", {})
                if isinstance(args, str):
                    try:
                        args = json.loads(args) if args.strip() else {}
                    except ValueError:
                        raise RequestError(f"{where}.function.arguments is not valid JSON: {args[:80]!r}",
                                           param=f"{where}.function.arguments") from None
                if call.get("id") is not None:
                    ids.add(call["id"])
                made += 1
                fixed.append({**call, "function": {"name": fn["name"], "arguments": args}})
            m["tool_calls"] = fixed
            if m.get("content") is None:
                m["content"] = ""
        elif role == "tool":
            cid = m.get("tool_call_id")
            if cid is not None and cid not in ids:
                raise RequestError(f"{param}[{i}] is a tool result for tool_call_id {cid!r}, but no earlier "
                                   "assistant message made a call with that id; send the assistant message with "
                                   "its tool_calls before the results", param=f"{param}[{i}].tool_call_id")
            if cid is None and not made:
                raise RequestError(f"{param}[{i}] is a tool result but no earlier assistant message made a tool "
                                   "call; send the assistant message with its tool_calls first",
                                   param=f"{param}[{i}]")
        if m.get("content") is None and role == "assistant":  # OpenAI: an assistant turn may have no text
            m["content"] = ""
        out.append(m)
    return out


def check_tool_ids(messages: list[dict[str, Any]], param: str = "messages") -> None:
    """For APIs with call ids (OpenAI): every tool message must carry the id of an earlier call."""
    for i, m in enumerate(messages):
        if m.get("role") == "tool" and not m.get("tool_call_id"):
            raise RequestError(f"{param}[{i}] is a tool message without tool_call_id; give the id of the call it "
                               "answers", param=f"{param}[{i}].tool_call_id")


# -- generation side: the constraint ---------------------------------------------------------------
_FENCE = re.compile(r"```(?:json)?[ \t]*\n")
_CALL_HEAD = '{"name"'


def call_start(text: str, names: list[str] | None = None) -> tuple[str, int]:
    """Whether a reply beginning with `text` is a call: ("yes", offset of its "{"), ("maybe", -1) while it
    could still become one, or ("no", -1). A call opens `{"name": "NAME"` (after optional whitespace and a
    ```json fence); with `names`, only once NAME is complete and one of them: a reply that invents a
    function is text, not a call forced onto another tool."""
    body = text.lstrip()
    at = len(text) - len(body)
    if body.startswith("`"):
        m = _FENCE.match(body)
        if m is None:
            return ("maybe", -1) if len(body) < 12 and re.fullmatch(r"`{1,3}(j(s(o(n)?)?)?)?[ \t]*", body) else ("no", -1)
        at += m.end()
        body = body[m.end():]
    if not body:
        return "maybe", -1
    if not body.startswith("{"):
        return "no", -1
    squeezed = re.sub(r"\s+", "", body)
    heads = [_CALL_HEAD] if names is None else [f'{_CALL_HEAD}:{json.dumps(n, ensure_ascii=False)}' for n in names]
    if any(squeezed.startswith(h) for h in heads):
        return "yes", at
    if any(h.startswith(squeezed) for h in heads):
        return "maybe", -1
    return "no", -1


class ToolCallConstraint:
    """The decode loop's constraint for a request with tools (see the module docstring).

    Phases: "free" (auto: nothing masked, watching for the start of a call), "open" (required:
    only `<tool_call>` may come), "call" (the JSON grammar of a call), "after" (a call closed:
    another `<tool_call>` or the end of the turn), "text" (auto reply that is plain text).
    """

    def __init__(self, llm: Any, tools: Tools):
        from .json_constraint import make_constraint

        # A model trained on XML calls (Qwen3.5, Qwen3-Coder: its chat template shows <function=...>)
        # gets the XML call's grammar after <tool_call> instead of the JSON one (engine/tool_calls_xml.py).
        self.xml = XML_FUNCTION in (getattr(llm, "chat_template", None) or "")
        if self.xml:
            from .tool_calls_xml import make_xml_constraint

            self._make = lambda: make_xml_constraint(llm, tools)
        else:
            self._make = lambda: make_constraint(llm, {"type": "json_schema", "json_schema": {
                "name": "tool_call", "schema": tools.call_schema()}}, param="tools")
        self.tools = tools
        tok = llm.tokenize
        open_ids = tok(OPEN_TAG, special=True)
        close_ids = tok(CLOSE_TAG, special=True)
        self.open_id = open_ids[0] if len(open_ids) == 1 else None
        self.close_id = close_ids[0] if len(close_ids) == 1 else None
        self.newline = tok("\n", special=False)
        self.eos = int(llm.llama.token_eos())
        self._pieces = llm._pieces
        self._json = self._make() if tools.names else None  # compiled now: a schema the engine cannot take
        # fails before the prompt runs. No names: every function was withdrawn (Tools.for_turn), text only.
        self.phase = "open" if tools.choice == "required" and self.open_id is not None else \
            "call" if tools.choice == "required" else "free"
        self.calls = 0
        self.start_kind: str | None = None  # how the first call began: "tag", "bare" or "fenced" (measured)
        self._watching = self.phase == "free"  # auto, no visible text yet: a reply opening like a call is one
        self._seen = ""
        self._seen_tokens: list[tuple[int, int]] = []  # (character offset in _seen, token)
        self._tagged = False        # the current call was opened by <tool_call>
        self._after_tokens = 0
        if not tools.constrain or not tools.names:  # measurement mode (nothing masked), or nothing to call
            self.phase, self._watching = "text", False
        if self.xml:  # a call starts with <tool_call> only (no bare-JSON start to watch for)
            self._watching = False

    # the Constraint protocol
    def mask_logits(self, logits: Any) -> None:
        import numpy as np

        if self.phase == "call":
            self._json.mask_logits(logits)
            return
        if self.phase in ("free", "text"):
            if not self.tools.names and self.tools.constrain and self.open_id is not None:
                logits[self.open_id] = -np.inf  # no function may be called now: no call may open
            return
        allowed = [self.open_id] if self.phase == "open" else self._after_allowed()
        keep = np.asarray([t for t in allowed if t is not None], dtype=np.int64)
        saved = logits[keep].copy()
        logits[:] = -np.inf
        logits[keep] = saved

    def _after_allowed(self) -> list[int | None]:
        if not self.tools.parallel:
            return [self.eos]
        # Between calls only another call or the end of the turn; one newline of spacing at most.
        return [self.open_id, self.eos] + (self.newline[:1] if self._after_tokens == 0 else [])

    def commit(self, token_id: int) -> list[int]:
        tok = int(token_id)
        if not self.tools.constrain:
            return []
        if self.phase == "call":
            forced = self._json.commit(tok)
            return self._after_json(forced)
        if (tok == self.open_id and self.open_id is not None and self.tools.names
                and self.phase in ("free", "text", "open", "after")):
            self.start_kind = self.start_kind or "tag"
            return self._begin(tagged=True)
        if self.phase == "after":
            self._after_tokens += 1
            return []
        if self.phase == "free" and self._watching:
            return self._watch(tok)
        return []

    def _watch(self, tok: int) -> list[int]:
        # auto: the reply's first characters decide. A reply that opens like a call (`{"name"`,
        # possibly inside a ```json fence) becomes one: its tokens so far are replayed into the call
        # grammar, which constrains the rest. Anything else is text, and only <tool_call> starts a call.
        start = len(self._seen)
        self._seen += self._pieces.piece(tok).decode("utf-8", errors="ignore")
        self._seen_tokens.append((start, tok))
        state, at = call_start(self._seen, self.tools.names)
        if state == "maybe":
            return []
        self._watching = False
        if state == "no":
            self.phase = "text"
            return []
        replay = [t for pos, t in self._seen_tokens if pos >= at]
        if not self._seen_tokens or not any(pos == at for pos, _ in self._seen_tokens):
            self.phase = "text"  # a token straddles the call's first "{": it cannot be replayed
            return []
        m = self._json._matcher  # noqa: SLF001 (our engine's matcher)
        if not all(m.consume_token(t) for t in replay):
            self.phase = "text"
            self._json = self._make()
            return []
        self.phase, self._tagged = "call", False
        self.start_kind = "fenced" if self._seen.lstrip().startswith("`") else "bare"
        return self._after_json(self._json_ff())

    def _json_ff(self) -> list[int]:
        m = self._json._matcher  # noqa: SLF001
        self._json._mask_ready = False  # noqa: SLF001
        if m.is_stopped():
            return []
        forced = m.compute_ff_tokens()
        if forced and not m.consume_tokens(forced):
            raise ConstraintViolation("the tool-call grammar rejected its own forced tokens")
        return list(forced)

    def _begin(self, tagged: bool) -> list[int]:
        if self.calls:
            self._json = self._make()
        self.phase, self._tagged, self._watching = "call", tagged, False
        # The trained format puts a newline after <tool_call>; the JSON grammar starts after it.
        return list(self.newline) + self._json_ff()

    def _after_json(self, forced: list[int]) -> list[int]:
        if not self._json.is_finished():
            return forced
        self.calls += 1
        self.phase, self._after_tokens = "after", 0
        if self._tagged and self.close_id is not None and self.tools.parallel:
            return forced + list(self.newline) + [self.close_id]
        return forced

    def is_finished(self) -> bool:
        return self.phase == "after" and not self.tools.parallel

    def finalize(self, text: str, finish_reason: str) -> None:
        # The parser re-validates each call it returns; an unfinished call is left out by it.
        if finish_reason == "stop" and self.phase == "call" and self.calls == 0 and self.tools.choice == "required":
            raise ConstraintViolation("generation stopped inside a required tool call (a stop string?)")


# -- output side: the parser -----------------------------------------------------------------------
@dataclass
class ToolCall:
    """One finished call: its id, function name and arguments as JSON text (OpenAI's form)."""

    id: str
    name: str
    arguments: str
    index: int = 0

    def openai(self) -> dict[str, Any]:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}

    def value(self) -> dict[str, Any]:
        return json.loads(self.arguments)


_HEADER = re.compile(r'\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"arguments"\s*:\s*')


def new_call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


class _ValueEnd:
    """Finds where one JSON value ends in text fed piece by piece (strings and nesting tracked)."""

    def __init__(self) -> None:
        self.depth, self.in_str, self.esc, self.started, self.done = 0, False, False, False, False

    def feed(self, text: str) -> int:
        """Index in `text` just past the value's end, or -1 if it has not ended yet."""
        for i, ch in enumerate(text):
            if self.in_str:
                if self.esc:
                    self.esc = False
                elif ch == "\\":
                    self.esc = True
                elif ch == '"':
                    self.in_str = False
                    if self.depth == 0:
                        self.done = True
                        return i + 1
            elif ch == '"':
                self.in_str, self.started = True, True
            elif ch in "{[":
                self.depth += 1
                self.started = True
            elif ch in "}]":
                self.depth -= 1
                if self.depth == 0:
                    self.done = True
                    return i + 1
            elif not ch.isspace():
                self.started = True
        return -1


class ToolCallParser:
    """Splits a reply's streamed text into content and tool calls.

    feed(text, token_ids) returns events: ("content", text), ("call", index, id, name) when a
    call's name is known, ("args", index, text) for pieces of its arguments, ("end", index,
    valid) when it closed. finish() returns (content, calls): only calls whose arguments parse
    and validate against their tool are returned.
    """

    def __init__(self, tools: Tools | None, open_id: int | None = None):
        self.tools = tools
        self.open_id = open_id
        self.mode = "start" if tools is not None and tools.active else "text"
        self.content: list[str] = []
        self.calls: list[ToolCall] = []
        self._hold = ""             # text not yet assigned to content or a call
        self._current: ToolCall | None = None
        self._end = _ValueEnd()
        self._n = 0                 # calls begun (valid or not): the next call's index
        self._xml: Any = None       # the XML call being read (tool_calls_xml.XmlCall)

    def feed(self, text: str, token_ids: list[int] | None = None) -> list[tuple]:
        if self.mode == "text":
            return self._text(text)
        if self.open_id is not None and token_ids and self.open_id in token_ids and OPEN_TAG not in text:
            text = OPEN_TAG + text  # the tag token rendered as nothing: put its text back for the scan
        self._hold += text
        events: list[tuple] = []
        while True:
            state = (self.mode, len(self._hold), self._current is None)
            events += self._step()
            if (self.mode, len(self._hold), self._current is None) == state or self.mode == "text":
                return events

    def _text(self, text: str) -> list[tuple]:
        if text:
            self.content.append(text)
            return [("content", text)]
        return []

    def _step(self) -> list[tuple]:
        h = self._hold
        if self.mode == "start":
            s = h.lstrip()
            if s.startswith(OPEN_TAG):
                self.mode, self._hold = "call", s[len(OPEN_TAG):]
                return []
            state, at = call_start(h)
            if state == "yes":
                self.mode, self._hold = "call", h[at:]
            elif state == "no" and not OPEN_TAG.startswith(s):
                self.mode = "content"
            return []
        if self.mode == "content":
            i = h.find(OPEN_TAG)
            if i >= 0:
                self._hold, self.mode = h[i + len(OPEN_TAG):], "call"
                return self._text(h[:i].rstrip())
            keep = next((k for k in range(min(len(OPEN_TAG) - 1, len(h)), 0, -1) if h.endswith(OPEN_TAG[:k])), 0)
            out, self._hold = h[:len(h) - keep], h[len(h) - keep:]
            return self._text(out)
        if self.mode == "call":
            return self._call()
        if self.mode == "close":  # the arguments ended: only whitespace and the wrapper's "}" remain
            j = h.find("}")
            if j < 0:
                self._hold = "" if not h.strip() else h
                if h.strip():
                    return self._close(valid=False)
                return []
            self._hold = h[j + 1:]
            return self._close(valid=not h[:j].strip())
        # mode "after": between calls
        s = h.lstrip()
        if s.startswith(CLOSE_TAG) or s.startswith("```"):
            self._hold = s[len(CLOSE_TAG) if s.startswith(CLOSE_TAG) else 3:]
        elif s.startswith(OPEN_TAG):
            self._hold, self.mode = s[len(OPEN_TAG):], "call"
        elif s.startswith("{"):
            self._hold, self.mode = s, "call"
        elif s and not OPEN_TAG.startswith(s) and not CLOSE_TAG.startswith(s) and not "```".startswith(s):
            self._hold = ""  # nothing else belongs between calls (the constraint lets nothing else through)
        else:
            self._hold = s
        return []

    def _call(self) -> list[tuple]:
        if self._xml is not None or (self._current is None and self._hold.lstrip().startswith(XML_FUNCTION)):
            return self._call_xml()
        if self._current is None and XML_FUNCTION.startswith(self._hold.lstrip()) and self._hold.strip():
            return []  # "<func...": may still become an XML call
        if self._current is None:
            m = _HEADER.match(self._hold)
            if m is None:
                if len(self._hold) > 4096 or not _could_be_header(self._hold):
                    return self._give_up()
                return []
            try:
                name = json.loads('"' + m.group(1) + '"')
            except ValueError:
                return self._give_up()
            if self.tools is None or name not in self.tools.schemas:
                return self._give_up()  # a function that was not offered: the model's text, not a call
            self._current = ToolCall(new_call_id(), name, "", self._n)
            self._n += 1
            self._end = _ValueEnd()
            self._hold = self._hold[m.end():]
            return [("call", self._current.index, self._current.id, name)]
        rest, self._hold = self._hold, ""
        if not self._current.arguments:
            rest = rest.lstrip()  # the value starts at its first character
        cut = self._end.feed(rest)
        piece = rest if cut < 0 else rest[:cut]
        events: list[tuple] = []
        if piece:
            self._current.arguments += piece
            events.append(("args", self._current.index, piece))
        if cut >= 0:
            self._hold, self.mode = rest[cut:], "close"
        return events

    def _call_xml(self) -> list[tuple]:
        """Qwen3.5 / Qwen3-Coder's XML call: <function=NAME> <parameter=KEY>VALUE</parameter>... </function>.

        The arguments stream as JSON text, one parameter at a time as each closes (see xml_value)."""
        from .tool_calls_xml import XmlCall

        if self._xml is None:
            s = self._hold.lstrip()
            end = s.find(">")
            if end < 0:
                return self._give_up() if len(s) > 256 else []
            name = s[len(XML_FUNCTION):end].strip()
            if self.tools is None or name not in self.tools.schemas:
                return self._give_up()
            self._current = ToolCall(new_call_id(), name, "", self._n)
            self._n += 1
            self._xml = XmlCall(self.tools.schemas[name])
            self._hold = s[end + 1:]
            return [("call", self._current.index, self._current.id, name)]
        call = self._current
        assert call is not None
        pieces, rest, state = self._xml.feed(self._hold)
        self._hold = rest
        events: list[tuple] = []
        for piece in pieces:
            call.arguments += piece
            events.append(("args", call.index, piece))
        if state == "bad":
            self._xml = None
            return events + self._close(valid=False)
        if state == "done":
            self._xml = None
            self.mode = "after"
            return events + self._close(valid=True)
        return events

    def _close(self, valid: bool) -> list[tuple]:
        call = self._current
        assert call is not None
        valid = valid and self._valid(call)
        if valid:
            self.calls.append(call)
        self._current, self.mode = None, "after"
        return [("end", call.index, valid)]

    def _valid(self, call: ToolCall) -> bool:
        tools = self.tools
        if tools is None or call.name not in tools.schemas:
            return False
        try:
            validate_output(call.arguments, tools.schemas[call.name])
        except ConstraintViolation:
            return False
        return True

    def _give_up(self) -> list[tuple]:
        # Not a call after all (an auto reply that merely starts with "{"): the text is content.
        text, self._hold = self._hold, ""
        self.mode = "text"
        if self.calls or self._n:
            return []
        return self._text(text)

    def flush(self) -> list[tuple]:
        """Events for text still held back once the stream has ended (a partial tag, a leading space)."""
        if self.mode in ("start", "content") and self._hold:
            text, self._hold = self._hold, ""
            self.mode = "content"
            return self._text(text)
        return []

    def finish(self) -> tuple[str, list[ToolCall]]:
        """(content, calls) once the stream has ended; an unfinished call is dropped."""
        if self.mode == "close" and not self._hold.strip():
            self._close(valid=True)  # the wrapper's "}" was cut (max_tokens) after complete arguments
        elif self.mode in ("start", "content") and self._hold:
            self.content.append(self._hold)
        elif self.mode == "call" and self._current is None and self._hold and not self.calls and self._n == 0:
            self.content.append(self._hold)  # began like JSON but never became a call
        self._hold = ""
        content = "".join(self.content)
        return (content.strip() if self.calls else content), self.calls


def _could_be_header(buf: str) -> bool:
    """Whether `buf` may still grow into '{"name": "...", "arguments": '."""
    probe = '{"name": "x", "arguments": '
    s = re.sub(r"\s+", "", buf)
    if s.startswith('{"name":"'):
        return True
    return probe.replace(" ", "").startswith(s) or s == "{"


def parse_reply(text: str, tools: Tools | None) -> tuple[str, list[ToolCall]]:
    """Content and valid tool calls of a whole reply (the non-streaming form of ToolCallParser)."""
    p = ToolCallParser(tools)
    p.feed(text)
    return p.finish()


def openai_deltas(events: list[tuple]) -> list[dict[str, Any]]:
    """Parser events as OpenAI chat.completion.chunk deltas: content, then per call a first delta with
    id, type and name (arguments "") and argument pieces after it, as OpenAI streams them."""
    out: list[dict[str, Any]] = []
    for ev in events:
        if ev[0] == "content":
            out.append({"content": ev[1]})
        elif ev[0] == "call":
            out.append({"tool_calls": [{"index": ev[1], "id": ev[2], "type": "function",
                                        "function": {"name": ev[3], "arguments": ""}}]})
        elif ev[0] == "args":
            out.append({"tool_calls": [{"index": ev[1], "function": {"arguments": ev[2]}}]})
    return out
