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


def _raise_interrupt(signum, frame):  # noqa: ARG001
    raise KeyboardInterrupt


class EdgeQwenGroup(click.Group):
    """A group that turns user mistakes into one-line errors instead of tracebacks."""

    def resolve_command(self, ctx: click.Context, args: list[str]):
        name, cmd, rest = super().resolve_command(ctx, args)
        import signal
        import threading

        # A closed terminal (SIGHUP) unwinds like SIGTERM, except for `serve` (uvicorn's own shutdown).
        if hasattr(signal, "SIGHUP") and name != "serve" and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGHUP, _raise_interrupt)
        return name, cmd, rest

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
    """edge-qwen: run Qwen2.5 on a laptop — convert, quantize, chat, serve, benchmark."""


# Command modules attach their commands to `main` on import.
from . import _convert, _demo, _quant, _run, _serve, _bench  # noqa: E402,F401
from . import _store  # noqa: E402,F401
from . import _docs  # noqa: E402,F401
