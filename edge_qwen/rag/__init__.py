"""Documents: long input and the user's own files, answered offline.

What this package owns, one idea per module:

- `documents`: reading txt/md/html/pdf/code files into text sections with locations.
- `chunking`: token-aware chunks with overlap on paragraph and sentence boundaries (Chinese
  and English).
- `terms`: the words retrieval matches on (English words, Chinese words via jieba).
- `index`: the on-disk index in the model store (SQLite FTS5 BM25, optional dense vectors),
  version-stamped, updated atomically, re-indexing only changed files.
- `embed`: dense vectors from a local embedding GGUF.
- `summarize`: retrieve-summarize-merge for text longer than the context window.
- `answer`: answers from retrieved chunks, citing [1], [2], or saying "not in the documents".

The package consumes EdgeQwen's public API (`chat`, `tokenize`, `n_ctx`); it never drives the
decode loop itself.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = ["DocIndex", "ask", "ask_files", "summarize", "NOT_FOUND"]

if TYPE_CHECKING:  # pragma: no cover
    from .answer import NOT_FOUND, ask, ask_files
    from .index import DocIndex
    from .summarize import summarize


def __getattr__(name: str) -> Any:
    # Lazy: `import edge_qwen.rag` stays cheap (no sqlite, jieba or llama.cpp until used).
    if name in ("ask", "ask_files", "NOT_FOUND"):
        from . import answer

        return getattr(answer, name)
    if name == "DocIndex":
        from .index import DocIndex

        return DocIndex
    if name == "summarize":
        from .summarize import summarize

        return summarize
    raise AttributeError(f"module 'edge_qwen.rag' has no attribute {name!r}")
