"""Retrieve-summarize-merge: summaries of text of any length within the model's context window.

The text is cut into token-aware chunks (`chunking`) that fit the window with the prompt and
the answer; each chunk is summarized ("map", at most `map_tokens` tokens); the partial
summaries are merged in groups that fit the window, level by level, until one summary is
left. Every character of the input is read by the model once: nothing is cut silently. The
prompts follow the text's language (Chinese or English).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..errors import RequestError
from .chunking import chunk_text

_PROMPTS = {
    "en": {
        "system": "You summarize documents faithfully. You keep names, numbers, dates and decisions, and add nothing "
                  "that is not in the text.",
        "map": "This is part {i} of {n} of a document:\n\n{text}\n\nSummarize this part in at most {words} words.",
        "merge": "These are summaries of consecutive parts of one document:\n\n{text}\n\nMerge them into one summary "
                 "of at most {words} words.",
        "one": "Document:\n\n{text}\n\nSummarize the document in at most {words} words.",
    },
    "zh": {
        "system": "你忠实地总结文档，保留人名、数字、日期和决定，不添加原文没有的内容。",
        "map": "这是一份文档的第 {i} 部分（共 {n} 部分）：\n\n{text}\n\n请用不超过 {words} 个字总结这一部分。",
        "merge": "以下是同一份文档各个连续部分的摘要：\n\n{text}\n\n请把它们合并成一份不超过 {words} 个字的摘要。",
        "one": "文档：\n\n{text}\n\n请用不超过 {words} 个字总结这份文档。",
    },
}


@dataclass
class Summary:
    """The summary and how it was made: input tokens, chunks mapped, merge levels, model calls."""

    text: str
    input_tokens: int
    chunks: int
    levels: int
    calls: int
    partials: list[list[str]] = field(default_factory=list)  # the summaries of each level, for inspection


def language_of(text: str) -> str:
    """ "zh" when at least a fifth of the letters are CJK, else "en"."""
    sample = text[:20000]
    cjk = sum(1 for ch in sample if "\u4e00" <= ch <= "\u9fff" or "\u3400" <= ch <= "\u4dbf")
    letters = sum(1 for ch in sample if ch.isalpha())
    return "zh" if letters and cjk / letters >= 0.2 else "en"


def _words(tokens: int, lang: str) -> int:
    # A Chinese character is about 0.7 tokens for Qwen's tokenizer, an English word about 1.4.
    return max(10, int(tokens * (1.3 if lang == "zh" else 0.7)) // 10 * 10)


def summarize(llm: Any, text: str, *, max_tokens: int = 400, map_tokens: int = 200, chunk_tokens: int | None = None,
              language: str | None = None, quiet: bool = True,
              on_progress: Callable[[int, int], None] | None = None) -> Summary:
    """A summary of `text` of at most `max_tokens` tokens, whatever its length, with `llm` (an EdgeQwen).

    Chunks are at most `chunk_tokens` (default: what the window leaves after the prompt and
    `map_tokens`); each is summarized in at most `map_tokens`; partial summaries are merged in
    groups until one remains. Greedy decoding, so the same text gives the same summary. On a model
    with several slots (`EdgeQwen(parallel=N)`) up to N chunks are summarized at once: one chunk's
    prompt is read while the others' summaries are written in the same batches (batched logits can
    tip a greedy near-tie, so the text may differ from a one-slot model's).
    `on_progress(done, total)` is called after each model call (total is an estimate until the
    last level); a tqdm bar shows on a terminal unless `quiet`.
    """
    if not isinstance(text, str) or not text.strip():
        raise RequestError("there is no text to summarize; give a non-empty text", param="text")
    for name, v in (("max_tokens", max_tokens), ("map_tokens", map_tokens)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 16:
            raise RequestError(f"{name}={v!r} must be an integer of at least 16", param=name)
    lang = language or language_of(text)
    if lang not in _PROMPTS:
        raise RequestError(f"language={lang!r}; use 'en' or 'zh'", param="language")
    p = _PROMPTS[lang]

    def count(t: str) -> int:
        return len(llm.tokenize(t, special=False))

    def overhead(template: str) -> int:
        msgs = [{"role": "system", "content": p["system"]},
                {"role": "user", "content": template.format(i=999, n=999, text="", words=9999)}]
        return len(llm.prompt_tokens(msgs))

    n_ctx = llm.n_ctx
    room = n_ctx - max(overhead(p["map"]), overhead(p["merge"]), overhead(p["one"])) - max(max_tokens, map_tokens) - 8
    if room < 64:
        raise RequestError(f"the context window n_ctx={n_ctx} leaves only {room} tokens for text after the prompt and "
                           f"max_tokens={max(max_tokens, map_tokens)}; lower max_tokens/map_tokens or load the model "
                           "with a larger n_ctx", param="max_tokens")
    size = min(room, chunk_tokens) if chunk_tokens else room
    total_tokens = count(text)

    def ask(prompt: str, limit: int) -> str:
        r = llm.chat([{"role": "system", "content": p["system"]}, {"role": "user", "content": prompt}],
                     temperature=0.0, max_tokens=limit)
        return r["choices"][0]["message"]["content"].strip()

    from ..progress import progress

    calls = 0
    if total_tokens <= size:
        with progress(1, "summarize", "call", quiet=quiet) as bar:
            out = ask(p["one"].format(text=text, words=_words(max_tokens, lang)), max_tokens)
            bar.update(1)
        if on_progress:
            on_progress(1, 1)
        return Summary(out, total_tokens, 1, 0, 1)

    pieces = [c.text for c in chunk_text(text, count, size, overlap_tokens=min(64, size // 10))]
    estimate = len(pieces) + max(1, len(pieces) * map_tokens // size + 1)
    levels: list[list[str]] = []
    with progress(estimate, "summarize", "call", quiet=quiet) as bar:
        def step() -> None:
            nonlocal calls
            calls += 1
            bar.total = max(bar.total or 0, calls)
            bar.update(1)
            if on_progress:
                on_progress(calls, max(estimate, calls))

        def ask_all(prompts: list[str], limit: int) -> list[str]:
            """Every prompt answered, in order; at once on a model with several slots (`parallel`), so
            one chunk's prompt is read while others' summaries are written in the same batches."""
            workers = max(1, min(int(getattr(llm, "parallel", 1) or 1), len(prompts)))
            if workers == 1:
                out = []
                for q in prompts:
                    out.append(ask(q, limit))
                    step()
                return out
            from concurrent.futures import ThreadPoolExecutor, as_completed

            with ThreadPoolExecutor(workers, thread_name_prefix="edge-qwen-summarize") as pool:
                futures = [pool.submit(ask, q, limit) for q in prompts]
                try:
                    for f in as_completed(futures):
                        f.result()
                        step()
                except BaseException:
                    for f in futures:
                        f.cancel()
                    raise
                return [f.result() for f in futures]

        partial = ask_all([p["map"].format(i=i, n=len(pieces), text=piece, words=_words(map_tokens, lang))
                           for i, piece in enumerate(pieces, start=1)], map_tokens)
        levels.append(partial)
        # Merge level by level: groups of partial summaries that fit the window.
        while True:
            joined = "\n\n".join(partial)
            if count(joined) <= size:
                final = ask(p["merge"].format(text=joined, words=_words(max_tokens, lang)), max_tokens)
                step()
                break
            groups: list[list[str]] = [[]]
            used = 0
            for s in partial:
                n = count(s) + 2
                if groups[-1] and used + n > size:
                    groups.append([])
                    used = 0
                groups[-1].append(s)
                used += n
            if len(groups) == len(partial):  # no group holds two summaries: they cannot shrink further
                raise RequestError(f"the partial summaries do not fit the context window n_ctx={n_ctx} two at a "
                                   "time; lower map_tokens or load the model with a larger n_ctx", param="map_tokens")
            merged = iter(ask_all([p["merge"].format(text="\n\n".join(g), words=_words(map_tokens, lang))
                                   for g in groups if len(g) > 1], map_tokens))
            partial = [g[0] if len(g) == 1 else next(merged) for g in groups]
            levels.append(partial)
    return Summary(final, total_tokens, len(pieces), len(levels), calls, levels)


def summarize_files(llm: Any, paths: list[str | os.PathLike], **kw: Any) -> Summary:
    """Summarize one or more files (txt, md, html, pdf, code) as one document."""
    from .documents import load_document

    if not paths:
        raise RequestError("no files given; name at least one file to summarize", param="paths")
    docs = [load_document(p) for p in paths]  # every file checked before the model runs
    text = docs[0].text if len(docs) == 1 else "\n\n".join(f"# {d.path.name}\n\n{d.text}" for d in docs)
    return summarize(llm, text, **kw)
