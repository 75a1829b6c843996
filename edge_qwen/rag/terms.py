"""The words retrieval matches on, for Chinese and English alike.

English (and any Latin-script or code text) is split into lowercase word tokens; SQLite's
porter tokenizer then stems them inside FTS5. Chinese has no spaces, so runs of CJK
characters are segmented into words with jieba (its dictionary plus an HMM for unknown
words). Words, not character bigrams: a bigram index also matches the bigrams that straddle
word boundaries ("项目的预算" gives 目的, 的预), which makes a question look half-answered by
text that shares none of its words, and the "not in the documents" decision below relies on
how many of a question's words a passage really contains.

Documents are segmented with jieba's search mode (long words and the words inside them), so
a question that uses the shorter word still matches; questions use the plain mode.
"""

from __future__ import annotations

import logging
import re
import threading
from functools import lru_cache

_CJK = "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\u3040-\u30ff\uac00-\ud7af"
_TOKEN = re.compile(rf"[{_CJK}]+|[^\W_]+(?:['’][^\W_]+)?", re.UNICODE)
_CJK_RUN = re.compile(rf"^[{_CJK}]+$")

# Question words and glue that say nothing about which passage answers; kept out of queries.
STOPWORDS = frozenset("""
a an the and or but of to in on at by for with from as is are was were be been being do does did done
it its this that these those there here what which who whom whose when where why how much many
i you he she we they me my your our their his her them us can could should would will shall may might
must not no yes if then than so such into about over under after before between during also just only
very more most some any each all both few other same own too s t tell please give list name named
according document documents text file files say says said mention mentioned
的 了 是 在 和 与 及 或 吗 呢 吧 啊 么 什么 多少 哪 哪里 哪个 哪些 哪儿 谁 怎么 怎样 如何 为什么 为何 几 请 请问 告诉
一下 我 你 他 她 它 我们 你们 他们 这 那 这个 那个 这些 那些 有 没有 就 都 也 还 又 被 把 对 于 从 到 给 让 上 下 中 之
其 所 以 而 且 并 等 个 些 是否 可以 能 会 要 需要 根据 文档 文件 中的 里 说 提到 一个
""".split())

_jieba_lock = threading.Lock()


@lru_cache(maxsize=1)
def _jieba():
    with _jieba_lock:
        import jieba

        jieba.setLogLevel(logging.WARNING)  # its "Building prefix dict" chatter would reach the user's terminal
        jieba.initialize()
        return jieba


def _cjk_words(run: str, search: bool) -> list[str]:
    if len(run) == 1:
        return [run]
    jb = _jieba()
    words = jb.lcut_for_search(run, HMM=True) if search else jb.lcut(run, HMM=True)
    return [w for w in words if w.strip()]


def terms(text: str, *, search: bool = True) -> list[str]:
    """The retrieval terms of `text`, in order (lowercase words; Chinese segmented into words).

    `search=True` (documents) adds the shorter words inside long Chinese words.
    """
    out: list[str] = []
    for m in _TOKEN.finditer(text):
        tok = m.group()
        if _CJK_RUN.match(tok):
            out.extend(_cjk_words(tok, search))
        else:
            out.append(tok.lower().replace("’", "'"))
    return out


def query_terms(question: str) -> list[str]:
    """The distinct content words of a question, in order: stopwords and lone Chinese characters
    dropped (unless nothing else is left)."""
    seen: dict[str, None] = {}
    all_terms = terms(question, search=False)
    for t in all_terms:
        if t in STOPWORDS or (len(t) == 1 and not t.isdigit()):
            continue
        seen.setdefault(t, None)
    if not seen:  # a question of stopwords only: match on what there is
        for t in all_terms:
            seen.setdefault(t, None)
    return list(seen)


def fts_document(text: str) -> str:
    """The text FTS5 stores for a chunk: its terms separated by spaces."""
    return " ".join(terms(text, search=True))


def fts_phrase(term: str) -> str:
    """One term as an FTS5 string literal (quotes doubled), safe in a MATCH expression."""
    return '"' + term.replace('"', '""') + '"'
