"""The `edge-qwen` command: one click group, each command a thin shell over a library function.

Command modules register themselves on `main`; they import heavy libraries only inside the
command body so `edge-qwen -h` stays instant.
"""

from __future__ import annotations

import sys

import click

from .. import __version__
from ..errors import EdgeQwenError

CONTEXT_SETTINGS = {"help_option_names": ["-h", "--help"], "max_content_width": 100}

# How `edge-qwen --help` groups the commands; a command not listed here shows under "Other".
SECTIONS: list[tuple[str, tuple[str, ...]]] = [
    ("Models", ("list", "show", "pull", "models", "cp", "rm", "convert", "inspect", "rebuild")),
    ("Run", ("run", "chat", "doctor", "demo")),
    ("Serve", ("serve", "ps", "stop")),
    ("Quantize", ("quantize", "imatrix")),
    ("Documents", ("ask", "summarize", "index")),
    ("Bench", ("bench", "recommend")),
]
ENVIRONMENT = [
    ("EDGE_QWEN_HOME", "the model store (default: ~/.cache/edge-qwen)"),
    ("EDGE_QWEN_MODEL", "the model used when a command names none (default: the default model)"),
    ("EDGE_QWEN_API_KEY", "serve's --api-key, and the key ps/stop send"),
    ("EDGE_QWEN_CPU_AMX", "1: keep llama.cpp's AMX kernels (off by default: they crash, llama.cpp#20824)"),
    ("HF_TOKEN", "Hugging Face token for pull (private or gated repos)"),
    ("HF_ENDPOINT", "Hugging Face Hub address for pull (a mirror)"),
    ("HF_HUB_OFFLINE", "1: pull uses only what the store has"),
]


def _raise_interrupt(signum, frame):  # noqa: ARG001
    raise KeyboardInterrupt


class SuggestingGroup(click.Group):
    """A group whose unknown command is a usage error (exit 2) naming the nearest command."""

    def resolve_command(self, ctx: click.Context, args: list[str]):
        if args and not args[0].startswith("-") and self.get_command(ctx, args[0]) is None:
            import difflib

            near = difflib.get_close_matches(args[0], self.list_commands(ctx), n=1, cutoff=0.5)
            hint = f" Did you mean '{near[0]}'?" if near else ""
            ctx.fail(f"No such command '{args[0]}'.{hint} `{ctx.command_path} --help` lists the commands.")
        return super().resolve_command(ctx, args)


class EdgeQwenGroup(SuggestingGroup):
    """A group that turns user mistakes into one-line errors instead of tracebacks."""

    def resolve_command(self, ctx: click.Context, args: list[str]):
        name, cmd, rest = super().resolve_command(ctx, args)
        import signal
        import threading

        # A closed terminal (SIGHUP) unwinds like SIGTERM, except for `serve` (uvicorn's own shutdown).
        if hasattr(signal, "SIGHUP") and name != "serve" and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGHUP, _raise_interrupt)
        return name, cmd, rest

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        """The commands by section, each with its whole first sentence; aliases (ls) beside their command."""
        names: dict[int, list[str]] = {}
        commands: dict[int, click.Command] = {}
        for name in self.list_commands(ctx):
            cmd = self.get_command(ctx, name)
            if cmd is not None and not cmd.hidden:
                names.setdefault(id(cmd), []).append(name)
                commands[id(cmd)] = cmd
        placed: set[int] = set()
        sections = [*SECTIONS, ("Other", tuple(n for ns in names.values() for n in ns))]
        for title, members in sections:
            rows = []
            for member in members:
                cmd = self.get_command(ctx, member)
                if cmd is None or id(cmd) not in commands or id(cmd) in placed:
                    continue
                placed.add(id(cmd))
                rows.append((", ".join(sorted(names[id(cmd)], key=lambda n: (n != cmd.name, n))),
                             cmd.get_short_help_str(limit=200)))
            if rows:
                with formatter.section(title):
                    formatter.write_dl(rows)
        with formatter.section("Environment"):
            formatter.write_dl(ENVIRONMENT)

    def invoke(self, ctx: click.Context):
        # SIGTERM unwinds like Ctrl-C, so `atomic_output` removes its temporary files.
        import signal
        import threading

        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, _raise_interrupt)
        try:
            return super().invoke(ctx)
        except EdgeQwenError as e:
            raise click.ClickException(e.message) from None
        except OSError as e:
            # A file system problem no library call turned into its own error (a full disk, a
            # read-only or unreadable folder): one line naming the path and the problem.
            from ..files import describe_os_error

            raise click.ClickException(describe_os_error(e)) from None
        except KeyboardInterrupt:
            click.echo("\nInterrupted.", err=True)
            sys.exit(130)


@click.group(cls=EdgeQwenGroup, context_settings=CONTEXT_SETTINGS)
@click.version_option(__version__, "--version", prog_name="edge-qwen")
def main() -> None:
    """edge-qwen: run Qwen on a laptop — pull, convert, quantize, chat, serve, benchmark.

    Ollama's verbs (run, list, ps, rm, show, cp, stop) and llama.cpp's common flags (-m, -c, -n, -t,
    -ngl, --temp, -p) work as typed. Every MODEL is a GGUF path, a store name, a pulled repo id, or
    `default`.
    """


# Command modules attach their commands to `main` on import.
from . import _convert, _demo, _quant, _run, _serve, _bench  # noqa: E402,F401
from . import _store  # noqa: E402,F401
from . import _docs  # noqa: E402,F401
