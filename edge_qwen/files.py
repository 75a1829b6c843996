"""Safe output files: written under a temporary name, renamed into place when complete.

An interrupted run (Ctrl-C, kill, full disk) never leaves a broken file under the final
name, and an existing file is never replaced unless `force` is given.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

from .errors import OutputExistsError


def check_output(path: str | os.PathLike, force: bool = False) -> Path:
    """Refuse an existing output unless `force`; make its parent folder."""
    out = Path(path)
    if out.exists() and not force:
        raise OutputExistsError(
            f"{out} already exists; pass --force (force=True) to overwrite it or choose another output name"
        )
    if out.exists() and out.is_dir():
        raise OutputExistsError(f"{out} is a folder; give a file name for the output")
    out.parent.mkdir(parents=True, exist_ok=True)
    return out


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike, force: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it to `path` only if the block succeeds."""
    out = check_output(path, force)
    tmp = out.with_name(f".{out.name}.partial-{os.getpid()}")
    try:
        yield tmp
        if not tmp.exists():
            raise RuntimeError(f"internal error: nothing was written to {tmp}")
        if out.exists() and not force:  # appeared while we worked
            raise OutputExistsError(f"{out} appeared while writing; pass --force to overwrite it")
        os.replace(tmp, out)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    """The hex sha256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
