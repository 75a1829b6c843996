"""The docs match the code: every `edge-qwen` command line in README.md and docs/*.md names a real
command and real options (checked against the click commands `--help` prints), and every file a
doc cites exists. New docs are picked up as they are added: every ```bash block line that starts
with `edge-qwen` (after `$ `, or after `&&`, `;` or `|`) is read the same way."""

from __future__ import annotations

import functools
import re
import shlex
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from edge_qwen.cli import main

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(\w*)\s*$")
# Paths a doc may cite in backticks: files of this repository (code, tests, scripts, data, docs).
CITED = re.compile(r"`((?:edge_qwen|tests|benchmarks|convert|docs|models)/[\w./-]*\w)`")
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


def _bash_lines(path: Path) -> list[tuple[int, str]]:
    out, lang, cont = [], None, ""
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        m = FENCE.match(line.strip())
        if m:
            lang = None if lang is not None else (m.group(1) or "text")
            continue
        if lang in ("bash", "sh", "shell", "console"):
            text = cont + line.strip()
            if text.endswith("\\"):
                cont = text[:-1] + " "
                continue
            cont = ""
            out.append((n, text.removeprefix("$ ")))
    return out


def _invocations(text: str) -> list[list[str]]:
    """Each `edge-qwen ...` command on a shell line, as argument lists (comments, pipes and && split off)."""
    try:
        lexer = shlex.shlex(text, posix=True, punctuation_chars=";&|")
        lexer.whitespace_split = True
        lexer.commenters = "#"
        tokens = list(lexer)
    except ValueError:  # an unbalanced quote in prose-like examples: judge the part before it
        tokens = text.split()
    runs, cur = [], []
    for t in tokens + [";"]:
        if t and set(t) <= set(";&|"):
            if cur and cur[0] == "edge-qwen":
                runs.append(cur[1:])
            cur = []
        else:
            cur.append(t)
    return runs


@functools.lru_cache(maxsize=None)
def _help(path: tuple[str, ...]) -> tuple[int, str]:
    r = CliRunner().invoke(main, [*path, "--help"], terminal_width=200)
    return r.exit_code, r.output


def _check(args: list[str]) -> str | None:
    """None if `edge-qwen ARGS` names a real command and only options its `--help` lists, else what is wrong."""
    cmd: click.Command = main
    path: list[str] = []
    rest = list(args)
    while isinstance(cmd, click.Group) and rest and not rest[0].startswith("-"):
        if rest[0].startswith(("[", "<")) or rest[0].isupper():
            break
        sub = cmd.get_command(click.Context(cmd), rest[0])
        if sub is None:
            return f"no command {' '.join(path + [rest[0]])!r}"
        path.append(rest.pop(0))
        cmd = sub
    code, text = _help(tuple(path))
    if code != 0:
        return f"`edge-qwen {' '.join(path)} --help` failed: {text}"
    listed = set(re.findall(r"(?<![\w-])(--?[A-Za-z][\w-]*)", text))
    for token in rest:
        for part in re.split(r"[\[\]|]", token):  # [--json] and [-q|--quiet] in usage lines
            if part.startswith("-") and len(part) > 1 and not re.fullmatch(r"-\d[\d.]*", part):
                flag = part.split("=", 1)[0].removesuffix("...")
                if flag not in listed:
                    return f"`edge-qwen {' '.join(path)} --help` lists no option {flag}"
    return None


INLINE = re.compile(r"(?<!`)`([^`\n]+)`(?!`)")


def _inline_invocations(path: Path) -> list[tuple[int, list[str]]]:
    """Commands quoted in the prose: `edge-qwen chat --json`, or `serve --ctx N` (a command name, then an option)."""
    out, fenced = [], False
    names = set(main.commands)
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if FENCE.match(line.strip()):
            fenced = not fenced
            continue
        if fenced:
            continue
        for m in INLINE.finditer(line):
            words = m.group(1).split()
            if words[:1] == ["edge-qwen"] and len(words) > 1:
                out.extend((n, args) for args in _invocations(m.group(1)))
            elif len(words) > 1 and words[0] in names and words[1].startswith("-"):
                out.append((n, words))
    return out


def _all_invocations():
    for doc in DOCS:
        for n, line in _bash_lines(doc):
            for args in _invocations(line):
                yield pytest.param(args, id=f"{doc.name}:{n}")
        for n, args in _inline_invocations(doc):
            yield pytest.param(args, id=f"{doc.name}:{n}:inline")


def test_docs_show_commands():
    assert len(list(_all_invocations())) > 40  # the parser finds the examples at all


@pytest.mark.parametrize("args", list(_all_invocations()))
def test_documented_command_exists(args):
    problem = _check(args)
    assert problem is None, f"edge-qwen {' '.join(args)}: {problem}"


def test_cited_files_exist():
    missing = []
    for doc in DOCS:
        text = doc.read_text(encoding="utf-8")
        for m in CITED.finditer(text):
            cited = m.group(1)
            if "*" in cited or "<" in cited:
                continue
            if not (ROOT / cited).exists() and not (ROOT / cited.split("::")[0]).exists():
                missing.append(f"{doc.name}: `{cited}`")
        for m in LINK.finditer(text):
            target = m.group(1)
            if target.startswith(("http://", "https://", "mailto:")):
                continue
            if not (doc.parent / target).exists():
                missing.append(f"{doc.name}: link {target}")
    assert missing == []


def test_readme_links_every_doc_and_names_every_api():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    for doc in sorted((ROOT / "docs").glob("*.md")):
        assert f"docs/{doc.name}" in readme, f"README.md does not link docs/{doc.name}"
    for api in ("OpenAI", "Ollama", "Qwen", "/v1/chat/completions", "/api/chat", "/v1/responses", "/v1/completions",
                "/v1/embeddings"):
        assert api in readme, api
