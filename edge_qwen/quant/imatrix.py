"""Importance matrices: computed in-process by running the model over calibration text.

For every weight matrix W of the transformer blocks, llama.cpp's imatrix tool accumulates the
squares of the activations that multiply W, column by column (sum of x_j^2 over all tokens,
plus a token count); the quantizer then weights each column's rounding error by that mean.
We collect the same statistic the same way: `llama_context_params.cb_eval` lets the scheduler
ask us about every node it computes; we say yes to MUL_MAT / MUL_MAT_ID nodes whose weight
(src0) is a `blk.*` tensor, and read their input (src1) with numpy when it is computed.

Files interchange with llama.cpp: we write its GGUF imatrix format (`<name>.in_sum2` and
`<name>.counts` F32 tensors, `imatrix.datasets` / `imatrix.chunk_count` / `imatrix.chunk_size`
keys, `general.type = imatrix`), or its legacy binary `.dat` format when the output name ends in
`.dat`; `load_imatrix` reads both.
"""

from __future__ import annotations

import os
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import EdgeQwenError, ModelFileError
from ..files import atomic_output, sha256_file

DEFAULT_CTX = 512  # llama.cpp's imatrix default chunk: statistics depend on it, so keep it


class ImatrixError(EdgeQwenError):
    """A bad importance-matrix file, one made for another model, or unusable calibration text."""

    code = "invalid_imatrix"


def default_calibration_path() -> Path:
    """The calibration corpus shipped with edge-qwen (English, Chinese, code, ChatML turns)."""
    return Path(__file__).resolve().parent.parent / "data" / "calibration.txt"


def check_calibration(calibration: str | os.PathLike | None) -> Path:
    """The calibration file a `calibration` argument names, checked to be a readable file.

    None/"default" is the shipped corpus. Called before any slow work (conversion, model load).
    """
    from ..files import InputFileError, check_input_file

    if calibration is None or str(calibration) == "default":
        return default_calibration_path()
    try:
        return check_input_file(calibration, "calibration file", "give a UTF-8 text file, or 'default' for the "
                                "shipped corpus")
    except InputFileError as e:
        raise ImatrixError(e.message, param="calibration") from None


def calibration_text(calibration: str | os.PathLike | None) -> tuple[str, str]:
    """(text, label) for a calibration argument: None/"default" means the shipped corpus."""
    p = check_calibration(calibration)
    label = "default" if calibration is None or str(calibration) == "default" else p.name
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:  # it was readable a moment ago (check_calibration)
        from ..files import describe_os_error

        raise ImatrixError(describe_os_error(e, "cannot read calibration file", p)) from None
    except UnicodeDecodeError as e:
        raise ImatrixError(f"calibration file {p} is not UTF-8 text (byte {e.start}); convert it to UTF-8") from None
    if not text.strip():
        raise ImatrixError(f"calibration file {p} is empty; give some representative text")
    if "\x00" in text:  # valid UTF-8, but a binary file (a model, an archive), not text
        raise ImatrixError(f"calibration file {p} is not text (it holds NUL bytes, from byte {text.index(chr(0))}); "
                           "give a UTF-8 text file, or 'default' for the shipped corpus")
    return text, label


@dataclass
class Imatrix:
    """Per weight tensor: sums of squared inputs, shape (n_mat, n_cols), and token counts (n_mat,)."""

    sums: dict[str, Any] = field(default_factory=dict)
    counts: dict[str, Any] = field(default_factory=dict)
    datasets: list[str] = field(default_factory=list)
    chunk_count: int = 0
    chunk_size: int = DEFAULT_CTX
    path: Path | None = None

    def __len__(self) -> int:
        return len(self.sums)

    def importance(self) -> dict[str, Any]:
        """name -> flat float32 mean of x^2 per column (what llama.cpp's quantizer consumes).

        A matrix that never saw a token gets ones, as llama.cpp does for partial data.
        """
        import numpy as np

        out = {}
        for name, s in self.sums.items():
            c = np.asarray(self.counts[name], dtype=np.float64).reshape(-1, 1)
            mean = np.where(c > 0, s / np.maximum(c, 1), 1.0)
            out[name] = np.ascontiguousarray(mean, dtype=np.float32).reshape(-1)
        return out

    def digest(self) -> str:
        """sha256 over names, counts and sums: identifies an imatrix that was never saved."""
        import hashlib

        import numpy as np

        h = hashlib.sha256()
        for name in sorted(self.sums):
            h.update(name.encode() + b"\0")
            h.update(np.asarray(self.counts[name], dtype=np.float64).tobytes())
            h.update(np.asarray(self.sums[name], dtype=np.float64).tobytes())
        return h.hexdigest()

    def save(self, path: str | os.PathLike, force: bool = False) -> Path:
        """Write llama.cpp's GGUF imatrix format, or its legacy format if `path` ends in `.dat`."""
        out = Path(path)
        with atomic_output(out, force) as tmp:
            (_save_dat if out.suffix == ".dat" else _save_gguf)(self, tmp)
        self.path = out
        return out

    def check_model(self, model: str | os.PathLike) -> None:
        """Raise ImatrixError unless every entry names a weight of `model` with a matching row length."""
        from ..gguf_file import read_header

        _, tensors, _ = read_header(model)
        shapes = {name: shape for name, shape, _t, _o in tensors}
        where = f"imatrix {self.path}" if self.path else "the imatrix"
        if not self.sums:
            raise ImatrixError(f"{where} has no entries; compute it again with `edge-qwen imatrix`")
        missing = [n for n in self.sums if n not in shapes]
        if missing:
            raise ImatrixError(f"{where} was made for another model: {len(missing)} of its {len(self)} tensors "
                               f"(e.g. {missing[0]!r}) are not in {model}; compute one for this model")
        for name, s in self.sums.items():
            shape = shapes[name]
            want = shape[0] * (shape[2] if len(shape) > 2 else 1)
            if s.size != want:
                raise ImatrixError(f"{where} was made for another model: tensor {name!r} has {s.size} values "
                                   f"but {model} needs {want} (shape {list(shape)}); compute one for this model")


def _save_gguf(im: Imatrix, path: Path) -> None:
    import gguf
    import numpy as np

    w = gguf.GGUFWriter(str(path), arch="imatrix")
    w.add_type("imatrix")
    w.add_array("imatrix.datasets", list(im.datasets) or ["unknown"])
    w.add_uint32("imatrix.chunk_count", int(im.chunk_count))
    w.add_uint32("imatrix.chunk_size", int(im.chunk_size))
    for name in sorted(im.sums):
        s = np.asarray(im.sums[name], dtype=np.float32)
        w.add_tensor(f"{name}.in_sum2", s.reshape(-1, s.shape[-1]))
        w.add_tensor(f"{name}.counts", np.asarray(im.counts[name], dtype=np.float32).reshape(-1, 1))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _save_dat(im: Imatrix, path: Path) -> None:
    # Legacy layout: per entry the mean of x^2 times ncall, ncall = chunks the entry saw.
    import numpy as np

    with open(path, "wb") as f:
        f.write(struct.pack("<i", len(im.sums)))
        for name in sorted(im.sums):
            counts = np.asarray(im.counts[name], dtype=np.float64)
            ncall = max(1, int(-(-counts.max() // max(im.chunk_size, 1))))
            s = np.asarray(im.sums[name], dtype=np.float64)
            c = counts.reshape(-1, 1)
            mean = np.where(c > 0, s / np.maximum(c, 1), 1.0)
            vals = (mean * ncall).astype(np.float32).reshape(-1)
            raw = name.encode()
            f.write(struct.pack("<i", len(raw)) + raw + struct.pack("<ii", ncall, vals.size))
            f.write(vals.tobytes())
        f.write(struct.pack("<i", int(im.chunk_count)))
        ds = (im.datasets[-1] if im.datasets else "").encode()
        f.write(struct.pack("<i", len(ds)) + ds)


def load_imatrix(path: str | os.PathLike) -> Imatrix:
    """Read an imatrix file in llama.cpp's GGUF or legacy `.dat` format."""
    from ..files import InputFileError, check_input_file

    p = Path(path).expanduser()
    try:
        check_input_file(p, "imatrix file", f"make one with `edge-qwen imatrix MODEL -o {p.name}`")
    except InputFileError as e:
        raise ImatrixError(e.message, param="imatrix") from None
    with open(p, "rb") as f:
        magic = f.read(4)
    im = _load_gguf(p) if magic == b"GGUF" else _load_dat(p)
    im.path = p
    return im


def _load_gguf(p: Path) -> Imatrix:
    import numpy as np

    from ..gguf_file import open_reader

    try:
        r = open_reader(p)
    except ModelFileError as e:
        raise ImatrixError(f"imatrix {e.message}") from None
    im = Imatrix()
    f = r.fields.get("imatrix.datasets")
    if f is not None:
        im.datasets = [bytes(f.parts[i]).decode("utf-8", "replace") for i in f.data]
    for key, attr in (("imatrix.chunk_count", "chunk_count"), ("imatrix.chunk_size", "chunk_size")):
        if key in r.fields:
            setattr(im, attr, int(r.fields[key].parts[-1][0]))
    by_name = {t.name: t for t in r.tensors}
    for tname, t in by_name.items():
        if not tname.endswith(".in_sum2"):
            continue
        name = tname[: -len(".in_sum2")]
        c = by_name.get(name + ".counts")
        if c is None:
            raise ImatrixError(f"imatrix {p} is damaged: {name!r} has sums but no counts")
        counts = np.array(c.data, dtype=np.float64).reshape(-1)
        sums = np.array(t.data, dtype=np.float64).reshape(counts.size, -1)
        im.sums[name], im.counts[name] = sums, counts
    if not im.sums:
        raise ImatrixError(f"{p} is a GGUF file but holds no imatrix entries (*.in_sum2 tensors); is it a model?")
    return im


def _load_dat(p: Path) -> Imatrix:
    import numpy as np

    data = p.read_bytes()
    pos = 0

    def take(n: int) -> bytes:
        nonlocal pos
        if n < 0 or pos + n > len(data):
            raise ImatrixError(f"{p} is not an imatrix file (neither GGUF nor a complete legacy .dat imatrix)")
        pos += n
        return data[pos - n:pos]

    (n,) = struct.unpack("<i", take(4))
    if not 0 < n < 1_000_000:
        raise ImatrixError(f"{p} is not an imatrix file (neither GGUF nor legacy .dat: bad entry count {n})")
    im = Imatrix()
    for _ in range(n):
        (ln,) = struct.unpack("<i", take(4))
        name = take(ln).decode("utf-8", "replace")
        ncall, nval = struct.unpack("<ii", take(8))
        vals = np.frombuffer(take(4 * nval), dtype=np.float32).astype(np.float64)
        # Legacy files store mean*ncall; as sums/counts that is sums=vals, counts=ncall.
        im.sums[name] = vals.reshape(1, -1)
        im.counts[name] = np.array([float(max(ncall, 0))])
    if pos + 4 <= len(data):
        (im.chunk_count,) = struct.unpack("<i", take(4))
        if pos + 4 <= len(data):
            (ln,) = struct.unpack("<i", take(4))
            if 0 < ln <= len(data) - pos:
                im.datasets = [take(ln).decode("utf-8", "replace")]
    im.chunk_size = 1  # counts above are chunk counts, not tokens
    return im


def compute_imatrix(model: str | os.PathLike, calibration: str | os.PathLike | None = "default",
                    n_ctx: int = DEFAULT_CTX, chunks: int | None = None, n_threads: int | None = None,
                    quiet: bool = False) -> Imatrix:
    """Run `model` over the calibration text in chunks of `n_ctx` tokens and collect the imatrix.

    `calibration` is a UTF-8 text file or "default" (the shipped corpus); ChatML markers in it
    are parsed as special tokens. `chunks` caps the number of chunks (all that fit by default).
    The llama.cpp side (the cb_eval collector) lives in edge_qwen.quant.imatrix_collect.
    """
    from .imatrix_collect import collect

    return collect(model, calibration, n_ctx=n_ctx, chunks=chunks, n_threads=n_threads, quiet=quiet)


@dataclass
class ImatrixResult:
    """What `imatrix()` made: the file, its hash, and the statistics it holds."""

    path: Path
    sha256: str
    entries: int
    chunks: int
    tokens: int
    seconds: float
    calibration: str


def imatrix(model: str | os.PathLike, calibration: str | os.PathLike | None = "default",
            out: str | os.PathLike | None = None, chunks: int | None = None, n_ctx: int = DEFAULT_CTX,
            n_threads: int | None = None, force: bool = False, quiet: bool = False) -> ImatrixResult:
    """Compute an importance matrix for `model` and save it (GGUF format; `.dat` for legacy).

    Default output: `<model stem>.imatrix.gguf` beside the model.
    """
    from ..files import check_output

    src = Path(model)
    dest = Path(out) if out else src.with_name(f"{src.stem}.imatrix.gguf")
    if dest.exists() and src.exists() and dest.resolve() == src.resolve():
        raise ImatrixError(f"output {dest} is the model itself; choose another output name", param="out")
    check_output(dest, force)  # fail before minutes of work
    calibration_text(calibration)  # a folder, missing, unreadable, empty, binary: before the model loads
    t0 = time.perf_counter()
    im = compute_imatrix(src, calibration, n_ctx=n_ctx, chunks=chunks, n_threads=n_threads, quiet=quiet)
    im.save(dest, force=force)
    return ImatrixResult(path=dest, sha256=sha256_file(dest), entries=len(im), chunks=im.chunk_count,
                         tokens=im.chunk_count * n_ctx, seconds=time.perf_counter() - t0,
                         calibration=im.datasets[0] if im.datasets else "")
