"""An interactive chat session over EdgeQwen: history, Ollama's slash commands, and timing readouts.

`ChatSession` holds the conversation and the sampling settings; `feed(lines)` reads user input
(Ollama's `\"\"\"` multi-line blocks included) and answers it through a `write` callback. The CLI's
`edge-qwen chat`/`run` drive it over stdin; a desktop app or a test drives the same object.

Commands: /help (/?), /clear (/reset), /bye (/exit, /quit), /set PARAM VALUE, /set system TEXT,
/show [info|parameters|system|template], /save FILE, /load FILE. Anything else that starts with
"/" is refused with a hint, never sent to the model.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

HELP = """Available commands:
  /set PARAM VALUE   set a parameter: temperature, top_p, top_k, max_tokens (num_predict), seed
  /set system TEXT   set the system prompt (clears the conversation)
  /set verbose       print token counts and tokens/s after each answer (/set quiet: stop)
  /show [info|parameters|system|template]   the model's details, or the current settings
  /save FILE         save the conversation (JSON)
  /load FILE         load a conversation saved with /save
  /clear             forget the conversation (the system prompt stays)
  /bye               exit (also /exit, Ctrl-D)
  /?, /help          this help
Start a message with \"\"\" and end it with \"\"\" to write several lines."""

# /set names -> (generate() keyword, type); Ollama's names accepted beside ours.
SETTABLE: dict[str, tuple[str, type]] = {
    "temperature": ("temperature", float), "temp": ("temperature", float), "top_p": ("top_p", float),
    "top_k": ("top_k", int), "max_tokens": ("max_tokens", int), "num_predict": ("max_tokens", int),
    "seed": ("seed", int)}
LIMITS = {"temperature": (0.0, 2.0), "top_p": (0.0, 1.0), "top_k": (0, 1 << 20), "max_tokens": (1, 1 << 20),
          "seed": (-(1 << 63), 1 << 63)}


def timing_lines(timings: Any, total_s: float) -> list[str]:
    """Ollama's --verbose readout for one answer: counts, durations and tokens per second."""
    prompt_s, gen_s = timings.prompt_ms / 1000.0, timings.gen_ms / 1000.0
    prompt_rate = timings.prompt_tokens / prompt_s if prompt_s > 0 else 0.0
    return [f"total duration:       {total_s:.3f}s",
            f"prompt eval count:    {timings.prompt_tokens} token(s)"
            + (f" ({timings.cached_tokens} cached)" if getattr(timings, "cached_tokens", 0) else ""),
            f"prompt eval duration: {prompt_s:.3f}s",
            f"prompt eval rate:     {prompt_rate:.2f} tokens/s",
            f"eval count:           {timings.completion_tokens} token(s)",
            f"eval duration:        {gen_s:.3f}s",
            f"eval rate:            {timings.tokens_per_s:.2f} tokens/s"]


def stream_reply(llm: Any, messages: list[dict], write: Callable[[str], None], **kw: Any) -> tuple[str, str, Any]:
    """Stream one reply through `write`; return (text, finish_reason, timings). Ctrl-C cancels the reply only.

    `reply` (in kw) replaces the plain generation: a callable (llm, messages, write, **kw) -> (text,
    finish), such as `chat --mcp`'s tool loop (edge_qwen.cli._mcp.stream_reply).
    """
    reply = kw.pop("reply", None)
    if reply is not None:
        text, finish = reply(llm, messages, write, **kw)
        return text, finish, None
    parts, finish, timings = [], "stop", None
    stream = llm.generate(messages, **kw)
    try:
        for chunk in stream:
            if chunk.text:
                write(chunk.text)
                parts.append(chunk.text)
            if chunk.finish_reason:
                finish = chunk.finish_reason
            if chunk.timings is not None:
                timings = chunk.timings
    except KeyboardInterrupt:
        finish = "cancelled"
    finally:
        stream.close()  # releases the model even when interrupted
    return "".join(parts), finish, timings


def read_messages(lines: Iterable[str]) -> Iterator[str]:
    """User inputs from raw lines: one per line, or a \"\"\"...\"\"\" block joined with newlines."""
    it = iter(lines)
    for raw in it:
        line = raw.rstrip("\r\n")
        if not line.lstrip().startswith('"""'):
            yield line
            continue
        body = line.lstrip()[3:]
        if body.endswith('"""'):
            yield body[:-3]
            continue
        block = [body]
        for more in it:
            more = more.rstrip("\r\n")
            if more.endswith('"""'):
                block.append(more[:-3])
                break
            block.append(more)
        yield "\n".join(block).strip("\n")


class ChatSession:
    """One conversation with `llm`, its settings (`options`: generate() keywords) and the slash commands."""

    def __init__(self, llm: Any, write: Callable[[str], None], *, system: str | None = None, verbose: bool = False,
                 info: Callable[[], list[str]] | None = None, note: Callable[[str], None] | None = None,
                 **options: Any):
        self.llm, self.write, self.system, self.verbose = llm, write, system, verbose
        self.note = note or write  # settings, timings and command answers (stderr in the CLI)
        self.info = info
        self.options = options
        self.history: list[dict[str, Any]] = self._head()

    def _head(self) -> list[dict[str, Any]]:
        return [{"role": "system", "content": self.system}] if self.system else []

    def feed(self, lines: Iterable[str], prompt: Callable[[], None] | None = None) -> list[dict[str, Any]]:
        """Answer every input in `lines` until /bye or the end; return the conversation."""
        if prompt:
            prompt()
        for text in read_messages(lines):
            if not self.handle(text):
                break
            if prompt:
                prompt()
        return self.history

    def handle(self, text: str) -> bool:
        """One user input: a command or a message. False when the session should end."""
        cmd = text.strip()
        if not cmd:
            return True
        if cmd.startswith("/") and "\n" not in cmd:
            return self.command(cmd)
        self.ask(text)
        return True

    def ask(self, text: str) -> str:
        """Send one message; the reply is streamed through `write` and kept in the history."""
        import time

        self.history.append({"role": "user", "content": text})
        start = time.perf_counter()
        reply, finish, timings = stream_reply(self.llm, self.history, self.write, **self.options)
        self.write("\n")
        if finish == "length":
            self.note("(reply cut at --max-tokens)\n")
        elif finish == "cancelled":
            self.note("(cancelled)\n")
        self.history.append({"role": "assistant", "content": reply})
        if self.verbose and timings is not None:
            self.note("\n".join(timing_lines(timings, time.perf_counter() - start)) + "\n")
        return reply

    def command(self, cmd: str) -> bool:
        name, _, arg = cmd.partition(" ")
        arg = arg.strip()
        if name in ("/bye", "/exit", "/quit"):
            return False
        if name in ("/clear", "/reset"):
            self.history = self._head()
            self.note("(conversation reset)\n" if name == "/reset" else "Cleared session context\n")
        elif name in ("/?", "/help"):
            self.note(HELP + "\n")
        elif name == "/set":
            self._set(arg)
        elif name == "/show":
            self._show(arg)
        elif name == "/save":
            self._save(arg)
        elif name == "/load":
            self._load(arg)
        else:
            self.note(f"Unknown command '{name}'. Type /? for help\n")
        return True

    def _set(self, arg: str) -> None:
        key, _, value = arg.partition(" ")
        value = value.strip()
        if key == "system":
            self.system = value or None
            self.history = self._head()
            self.note("Set system message.\n" if value else "Cleared system message.\n")
            return
        if key in ("verbose", "quiet"):
            self.verbose = key == "verbose"
            self.note(f"Set '{key}' mode.\n")
            return
        if key not in SETTABLE or not value:
            self.note(f"Usage: /set PARAM VALUE with PARAM one of {', '.join(SETTABLE)}, or /set system TEXT\n")
            return
        option, kind = SETTABLE[key]
        try:
            parsed = kind(value)
        except ValueError:
            self.note(f"'{value}' is not a valid {key} ({kind.__name__} expected)\n")
            return
        low, high = LIMITS[option]
        if not low <= parsed <= high:
            self.note(f"{key} must be between {low} and {high}\n")
            return
        self.options[option] = parsed
        self.note(f"Set parameter '{option}' to '{parsed}'\n")

    def _show(self, arg: str) -> None:
        what = arg or "info"
        if what == "info":
            lines = self.info() if self.info else [f"model: {getattr(self.llm, 'model_name', '?')}"]
        elif what == "parameters":
            lines = [f"{k:<12}{v}" for k, v in self.options.items() if v is not None and k != "response_format"]
        elif what == "system":
            lines = [self.system or "(no system prompt)"]
        elif what == "template":
            lines = [getattr(self.llm, "chat_template", None) or "(the model's built-in template)"]
        else:
            lines = ["Usage: /show [info|parameters|system|template]"]
        self.note("\n".join(lines) + "\n")

    def _save(self, arg: str) -> None:
        if not arg:
            self.note("Usage: /save FILE\n")
            return
        from .errors import EdgeQwenError
        from .files import atomic_output

        path = Path(arg).expanduser()
        data = {"model": getattr(self.llm, "model_name", None), "system": self.system,
                "options": {k: v for k, v in self.options.items() if k != "response_format"},
                "messages": self.history}
        try:
            with atomic_output(path, force=True) as tmp:
                Path(tmp).write_text(json.dumps(data, ensure_ascii=False, indent=2), encoding="utf-8")
        except (EdgeQwenError, OSError) as e:
            self.note(f"cannot save to {path}: {getattr(e, 'message', None) or e}\n")
            return
        self.note(f"Saved the conversation ({len(self.history)} messages) to {path}\n")

    def _load(self, arg: str) -> None:
        if not arg:
            self.note("Usage: /load FILE\n")
            return
        path = Path(arg).expanduser()
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            messages = data["messages"]
            if not isinstance(messages, list) or not all(
                    isinstance(m, dict) and m.get("role") in ("system", "user", "assistant")
                    and isinstance(m.get("content"), str) for m in messages):
                raise ValueError("messages must be a list of {role, content}")
        except OSError as e:
            self.note(f"cannot read {path}: {e.strerror}\n")
            return
        except (ValueError, KeyError, TypeError) as e:
            self.note(f"{path} is not a conversation saved with /save ({e})\n")
            return
        self.history = messages
        self.system = next((m["content"] for m in messages if m["role"] == "system"), None)
        self.note(f"Loaded {len(messages)} messages from {path}\n")
