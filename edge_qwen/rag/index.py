"""The document index: files chunked into an SQLite database in the model store, searched by BM25.

One index is one SQLite file, `$EDGE_QWEN_HOME/indexes/NAME.sqlite`:

- `meta`: the format version (an index made by another version is refused with what to do),
  the chunk size, the embedding model if any.
- `files`: path, mtime, size, sha256 and chunk count of each indexed file. Re-adding a path
  re-reads only files whose mtime or size changed and whose hash then differs; files that
  vanished from an added folder leave the index.
- `chunks` + `chunks_fts` (FTS5, porter stemming over our own term segmentation, see
  `terms`): the text and its location (page or line range).
- `vectors`: dense embeddings of the chunks, when the index was made with an embedding GGUF.

Every file is read and chunked before the database is touched; the changes then go in one
transaction (a new index is built under a temporary name and renamed), so a bad file, a
Ctrl-C or a full disk leaves the index as it was.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import sqlite3
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import EdgeQwenError
from .chunking import TokenCounter, chunk_text, line_of
from .documents import DocumentError, is_supported, load_document
from .terms import fts_document, fts_phrase, query_terms

INDEX_FORMAT = 1
DEFAULT_CHUNK_TOKENS = 300
DEFAULT_OVERLAP_TOKENS = 40
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_SKIP_DIRS = frozenset({".git", ".hg", ".svn", "node_modules", "__pycache__", ".venv", "venv", ".tox", ".mypy_cache"})

SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE files (id INTEGER PRIMARY KEY, path TEXT UNIQUE NOT NULL, mtime_ns INTEGER NOT NULL,
                    size INTEGER NOT NULL, sha256 TEXT NOT NULL, kind TEXT NOT NULL, n_chunks INTEGER NOT NULL,
                    indexed_at REAL NOT NULL);
CREATE TABLE chunks (id INTEGER PRIMARY KEY, file_id INTEGER NOT NULL REFERENCES files(id) ON DELETE CASCADE,
                     ord INTEGER NOT NULL, text TEXT NOT NULL, page INTEGER, line_start INTEGER,
                     line_end INTEGER, n_tokens INTEGER NOT NULL);
CREATE INDEX chunks_file ON chunks(file_id);
CREATE VIRTUAL TABLE chunks_fts USING fts5(terms, tokenize='porter unicode61 remove_diacritics 2');
CREATE TABLE vectors (chunk_id INTEGER PRIMARY KEY REFERENCES chunks(id) ON DELETE CASCADE, vec BLOB NOT NULL);
"""


class IndexError_(EdgeQwenError):
    """An index that is missing, empty, of another version, or a bad index name."""

    code = "invalid_index"


class IndexNotFoundError(IndexError_):
    status = 404
    code = "index_not_found"


@dataclass
class Hit:
    """One retrieved chunk: where it is, its text, its BM25 score (higher is better) and `coverage`,
    the share of the question's words (weighted by rarity) that it contains."""

    chunk_id: int
    path: str
    location: str
    text: str
    score: float
    coverage: float
    page: int | None = None
    line_start: int | None = None
    line_end: int | None = None


@dataclass
class AddReport:
    """What `DocIndex.add` did, file by file."""

    added: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # "path: reason"
    warnings: list[str] = field(default_factory=list)
    chunks: int = 0


def indexes_dir() -> Path:
    """Where indexes live: $EDGE_QWEN_HOME/indexes."""
    from ..store import home

    return home() / "indexes"


def check_name(name: Any) -> str:
    """A valid index name (letters, digits, . _ -; up to 64), or IndexError_ saying so."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise IndexError_(f"index name {name!r} is not valid; use letters, digits, '.', '_' and '-' (up to 64, "
                          "starting with a letter or digit)", param="index")
    return name


def list_indexes() -> list[dict[str, Any]]:
    """Every index in the store: name, files, chunks, size on disk, format, embedding model."""
    d = indexes_dir()
    out = []
    for p in sorted(d.glob("*.sqlite")) if d.is_dir() else []:
        row: dict[str, Any] = {"name": p.stem, "path": str(p), "bytes": p.stat().st_size}
        try:
            with DocIndex.open(p.stem) as ix:
                row.update(ix.stats())
        except EdgeQwenError as e:
            row["error"] = e.message
        out.append(row)
    return out


def remove_index(name: str) -> Path:
    """Delete index `name` from the store; IndexNotFoundError if there is none."""
    path = indexes_dir() / f"{check_name(name)}.sqlite"
    if not path.exists():
        raise IndexNotFoundError(f"there is no index named {name!r}; `edge-qwen index ls` lists them", param="index")
    path.unlink()
    for extra in ("-wal", "-shm", "-journal"):
        with contextlib.suppress(FileNotFoundError):
            Path(f"{path}{extra}").unlink()
    return path


def _connect(path: str | Path) -> sqlite3.Connection:
    con = sqlite3.connect(str(path), timeout=30, isolation_level=None, check_same_thread=False)
    con.execute("PRAGMA foreign_keys = ON")
    return con


def _walk(paths: Iterable[str | os.PathLike]) -> tuple[list[Path], list[Path], list[str]]:
    """(files to index, folders given, skipped "path: reason"). A missing path is an error."""
    files: list[Path] = []
    folders: list[Path] = []
    skipped: list[str] = []
    for raw in paths:
        p = Path(raw).expanduser()
        if not p.exists():
            raise DocumentError(f"{p} does not exist; check the path", param="paths")
        if p.is_dir():
            folders.append(p.resolve())
            for root, dirs, names in os.walk(p):
                dirs[:] = sorted(d for d in dirs if d not in _SKIP_DIRS and not d.startswith("."))
                for n in sorted(names):
                    f = Path(root) / n
                    if n.startswith("."):
                        continue
                    if is_supported(f):
                        files.append(f.resolve())
                    else:
                        skipped.append(f"{f}: not a supported kind (txt, md, html, pdf, code)")
        else:
            files.append(p.resolve())  # named explicitly: it must be readable, load_document says why not
    seen: dict[Path, None] = dict.fromkeys(files)
    return list(seen), folders, skipped


def location_of(path: str, page: int | None, line_start: int | None, line_end: int | None) -> str:
    """How a citation names a chunk: "file.pdf p.3" or "notes.md:12-18"."""
    name = Path(path).name
    if page is not None:
        return f"{name} p.{page}"
    if line_start is not None:
        return f"{name}:{line_start}" if line_start == line_end else f"{name}:{line_start}-{line_end}"
    return name


class DocIndex:
    """An open index. `DocIndex.open(name)` / `DocIndex.create(name)` / `DocIndex.memory()`."""

    def __init__(self, con: sqlite3.Connection, name: str, path: Path | None):
        self.con = con
        self.name = name
        self.path = path

    # -- opening ----------------------------------------------------------------------------
    @classmethod
    def open(cls, name: str, *, create: bool = False, chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
             overlap_tokens: int = DEFAULT_OVERLAP_TOKENS) -> DocIndex:
        """Open index `name` from the store (with `create`, make it if missing); checks its version."""
        path = indexes_dir() / f"{check_name(name)}.sqlite"
        if not path.exists():
            if not create:
                raise IndexNotFoundError(f"there is no index named {name!r}; make it with `edge-qwen index add "
                                         f"{name} PATH...` (`edge-qwen index ls` lists the indexes)", param="index")
            return cls._new(name, path, chunk_tokens, overlap_tokens)
        try:
            con = _connect(path)
            meta = dict(con.execute("SELECT key, value FROM meta").fetchall())
        except sqlite3.DatabaseError as e:
            raise IndexError_(f"{path} is not an edge-qwen index ({e}); remove it with `edge-qwen index rm {name}` "
                              "and add the files again", param="index") from None
        fmt = meta.get("format")
        if fmt != str(INDEX_FORMAT):
            con.close()
            raise IndexError_(f"index {name!r} was made with index format {fmt} (by edge-qwen {meta.get('edge_qwen')}); "
                              f"this edge-qwen reads format {INDEX_FORMAT}. Rebuild it: `edge-qwen index rm {name}` "
                              f"then `edge-qwen index add {name} PATH...`", param="index", code="index_version")
        return cls(con, name, path)

    @classmethod
    def _new(cls, name: str, path: Path | None, chunk_tokens: int, overlap_tokens: int) -> DocIndex:
        from .. import __version__

        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
        con = _connect(":memory:" if path is None else path)
        con.executescript(SCHEMA)
        con.executemany("INSERT INTO meta VALUES (?, ?)", [
            ("format", str(INDEX_FORMAT)), ("edge_qwen", __version__), ("created", str(time.time())),
            ("chunk_tokens", str(chunk_tokens)), ("overlap_tokens", str(overlap_tokens))])
        return cls(con, name, path)

    @classmethod
    def create(cls, name: str, **kw: Any) -> DocIndex:
        """Open index `name`, making it if it does not exist."""
        return cls.open(name, create=True, **kw)

    @classmethod
    def memory(cls, chunk_tokens: int = DEFAULT_CHUNK_TOKENS, overlap_tokens: int = DEFAULT_OVERLAP_TOKENS) -> DocIndex:
        """A throwaway in-memory index (for `ask FILE`)."""
        return cls._new(":memory:", None, chunk_tokens, overlap_tokens)

    def meta(self) -> dict[str, str]:
        return dict(self.con.execute("SELECT key, value FROM meta").fetchall())

    def stats(self) -> dict[str, Any]:
        """Files, chunks, format, chunk size and embedding model of this index."""
        m = self.meta()
        files = self.con.execute("SELECT count(*), coalesce(sum(n_chunks), 0) FROM files").fetchone()
        return {"files": files[0], "chunks": files[1], "format": int(m.get("format", 0)),
                "chunk_tokens": int(m.get("chunk_tokens", 0)), "embed_model": m.get("embed_model"),
                "updated": float(m.get("updated", m.get("created", 0)))}

    def files(self) -> list[dict[str, Any]]:
        """The indexed files with their size, chunk count and when they were indexed."""
        rows = self.con.execute("SELECT path, size, n_chunks, kind, indexed_at FROM files ORDER BY path").fetchall()
        return [{"path": p, "size": s, "chunks": n, "kind": k, "indexed_at": t} for p, s, n, k, t in rows]

    def close(self) -> None:
        self.con.close()

    def __enter__(self) -> DocIndex:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- adding -----------------------------------------------------------------------------
    def add(self, paths: Iterable[str | os.PathLike], count: TokenCounter, *, embedder: Any = None,
            skip_errors: bool = False, progress: Callable[[int, int], None] | None = None) -> AddReport:
        """Index `paths` (files and folders; folders are walked). Only changed files are read again.

        `count` measures tokens (e.g. `lambda t: len(llm.tokenize(t))`). A file that cannot be read
        raises DocumentError and nothing changes, unless `skip_errors` (then it is reported in
        `skipped`). `embedder` (an `embed.Embedder`) adds dense vectors; an index made with one
        needs the same model on every later add.
        """
        meta = self.meta()
        chunk_tokens, overlap = int(meta["chunk_tokens"]), int(meta["overlap_tokens"])
        if meta.get("embed_model") and embedder is None:
            raise IndexError_(f"index {self.name!r} holds dense vectors from {meta['embed_model']}; pass the same "
                              "embedding model (--embed-model) to add files to it", param="embed_model")
        if embedder is not None and meta.get("embed_model") not in (None, embedder.name):
            raise IndexError_(f"index {self.name!r} was built with embedding model {meta['embed_model']}, not "
                              f"{embedder.name}; use that model or build a new index", param="embed_model")
        report = AddReport()
        files, folders, skipped = _walk(paths)
        report.skipped.extend(skipped)
        known = {p: (fid, mt, sz, h) for fid, p, mt, sz, h in
                 self.con.execute("SELECT id, path, mtime_ns, size, sha256 FROM files")}
        from ..files import sha256_file

        # 1. Read and chunk everything that changed, in memory: no database write yet.
        staged: list[tuple[str, Any, Any, str, list[tuple], str]] = []  # (path, stat, old id, sha, rows, kind)
        touch: list[tuple[int, int, str]] = []  # same content, new mtime
        for n, f in enumerate(files):
            if progress:
                progress(n, len(files))
            key = str(f)
            st = f.stat() if f.exists() else None
            old = known.get(key)
            if st is not None and old is not None and old[1] == st.st_mtime_ns and old[2] == st.st_size:
                report.unchanged.append(key)
                continue
            try:
                sha = sha256_file(f) if st is not None else ""
                if old is not None and st is not None and old[3] == sha:
                    touch.append((st.st_mtime_ns, st.st_size, key))
                    report.unchanged.append(key)
                    continue
                doc = load_document(f)
            except (DocumentError, OSError) as e:
                msg = e.message if isinstance(e, DocumentError) else f"cannot read {f}: {e}"
                if not skip_errors:
                    raise DocumentError(msg + " (the index was not changed; --skip-errors indexes the other files)",
                                        param="paths") from None
                report.skipped.append(msg)
                continue
            report.warnings.extend(doc.warnings)
            rows = []
            for sec in doc.sections:
                for c in chunk_text(sec.text, count, chunk_tokens, overlap):
                    if sec.page is not None:
                        rows.append((c.text, sec.page, None, None, c.n_tokens))
                    else:
                        a = sec.first_line + line_of(sec.text, c.start) - 1
                        b = sec.first_line + line_of(sec.text, max(c.start, c.end - 1)) - 1
                        rows.append((c.text, None, a, b, c.n_tokens))
            staged.append((key, st, old[0] if old else None, sha, rows, doc.kind))
            (report.updated if old else report.added).append(key)
            report.chunks += len(rows)
        if progress:
            progress(len(files), len(files))
        # Files that left an added folder leave the index too.
        gone = [(fid, p) for p, (fid, *_rest) in known.items()
                if p not in {str(f) for f in files} and any(Path(p).is_relative_to(d) for d in folders)
                and not Path(p).exists()]
        report.removed = [p for _, p in gone]
        vectors: list[list[float]] = []
        if embedder is not None:
            texts = [r[0] for s in staged for r in s[4]]
            vectors = embedder.embed(texts) if texts else []
        if not staged and not touch and not gone:
            return report
        # 2. One transaction: all of it or none of it.
        con = self.con
        con.execute("BEGIN IMMEDIATE")
        try:
            for fid, _ in gone:
                self._drop_file(fid)
            for mt, sz, key in touch:
                con.execute("UPDATE files SET mtime_ns = ?, size = ? WHERE path = ?", (mt, sz, key))
            vi = 0
            for key, st, old_id, sha, rows, kind in staged:
                if old_id is not None:
                    self._drop_file(old_id)
                cur = con.execute("INSERT INTO files (path, mtime_ns, size, sha256, kind, n_chunks, indexed_at) "
                                  "VALUES (?, ?, ?, ?, ?, ?, ?)", (key, st.st_mtime_ns, st.st_size, sha, kind,
                                                                   len(rows), time.time()))
                fid = cur.lastrowid
                for ordinal, (text, page, a, b, ntok) in enumerate(rows):
                    cid = con.execute("INSERT INTO chunks (file_id, ord, text, page, line_start, line_end, n_tokens) "
                                      "VALUES (?, ?, ?, ?, ?, ?, ?)", (fid, ordinal, text, page, a, b, ntok)).lastrowid
                    con.execute("INSERT INTO chunks_fts (rowid, terms) VALUES (?, ?)", (cid, fts_document(text)))
                    if embedder is not None:
                        con.execute("INSERT INTO vectors VALUES (?, ?)", (cid, _pack(vectors[vi])))
                        vi += 1
            if embedder is not None:
                con.execute("INSERT OR REPLACE INTO meta VALUES ('embed_model', ?)", (embedder.name,))
            con.execute("INSERT OR REPLACE INTO meta VALUES ('updated', ?)", (str(time.time()),))
            con.execute("COMMIT")
        except BaseException:
            con.execute("ROLLBACK")
            raise
        return report

    def _drop_file(self, file_id: int) -> None:
        ids = [r[0] for r in self.con.execute("SELECT id FROM chunks WHERE file_id = ?", (file_id,))]
        self.con.executemany("DELETE FROM chunks_fts WHERE rowid = ?", [(i,) for i in ids])
        self.con.execute("DELETE FROM files WHERE id = ?", (file_id,))  # chunks and vectors cascade

    def add_text(self, text: str, count: TokenCounter, source: str = "text") -> int:
        """Index a text that is not a file (the `ask FILE` path chunks documents it already read)."""
        meta = self.meta()
        rows = chunk_text(text, count, int(meta["chunk_tokens"]), int(meta["overlap_tokens"]))
        con = self.con
        con.execute("BEGIN")
        cur = con.execute("INSERT INTO files (path, mtime_ns, size, sha256, kind, n_chunks, indexed_at) VALUES "
                          "(?, 0, ?, '', 'text', ?, ?)", (source, len(text), len(rows), time.time()))
        for ordinal, c in enumerate(rows):
            a, b = line_of(text, c.start), line_of(text, max(c.start, c.end - 1))
            cid = con.execute("INSERT INTO chunks (file_id, ord, text, page, line_start, line_end, n_tokens) VALUES "
                              "(?, ?, ?, NULL, ?, ?, ?)", (cur.lastrowid, ordinal, c.text, a, b, c.n_tokens)).lastrowid
            con.execute("INSERT INTO chunks_fts (rowid, terms) VALUES (?, ?)", (cid, fts_document(c.text)))
        con.execute("COMMIT")
        return len(rows)

    # -- searching --------------------------------------------------------------------------
    def _count(self) -> int:
        return self.con.execute("SELECT count(*) FROM chunks").fetchone()[0]

    def _idf(self, words: list[str], n_docs: int) -> dict[str, float]:
        out = {}
        for w in words:
            df = self.con.execute("SELECT count(*) FROM chunks_fts WHERE chunks_fts MATCH ?", (fts_phrase(w),)).fetchone()[0]
            out[w] = math.log((n_docs - df + 0.5) / (df + 0.5) + 1.0)
        return out

    def search(self, question: str, k: int = 5, *, embedder: Any = None, candidates: int = 50,
               reranker: Any = None, rerank_candidates: int = 20) -> list[Hit]:
        """The `k` chunks that best match `question`, best first.

        BM25 over the question's content words (see `terms.query_terms`); each hit's `coverage` is
        the rarity-weighted share of those words it contains (1.0: all of them). With dense vectors
        in the index and an `embedder`, BM25 and cosine rankings are fused (reciprocal rank fusion).
        A `reranker` (engine.pooled.Reranker) then scores the first `rerank_candidates` of that
        order against the question, and the `k` it rates highest are returned (`score` is then
        the reranker's).
        """
        if not isinstance(question, str) or not question.strip():
            raise IndexError_("the question is empty; ask something", param="question")
        n_docs = self._count()
        if n_docs == 0:
            raise IndexError_(f"index {self.name!r} is empty; add files with `edge-qwen index add {self.name} PATH...`",
                              param="index", code="index_empty")
        words = query_terms(question)
        if not words:
            return []
        idf = self._idf(words, n_docs)
        expr = " OR ".join(fts_phrase(w) for w in words)
        ranked = self.con.execute(
            "SELECT rowid, -bm25(chunks_fts) FROM chunks_fts WHERE chunks_fts MATCH ? ORDER BY bm25(chunks_fts) LIMIT ?",
            (expr, max(candidates, k))).fetchall()
        scores = {cid: s for cid, s in ranked}
        order = [cid for cid, _ in ranked]
        if embedder is not None and self.meta().get("embed_model"):
            order = self._fuse(order, question, embedder, max(candidates, k))
        if reranker is not None and order:
            pool = order[:max(rerank_candidates, k)]
            texts = [self.con.execute("SELECT text FROM chunks WHERE id = ?", (cid,)).fetchone()[0] for cid in pool]
            ranked_pool = reranker.rank(question, texts)
            scores = {pool[i]: s for i, s in ranked_pool}
            order = [pool[i] for i, _s in ranked_pool]
        top = order[:k]
        hits = []
        total_idf = sum(idf.values()) or 1.0
        for cid in top:
            matched = sum(idf[w] for w in words if self.con.execute(
                "SELECT 1 FROM chunks_fts WHERE chunks_fts MATCH ? AND rowid = ?", (fts_phrase(w), cid)).fetchone())
            text, page, a, b, path = self.con.execute(
                "SELECT c.text, c.page, c.line_start, c.line_end, f.path FROM chunks c JOIN files f ON f.id = c.file_id "
                "WHERE c.id = ?", (cid,)).fetchone()
            hits.append(Hit(cid, path, location_of(path, page, a, b), text, float(scores.get(cid, 0.0)),
                            matched / total_idf, page, a, b))
        return hits

    def _fuse(self, bm25_order: list[int], question: str, embedder: Any, n: int) -> list[int]:
        import numpy as np

        embed_query = getattr(embedder, "embed_query", None)  # Qwen3-Embedding: the query with its instruction
        q = np.asarray(embed_query(question) if embed_query else embedder.embed([question])[0], dtype=np.float32)
        ids, mats = [], []
        for cid, blob in self.con.execute("SELECT chunk_id, vec FROM vectors"):
            ids.append(cid)
            mats.append(np.frombuffer(blob, dtype=np.float32))
        if not ids:
            return bm25_order
        sims = np.stack(mats) @ q
        dense_order = [ids[i] for i in np.argsort(-sims)[:n]]
        rrf: dict[int, float] = {}
        for order in (bm25_order, dense_order):
            for rank, cid in enumerate(order):
                rrf[cid] = rrf.get(cid, 0.0) + 1.0 / (60 + rank)  # 60: the constant of the RRF paper
        return sorted(rrf, key=lambda c: -rrf[c])

    def iter_chunks(self) -> Iterator[tuple[str, str]]:
        """(location, text) of every chunk, in file order."""
        for text, page, a, b, path in self.con.execute(
                "SELECT c.text, c.page, c.line_start, c.line_end, f.path FROM chunks c JOIN files f ON f.id = c.file_id "
                "ORDER BY f.path, c.ord"):
            yield location_of(path, page, a, b), text


def _pack(vec: Any) -> bytes:
    import numpy as np

    v = np.asarray(vec, dtype=np.float32)
    return v.tobytes()


def build(name: str, paths: list[str | os.PathLike], count: TokenCounter, *, chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
          overlap_tokens: int = DEFAULT_OVERLAP_TOKENS, embedder: Any = None, skip_errors: bool = False,
          progress: Callable[[int, int], None] | None = None) -> AddReport:
    """`edge-qwen index add`: add `paths` to index `name`, creating it when new.

    A new index is built under a temporary name and renamed into place only when complete, so a
    failed first add leaves no half-made index behind.
    """
    final = indexes_dir() / f"{check_name(name)}.sqlite"
    from ..files import remove_stale_partials

    remove_stale_partials(final.parent)  # what runs killed with SIGKILL left (and their journals)
    if final.exists():
        with DocIndex.open(name) as ix:
            return ix.add(paths, count, embedder=embedder, skip_errors=skip_errors, progress=progress)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.partial-{os.getpid()}")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    try:
        ix = DocIndex._new(name, tmp, chunk_tokens, overlap_tokens)
        try:
            report = ix.add(paths, count, embedder=embedder, skip_errors=skip_errors, progress=progress)
        finally:
            ix.close()
        if not report.added:
            raise DocumentError("no readable files to index in " + ", ".join(str(p) for p in paths)
                                + (f" ({len(report.skipped)} skipped: {report.skipped[0]})" if report.skipped else "")
                                + "; give txt, md, html, pdf or code files", param="paths")
        if final.exists():
            raise IndexError_(f"index {name!r} appeared while this one was being built; add the files again",
                              param="index")
        os.replace(tmp, final)
        return report
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
