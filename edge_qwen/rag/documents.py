"""Reading the user's files into text: plain text, Markdown, code, HTML and PDF.

A document is a list of sections, each with the text and where it sits (a PDF page, or the
first line of the section in a text file), so an answer can cite "notes.md:12-18" or
"report.pdf p.3". Anything that cannot be read as text is refused with the reason and what to
do: a missing file, a binary file, a file that is not UTF-8, an encrypted or broken PDF, a PDF
without a text layer.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path

from ..errors import EdgeQwenError

# Kinds by suffix: names in a table, not in code.
TEXT_SUFFIXES = frozenset({
    ".txt", ".text", ".md", ".markdown", ".rst", ".org", ".tex", ".csv", ".tsv", ".log", ".json", ".jsonl",
    ".yaml", ".yml", ".toml", ".ini", ".cfg", ".xml",
    # code
    ".py", ".pyi", ".js", ".mjs", ".ts", ".tsx", ".jsx", ".c", ".h", ".cc", ".cpp", ".hpp", ".cxx", ".go",
    ".rs", ".java", ".kt", ".swift", ".rb", ".php", ".cs", ".scala", ".lua", ".r", ".jl", ".sh", ".bash",
    ".zsh", ".ps1", ".sql", ".css", ".scss", ".vue", ".svelte", ".m", ".mm", ".pl", ".dart", ".zig",
})
HTML_SUFFIXES = frozenset({".html", ".htm", ".xhtml"})
PDF_SUFFIXES = frozenset({".pdf"})
SUPPORTED_SUFFIXES = TEXT_SUFFIXES | HTML_SUFFIXES | PDF_SUFFIXES
# Files without a suffix that are text by convention.
TEXT_NAMES = frozenset({"readme", "license", "copying", "notice", "makefile", "dockerfile", "changelog", "authors"})
MAX_FILE_BYTES = 200_000_000


class DocumentError(EdgeQwenError):
    """A file that cannot be read as a document (missing, binary, encrypted, broken)."""

    code = "invalid_document"


@dataclass
class Section:
    """A run of a document's text: `page` (1-based) for PDFs, else `first_line` (1-based)."""

    text: str
    page: int | None = None
    first_line: int = 1


@dataclass
class Document:
    """A file read as text sections."""

    path: Path
    kind: str  # "text" | "html" | "pdf"
    sections: list[Section] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def text(self) -> str:
        return "\n\n".join(s.text for s in self.sections)


def is_supported(path: Path) -> bool:
    """True when the file's suffix (or bare name, like LICENSE) is one this module reads."""
    return path.suffix.lower() in SUPPORTED_SUFFIXES or (not path.suffix and path.name.lower() in TEXT_NAMES)


def decode_text(data: bytes, path: Path) -> str:
    """UTF-8 (with or without BOM) or UTF-16 with a BOM; anything else is refused with advice."""
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        try:
            return data.decode("utf-16")
        except UnicodeDecodeError:
            pass
    if b"\x00" in data[:8192]:
        raise DocumentError(f"{path} looks like a binary file (it contains NUL bytes), not text; give a text, "
                            "Markdown, HTML, code or PDF file")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DocumentError(f"{path} is not UTF-8 text (invalid byte at offset {e.start}); convert it, e.g. "
                            f"`iconv -f GBK -t UTF-8 {path.name} > {path.stem}.utf8{path.suffix}`") from None


class _HTMLText(HTMLParser):
    """Visible text of an HTML page: scripts and styles dropped, block elements end lines."""

    BLOCKS = frozenset({"p", "div", "br", "li", "tr", "h1", "h2", "h3", "h4", "h5", "h6", "section", "article",
                        "header", "footer", "pre", "blockquote", "table", "ul", "ol", "dd", "dt", "title"})
    HIDDEN = frozenset({"script", "style", "noscript", "template", "svg"})

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.hidden = 0

    def handle_starttag(self, tag: str, attrs) -> None:  # noqa: ANN001
        if tag in self.HIDDEN:
            self.hidden += 1
        elif tag in self.BLOCKS:
            self.parts.append("\n\n" if tag in ("p", "h1", "h2", "h3", "h4", "h5", "h6", "title") else "\n")

    def handle_endtag(self, tag: str) -> None:
        if tag in self.HIDDEN and self.hidden:
            self.hidden -= 1
        elif tag in self.BLOCKS:
            self.parts.append("\n")

    def handle_data(self, data: str) -> None:
        if not self.hidden:
            self.parts.append(data)


def _html_text(source: str) -> str:
    import re

    parser = _HTMLText()
    parser.feed(source)
    parser.close()
    text = "".join(parser.parts)
    text = re.sub(r"[ \t\r\f\v]+", " ", text)
    text = re.sub(r" *\n *", "\n", text)
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def _pdf_sections(path: Path) -> tuple[list[Section], list[str]]:
    try:
        from pypdf import PdfReader
        from pypdf.errors import PdfReadError
    except ImportError:  # a dependency; say how to get it rather than fail obscurely
        raise DocumentError(f"reading {path} needs pypdf: pip install pypdf") from None
    try:
        reader = PdfReader(str(path))
        if reader.is_encrypted:
            # Many PDFs are "encrypted" with an empty user password (print/copy restrictions only).
            try:
                ok = reader.decrypt("")
            except Exception:  # noqa: BLE001 - pypdf raises several types (missing crypto backend etc.)
                ok = 0
            if not ok:
                raise DocumentError(f"{path} is an encrypted PDF; decrypt it first (e.g. `qpdf --decrypt "
                                    f"--password=... {path.name} out.pdf`) and index the decrypted copy")
        sections, empty = [], 0
        for i, page in enumerate(reader.pages, start=1):
            text = (page.extract_text() or "").strip()
            if text:
                sections.append(Section(text, page=i))
            else:
                empty += 1
    except DocumentError:
        raise
    except (PdfReadError, ValueError, KeyError, TypeError, AttributeError, OSError, RecursionError) as e:
        raise DocumentError(f"{path} is not a readable PDF ({type(e).__name__}: {e}); re-save or repair it "
                            "(e.g. `qpdf in.pdf out.pdf`)") from None
    if not sections:
        raise DocumentError(f"{path} has no text layer (a scanned PDF?); run OCR on it first (e.g. `ocrmypdf "
                            f"{path.name} out.pdf`)")
    warnings = [f"{path}: {empty} of {len(reader.pages)} pages have no text layer and were not indexed"] if empty else []
    return sections, warnings


def load_document(path: str | os.PathLike) -> Document:
    """Read one file as a Document; raises DocumentError naming the file and what to do."""
    p = Path(path)
    if not p.exists():
        raise DocumentError(f"{p} does not exist; check the path")
    if p.is_dir():
        raise DocumentError(f"{p} is a folder; give files (or use `edge-qwen index add`, which walks folders)")
    if not p.is_file():
        raise DocumentError(f"{p} is not a regular file")
    size = p.stat().st_size
    if size > MAX_FILE_BYTES:
        raise DocumentError(f"{p} is {size / 1e6:.0f} MB, more than the {MAX_FILE_BYTES / 1e6:.0f} MB one document "
                            "may be; split it")
    suffix = p.suffix.lower()
    if suffix in PDF_SUFFIXES:
        sections, warnings = _pdf_sections(p)
        return Document(p, "pdf", sections, warnings)
    try:
        data = p.read_bytes()
    except OSError as e:
        raise DocumentError(f"cannot read {p}: {e.strerror}") from None
    if data.startswith(b"%PDF-"):
        raise DocumentError(f"{p} is a PDF without the .pdf suffix; rename it to {p.stem}.pdf")
    text = decode_text(data, p)
    kind = "text"
    if suffix in HTML_SUFFIXES:
        text, kind = _html_text(text), "html"
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    if not text.strip():
        raise DocumentError(f"{p} holds no text; nothing to read")
    return Document(p, kind, [Section(text, first_line=1)])
