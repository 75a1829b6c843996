"""Answers from the user's documents, citing [1], [2], or saying "not in the documents".

`ask` retrieves the chunks that bear on the question (`DocIndex.search`), numbers them as
sources with their file and location, and has the model answer from them alone. Whether the
documents hold the answer is decided twice:

1. Retrieval: the best chunk must contain at least `min_coverage` of the question's content
   words, weighted by rarity (BM25's idf). A question none of whose rare words occur in the
   documents never reaches the model, so the model cannot invent an answer to it.
2. The model: told to reply "not in the documents" when the sources do not answer; a reply
   that says so (in English or Chinese) is reported as not found.

Then the answer is "not in the documents" and `found` is False. The model answers as JSON
{"answer", "source"} through the JSON constraint (free text, the 0.5B model dropped the [n]
markers or copied the instruction's example); the answer is shown as "text [n]" and its
citation mapped to the source's file and location.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass, field
from typing import Any

from ..errors import ContextOverflowError, RequestError
from .index import DocIndex, Hit

NOT_FOUND = "not in the documents"
NOT_FOUND_ZH = "文档中没有答案"
MIN_COVERAGE = 0.25  # measured on the 40-question test corpus: the lowest answerable question scores 0.28
DEFAULT_K = 3

_SYSTEM = {
    "en": "You answer questions from the user's documents. You use only the numbered sources you are given.",
    "zh": "你根据用户的文档回答问题，只使用给你的编号资料。",
}
_USER = {
    "en": ("Sources:\n\n{sources}\n\nQuestion: {question}\n\nAnswer from the sources only, as JSON: \"answer\" is a "
           "short sentence, \"source\" the number of the source it comes from. If the sources do not contain the "
           "answer, the answer is \"" + NOT_FOUND + "\"."),
    "zh": ("资料：\n\n{sources}\n\n问题：{question}\n\n只根据资料回答，用 JSON：\"answer\" 是一句简短的回答，\"source\" 是答案"
           "所在资料的编号。如果资料里没有答案，answer 写 \"" + NOT_FOUND_ZH + "\"。"),
}


def _schema(n_sources: int) -> dict[str, Any]:
    """The answer's shape: the model must name the source it answers from (1..n)."""
    return {"type": "object", "additionalProperties": False, "required": ["answer", "source"],
            "properties": {"answer": {"type": "string", "maxLength": 600},
                           "source": {"type": "integer", "minimum": 1, "maximum": max(1, n_sources)}}}


def _messages(lang: str, sources: str, question: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": _SYSTEM[lang]},
            {"role": "user", "content": _USER[lang].format(sources=sources, question=question)}]


_NOT_FOUND_RE = re.compile(
    r"not in the (?:documents?|sources?|provided)|(?:documents?|sources?) do(?:es)? not (?:contain|mention|say)|"
    r"no information (?:about|on)|文档中没有|资料中没有|资料里没有|文档里没有|没有(?:相关)?(?:信息|答案|提到)|未提及|没有提及",
    re.IGNORECASE)
_CITE_RE = re.compile(r"\[(\d+(?:\s*[,，、]\s*\d+)*)\]")


@dataclass
class Source:
    """A numbered source given to the model."""

    n: int
    path: str
    location: str
    text: str
    score: float
    coverage: float


@dataclass
class Answer:
    """The answer, whether the documents hold it, what it cites and what the model saw."""

    answer: str
    found: bool
    citations: list[dict[str, Any]] = field(default_factory=list)  # {"n", "path", "location"}
    sources: list[Source] = field(default_factory=list)
    reason: str | None = None  # why not found: "retrieval" | "model"
    bad_citations: list[int] = field(default_factory=list)
    reasoning_content: str | None = None
    usage: dict[str, int] | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def cited_paths(self) -> list[str]:
        return [c["path"] for c in self.citations]


def _lang(question: str) -> str:
    cjk = sum(1 for ch in question if "\u4e00" <= ch <= "\u9fff")
    return "zh" if cjk >= max(2, len(question.strip()) // 5) else "en"


def says_not_found(text: str) -> bool:
    """True when a reply says the documents do not hold the answer (English or Chinese)."""
    return bool(_NOT_FOUND_RE.search(text))


def citations_of(text: str, sources: list[Source]) -> tuple[list[dict[str, Any]], list[int]]:
    """([{"n", "path", "location"}...] in first-mention order, [numbers that name no source])."""
    by_n = {s.n: s for s in sources}
    cited: dict[int, dict[str, Any]] = {}
    bad: list[int] = []
    for m in _CITE_RE.finditer(text):
        for part in re.split(r"\s*[,，、]\s*", m.group(1)):
            n = int(part)
            if n in by_n:
                cited.setdefault(n, {"n": n, "path": by_n[n].path, "location": by_n[n].location})
            elif n not in bad:
                bad.append(n)
    return list(cited.values()), bad


def _not_found(lang: str, sources: list[Source], reason: str, **kw: Any) -> Answer:
    text = NOT_FOUND if lang == "en" else f"{NOT_FOUND_ZH}（{NOT_FOUND}）"
    return Answer(text, False, [], sources, reason, **kw)


def answer_from(llm: Any, question: str, hits: list[Hit], *, max_tokens: int = 256, min_coverage: float = MIN_COVERAGE,
                reasoning: str | None = None, temperature: float = 0.0, seed: int | None = None) -> Answer:
    """Answer `question` from retrieved `hits` with `llm` (an EdgeQwen); see the module docstring."""
    if not isinstance(question, str) or not question.strip():
        raise RequestError("the question is empty; ask something", param="question")
    lang = _lang(question)
    fixed = len(llm.prompt_tokens(_messages(lang, "", question)))
    room = llm.n_ctx - fixed - max_tokens - 8
    if room < 64:
        raise ContextOverflowError(
            f"the question is {len(llm.tokenize(question, special=False))} tokens: with the instructions and "
            f"max_tokens={max_tokens} it leaves {max(room, 0)} tokens of the context window n_ctx={llm.n_ctx} for the "
            "documents; shorten the question, lower max_tokens or load the model with a larger n_ctx",
            param="question")
    sources: list[Source] = []
    used = 0
    for h in hits:
        block = f"[{len(sources) + 1}] {h.location}\n{h.text.strip()}\n\n"
        n = len(llm.tokenize(block, special=False))
        if used + n > room:
            if not sources:  # even the best chunk does not fit: cut it to the room, and say so in the source
                ids = llm.tokenize(h.text, special=False)[: max(room - 32, 16)]
                block = f"[1] {h.location} (beginning)\n{llm.detokenize(ids)}\n\n"
                sources.append(Source(1, h.path, h.location, llm.detokenize(ids), h.score, h.coverage))
            break
        sources.append(Source(len(sources) + 1, h.path, h.location, h.text.strip(), h.score, h.coverage))
        used += n
    if not sources or max(s.coverage for s in sources) < min_coverage:
        return _not_found(lang, sources, "retrieval")
    text = "".join(f"[{s.n}] {s.location}\n{s.text}\n\n" for s in sources).rstrip()
    messages = _messages(lang, text, question)
    # The reply is JSON {"answer", "source"}: a small model left to write free text drops the [n]
    # markers or copies the instruction's example; constrained, it always names a source.
    kw: dict[str, Any] = {"temperature": temperature, "max_tokens": max_tokens, "seed": seed,
                          "response_format": {"type": "json_schema",
                                              "json_schema": {"name": "answer", "schema": _schema(len(sources))}}}
    if reasoning is not None:
        kw["reasoning"] = reasoning
    r = llm.chat(messages, **kw)
    msg = r["choices"][0]["message"]
    thought = msg.get("reasoning_content")
    try:
        data = json.loads(msg.get("content") or "")
        reply, n = str(data["answer"]).strip(), int(data["source"])
    except (ValueError, KeyError, TypeError):  # cut by max_tokens: the JSON did not close
        raise RequestError(f"the answer did not fit max_tokens={max_tokens}; raise max_tokens", param="max_tokens") from None
    if says_not_found(reply) or not reply:
        return _not_found(lang, sources, "model", reasoning_content=thought, usage=r.get("usage"))
    reply = re.sub(r"\s*\[\d+\]\s*$", "", reply)
    text = f"{reply} [{n}]" if reply[-1:] not in ".。!?！？" else f"{reply[:-1]} [{n}]{reply[-1]}"
    cited, bad = citations_of(text, sources)
    return Answer(text, True, cited, sources, None, bad, thought, r.get("usage"))


def ask(llm: Any, question: str, index: str | DocIndex, *, k: int = DEFAULT_K, embedder: Any = None,
        reranker: Any = None, **kw: Any) -> Answer:
    """Answer `question` from index `index` (a name in the store or an open DocIndex).

    `embedder` (rag.embed.Embedder) adds dense retrieval; `reranker` (engine.pooled.Reranker)
    reorders the retrieved candidates before the best `k` are kept."""
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= 50:
        raise RequestError(f"k={k!r} must be an integer between 1 and 50", param="k")
    if isinstance(index, DocIndex):
        hits = index.search(question, k, embedder=embedder, reranker=reranker)
    else:
        with DocIndex.open(index) as ix:
            hits = ix.search(question, k, embedder=embedder, reranker=reranker)
    return answer_from(llm, question, hits, **kw)


def ask_files(llm: Any, paths: list[str | os.PathLike], question: str, *, k: int = DEFAULT_K,
              chunk_tokens: int = 300, **kw: Any) -> Answer:
    """Answer `question` from files of any length: chunk them into a throwaway index, retrieve, answer."""
    from .documents import load_document

    if not paths:
        raise RequestError("no files given; name at least one file to ask about", param="paths")
    if not isinstance(question, str) or not question.strip():
        raise RequestError("the question is empty; ask something", param="question")
    docs = [load_document(p) for p in paths]

    def count(t: str) -> int:
        return len(llm.tokenize(t, special=False))

    with DocIndex.memory(chunk_tokens=chunk_tokens) as ix:
        for d in docs:
            for sec in d.sections:
                ix.add_text(sec.text, count, source=str(d.path) if sec.page is None else f"{d.path}#p{sec.page}")
        return ask(llm, question, ix, k=k, **kw)
