"""The batched engine: every generation of one loaded model decoded together (continuous batching).

One Engine owns one llama.cpp context with `parallel` sequence slots. By default each slot has
its own KV stream of n_ctx cells (llama.cpp's non-unified cache, as llama-server runs it), so a
token attends over its own conversation only; with `kv_cells` smaller than n_ctx * parallel the
slots share one unified pool of cells instead. A single engine thread runs steps; each step is
one llama_decode of one llama_batch holding the next token(s) of every generating sequence plus
a bounded chunk of any prompt still being evaluated (chunked prefill), so a new request starts
within a step or two and a long prompt never stalls the streams. After the decode each sequence samples from its own
logits row with its own sampler chain and constraint (edge_qwen.engine.sequence).

Admission: a request waits (FIFO) until a slot is free (and, with a shared pool, until the KV
cells it may need, prompt plus max_tokens, fit beside those reserved by running sequences;
cached prefixes of idle slots are then evicted, least recently used first, to make room). A finished, cancelled or abandoned
sequence frees its slot at the next step.

Prefix cache: an idle slot keeps the KV of its last conversation. A new prompt continues the
slot holding its longest cached prefix, or copies that prefix from any slot (llama_memory_seq_cp:
in a shared pool the cells are shared; across streams the slot's buffer is copied, then cut to
the prefix; either way nothing is recomputed) -- but only between requests with the same `cache_key`,
so prefixes (and timing) never leak between API keys / cache_salt scopes.

Hybrid and recurrent models (Qwen3.5/3.6, Qwen3-Next: Gated DeltaNet layers beside attention)
keep a recurrent state per sequence that cannot be cut back to a prefix the way attention KV
cells can. On them (`exact_prefix` False) every request evaluates its whole prompt afresh: no
cached prefix, no copy between slots, no host cache, and no placeholder tokens in idle slots
(a placeholder would advance the idle slot's state). Correct, never wrong, until their prompt
cache is made exact with state checkpoints.

Batched logits are not bit-identical to single-sequence logits (other rows change the matrix
shapes llama.cpp computes with), see docs/runtime.md for what a seed still reproduces.
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from collections import OrderedDict, deque
from collections.abc import Iterator, Sequence as Seq
from dataclasses import dataclass, field
from typing import Any

from ..errors import BusyError, EdgeQwenError, RequestError
from .generate import Constraint, GenerationChunk, SamplingParams, TokenPieces
from .sequence import DONE, Request, Sequence

log = logging.getLogger("edge_qwen.engine")

_engines: "weakref.WeakKeyDictionary[Any, Engine]" = weakref.WeakKeyDictionary()  # Llama -> its engine


def engine_of(llama: Any) -> Engine | None:
    """The engine running on a llama_cpp.Llama, if one adopted it."""
    return _engines.get(llama)


@dataclass
class _Slot:
    """One llama.cpp sequence id: what its KV cells hold, for whom, and who runs on it now."""

    seq_id: int
    tokens: list[int] = field(default_factory=list)  # evaluated tokens in the KV cache, in order
    cache_key: str = ""
    last_used: float = 0.0
    running: Sequence | None = None


@dataclass
class _Saved:
    """A conversation cut from a slot, kept in host memory (llama_state_seq_get_data) to restore later."""

    tokens: list[int]
    cache_key: str
    data: Any  # ctypes byte array


HOST_CACHE_MB = 512   # default bound of the host prompt cache (llama-server's --cache-ram)
MIN_SAVED = 16        # conversations shorter than this are cheaper to evaluate again than to save


def _common_prefix(a: Seq[int], b: Seq[int]) -> int:
    n = min(len(a), len(b))
    if n == 0:
        return 0
    import numpy as np

    diff = np.nonzero(np.asarray(a[:n], dtype=np.int64) != np.asarray(b[:n], dtype=np.int64))[0]
    return int(diff[0]) if len(diff) else n


class Engine:
    """Continuous batching over one llama.cpp context (see the module docstring).

    llama: a loaded llama_cpp.Llama. The engine adopts it: it creates its own context from the
        Llama's context settings (threads, rope/YaRN, KV types...) with `parallel` sequences
        and `kv_cells` KV cells (default n_ctx * parallel: a stream of n_ctx cells per slot;
        fewer: one pool shared by all slots), and frees the Llama's original context so its KV
        memory is not held twice.
    n_ctx: the most tokens one sequence may hold (prompt + completion); default the Llama's n_ctx.
    n_batch: tokens per llama_decode (the step's budget).
    prefill_chunk: prompt tokens per step while other sequences are generating (default
        n_batch // 4): bounds how long a new prompt delays the streams.
    host_cache_mb: host memory for conversations cut from their slot (0: none), see `_save`.
    """

    def __init__(self, llama: Any, *, parallel: int = 1, n_ctx: int | None = None, n_batch: int | None = None,
                 kv_cells: int | None = None, prefill_chunk: int | None = None,
                 pieces: TokenPieces | None = None, host_cache_mb: int = HOST_CACHE_MB):
        import llama_cpp
        from llama_cpp import _internals

        if not isinstance(parallel, int) or isinstance(parallel, bool) or not 1 <= parallel <= \
                llama_cpp.llama_max_parallel_sequences():
            raise RequestError(f"parallel={parallel!r} must be an integer between 1 and "
                               f"{llama_cpp.llama_max_parallel_sequences()}", param="parallel")
        self.llama = llama
        self.parallel = parallel
        self.n_ctx = int(n_ctx or llama.n_ctx())
        self.n_batch = int(n_batch or llama.n_batch)
        self.kv_cells = int(kv_cells or self.n_ctx * parallel)
        self.prefill_chunk = int(prefill_chunk or max(32, self.n_batch // 4))
        self.pieces = pieces or TokenPieces(llama)
        self.n_vocab = llama.n_vocab()
        model = llama.model
        # Attention KV can be cut at any position; a recurrent state only as a whole (see the module docstring).
        self.exact_prefix = not (llama_cpp.llama_model_is_recurrent(model) or llama_cpp.llama_model_is_hybrid(model))
        if not self.exact_prefix:
            host_cache_mb = 0

        params = llama_cpp.llama_context_params.from_buffer_copy(llama.context_params)
        params.n_ctx = self.kv_cells
        params.n_batch = self.n_batch
        params.n_ubatch = min(self.n_batch, params.n_ubatch or self.n_batch)
        params.n_seq_max = parallel
        # A stream per slot: each token's attention spans its own sequence's cells, not every
        # cell in use (in one unified pool, 16 conversations make every token attend over all
        # 16, masked). A pool smaller than a full window per slot must be shared.
        self.unified = self.kv_cells < self.n_ctx * parallel
        params.kv_unified = self.unified
        try:
            self._context = _internals.LlamaContext(model=llama._model, params=params, verbose=False)
        except ValueError:
            raise EdgeQwenError(f"llama.cpp could not create a context of {self.kv_cells} KV cells for {parallel} "
                                "sequences (out of memory?); lower parallel or n_ctx") from None
        self.kv_cells = int(llama_cpp.llama_n_ctx(self._context.ctx))  # llama.cpp may round it up
        if not self.unified:
            per_slot = int(llama_cpp.llama_n_ctx_seq(self._context.ctx))
            if per_slot < self.n_ctx:
                self._context.close()
                raise EdgeQwenError(f"llama.cpp gave each of the {parallel} slots {per_slot} KV cells, fewer than "
                                    f"n_ctx={self.n_ctx}; choose an n_ctx that is a multiple of 256")
        old, llama._ctx = llama._ctx, self._context  # every user of llama.ctx now sees the engine's context
        if old is not None and old is not self._context:
            old.close()
        llama.n_tokens = 0
        self.ctx = self._context.ctx
        self.mem = llama_cpp.llama_get_memory(self.ctx)
        self._batch = llama_cpp.llama_batch_init(self.n_batch, 0, 1)

        self.slots = [_Slot(i) for i in range(parallel)]
        self.host_cache_bytes = max(0, int(host_cache_mb)) << 20
        self._saved: OrderedDict[int, _Saved] = OrderedDict()  # least recently used first
        self._saved_bytes = 0
        self._saved_id = 0
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.steps = 0
        self.stats = {"requests": 0, "cancelled": 0, "prompt_tokens": 0, "cached_tokens": 0, "placeholders": 0,
                      "completion_tokens": 0, "host_saves": 0, "host_restores": 0}
        self._cv = threading.Condition()
        self._closing = False
        self._thread = threading.Thread(target=self._run, name="edge-qwen-engine", daemon=True)
        self._thread.start()
        _engines[llama] = self

    # -- clients --------------------------------------------------------------------------------
    def submit(self, prompt: Seq[int], params: SamplingParams, *, constraint: Constraint | None = None,
               cancel: threading.Event | None = None, cache_key: str = "", reuse_prefix: bool = True,
               blocking: bool = True) -> Sequence:
        """Queue one generation; read its chunks with `stream()`.

        Raises RequestError when it can never fit (prompt + max_tokens over n_ctx) and, with
        `blocking=False`, BusyError when every slot is taken.
        """
        prompt = [int(t) for t in prompt]
        if not prompt:
            raise RequestError("the prompt is empty; give at least one token", param="messages")
        need = len(prompt) + params.max_tokens
        if need > min(self.n_ctx, self.kv_cells):
            raise RequestError(f"prompt ({len(prompt)} tokens) + max_tokens ({params.max_tokens}) = {need} is more "
                               f"than one sequence may hold ({min(self.n_ctx, self.kv_cells)} tokens); shorten "
                               "the prompt or lower max_tokens", param="max_tokens")
        seq = Sequence(Request(prompt, params, constraint, cancel, cache_key, reuse_prefix), self.pieces)
        with self._cv:
            if self._closing:
                raise EdgeQwenError("the engine is closed; load the model again")
            # A cancelled or abandoned sequence leaves at the next step: its slot counts as free.
            taken = sum(not s.cancelled() for s in self.running) + sum(not s.cancelled() for s in self.waiting)
            if not blocking and taken >= self.parallel:
                raise BusyError(f"all {self.parallel} generation slots are busy; retry later "
                                "(or call with blocking=True)")
            self.waiting.append(seq)
            self._cv.notify_all()
        return seq

    def stream(self, seq: Sequence) -> Iterator[GenerationChunk]:
        """The chunks of a submitted sequence, until the one with finish_reason.

        Closing the iterator early abandons the sequence: its slot is freed at the next step.
        Errors (a llama.cpp failure, an invalid constrained answer) are raised here.
        """
        done = False
        try:
            while True:
                item = seq.out.get()
                if isinstance(item, BaseException):
                    done = True
                    raise item
                if item.finish_reason is not None:
                    done = True
                yield item
                if done:
                    return
        finally:
            if not done:
                self.abandon(seq)

    def generate(self, prompt: Seq[int], params: SamplingParams, **kw: Any) -> Iterator[GenerationChunk]:
        """submit() and stream() in one: the chunks of one generation."""
        return self.stream(self.submit(prompt, params, **kw))

    def abandon(self, seq: Sequence) -> None:
        """The consumer has gone: stop the sequence and free its slot at the next step."""
        with self._cv:
            seq.abandoned = True
            self._cv.notify_all()

    def status(self) -> dict[str, Any]:
        """Slots busy/free, requests waiting, KV cells reserved/cached, steps run, totals."""
        with self._cv:
            busy = len(self.running)
            return {"slots": self.parallel, "busy": busy, "free": self.parallel - busy, "waiting": len(self.waiting),
                    "kv_cells": self.kv_cells, "kv_reserved": sum(s.reservation for s in self.running),
                    "kv_cached": sum(len(s.tokens) for s in self.slots if s.running is None),
                    "host_cached": len(self._saved), "host_cached_mib": round(self._saved_bytes / 2**20, 1),
                    "steps": self.steps, **self.stats}

    def idle(self) -> bool:
        with self._cv:
            return not self.running and not self.waiting

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Block until nothing runs or waits (True), or `timeout` seconds pass (False)."""
        with self._cv:
            return self._cv.wait_for(lambda: not self.running and not self.waiting, timeout)

    def close(self) -> None:
        """Stop the engine thread (running sequences end "cancelled") and free the context."""
        import llama_cpp

        with self._cv:
            if self._closing:
                return
            self._closing = True
            self._cv.notify_all()
        self._thread.join()
        llama_cpp.llama_batch_free(self._batch)
        self._context.close()
        _engines.pop(self.llama, None)

    # -- the engine thread ------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._closing and not self.running and not self.waiting:
                    self._cv.wait()
                if self._closing:
                    for seq in list(self.running) + list(self.waiting):
                        self._end(seq, "cancelled")
                    self.waiting.clear()
                    self._cv.notify_all()
                    return
                self._drop_cancelled()
                self._admit()
                if not self.running:
                    if self.waiting:  # waiting for cells: a cancel must still be noticed soon
                        self._cv.wait(0.05)
                    continue
            try:
                self._step()
            except Exception as e:  # never let the engine thread die: fail what ran, keep serving
                log.exception("engine step failed")
                with self._cv:
                    for seq in list(self.running):
                        self._clear_slot(self.slots[seq.slot], save=False)  # its cells are in doubt
                        self._release(seq, error=EdgeQwenError(f"generation failed ({type(e).__name__}: {e})"))

    def _drop_cancelled(self) -> None:
        for seq in [s for s in self.running if s.cancelled()]:
            self._end(seq, "cancelled")
        for seq in [s for s in self.waiting if s.cancelled()]:
            self.waiting.remove(seq)
            seq.finish("cancelled")
            self.stats["cancelled"] += 1
            self._cv.notify_all()

    def _end(self, seq: Sequence, reason: str) -> None:
        seq.finish(reason)
        if seq.slot is not None:
            self._release(seq)
        else:
            self.stats["cancelled"] += reason == "cancelled"

    def _release(self, seq: Sequence, error: BaseException | None = None) -> None:
        """Take a finished (or failed) sequence off its slot; the slot keeps its KV for the prefix cache."""
        if error is not None:
            seq.fail(error)
        slot = self.slots[seq.slot]
        slot.running = None
        slot.last_used = time.monotonic()
        if seq in self.running:
            self.running.remove(seq)
        self.stats["requests"] += 1
        self.stats["cancelled"] += int(seq.cancelled())
        self.stats["completion_tokens"] += seq.n_completion
        self._cv.notify_all()

    def _clear_slot(self, slot: _Slot, keep: int = 0, save: bool = True) -> int:
        """Remove the slot's cells from position `keep` on; returns how many stay.

        With `save`, a conversation losing MIN_SAVED tokens or more is first kept in the host cache.
        """
        import llama_cpp

        if save and len(slot.tokens) - max(keep, 0) >= MIN_SAVED:
            self._save(slot)
        if keep <= 0:
            llama_cpp.llama_memory_seq_rm(self.mem, slot.seq_id, -1, -1)
            slot.tokens = []
            return 0
        if not llama_cpp.llama_memory_seq_rm(self.mem, slot.seq_id, keep, -1):
            llama_cpp.llama_memory_seq_rm(self.mem, slot.seq_id, -1, -1)
            slot.tokens = []
            return 0
        del slot.tokens[keep:]
        return keep

    def _admit(self) -> None:
        """Start waiting sequences (FIFO) while a slot is free and their KV cells fit."""
        while self.waiting:
            seq = self.waiting[0]
            reserved = sum(s.reservation for s in self.running)
            if self.unified and reserved + seq.reservation > self.kv_cells:
                return  # cells run out: wait for a running sequence to end
            free = [s for s in self.slots if s.running is None]
            if not free:
                return
            self.waiting.popleft()
            slot, cached = self._place(seq, free)
            seq.start(slot.seq_id, cached, self.n_vocab)
            slot.running = seq
            slot.cache_key = seq.req.cache_key
            self.running.append(seq)
            self.stats["prompt_tokens"] += len(seq.req.prompt)
            self.stats["cached_tokens"] += cached
            if not self.unified:
                continue  # each slot has its own stream: nothing to evict for room
            # Idle caches give way to reservations: evict least recently used first.
            cached_idle = sorted((s for s in self.slots if s.running is None and s.tokens), key=lambda s: s.last_used)
            total = reserved + seq.reservation + sum(len(s.tokens) for s in cached_idle)
            for s in cached_idle:
                if total <= self.kv_cells:
                    break
                total -= len(s.tokens)
                self._clear_slot(s)

    def _save(self, slot: _Slot) -> None:
        """Copy the slot's KV cells to host memory before they are cut (llama-server's RAM prompt cache).

        A later prompt that continues this conversation further than any slot's cache restores it
        (`_restore`) instead of evaluating those tokens again: one memcpy in place of a prefill.
        Bounded by `host_cache_bytes`, least recently used out first; only within one cache_key.
        """
        import ctypes

        import llama_cpp

        if not self.host_cache_bytes:
            return
        for k, e in list(self._saved.items()):  # one it extends (or repeats) is no longer needed
            if e.cache_key == slot.cache_key and len(e.tokens) <= len(slot.tokens) \
                    and _common_prefix(e.tokens, slot.tokens) == len(e.tokens):
                self._drop_saved(k)
        size = int(llama_cpp.llama_state_seq_get_size(self.ctx, slot.seq_id))
        if not 0 < size <= self.host_cache_bytes:
            return
        data = (ctypes.c_uint8 * size)()
        if int(llama_cpp.llama_state_seq_get_data(self.ctx, data, size, slot.seq_id)) != size:
            return
        while self._saved and self._saved_bytes + size > self.host_cache_bytes:
            self._drop_saved(next(iter(self._saved)))
        self._saved_id += 1
        self._saved[self._saved_id] = _Saved(list(slot.tokens), slot.cache_key, data)
        self._saved_bytes += size
        self.stats["host_saves"] += 1

    def _drop_saved(self, key: int) -> None:
        e = self._saved.pop(key)
        self._saved_bytes -= len(e.data)

    def _restore(self, prompt: list[int], key: str, limit: int, better_than: int, target: _Slot) -> int:
        """Restore into `target` the saved conversation sharing the longest prefix with `prompt`, if it
        shares more than `better_than` tokens; returns the cached tokens (0: nothing restored)."""
        import llama_cpp

        best, best_n = None, better_than
        for k, e in self._saved.items():
            if e.cache_key == key:
                n = min(_common_prefix(e.tokens, prompt), limit)
                if n > best_n:
                    best, best_n = k, n
        if best is None:
            return 0
        e = self._saved.pop(best)  # taken out first: saving the target's own cells may evict entries
        self._saved_bytes -= len(e.data)
        self._clear_slot(target)
        if int(llama_cpp.llama_state_seq_set_data(self.ctx, e.data, len(e.data), target.seq_id)) == 0:
            log.warning("could not restore a cached conversation into slot %d; evaluating it again", target.seq_id)
            self._clear_slot(target, save=False)
            return 0
        target.tokens = list(e.tokens)
        if best_n < len(e.tokens) and self._saved_bytes + len(e.data) <= self.host_cache_bytes:
            self._saved[best] = e  # its tail is still only here; most recently used now
            self._saved_bytes += len(e.data)
        self.stats["host_restores"] += 1
        return self._clear_slot(target, best_n, save=False)

    def _place(self, seq: Sequence, free: list[_Slot]) -> tuple[_Slot, int]:
        """Choose a free slot for `seq` and set up its cached prefix; returns (slot, cached tokens)."""
        import llama_cpp

        prompt, key = seq.req.prompt, seq.req.cache_key
        if not self.exact_prefix:  # a recurrent state: the whole prompt, evaluated afresh in a cleared slot
            target = min(free, key=lambda s: (bool(s.tokens), s.last_used))
            self._clear_slot(target, save=False)
            return target, 0
        limit = len(prompt) - 1  # at least one prompt token must be evaluated for logits
        busy = [s.seq_id for s in self.slots if s.running is not None]

        def holes(s: _Slot) -> int:
            """Idle slots left between running ones if `s` runs too (each costs a placeholder per step)."""
            if self.unified or not busy:
                return 0
            ids = [*busy, s.seq_id]
            return max(ids) - min(ids) + 1 - len(ids)

        best_free, best_free_n = None, 0
        best_any, best_any_n = None, 0
        if seq.req.reuse_prefix and limit > 0:
            for s in self.slots:
                if s.cache_key != key or not s.tokens:
                    continue  # never across cache scopes
                n = min(_common_prefix(s.tokens, prompt), limit)
                if s.running is None and (n > best_free_n or (n == best_free_n and n > 0 and best_free is not None
                                                              and holes(s) < holes(best_free))):
                    best_free, best_free_n = s, n
                if n > best_any_n:
                    best_any, best_any_n = s, n
        # Continue an idle slot's conversation; else next to the running slots, then an empty
        # slot, else the least recently used one.
        resume = best_free is not None and best_free_n >= best_any_n
        target = best_free if resume else min(free, key=lambda s: (holes(s), bool(s.tokens), s.last_used))
        if seq.req.reuse_prefix and limit > 0 and self._saved:
            restored = self._restore(prompt, key, limit, max(best_free_n, best_any_n) + 1, target)
            if restored:
                return target, restored
        if resume:
            return target, self._clear_slot(target, best_free_n)
        self._clear_slot(target)
        if best_any is not None and best_any_n > 0:
            # Share the prefix's cells with the slot that holds them (a running conversation or a
            # common system prompt): nothing is recomputed.
            if self.unified:
                llama_cpp.llama_memory_seq_cp(self.mem, best_any.seq_id, target.seq_id, 0, best_any_n)
            else:  # across streams llama.cpp copies whole buffers only: copy, then cut to the prefix
                llama_cpp.llama_memory_seq_cp(self.mem, best_any.seq_id, target.seq_id, -1, -1)
                llama_cpp.llama_memory_seq_rm(self.mem, target.seq_id, best_any_n, -1)
            target.tokens = list(best_any.tokens[:best_any_n])
            return target, best_any_n
        return target, 0

    def _step(self) -> None:
        """One llama_decode over every running sequence, then sampling for those that produced logits.

        With a KV stream per slot (the default), llama.cpp splits a batch into micro-batches of
        consecutive sequence ids, in batch order, with the same number of tokens for each; every
        micro-batch is another pass over the weights (about 90 ms of a 160 ms step at 16 slots on
        2 cores). So the batch is laid out in slot order; an idle or waiting slot between two fed
        ones gets one placeholder token (no logits; its cell removed right after), far cheaper than
        a second pass; and while several sequences generate, each feeds one token per step (a
        constraint's forced tokens go one a step instead of costing everyone an extra pass).
        """
        import llama_cpp

        batch = self._batch
        n = 0
        rows: list[tuple[Sequence, int]] = []
        fed: list[tuple[Sequence, list[int]]] = []
        with self._cv:
            running = list(self.running)
        plan: dict[int, tuple[Sequence, list[int], bool]] = {}  # slot -> (sequence, tokens, wants logits)
        used = 0
        # Generating sequences first: one token each (more when a constraint forced some and the
        # sequence is the only one generating).
        generating = [s for s in running if not s.prefilling]
        per_seq = 1 if len(generating) > 1 and not self.unified else self.n_batch
        for seq in generating:
            room = min(self.n_batch - used, per_seq)
            if room <= 0:
                break
            toks = seq.pending[:room]
            plan[seq.slot] = (seq, toks, len(toks) == len(seq.pending))
            used += len(toks)
        # Then prompt chunks, oldest first; bounded while others stream.
        budget = self.n_batch - used if not generating else min(self.n_batch - used, self.prefill_chunk)
        for seq in running:
            if not seq.prefilling or budget <= 0:
                continue
            toks = seq.pending[:budget]
            budget -= len(toks)
            plan[seq.slot] = (seq, toks, len(toks) == len(seq.pending))
        if not plan:
            return
        ids = sorted(plan)
        fill: dict[int, int] = {}  # slot -> position of its placeholder token (removed after the step)
        room = self.n_batch - sum(len(toks) for _, toks, _ in plan.values())
        for sid in range(ids[0], ids[-1] + 1) if not self.unified and self.exact_prefix else ():
            if sid not in plan and room > 0 and len(self.slots[sid].tokens) < self.n_ctx:  # a free cell there
                fill[sid] = len(self.slots[sid].tokens)
                room -= 1
        self.stats["placeholders"] += len(fill)

        def put(sid: int, tok: int, pos: int) -> None:
            nonlocal n
            batch.token[n] = tok
            batch.pos[n] = pos
            batch.n_seq_id[n] = 1
            batch.seq_id[n][0] = sid
            batch.logits[n] = 0
            n += 1

        for sid in range(ids[0], ids[-1] + 1):
            if sid in fill:
                put(sid, 0, fill[sid])
            elif sid in plan:
                seq, toks, want_logits = plan[sid]
                pos = len(self.slots[sid].tokens)
                for k, t in enumerate(toks):
                    put(sid, t, pos + k)
                if want_logits:
                    batch.logits[n - 1] = 1
                    rows.append((seq, n - 1))
                fed.append((seq, toks))
        if n == 0:
            return
        batch.n_tokens = n
        rc = llama_cpp.llama_decode(self.ctx, batch)
        if rc == 1 and not fill:  # no room for the batch in the KV cache: drop every idle cache, retry once
            with self._cv:
                for s in self.slots:
                    if s.running is None and s.tokens:
                        self._clear_slot(s)
            rc = llama_cpp.llama_decode(self.ctx, batch)
        for sid, pos in fill.items():  # the placeholders' cells go; the slot's own cells stay
            llama_cpp.llama_memory_seq_rm(self.mem, sid, pos, -1)
        if rc != 0:
            with self._cv:
                for seq, _ in fed:
                    slot = self.slots[seq.slot]
                    self._clear_slot(slot, len(slot.tokens))  # drop whatever the failed decode left
                    self._release(seq, error=EdgeQwenError(
                        f"llama.cpp could not evaluate a batch of {n} tokens (llama_decode returned {rc}); "
                        "try a smaller request, fewer parallel slots or a larger n_ctx"))
            return
        self.steps += 1
        for seq, toks in fed:
            self.slots[seq.slot].tokens.extend(toks)
            del seq.pending[:len(toks)]
        for seq, row in rows:
            try:
                seq.on_logits(self.ctx, row)
            except Exception as e:  # a constraint that failed: this sequence ends with the error
                seq.fail(e)
            if seq.state == DONE:
                with self._cv:
                    self._release(seq)
