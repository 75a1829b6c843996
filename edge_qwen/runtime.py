"""EdgeQwen: load a Qwen2.5 GGUF once, chat with it many times, from any thread.

The model file is checked before llama.cpp sees it; messages go through the chat template
stored in the GGUF; generation runs on the model's batched engine (`edge_qwen.engine.scheduler`,
the one decode loop). With `parallel=N` up to N generations from any threads run together in
one batch, each with its own sampling, stop strings and cancel event, never interleaving their
outputs; more wait their turn. The default, 1, runs one generation at a time.
"""

from __future__ import annotations

import copy
import dataclasses
import re
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from .chat_template import render_chat, validate_messages
from .errors import BusyError, ContextOverflowError, EdgeQwenError, ModelFileError, RequestError
from .engine.generate import MAX_TOP_LOGPROBS, GenerationChunk, SamplingParams, TokenLogprob, TokenPieces

OVERFLOW_POLICIES = ("error", "truncate_middle")
DEFAULT_MAX_TOKENS = 1024  # the Qwen API's default
_MARKER = re.compile("\ue000(\\d+)\ue001")  # stands for message i's content while rendering
FINISH_REASONS = ("stop", "length", "cancelled")


MAX_LOGIT_BIAS = 1024  # logit_bias entries one request may set
MAX_N = 8  # choices one request may ask for (n): each is a generation of its own


def _is_utf8(text: str) -> bool:
    # JSON and Python strings may hold lone surrogates ("\ud800"), which no UTF-8 text can carry.
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _check_penalties(frequency_penalty: Any, presence_penalty: Any, top_k: Any, logit_bias: Any,
                     n_vocab: int | None) -> dict[str, Any]:
    """The SamplingParams fields for OpenAI's penalties and logit_bias and a top-k cut, checked
    (OpenAI's ranges: penalties in [-2, 2], biases in [-100, 100] keyed by token id)."""
    def number(v: Any) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and v == v

    for name, v in (("frequency_penalty", frequency_penalty), ("presence_penalty", presence_penalty)):
        if not number(v) or not -2 <= v <= 2:
            raise RequestError(f"{name}={v!r} is outside [-2, 2]", param=name)
    if not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 0:
        raise RequestError(f"top_k={top_k!r} must be a non-negative integer (0: no top-k cut)", param="top_k")
    biases: list[tuple[int, float]] = []
    if logit_bias is not None:
        if not isinstance(logit_bias, dict):
            raise RequestError("logit_bias must be an object mapping token ids to biases, like {\"1234\": -100}",
                               param="logit_bias")
        if len(logit_bias) > MAX_LOGIT_BIAS:
            raise RequestError(f"logit_bias has {len(logit_bias)} entries; at most {MAX_LOGIT_BIAS} are allowed",
                               param="logit_bias")
        for key, bias in logit_bias.items():
            shown = str(key)[:40]
            token = key if isinstance(key, int) and not isinstance(key, bool) else (
                int(key) if isinstance(key, str) and key.isascii() and key.isdigit() else None)
            if token is None or (n_vocab is not None and not 0 <= token < n_vocab):
                raise RequestError(f"logit_bias key {shown!r} is not a token id of this model "
                                   f"(0 to {n_vocab - 1 if n_vocab else 'n_vocab - 1'})", param="logit_bias")
            if not number(bias) or not -100 <= bias <= 100:
                raise RequestError(f"logit_bias[{shown!r}]={bias!r} is outside [-100, 100]", param="logit_bias")
            biases.append((token, float(bias)))
    return {"frequency_penalty": float(frequency_penalty), "presence_penalty": float(presence_penalty),
            "top_k": top_k, "logit_bias": tuple(biases)}


def _check_params(temperature: Any, top_p: Any, max_tokens: Any, stop: Any, seed: Any,
                  **penalties: Any) -> SamplingParams:
    """SamplingParams from a request's values, or RequestError naming the bad one. `penalties` are
    _check_penalties' arguments (frequency_penalty, presence_penalty, top_k, logit_bias, n_vocab)."""
    def number(v: Any) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool)

    if not number(temperature) or not 0 <= temperature <= 2:
        raise RequestError(f"temperature={temperature!r} is outside [0, 2]; use 0 for greedy decoding",
                           param="temperature")
    if not number(top_p) or not 0 < top_p <= 1:
        raise RequestError(f"top_p={top_p!r} is outside (0, 1]", param="top_p")
    if max_tokens is None:  # the caller left it out: the default, within the room the prompt leaves
        max_tokens = DEFAULT_MAX_TOKENS
    elif not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens <= 0:
        raise RequestError(f"max_tokens={max_tokens!r} must be a positive integer", param="max_tokens")
    if stop is None:
        stops: tuple[str, ...] = ()
    elif isinstance(stop, str):
        stops = (stop,)
    elif isinstance(stop, (list, tuple)) and all(isinstance(s, str) for s in stop):
        stops = tuple(stop)
    else:
        raise RequestError(f"stop must be a string or a list of strings, got {stop!r}", param="stop")
    if any(s == "" for s in stops):
        raise RequestError("stop contains an empty string; remove it", param="stop")
    if any(not _is_utf8(s) for s in stops):
        raise RequestError("stop contains a lone UTF-16 surrogate, which is not valid Unicode; send well-formed "
                           "text", param="stop")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
        raise RequestError(f"seed={seed!r} must be an integer or None", param="seed")
    extra = _check_penalties(penalties.get("frequency_penalty", 0.0), penalties.get("presence_penalty", 0.0),
                             penalties.get("top_k", 0), penalties.get("logit_bias"), penalties.get("n_vocab"))
    logprobs = penalties.get("logprobs")
    if logprobs is not None and (not isinstance(logprobs, int) or isinstance(logprobs, bool)
                                 or not 0 <= logprobs <= MAX_TOP_LOGPROBS):
        raise RequestError(f"logprobs={logprobs!r} must be None or the number of alternatives per token, 0 to "
                           f"{MAX_TOP_LOGPROBS}", param="logprobs")
    stop_tokens = tuple(int(t) for t in penalties.get("stop_tokens") or ())
    return SamplingParams(float(temperature), float(top_p), max_tokens, stops, seed, **extra, logprobs=logprobs,
                          stop_tokens=stop_tokens)


def _check_logprobs(logprobs: Any, top_logprobs: Any) -> int | None:
    """SamplingParams.logprobs from OpenAI chat's `logprobs` (bool) and `top_logprobs` (0..20)."""
    if not isinstance(logprobs, bool):
        raise RequestError(f"logprobs={logprobs!r} must be true or false", param="logprobs")
    if top_logprobs is not None:
        if not isinstance(top_logprobs, int) or isinstance(top_logprobs, bool) or \
                not 0 <= top_logprobs <= MAX_TOP_LOGPROBS:
            raise RequestError(f"top_logprobs={top_logprobs!r} must be an integer from 0 to {MAX_TOP_LOGPROBS}",
                               param="top_logprobs")
        if not logprobs:
            raise RequestError("top_logprobs needs logprobs: true", param="top_logprobs")
    return (top_logprobs or 0) if logprobs else None


def check_n(n: Any) -> int:
    """The number of choices a request asks for, 1 to MAX_N (RequestError otherwise)."""
    if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= MAX_N:
        raise RequestError(f"n={n!r}: ask for 1 to {MAX_N} choices per request (each is a generation of its own)",
                           param="n")
    return n


class EdgeQwen:
    """A loaded Qwen2.5 GGUF model with OpenAI-shaped chat.

    model: None (the default model / $EDGE_QWEN_MODEL), a GGUF path or a store name.
    n_ctx: context window in tokens (default 4096, at most the model's trained length).
    device: "auto" | "cpu" | "metal" | "cuda" (see edge_qwen.device.select_device).
    context_overflow: "error" refuses a request whose prompt + max_tokens exceeds n_ctx;
        "truncate_middle" drops whole messages after the system prompt, oldest first, keeping
        the system prompt and the latest turns, until it fits (an error if even the system
        prompt plus the last message do not fit).
    reuse_prefix: keep the KV cache of a prompt prefix shared with the previous call (faster
        multi-turn chat). Off by default, because a reused prefix can change a greedy answer
        to a repeated request; the interactive `edge-qwen chat` and `edge-qwen serve` turn it
        on. `generate`/`chat` take `reuse_prefix` per call to override it.
    parallel: how many generations run at once (sequence slots of the engine; default 1). Each
        slot may hold n_ctx tokens, so the KV cache is n_ctx * parallel cells (`kv_cache_bytes`).
        Batched logits are not bit-identical to single-sequence ones: a seed reproduces an answer
        exactly only when the request runs alone (see docs/runtime.md).
    host_cache_mb: host memory for conversations cut from their slot (restored when a later
        prompt continues them, llama-server's --cache-ram); default 512, 0 turns it off.
    mcp: an MCP config (a path or dict in the `{"mcpServers": ...}` format) or an edge_qwen.mcp.MCPHub:
        its servers start with the model (stopped by close()), and `mcp_chat` runs the tool loop over
        their tools. Plain `chat` never calls them.
    """

    def __init__(self, model: str | Path | None = None, *, n_ctx: int = 4096, device: str = "auto",
                 n_threads: int | None = None, n_gpu_layers: int | None = None,
                 context_overflow: str = "error", verbose: bool = False, n_batch: int = 512,
                 reuse_prefix: bool = False, parallel: int = 1, kv_type: str = "f16",
                 flash_attn: bool | None = None, rope_scaling: str | None = None,
                 host_cache_mb: int | None = None, mcp: Any = None):
        from .device import select_device
        from .gguf_file import check_gguf
        from .store import resolve_model

        if context_overflow not in OVERFLOW_POLICIES:
            raise RequestError(f"context_overflow={context_overflow!r}; use one of {', '.join(OVERFLOW_POLICIES)}",
                               param="context_overflow")
        self.mcp = None  # MCP servers (edge_qwen.mcp), started after the model loads
        path = resolve_model(model)
        info = check_gguf(path)  # before llama.cpp: it may abort the process on a damaged file
        from .engine.pooled import refuse_chat

        refuse_chat(path, info.metadata, info.architecture)  # an embedding model or reranker cannot chat
        train = info.metadata.get(f"{info.architecture}.context_length")
        self.n_ctx_train = int(train) if isinstance(train, int) else 32768
        from .long_context import context_options  # n_ctx past the trained length (YaRN), KV cache types

        long_ctx = context_options(n_ctx, self.n_ctx_train, kv_type, flash_attn, rope_scaling)
        plan = select_device(device, n_threads, n_gpu_layers)
        from llama_cpp import Llama

        try:
            self.llama = Llama(model_path=str(path), n_ctx=n_ctx, n_batch=min(n_batch, n_ctx),
                               n_threads=plan.n_threads, n_threads_batch=plan.n_threads,
                               n_gpu_layers=plan.n_gpu_layers, logits_all=False, verbose=verbose,
                               **long_ctx.llama_kwargs())
        except (ValueError, RuntimeError, OSError) as e:
            raise ModelFileError(f"llama.cpp could not load {path} ({e}); check the file with "
                                 "`edge-qwen doctor` or convert it again") from None
        self.model_path = Path(path)
        self.model_name = self.model_path.name.removesuffix(".gguf")
        self.n_ctx = n_ctx
        self.device = plan.device
        self.n_threads = plan.n_threads
        self.n_gpu_layers = plan.n_gpu_layers
        self.context_overflow = context_overflow
        # Off by default: a reused prefix can tip a greedy near-tie (see docs/runtime.md).
        self.reuse_prefix = bool(reuse_prefix)
        self.chat_template: str | None = self.llama.metadata.get("tokenizer.chat_template")
        self._pieces = TokenPieces(self.llama)
        from .device import kv_cache_bytes
        from .engine.scheduler import Engine

        try:
            self.engine = Engine(self.llama, parallel=parallel, n_ctx=n_ctx, n_batch=min(n_batch, n_ctx),
                                 pieces=self._pieces,
                                 **({} if host_cache_mb is None else {"host_cache_mb": host_cache_mb}))
        except EdgeQwenError:
            self.llama.close()
            raise
        self.parallel = parallel
        self.kv_type, self.flash_attn, self.rope_scaling = long_ctx.kv_type, long_ctx.flash_attn, long_ctx.rope_scaling
        self.kv_cache_bytes = kv_cache_bytes(info.metadata, self.engine.kv_cells,
                                             self.llama.context_params.type_k, self.llama.context_params.type_v)
        self._owners: dict[int, int] = {}  # thread id -> streams it has open (to refuse a self-deadlock)
        self._owners_lock = threading.Lock()
        self._closed = False
        if mcp is not None:
            from .mcp import MCPHub

            try:
                self.mcp = mcp if isinstance(mcp, MCPHub) else MCPHub.start(mcp)
            except BaseException:
                self.close()
                raise

    # -- tokens -----------------------------------------------------------------------------
    def tokenize(self, text: str, special: bool = True) -> list[int]:
        """Token ids of `text`; with `special`, `<|im_start|>` etc. become their special tokens."""
        self._check_open()
        return self.llama.tokenize(text.encode("utf-8"), add_bos=False, special=special)

    def detokenize(self, ids: Sequence[int]) -> str:
        """Text of token ids (special tokens render as nothing)."""
        self._check_open()
        return b"".join(self._pieces.piece(int(t)) for t in ids).decode("utf-8", errors="replace")

    def render(self, messages: Any, tools: list[dict] | None = None) -> str:
        """The prompt text for `messages` (and the OpenAI-shaped `tools` offered), from the model's chat template."""
        return render_chat(self.chat_template, messages, tools=tools or None)

    def prompt_tokens(self, messages: Any, tools: list[dict] | None = None) -> list[int]:
        """The prompt token ids for validated `messages`: the chat template's markers are special
        tokens, while message content is always text.

        Content that spells a control token (`<|im_end|>`, `<|im_start|>system`) is tokenized as
        the plain characters, so user text cannot forge turns. Other content tokenizes exactly as
        the whole rendered prompt would.
        """
        text = self.render(messages, tools)
        if not any(self._spells_control(m.get("content")) for m in messages):
            return self.tokenize(text)
        marked = [{**m, "content": f"\ue000{i}\ue001"} for i, m in enumerate(messages)]
        parts = _MARKER.split(self.render(marked, tools))
        if sorted(int(i) for i in parts[1::2]) != list(range(len(messages))):
            return self.tokenize(text)  # a template that rewrites content: it cannot be told apart
        ids: list[int] = []
        for k, part in enumerate(parts):
            if k % 2:
                ids += self.tokenize(messages[int(part)]["content"], special=False)
            elif part:
                ids += self.tokenize(part)
        return ids

    def _spells_control(self, content: Any) -> bool:
        # A substring search: tokenizing with special=True to find out is quadratic in the number
        # of control-token spellings (80,000 of them took 49 s).
        return isinstance(content, str) and any(t in content for t in self._pieces.control_texts())

    # -- generation -------------------------------------------------------------------------
    def fit_messages(self, messages: Any, max_tokens: int | None = 1024,
                     tools: list[dict] | None = None) -> tuple[list[dict], list[int]]:
        """The messages that will be sent and their prompt tokens, under the context_overflow policy.

        Raises ContextOverflowError naming the sizes when prompt + max_tokens exceeds n_ctx (with
        "truncate_middle": only when even the system prompt plus the last message do not fit).
        `max_tokens=None` (left out by the caller) asks only for room for one token.
        """
        given = max_tokens
        max_tokens = 1 if max_tokens is None else max_tokens
        msgs = validate_messages(messages)
        tokens = self.prompt_tokens(msgs, tools)
        if len(tokens) + max_tokens <= self.n_ctx:
            return msgs, tokens
        if self.context_overflow == "truncate_middle":
            # Drop the oldest turns after the system prompt: the fewest that make it fit, found by
            # bisection (the prompt only shrinks as more are dropped), so a long history costs
            # O(n log n) to fit, not one render per dropped message.
            keep_head = 1 if msgs[0]["role"] == "system" else 0
            lo, hi = 1, len(msgs) - keep_head - 1  # how many to drop; hi keeps only the last message
            best: tuple[list[dict], list[int]] | None = None
            while lo <= hi:
                mid = (lo + hi) // 2
                kept = msgs[:keep_head] + msgs[keep_head + mid:]
                kept_tokens = self.prompt_tokens(kept, tools)
                if len(kept_tokens) + max_tokens <= self.n_ctx:
                    best, hi = (kept, kept_tokens), mid - 1
                else:
                    lo = mid + 1
                    tokens = kept_tokens
            if best is not None:
                return best
        sizes = (f"the prompt alone is {len(tokens)} tokens, which leaves no room in the context window "
                 f"n_ctx={self.n_ctx}" if given is None else
                 f"the prompt is {len(tokens)} tokens and max_tokens is {max_tokens}: {len(tokens) + max_tokens} "
                 f"> the context window n_ctx={self.n_ctx}")
        err = ContextOverflowError(
            f"{sizes}; shorten the messages{'' if given is None else ', lower max_tokens'}, load the model "
            f"with a larger n_ctx (up to {self.n_ctx_train})"
            + ("" if self.context_overflow == "truncate_middle" else " or use context_overflow='truncate_middle'"),
            param="max_tokens" if max_tokens >= self.n_ctx else "messages")
        err.sizes = (len(tokens), given, self.n_ctx, self.n_ctx_train)  # for callers that word it their way
        raise err

    def generate(self, messages: Any, *, temperature: float = 0.7, top_p: float = 0.9,
                 max_tokens: int | None = DEFAULT_MAX_TOKENS,
                 stop: str | list[str] | None = None, seed: int | None = None,
                 frequency_penalty: float = 0.0, presence_penalty: float = 0.0, top_k: int = 0,
                 logit_bias: dict | None = None,
                 response_format: dict | None = None, cancel: threading.Event | None = None,
                 blocking: bool = True, reuse_prefix: bool | None = None,
                 default_max_tokens: int = DEFAULT_MAX_TOKENS, tools: Any = None,
                 cache_key: str = "", enable_thinking: bool | None = None, logprobs: int | None = None,
                 prefilled: threading.Event | None = None, retry_cut: bool = False) -> Iterator[GenerationChunk]:
        """Stream a reply to `messages` as GenerationChunks (the last has finish_reason and timings).

        Bad parameters raise RequestError here, before anything runs. The generation itself
        starts on the first `next()`: it waits for a running generation to end (or raises
        BusyError when `blocking=False`) and holds the model until the iterator is exhausted
        or closed. Setting `cancel` ends it with finish_reason "cancelled". `max_tokens=None`
        means `default_max_tokens` (1024) or the room the prompt leaves in n_ctx, whichever is less. `reuse_prefix`
        (None: the instance's setting) keeps the KV cache of the prefix shared with the last call;
        False evaluates the prompt afresh, which reproduces a seeded or greedy answer bit for bit.
        `frequency_penalty` and `presence_penalty` (OpenAI's, -2 to 2) penalize tokens already generated;
        `logit_bias` ({token id: -100 to 100}) shifts chosen tokens' logits; `top_k` > 0 samples among
        the k most likely tokens only. All run in llama.cpp's own samplers.
        `tools` (checked engine.tool_calls.Tools) offers functions in the prompt; every call the model
        starts is then generated under the call grammar (see engine/tool_calls.py).
        `cache_key` scopes the prefix cache: a prompt reuses KV cells only from requests with the
        same key (the server passes one per API key and cache_salt).
        `enable_thinking` (Qwen3): None = the model's default (on) unless the last user/system message
        says `/no_think`; False pre-fills an empty think block; see engine/reasoning.py.
        `logprobs` (None: off, costs nothing; 0..20: that many alternatives) puts each token's
        log-probability under the model's raw distribution on the chunks (GenerationChunk.logprobs).
        `prefilled` is set once the prompt is evaluated (engine.generate.fan_out uses it to share
        the prompt's KV cells between the choices of one request).
        `retry_cut` (the caller collects the whole reply, as a non-streamed chat does): a JSON answer
        cut at max_tokens is retried once under a stricter variant of its schema (engine/json_retry.py).
        """
        from .engine.reasoning import EMPTY_THINK, THINK_OPEN, AfterThinking, plan_thinking, think_close_id
        from .engine.tool_calls import ToolCallConstraint, prepare_history

        self._check_open()
        params = _check_params(temperature, top_p, max_tokens, stop, seed, frequency_penalty=frequency_penalty,
                               presence_penalty=presence_penalty, top_k=top_k, logit_bias=logit_bias,
                               n_vocab=self.llama.n_vocab(), logprobs=logprobs)
        active = tools is not None and tools.offered  # in the prompt; tools.for_turn may leave none callable
        if isinstance(messages, list):
            messages = prepare_history(messages)  # assistant tool_calls and tool results, checked
        if tools is not None:
            if active and response_format not in (None, {"type": "text"}):
                raise RequestError("response_format cannot be combined with tools the model may call; send one "
                                   "of them (or tool_choice \"none\")", param="response_format")
        _, prompt = self.fit_messages(messages, max_tokens, tools.specs if active else None)
        thinking = plan_thinking(self, messages, enable_thinking)
        if thinking.split and not thinking.thinking:  # Qwen3's switch: an empty think block, then the answer
            opened = self.tokenize(THINK_OPEN + "\n")
            if prompt[-len(opened):] == opened:  # the template opened it (Qwen3.5): tokens as its enable_thinking=false
                prompt = prompt[:-1] + self.tokenize(EMPTY_THINK[len(THINK_OPEN):])
            else:
                prompt = prompt + self.tokenize(EMPTY_THINK)
        if max_tokens is None:
            params = dataclasses.replace(params, max_tokens=min(default_max_tokens, self.n_ctx - len(prompt)))
        if active:
            constraint = ToolCallConstraint(self, tools)
        else:
            constraint = self._constraint(response_format)
            if constraint is not None and thinking.thinking:  # the schema is for the answer, not the reasoning
                eog = [t for t in (self.llama.token_eos(), *self.tokenize("<|im_end|><|endoftext|>")) if t >= 0]
                constraint = AfterThinking(constraint, think_close_id(self), eog)
        if constraint is not None and params.stop and not active:
            # A stop string inside the JSON would cut it into invalid output: the grammar decides the end.
            raise RequestError("stop cannot be combined with a JSON response_format (the JSON value's end "
                               "ends the reply); remove stop", param="stop")
        reuse = self.reuse_prefix if reuse_prefix is None else bool(reuse_prefix)
        if getattr(constraint, "needs_validation", False) or (retry_cut and not active and constraint is not None):
            from .engine.json_retry import generate_checked  # validation, or a cut answer's retry

            return generate_checked(lambda p, c: self._run(prompt, p, c, cancel, blocking, reuse, cache_key,
                                                           prefilled), params, constraint, retry_cut=retry_cut)
        return self._run(prompt, params, constraint, cancel, blocking, reuse, cache_key, prefilled)

    def generate_tokens(self, prompt: Sequence[int], *, temperature: float = 0.7, top_p: float = 0.9,
                        max_tokens: int | None = None, stop: str | list[str] | None = None,
                        seed: int | None = None, response_format: dict | None = None,
                        cancel: threading.Event | None = None, blocking: bool = True,
                        reuse_prefix: bool | None = None, default_max_tokens: int = DEFAULT_MAX_TOKENS,
                        cache_key: str = "", prefilled: threading.Event | None = None,
                        **penalties: Any) -> Iterator[GenerationChunk]:
        """Stream a continuation of raw prompt token ids, no chat template (completions, fill-in-the-middle).

        The same checks and engine as `generate`; ContextOverflowError when prompt + max_tokens
        does not fit n_ctx. `penalties`: frequency_penalty, presence_penalty, top_k, logit_bias,
        logprobs (as in `generate`), stop_tokens (token ids that end the text like end-of-turn).
        """
        self._check_open()
        prompt = [int(t) for t in prompt]
        if not prompt:
            raise RequestError("the prompt is empty; give at least one token of text", param="prompt")
        params = _check_params(temperature, top_p, max_tokens, stop, seed, n_vocab=self.llama.n_vocab(), **penalties)
        room = self.n_ctx - len(prompt)
        wanted = params.max_tokens if max_tokens is not None else 1
        if wanted > room:
            err = ContextOverflowError(
                f"the prompt is {len(prompt)} tokens and max_tokens is {wanted}: {len(prompt) + wanted} > the "
                f"context window n_ctx={self.n_ctx}; shorten the prompt or lower max_tokens",
                param="max_tokens" if max_tokens is not None else "prompt")
            err.sizes = (len(prompt), max_tokens, self.n_ctx, self.n_ctx_train)
            raise err
        if max_tokens is None:
            params = dataclasses.replace(params, max_tokens=min(default_max_tokens, room))
        constraint = self._constraint(response_format)
        if constraint is not None and params.stop:
            raise RequestError("stop cannot be combined with a JSON format (the JSON value's end ends the reply); "
                               "remove stop", param="stop")
        reuse = self.reuse_prefix if reuse_prefix is None else bool(reuse_prefix)
        return self._run(prompt, params, constraint, cancel, blocking, reuse, cache_key, prefilled)

    def _constraint(self, response_format: dict | None):
        if response_format is None:
            return None
        if not isinstance(response_format, dict):
            raise RequestError(f"response_format must be an object like {{'type': 'json_object'}}, "
                               f"got {response_format!r}", param="response_format")
        try:
            from .engine.json_constraint import make_constraint
        except ImportError:
            if response_format.get("type") == "text":
                return None
            raise RequestError("response_format not supported yet (edge_qwen.engine.json_constraint is missing)",
                               param="response_format") from None
        return make_constraint(self, response_format)

    def _run(self, prompt, params, constraint, cancel, blocking, reuse, cache_key,
             prefilled: threading.Event | None = None) -> Iterator[GenerationChunk]:
        me = threading.get_ident()
        with self._owners_lock:
            if self._owners.get(me, 0) >= self.parallel:
                raise BusyError("a generation is already running in this thread"
                                + (f" (all {self.parallel} slots)" if self.parallel > 1 else "")
                                + "; consume or close its stream before starting another")
            self._owners[me] = self._owners.get(me, 0) + 1
        try:
            self._check_open()
            seq = self.engine.submit(prompt, params, constraint=constraint, cancel=cancel, cache_key=cache_key,
                                     reuse_prefix=reuse, blocking=blocking)
            if prefilled is None:
                yield from self.engine.stream(seq)
            else:
                try:
                    for chunk in self.engine.stream(seq):
                        prefilled.set()  # the first chunk comes once the prompt is evaluated
                        yield chunk
                finally:
                    prefilled.set()
        finally:
            with self._owners_lock:
                self._owners[me] -= 1
                if not self._owners[me]:
                    del self._owners[me]

    def chat(self, messages: Any, *, temperature: float = 0.7, top_p: float = 0.9,
             max_tokens: int | None = DEFAULT_MAX_TOKENS,
             stop: str | list[str] | None = None, seed: int | None = None, stream: bool = False,
             frequency_penalty: float = 0.0, presence_penalty: float = 0.0, top_k: int = 0,
             logit_bias: dict | None = None,
             response_format: dict | None = None, cancel: threading.Event | None = None,
             blocking: bool = True, reuse_prefix: bool | None = None,
             default_max_tokens: int = DEFAULT_MAX_TOKENS, tools: list[dict] | None = None,
             tool_choice: Any = None, parallel_tool_calls: bool | None = None,
             cache_key: str = "", enable_thinking: bool | None = None,
             reasoning: str | None = None, logprobs: bool = False, top_logprobs: int | None = None,
             n: int = 1, _prefilled: threading.Event | None = None,
             _ids: tuple[str, int] | None = None) -> dict | Iterator[dict]:
        """OpenAI-shaped chat: a chat.completion dict, or with `stream` an iterator of chunks.

        With `response_format` ({"type": "json_object"} or a JSON schema) the content is the
        JSON text. With `tools` (OpenAI's [{"type": "function", "function": {name, description,
        parameters}}]) the reply may carry `tool_calls` (finish_reason "tool_calls"); `tool_choice`
        is "auto" (default), "none", "required" or {"type": "function", "function": {"name": ...}}.
        Every returned call's arguments parse and validate against its function's parameters.
        A thinking model's (Qwen3) reasoning comes apart as the message's `reasoning_content`
        (streamed: `reasoning_content` deltas first); `enable_thinking` as in `generate`.
        `reasoning="step_by_step"` asks any model to reason first (edge_qwen.step_by_step), returned
        the same way; a response_format then constrains the answer only.
        `logprobs` puts OpenAI's `logprobs: {"content": [{token, logprob, bytes, top_logprobs}]}` on
        the choice (on each streamed chunk: its tokens), with `top_logprobs` (0..20) alternatives
        per token: log-probabilities of the model's raw distribution (before temperature,
        penalties, bias and constraints). They cover every generated token, tool calls included.
        `n` (1..MAX_N) choices of the same prompt, generated together (engine.generate.fan_out:
        they share the prompt's KV cells); with a `seed`, choice i samples with seed + i. A greedy
        request (temperature 0) has one answer: it is generated once and given n times. Streamed,
        the choices' chunks interleave by `index`; usage counts the completion tokens of all.
        """
        from .step_by_step import check_reasoning

        want = _check_logprobs(logprobs, top_logprobs)
        n = check_n(n)
        if check_reasoning(reasoning) is not None:
            if want is not None or n != 1:
                raise RequestError('reasoning="step_by_step" cannot be combined with logprobs or n > 1',
                                   param="logprobs" if want is not None else "n")
            return self._step_by_step(messages, stream, temperature=temperature, top_p=top_p, max_tokens=max_tokens,
                                      stop=stop, seed=seed, frequency_penalty=frequency_penalty,
                                      presence_penalty=presence_penalty, top_k=top_k, logit_bias=logit_bias,
                                      response_format=response_format, cancel=cancel, blocking=blocking,
                                      reuse_prefix=reuse_prefix, default_max_tokens=default_max_tokens,
                                      tools=tools, cache_key=cache_key)
        from .engine.reasoning import plan_thinking, split_reasoning
        from .engine.tool_calls import ToolCallParser, Tools, parse_tools

        checked = tools if isinstance(tools, Tools) else parse_tools(tools, tool_choice, parallel_tool_calls)
        if checked is not None:
            checked = checked.for_turn(messages)  # the repeat guard: see Tools.for_turn
        cid, created = _ids or (f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time()))
        if n > 1:
            one = dict(temperature=temperature, top_p=top_p, max_tokens=max_tokens, stop=stop,
                       frequency_penalty=frequency_penalty, presence_penalty=presence_penalty, top_k=top_k,
                       logit_bias=logit_bias, response_format=response_format, blocking=blocking,
                       reuse_prefix=reuse_prefix, default_max_tokens=default_max_tokens, tools=checked,
                       cache_key=cache_key, enable_thinking=enable_thinking, logprobs=logprobs,
                       top_logprobs=top_logprobs, _ids=(cid, created))
            # Checked here, before any thread starts: a bad request fails at once.
            self.generate(messages, seed=seed, **{k: v for k, v in one.items() if k not in (
                "logprobs", "top_logprobs", "_ids")}, logprobs=want).close()
            return self._chat_n(n, messages, stream, seed, cancel, one)
        gen = self.generate(messages, temperature=temperature, top_p=top_p, max_tokens=max_tokens, stop=stop,
                            frequency_penalty=frequency_penalty, presence_penalty=presence_penalty, top_k=top_k,
                            logit_bias=logit_bias,
                            seed=seed, response_format=response_format, cancel=cancel, blocking=blocking,
                            cache_key=cache_key,
                            reuse_prefix=reuse_prefix, default_max_tokens=default_max_tokens, tools=checked,
                            enable_thinking=enable_thinking, logprobs=want, prefilled=_prefilled,
                            retry_cut=not stream)
        thinking = plan_thinking(self, messages, enable_thinking)
        if thinking.split:
            gen = split_reasoning(gen, thinking.in_reasoning)
        parser = ToolCallParser(checked, self.tokenize("<tool_call>")[0] if checked is not None else None)
        if stream:
            return self._stream(gen, cid, created, parser, want is not None)
        last, reasoning, lps = None, "", []
        for chunk in gen:
            parser.feed(chunk.text, chunk.token_ids)
            reasoning += getattr(chunk, "reasoning", "")
            lps += chunk.logprobs or []
            last = chunk
        assert last is not None and last.finish_reason is not None  # decode always ends with one
        content, calls = parser.finish()
        message: dict[str, Any] = {"role": "assistant", "content": content}
        extra = {"reasoning_content": reasoning} if reasoning else {}
        message.update(extra)
        finish = last.finish_reason
        if calls:
            message = {"role": "assistant", "content": content or None, **extra,
                       "tool_calls": [c.openai() for c in calls]}
            finish = "tool_calls" if finish == "stop" else finish
        choice: dict[str, Any] = {"index": 0, "message": message, "finish_reason": finish}
        if last.stop is not None:  # vLLM's field: which stop string ended the reply (the Anthropic API reports it)
            choice["stop_reason"] = last.stop
        if want is not None:
            choice["logprobs"] = {"content": self.openai_logprobs(lps), "refusal": None}
        return {
            "id": cid, "object": "chat.completion", "created": created, "model": self.model_name,
            "choices": [choice],
            "usage": _usage(last),
        }

    def openai_logprobs(self, entries: Sequence[TokenLogprob]) -> list[dict[str, Any]]:
        """TokenLogprobs in OpenAI chat's form: [{token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}].

        `token` is the token's text (a control token spelled out; bytes that are not whole UTF-8
        characters as \\x escapes); `bytes` its exact UTF-8 bytes.
        """
        def one(token: int, logprob: float) -> dict[str, Any]:
            b = self._pieces.display(token)
            return {"token": b.decode("utf-8", errors="backslashreplace"), "logprob": logprob, "bytes": list(b)}

        return [{**one(e.token, e.logprob), "top_logprobs": [one(t, lp) for t, lp in e.top]} for e in entries]

    def _chat_n(self, n: int, messages: Any, stream: bool, seed: int | None, cancel: threading.Event | None,
                one: dict[str, Any]) -> dict | Iterator[dict]:
        """chat() with n > 1 choices: n generations through engine.generate.fan_out, merged into one reply."""
        from .engine.generate import fan_out

        greedy = one["temperature"] == 0
        runs = 1 if greedy else n  # greedy decoding has one answer: generate it once

        def start(i: int, cancel_i: threading.Event, prefilled: threading.Event | None) -> Iterator[Any]:
            s = None if seed is None else (seed + i) & 0xFFFFFFFF
            # Choices after the first copy the prompt's KV cells from the first one's slot.
            kw = one if i == 0 else {**one, "reuse_prefix": True}
            out = self.chat(messages, stream=stream, seed=s, cancel=cancel_i, _prefilled=prefilled, **kw)
            return out if stream else iter([out])

        def copies(items: Iterator[tuple[int, Any]]) -> Iterator[tuple[int, Any]]:
            for i, item in items:
                if not greedy:
                    yield i, item
                    continue
                dups = [item] + [copy.deepcopy(item) for _ in range(n - 1)]  # before the consumer changes one
                yield from enumerate(dups)

        merged = copies(fan_out(runs, start, cancel))
        if not stream:
            results: dict[int, dict] = dict(merged)
            out = results[0]
            out["choices"] = [{**results[i]["choices"][0], "index": i} for i in range(n)]
            out["usage"] = _sum_usage([results[i]["usage"] for i in range(n)])
            return out
        return self._stream_n(n, merged)

    @staticmethod
    def _stream_n(n: int, merged: Iterator[tuple[int, dict]]) -> Iterator[dict]:
        """The chunks of n streamed choices, each re-indexed; the summed usage rides on the last final chunk."""
        usages: list[dict] = []
        try:
            for i, chunk in merged:
                chunk["choices"][0]["index"] = i
                usage = chunk.pop("usage", None)
                if usage is not None:
                    usages.append(usage)
                    if len(usages) == n:
                        chunk["usage"] = _sum_usage(usages)
                yield chunk
        finally:
            close = getattr(merged, "close", None)
            if close is not None:
                close()

    def mcp_chat(self, messages: Any, *, stream: bool = False, **kw: Any) -> dict | Iterator[dict]:
        """chat() with the tools of this model's MCP servers (EdgeQwen(mcp=CONFIG)), running the tool loop.

        The same shape as chat(); each call shows as a `delta.mcp_call` / `delta.mcp_result` chunk when
        streamed, and in the message's `mcp_calls` otherwise. Keywords of edge_qwen.mcp.loop.mcp_chat
        (servers, max_rounds, timeout, confirm) and of chat().
        """
        if self.mcp is None:
            raise RequestError("this EdgeQwen has no MCP servers; create it with EdgeQwen(..., mcp=\"mcp.json\")",
                               param="mcp")
        from .mcp.loop import mcp_chat

        return mcp_chat(self, self.mcp, messages, stream=stream, **kw)

    def summarize(self, text: str, **kw: Any) -> Any:
        """A summary of `text` of any length within this model's window (edge_qwen.rag.summarize.summarize:
        max_tokens, map_tokens, chunk_tokens, language, quiet). Returns a Summary (`.text`, `.chunks`...)."""
        from .rag.summarize import summarize

        return summarize(self, text, **kw)

    def _step_by_step(self, messages: Any, stream: bool, *, tools: Any = None, **kw: Any) -> dict | Iterator[dict]:
        """chat() for reasoning="step_by_step": the two generations of edge_qwen.step_by_step as one reply."""
        from .step_by_step import step_by_step

        if tools:
            raise RequestError('reasoning="step_by_step" cannot be combined with tools; send one or the other',
                               param="reasoning")
        gen = step_by_step(self, messages, **kw)
        cid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        if stream:
            return self._stream(gen, cid, created)
        text, reasoning, last = "", "", None
        for chunk in gen:
            text += chunk.text
            reasoning += chunk.reasoning
            last = chunk
        assert last is not None and last.finish_reason is not None
        return {"id": cid, "object": "chat.completion", "created": created, "model": self.model_name,
                "choices": [{"index": 0, "finish_reason": last.finish_reason,
                             "message": {"role": "assistant", "content": text, "reasoning_content": reasoning}}],
                "usage": _usage(last)}

    def _stream(self, gen: Iterator[GenerationChunk], cid: str, created: int, parser: Any = None,
                logprobs: bool = False) -> Iterator[dict]:
        held: list[TokenLogprob] = []  # logprobs of tokens whose text has not gone out yet

        def chunk(delta: dict, finish: str | None = None, usage: dict | None = None) -> dict:
            choice: dict[str, Any] = {"index": 0, "delta": delta, "finish_reason": finish}
            if logprobs:
                choice["logprobs"] = None
                if held and (delta or finish):
                    choice["logprobs"] = {"content": self.openai_logprobs(held), "refusal": None}
                    held.clear()
            out = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": self.model_name,
                   "choices": [choice]}
            if usage is not None:
                out["usage"] = usage
            return out

        from .engine.tool_calls import openai_deltas

        try:
            first = True
            for c in gen:
                if first:
                    yield chunk({"role": "assistant", "content": ""})
                    first = False
                held.extend(c.logprobs or [])
                if getattr(c, "reasoning", ""):  # a thinking model's reasoning, before its answer
                    yield chunk({"reasoning_content": c.reasoning})
                if parser is None:
                    if c.text:
                        yield chunk({"content": c.text})
                else:
                    for delta in openai_deltas(parser.feed(c.text, c.token_ids)):
                        yield chunk(delta)
                if c.finish_reason is not None:
                    finish = c.finish_reason
                    if parser is not None:
                        for delta in openai_deltas(parser.flush()):
                            yield chunk(delta)
                        if parser.finish()[1] and finish == "stop":
                            finish = "tool_calls"
                    last = chunk({}, finish, _usage(c))
                    if getattr(c, "stop", None) is not None:  # as in chat(): the stop string that ended it
                        last["choices"][0]["stop_reason"] = c.stop
                    yield last
        finally:
            gen.close()  # a closed stream releases the model at once

    # -- lifetime ---------------------------------------------------------------------------
    def _check_open(self) -> None:
        if self._closed:
            raise EdgeQwenError(f"this EdgeQwen ({self.model_name}) was closed; create a new one")

    def engine_health(self) -> dict[str, Any]:
        """The batched engine's part of /health: {"kv_cache": {cells, reserved, cached, mib, host_cached,
        host_cached_mib}, "engine_steps"}."""
        st = self.engine.status()
        return {"kv_cache": {"cells": st["kv_cells"], "reserved": st["kv_reserved"], "cached": st["kv_cached"],
                             "mib": round(self.kv_cache_bytes / 2**20, 1), "host_cached": st["host_cached"],
                             "host_cached_mib": st["host_cached_mib"]},
                "engine_steps": st["steps"]}

    def close(self) -> None:
        """Free the model and its context. Waits for running generations to finish."""
        if self._closed:
            return
        if threading.get_ident() in self._owners:
            raise BusyError("close the running stream before closing the model")
        self.engine.wait_idle()
        with self._owners_lock:
            if self._closed:
                return
            self._closed = True
        if self.mcp is not None:
            self.mcp.close()
        self.engine.close()
        self.llama.close()

    def __enter__(self) -> EdgeQwen:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"EdgeQwen({self.model_name!r}, n_ctx={self.n_ctx}, device={self.device!r}"
                f"{', closed' if self._closed else ''})")


def _sum_usage(usages: list[dict]) -> dict:
    """The usage of n choices of one prompt: the prompt counted once, every choice's completion tokens."""
    out = copy.deepcopy(usages[0])
    out["completion_tokens"] = sum(u["completion_tokens"] for u in usages)
    out["total_tokens"] = out["prompt_tokens"] + out["completion_tokens"]
    for key in ("json_retries", "json_retry_tokens", "json_cut_retries"):
        if key in out:
            out[key] = sum(u.get(key, 0) for u in usages)
    return out


def _usage(last: GenerationChunk) -> dict:
    """OpenAI's usage object; prompt_tokens_details.cached_tokens counts the reused KV prefix."""
    t = last.timings
    p, c, cached = (t.prompt_tokens, t.completion_tokens, t.cached_tokens) if t else (0, 0, 0)
    usage = {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c,
             "prompt_tokens_details": {"cached_tokens": cached}}
    if hasattr(t, "json_retries"):  # a validated JSON answer (engine/json_retry.py): what its retries cost
        usage["json_retries"], usage["json_retry_tokens"] = t.json_retries, t.json_retry_tokens
        usage["json_cut_retries"] = t.json_cut_retries
    return usage
