"""Safe output files: written under a temporary name, renamed into place when complete.

An interrupted run (Ctrl-C, kill, full disk) never leaves a broken file under the final
name, and an existing file is never replaced unless `force` is given. What can go wrong on
the way is reported as one `OutputWriteError` naming the path and the problem (full disk,
read-only folder, permission, file-size limit), checked before the slow work where it can
be: the folder is probed for writing and the free space compared with the expected size.

Temporary names are `.NAME.partial-PID`. A run killed with SIGKILL (or a power cut) cannot
remove its own; the next output written into the same folder removes those of processes
that are gone (`remove_stale_partials`), never those of a live process.

A folder output that replaces an existing folder (`--force`) moves the old one aside as
`.NAME.replaced-PID`, renames the new one in, and only then deletes the old one
(`replace_into_place`); a failure in between puts the old one back, and a run killed in between
leaves the old one aside, where the next run in that folder restores it if nothing took its place.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

from .errors import DiskSpaceError, EdgeQwenError, OutputExistsError, OutputWriteError

log = logging.getLogger("edge_qwen.files")

# SQLite keeps `-journal`/`-wal`/`-shm` files beside a database written under a partial name.
_PARTIAL = re.compile(r"^\.(?P<name>.+)\.partial-(?P<pid>\d+)(?:-journal|-wal|-shm)?$")
_REPLACED = re.compile(r"^\.(?P<name>.+)\.replaced-(?P<pid>\d+)$")
# Room left beyond an estimated output size: metadata, padding, the file system's own blocks.
SPACE_MARGIN = 64 << 10

# errno -> (what happened, what to do). Everything else gets the system's own wording.
_OS_PROBLEMS: dict[int, tuple[str, str]] = {
    errno.ENOSPC: ("no space left on the device", "free some space or write to another disk"),
    errno.EDQUOT: ("the disk quota is exceeded", "free some space or write to another disk"),
    errno.EFBIG: ("the file is larger than the file-size limit (`ulimit -f`) or the file system allows",
                  "raise the limit or write to another file system"),
    errno.EROFS: ("the file system is read-only", "write to another folder"),
    errno.EACCES: ("permission denied", "fix its permissions, or use a path you may read and write"),
    errno.EPERM: ("operation not permitted", "fix its permissions, or use a path you may read and write"),
    errno.ENOENT: ("no such file or folder", "check the path"),
    errno.ENOTDIR: ("a part of the path is a file, not a folder", "check the path"),
    errno.EISDIR: ("it is a folder", "give a file name"),
    errno.ENAMETOOLONG: ("the name is too long", "choose a shorter path"),
    errno.EIO: ("input/output error (a failing or removed disk?)", "check the disk and run again"),
    errno.EMFILE: ("too many open files", "raise the open-file limit (`ulimit -n`)"),
}


def os_problem(e: OSError) -> tuple[str, str]:
    """(what happened, what to do) for an OSError, in words a user can act on."""
    if e.errno in _OS_PROBLEMS:
        what, todo = _OS_PROBLEMS[e.errno]
        name = errno.errorcode.get(e.errno, str(e.errno))
        return f"{what} ({name})", todo
    return (e.strerror or str(e) or type(e).__name__), "check the path and run again"


def describe_os_error(e: OSError, action: str = "", path: str | os.PathLike | None = None) -> str:
    """One line for an OSError: the path (the error's own, else `path`), the problem, what to do.

    `action` ("cannot write", "cannot read") leads the line when given.
    """
    what, todo = os_problem(e)
    where = e.filename if e.filename not in (None, "") else path
    where = os.fsdecode(where) if where is not None and not isinstance(where, int) else None
    lead = f"{action} {where}" if action and where else (where or action or "")
    if e.filename2:
        lead += f" -> {os.fsdecode(e.filename2)}"
    return f"{lead}: {what}; {todo}" if lead else f"{what}; {todo}"


def write_error(e: OSError, out: str | os.PathLike, tmp: str | os.PathLike | None = None) -> OutputWriteError:
    """An OutputWriteError for an OSError met while writing `out` (under the temporary name `tmp`)."""
    out = Path(out)
    if e.errno is None:  # e.g. numpy's "32768 requested and 22896 written": the cause is not given
        return output_failure(tmp if tmp is not None else out, str(e))
    own = {os.fsdecode(p) for p in (out, tmp) if p is not None}
    err_path = None if e.filename in (None, "") or isinstance(e.filename, int) else os.fsdecode(e.filename)
    what, todo = os_problem(e)
    if err_path is not None and err_path not in own and Path(err_path) != out.parent:
        # the failing path is not the output (a source file, a sibling): name both
        return OutputWriteError(f"cannot write {out}: {err_path}: {what}; {todo}")
    cls = DiskSpaceError if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG) else OutputWriteError
    return cls(f"cannot write {out}: {what}; {todo}")


def _format_bytes(n: float) -> str:
    for unit in ("bytes", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def _existing_folder(path: Path) -> Path:
    p = path
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def _free_bytes(folder: Path) -> int | None:
    try:
        return shutil.disk_usage(_existing_folder(folder)).free
    except OSError:
        return None


def output_failure(path: str | os.PathLike, detail: str) -> OutputWriteError:
    """An OutputWriteError for a write that failed without an errno (a C++ library, numpy).

    `path` is the output or its `.NAME.partial-PID` file (the error names the final name). The
    likely causes are checked in turn: the disk that holds it is full, the file reached the
    process's file-size limit (`ulimit -f`); otherwise `detail` is all that is known.
    """
    written = Path(path)
    m = _PARTIAL.match(written.name)
    out = written.with_name(m.group("name")) if m else written
    free = _free_bytes(out.parent)
    if free is not None and free < SPACE_MARGIN:
        return DiskSpaceError(f"cannot write {out}: no space left on the device ({_format_bytes(free)} free); "
                              "free some space or choose another output location")
    try:
        import resource

        limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
        unlimited = limit == resource.RLIM_INFINITY
    except (ImportError, OSError, ValueError):
        unlimited = True
    if not unlimited:
        size = max((p.stat().st_size for p in (written, out) if p.is_file()), default=0)
        if size + (1 << 16) >= limit:
            return DiskSpaceError(f"cannot write {out}: the file reached the file-size limit of "
                                  f"{_format_bytes(limit)} (`ulimit -f`); raise the limit or choose another "
                                  "output location")
    return OutputWriteError(f"cannot write {out}: {detail}; check that the disk has room and the folder is "
                            "writable, and run again")


def check_free_space(path: str | os.PathLike, need: int, margin: int = SPACE_MARGIN,
                     advice: str = "free some space or choose another output location") -> None:
    """Raise DiskSpaceError when the file system that will hold `path` has less than `need` bytes free.

    Called before slow work whose output size is known (or closely estimated) in advance.
    """
    out = Path(path)
    folder = _existing_folder(out.parent)
    free = _free_bytes(folder)
    if free is None:
        return  # cannot tell (odd mounts): the write itself reports a full disk clearly
    if need + margin > free:
        raise DiskSpaceError(
            f"cannot write {out}: it needs about {_format_bytes(need)} but {folder} has only "
            f"{_format_bytes(free)} free; {advice}")


def partial_path(out: str | os.PathLike) -> Path:
    """The temporary name an output is written under while incomplete: `.NAME.partial-PID`."""
    out = Path(out)
    return out.with_name(f".{out.name}.partial-{os.getpid()}")


def _writer_alive(pid: int, since: float) -> bool:
    """Whether process `pid` may still be writing a partial file last changed at time `since`."""
    if pid == os.getpid():
        return True
    import psutil

    try:
        started = psutil.Process(pid).create_time()
    except psutil.NoSuchProcess:
        return False
    except (psutil.Error, OSError):
        return True  # exists but unreadable: keep its files
    # A process that started after the file was last written is a later one that reuses the pid.
    return started <= since + 2.0


def remove_stale_partials(folder: str | os.PathLike) -> list[Path]:
    """Remove `.NAME.partial-PID` files and folders in `folder` whose process is gone.

    A run killed with SIGKILL cannot clean up after itself; this is how its (possibly
    hundreds of MB) leftovers go. Partial files of live processes are never touched. An old
    output a dead run had moved aside (`.NAME.replaced-PID`, see `replace_into_place`) is put
    back under NAME when nothing took its place, else removed. Returns what was removed.
    Best effort: a folder that cannot be listed or cleaned is left alone.
    """
    removed: list[Path] = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        m = _PARTIAL.match(entry.name) or _REPLACED.match(entry.name)
        if not m:
            continue
        try:
            since = entry.stat(follow_symlinks=False).st_mtime
            if _writer_alive(int(m.group("pid")), since):
                continue
            if m.re is _REPLACED:
                final = Path(folder) / m.group("name")
                if not os.path.lexists(final):
                    os.rename(entry.path, final)
                    log.warning("restored %s, which a run that no longer exists had moved aside", final)
                    continue
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path)
            else:
                os.unlink(entry.path)
        except OSError:
            continue
        removed.append(Path(entry.path))
        log.info("removed %s, left by a run that no longer exists", entry.path)
    return removed


def replace_into_place(tmp: str | os.PathLike, out: str | os.PathLike) -> None:
    """Move the finished `tmp` (a file or a folder) to `out`, replacing what is there.

    A file replaces a file atomically (`os.replace`). A folder cannot replace a non-empty
    folder that way, so the old one is renamed aside (`.NAME.replaced-PID`), the new one renamed
    in, and the old one deleted last: at no moment is neither on disk. If the rename in fails
    (or the run is interrupted there), the old one is put back; a run killed with SIGKILL
    between the two renames leaves the old one aside, and the next `remove_stale_partials` in
    that folder restores it. OSError propagates (callers turn it into OutputWriteError).
    """
    tmp, out = Path(tmp), Path(out)
    aside = None
    if out.is_dir() and not out.is_symlink() and tmp.is_dir():
        aside = out.with_name(f".{out.name}.replaced-{os.getpid()}")
        remove_quietly(aside)  # ours from an earlier call in this process
        os.rename(out, aside)
    try:
        os.replace(tmp, out)
    except BaseException:
        if aside is not None and not os.path.lexists(out):
            with contextlib.suppress(OSError):
                os.rename(aside, out)
        raise
    if aside is not None:
        remove_quietly(aside)


def check_output(path: str | os.PathLike, force: bool = False) -> Path:
    """Refuse an existing output unless `force`; make its parent folder and check it is writable.

    Also removes stale partial files of dead runs from that folder. Raises OutputExistsError,
    or OutputWriteError naming the folder and the problem (read-only, permission, full).
    """
    out = Path(path)
    if out.is_dir():  # --force would not help: a file never replaces a folder
        raise OutputExistsError(f"{out} is a folder; give a file name for the output")
    if out.exists() and not force:
        raise OutputExistsError(
            f"{out} already exists; pass --force (force=True) to overwrite it or choose another output name"
        )
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise write_error(e, out) from None
    remove_stale_partials(out.parent)
    probe = partial_path(out)
    try:  # a read-only or full folder fails here, before any slow work
        with open(probe, "xb"):
            pass
    except FileExistsError:
        pass  # ours from an earlier call in this process; it is overwritten
    except OSError as e:
        raise write_error(e, out, probe) from None
    else:
        with contextlib.suppress(OSError):
            probe.unlink()
    return out


def _fsync(path: Path) -> None:
    # The data must be on disk before the rename makes it look complete (power cut, kernel panic).
    if path.is_file():
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike, force: bool = False, expected_size: int | None = None) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it to `path` only if the block succeeds.

    `expected_size` (bytes), when known, is checked against the free space first. An OSError
    in the block or the rename (full disk, read-only folder, ...) becomes one OutputWriteError
    naming the path and the problem; the temporary file is removed whatever happens.
    """
    out = check_output(path, force)
    if expected_size:
        check_free_space(out, expected_size)
    tmp = partial_path(out)
    try:
        try:
            yield tmp
            if not tmp.exists():
                raise RuntimeError(f"internal error: nothing was written to {tmp}")
            if out.exists() and not force:  # appeared while we worked
                raise OutputExistsError(f"{out} appeared while writing; pass --force to overwrite it")
            _fsync(tmp)
            replace_into_place(tmp, out)
        except OSError as e:
            raise write_error(e, out, tmp) from None
    finally:
        remove_quietly(tmp)


def remove_quietly(path: str | os.PathLike) -> None:
    """Remove a file or folder if it exists; never raise (cleanup must not hide the real error)."""
    p = Path(path)
    with contextlib.suppress(OSError):
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()


def missing_path_note(path: str | os.PathLike) -> str:
    """Which part of a path the user typed is missing, and close names: for "does not exist (...)".

    E.g. "/abs/ckpt has no 'nope'; did you mean 'nope1'?" or "/abs/ckpt does not exist".
    """
    import difflib

    p = Path(path).expanduser()
    full = p if p.is_absolute() else Path.cwd() / p
    parent = full.parent
    if not parent.is_dir():
        top = _existing_folder(parent)
        missing = top / full.relative_to(top).parts[0] if top in full.parents else parent
        return f"{missing} does not exist"
    try:
        names = sorted(os.listdir(parent))
    except OSError:
        names = []
    close = difflib.get_close_matches(p.name, names, n=3, cutoff=0.6)
    hint = f"; did you mean {', '.join(repr(n) for n in close)}?" if close else ""
    return f"{parent} has no {p.name!r}{hint}"


class InputFileError(EdgeQwenError):
    """An input file the user named is missing, a folder, or unreadable."""

    code = "invalid_input_file"


def check_input_file(path: str | os.PathLike, what: str = "file", todo: str = "check the path") -> Path:
    """`path` as an existing, readable file, or one InputFileError naming it and what is wrong.

    `what` names the file in the message ("calibration file", "imatrix file"); `todo` says
    what to give instead. Called before slow work, so a mistyped option fails at once.
    """
    p = Path(path).expanduser()
    if p.is_dir():
        raise InputFileError(f"{what} {p} is a folder, not a file; {todo}")
    if not p.exists():
        raise InputFileError(f"{what} {p} does not exist ({missing_path_note(p)}); {todo}")
    if not p.is_file():  # a pipe or a device: reading it would block, or consume what a later read needs
        raise InputFileError(f"{what} {p} is not a regular file (a pipe or a device); save it to a file first")
    try:
        with open(p, "rb") as f:
            f.read(1)
    except OSError as e:
        problem, _ = os_problem(e)
        hint = ("fix its permissions or run as a user who may read it" if e.errno in (errno.EACCES, errno.EPERM)
                else todo)
        raise InputFileError(f"cannot read {what} {p}: {problem}; {hint}") from None
    return p


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    """The hex sha256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


__all__ = ["InputFileError", "atomic_output", "check_input_file", "check_output", "check_free_space",
           "describe_os_error", "missing_path_note", "partial_path", "remove_quietly", "remove_stale_partials",
           "replace_into_place", "sha256_file", "write_error"]
