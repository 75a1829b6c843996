"""Progress bars for long work: shown on a terminal, silent when piped or asked to be quiet."""

from __future__ import annotations

import sys
from typing import Any


def progress(total: int | float | None = None, desc: str = "", unit: str = "it", quiet: bool = False,
             **kwargs: Any):
    """A tqdm bar on stderr, disabled with `quiet` or when stderr is not a terminal."""
    from tqdm.auto import tqdm

    disable = quiet or not sys.stderr.isatty()
    return tqdm(total=total, desc=desc, unit=unit, disable=disable, file=sys.stderr,
                dynamic_ncols=True, **kwargs)
