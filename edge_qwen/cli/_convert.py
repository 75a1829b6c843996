"""CLI commands (filled in by their issue)."""

from __future__ import annotations

import click  # noqa: F401

from . import main  # noqa: F401
