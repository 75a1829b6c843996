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

import contextlib
import ctypes
import os
import struct
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import EdgeQwenError, ModelFileError
from .files import atomic_output, sha256_file

DEFAULT_CTX = 512  # llama.cpp's imatrix default chunk: statistics depend on it, so keep it


class ImatrixError(EdgeQwenError):
    """A bad importance-matrix file, one made for another model, or unusable calibration text."""

    code = "invalid_imatrix"


def default_calibration_path() -> Path:
    """The calibration corpus shipped with edge-qwen (English, Chinese, code, ChatML turns)."""
    return Path(__file__).parent / "data" / "calibration.txt"


def calibration_text(calibration: str | os.PathLike | None) -> tuple[str, str]:
    """(text, label) for a calibration argument: None/"default" means the shipped corpus."""
    if calibration is None or str(calibration) == "default":
        p, label = default_calibration_path(), "default"
    else:
        p = Path(calibration).expanduser()
        label = p.name
    if not p.is_file():
        raise ImatrixError(f"calibration file {p} does not exist; give a UTF-8 text file or 'default'")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ImatrixError(f"calibration file {p} is not UTF-8 text (byte {e.start}); convert it to UTF-8") from None
    if not text.strip():
        raise ImatrixError(f"calibration file {p} is empty; give some representative text")
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

    def save(self, path: str | os.PathLike, force: bool = False) -> Path:
        """Write llama.cpp's GGUF imatrix format, or its legacy format if `path` ends in `.dat`."""
        out = Path(path)
        with atomic_output(out, force) as tmp:
            (_save_dat if out.suffix == ".dat" else _save_gguf)(self, tmp)
        self.path = out
        return out

    def check_model(self, model: str | os.PathLike) -> None:
        """Raise ImatrixError unless every entry names a weight of `model` with a matching row length."""
        from .gguf_file import read_header

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
    p = Path(path).expanduser()
    if not p.is_file():
        raise ImatrixError(f"imatrix file {p} does not exist; make one with `edge-qwen imatrix MODEL -o {p.name}`")
    with open(p, "rb") as f:
        magic = f.read(4)
    im = _load_gguf(p) if magic == b"GGUF" else _load_dat(p)
    im.path = p
    return im


def _load_gguf(p: Path) -> Imatrix:
    import numpy as np

    from .gguf_file import open_reader

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


# --- running llama.cpp ---------------------------------------------------------------------

@contextlib.contextmanager
def llama_log(on_line: Callable[[int, str], None]) -> Iterator[None]:
    """Route llama.cpp's log to `on_line(level, line)` for the block, then restore the old logger.

    llama.cpp logs in pieces (a tensor line arrives in two or three calls); we join pieces until
    a newline so `on_line` sees whole lines. The logger is process-global: don't run two at once.
    """
    import llama_cpp

    prev_cb, prev_ud = llama_cpp.llama_log_callback(), ctypes.c_void_p()
    llama_cpp.llama_log_get(ctypes.byref(prev_cb), ctypes.byref(prev_ud))
    buf: list[str] = []
    level_now = [1]

    def _cb(level: int, text: bytes, _ud) -> None:
        try:
            if level != 5:  # 5 = continuation of the previous message
                level_now[0] = level
            buf.append((text or b"").decode("utf-8", "replace"))
            if buf[-1].endswith("\n"):
                for line in "".join(buf).splitlines():
                    on_line(level_now[0], line)
                buf.clear()
        except Exception:  # never let a Python error unwind into C
            pass

    cb = llama_cpp.llama_log_callback(_cb)
    llama_cpp.llama_log_set(cb, ctypes.c_void_p(0))
    try:
        yield
    finally:
        if buf:
            on_line(level_now[0], "".join(buf))
        llama_cpp.llama_log_set(prev_cb, prev_ud)


class _Tensor(ctypes.Structure):
    # struct ggml_tensor of ggml.h (GGML_MAX_DIMS 4, GGML_MAX_OP_PARAMS 64, GGML_MAX_SRC 10,
    # GGML_MAX_NAME 64); checked against ggml_get_name/ggml_nelements on first use.
    _fields_ = [("type", ctypes.c_int), ("buffer", ctypes.c_void_p), ("ne", ctypes.c_int64 * 4),
                ("nb", ctypes.c_size_t * 4), ("op", ctypes.c_int), ("op_params", ctypes.c_int32 * 16),
                ("flags", ctypes.c_int32), ("src", ctypes.c_void_p * 10), ("view_src", ctypes.c_void_p),
                ("view_offs", ctypes.c_size_t), ("data", ctypes.c_void_p), ("name", ctypes.c_char * 64),
                ("extra", ctypes.c_void_p), ("padding", ctypes.c_char * 8)]


def _ggml():
    from llama_cpp._ggml import libggml as g

    for fn, args, res in (("ggml_op_name", [ctypes.c_int], ctypes.c_char_p),
                          ("ggml_get_name", [ctypes.c_void_p], ctypes.c_char_p),
                          ("ggml_nelements", [ctypes.c_void_p], ctypes.c_int64),
                          ("ggml_nbytes", [ctypes.c_void_p], ctypes.c_size_t),
                          ("ggml_backend_buffer_is_host", [ctypes.c_void_p], ctypes.c_bool),
                          ("ggml_backend_tensor_get", [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t,
                                                       ctypes.c_size_t], None)):
        f = getattr(g, fn)
        f.argtypes, f.restype = args, res
    return g


class _Collector:
    """The cb_eval callback: accumulates sum of x^2 per input column of each blk.* weight."""

    def __init__(self, im: Imatrix):
        import numpy as np

        self.np, self.im, self.g = np, im, _ggml()
        # enum ggml_op positions in ggml.h; checked by name (reading past GGML_OP_COUNT would crash).
        self.mul_mat, self.mul_mat_id = 29, 30
        if (self.g.ggml_op_name(29), self.g.ggml_op_name(30)) != (b"MUL_MAT", b"MUL_MAT_ID"):
            raise ImatrixError("this llama.cpp build numbers its ggml ops differently than edge-qwen expects; "
                               "install llama-cpp-python==0.3.36")
        self.checked = False
        self.error: BaseException | None = None
        self.cfunc = None

    def callback(self, t_ptr: int, ask: bool, _ud) -> bool:
        try:
            t = _Tensor.from_address(t_ptr)
            if t.op != self.mul_mat and t.op != self.mul_mat_id:
                return False
            src0, src1 = _Tensor.from_address(t.src[0]), _Tensor.from_address(t.src[1])
            name = _weight_name(src0.name)
            if not name.startswith("blk."):
                return False
            if ask:
                # Like llama.cpp: skip tiny batches (<16 tokens) and non-float inputs.
                return src1.type == 0 and (t.op == self.mul_mat_id or src1.ne[1] >= 16)
            if not self.checked:
                self._check_layout(t_ptr, t)
            self._accumulate(name, t, src0, src1, t.src[1])
            return True
        except BaseException as e:  # an exception must not unwind into C: stop the graph instead
            self.error = e
            return False

    def _check_layout(self, ptr: int, t: _Tensor) -> None:
        n = t.ne[0] * t.ne[1] * t.ne[2] * t.ne[3]
        if self.g.ggml_get_name(ptr) != t.name or self.g.ggml_nelements(ptr) != n:
            raise ImatrixError("this llama.cpp build has a different ggml_tensor layout than edge-qwen expects; "
                               "install llama-cpp-python==0.3.36")
        self.checked = True

    def _array(self, t: _Tensor, ptr: int):
        np = self.np
        ne, nb = list(t.ne), list(t.nb)
        if self.g.ggml_backend_buffer_is_host(t.buffer):
            span = sum((ne[i] - 1) * nb[i] for i in range(4)) + 4
            buf = (ctypes.c_char * span).from_address(t.data)
        else:  # GPU memory: copy to the host first
            size = self.g.ggml_nbytes(ptr)
            buf = np.empty(size, dtype=np.uint8)
            self.g.ggml_backend_tensor_get(ptr, buf.ctypes.data, 0, size)
        return np.ndarray(shape=(ne[3], ne[2], ne[1], ne[0]), dtype=np.float32, buffer=buf,
                          strides=(nb[3], nb[2], nb[1], nb[0]))

    def _accumulate(self, name: str, t: _Tensor, src0: _Tensor, src1: _Tensor, src1_ptr: int) -> None:
        np = self.np
        x = self._array(src1, src1_ptr)
        ne0 = int(src1.ne[0])
        if t.op == self.mul_mat_id:
            n_mat = int(src0.ne[2])
            ids_t = _Tensor.from_address(t.src[2])
            ids = np.empty((int(ids_t.ne[1]), int(ids_t.ne[0])), dtype=np.int32)
            raw = np.ndarray(shape=ids.shape, dtype=np.int32,
                             buffer=self._ids_bytes(ids_t, t.src[2]), strides=(ids_t.nb[1], ids_t.nb[0]))
            ids[...] = raw
        else:
            n_mat = int(src0.ne[2] * src0.ne[3])
        sums = self.im.sums.get(name)
        if sums is None:
            sums = self.im.sums[name] = np.zeros((n_mat, ne0))
            self.im.counts[name] = np.zeros(n_mat)
        elif sums.shape != (n_mat, ne0):
            raise ImatrixError(f"inconsistent input size for {name}: {sums.shape} then {(n_mat, ne0)}")
        counts = self.im.counts[name]
        if t.op == self.mul_mat_id:
            # x: (1, tokens, used experts or 1, cols); ids: (tokens, used experts)
            for row in range(ids.shape[0]):
                for k in range(ids.shape[1]):
                    e = int(ids[row, k])
                    v = x[0, row, k % x.shape[2]]
                    sums[e] += v.astype(np.float64) ** 2
                    counts[e] += 1
        elif n_mat == 1:
            sums[0] += np.einsum("abij,abij->j", x, x, dtype=np.float64)
            counts[0] += x.shape[0] * x.shape[1] * x.shape[2]
        else:
            s2, s3 = int(src0.ne[2]), int(src0.ne[3])
            for i3 in range(x.shape[0]):
                for i2 in range(x.shape[1]):
                    m = (i3 % s3) * s2 + (i2 % s2)
                    sums[m] += np.einsum("ij,ij->j", x[i3, i2], x[i3, i2], dtype=np.float64)
            counts += x.shape[0] * x.shape[1] * x.shape[2] / n_mat

    def _ids_bytes(self, t: _Tensor, ptr: int):
        size = self.g.ggml_nbytes(ptr)
        buf = self.np.empty(size, dtype=self.np.uint8)
        self.g.ggml_backend_tensor_get(ptr, buf.ctypes.data, 0, size)
        return buf


def _weight_name(raw: bytes) -> str:
    # Backends copy weights under names like "CUDA0#blk.0.attn_k.weight#0".
    name = raw.decode("utf-8", "replace")
    if "#" in name:
        name = name.split("#")[1]
    return name


def compute_imatrix(model: str | os.PathLike, calibration: str | os.PathLike | None = "default",
                    n_ctx: int = DEFAULT_CTX, chunks: int | None = None, n_threads: int | None = None,
                    quiet: bool = False) -> Imatrix:
    """Run `model` over the calibration text in chunks of `n_ctx` tokens and collect the imatrix.

    `calibration` is a UTF-8 text file or "default" (the shipped corpus); ChatML markers in it
    are parsed as special tokens. `chunks` caps the number of chunks (all that fit by default).
    """
    import llama_cpp

    from .gguf_file import check_gguf
    from .progress import progress

    check_gguf(model)
    text, label = calibration_text(calibration)
    if n_ctx < 16:
        raise ImatrixError(f"context {n_ctx} is too small; use at least 16 tokens per chunk (default {DEFAULT_CTX})")
    if chunks is not None and chunks < 1:
        raise ImatrixError(f"--chunks must be at least 1, got {chunks}")
    errors: list[str] = []
    with llama_log(lambda lvl, line: errors.append(line) if lvl == 3 else None):
        mparams = llama_cpp.llama_model_default_params()
        mdl = llama_cpp.llama_model_load_from_file(str(model).encode(), mparams)
        if not mdl:
            raise ModelFileError(f"llama.cpp could not load {model}: {' '.join(errors[-2:]) or 'unknown error'}")
        try:
            return _run(llama_cpp, mdl, text, label, n_ctx, chunks, n_threads, quiet, progress)
        finally:
            llama_cpp.llama_model_free(mdl)


def _run(llama_cpp, mdl, text: str, label: str, n_ctx: int, chunks: int | None, n_threads: int | None,
         quiet: bool, progress) -> Imatrix:
    vocab = llama_cpp.llama_model_get_vocab(mdl)
    raw = text.encode("utf-8")
    buf = (llama_cpp.llama_token * (len(raw) + 16))()
    n_tok = llama_cpp.llama_tokenize(vocab, raw, len(raw), buf, len(buf), True, True)
    if n_tok < 0:
        raise ImatrixError(f"calibration text could not be tokenized ({-n_tok} tokens needed)")
    n_chunks = n_tok // n_ctx
    if n_chunks < 1:
        raise ImatrixError(f"calibration text '{label}' has {n_tok} tokens, fewer than one chunk of {n_ctx}; "
                           "give more text or a smaller --ctx")
    if chunks:
        n_chunks = min(n_chunks, chunks)
    im = Imatrix(datasets=[label], chunk_size=n_ctx)
    col = _Collector(im)
    col.cfunc = llama_cpp.ggml_backend_sched_eval_callback(col.callback)
    cparams = llama_cpp.llama_context_default_params()
    cparams.n_ctx = cparams.n_batch = cparams.n_ubatch = n_ctx
    threads = n_threads or os.cpu_count() or 1
    cparams.n_threads = cparams.n_threads_batch = threads
    cparams.cb_eval = col.cfunc
    cparams.no_perf = True
    ctx = llama_cpp.llama_init_from_model(mdl, cparams)
    if not ctx:
        raise ImatrixError(f"llama.cpp could not create a context of {n_ctx} tokens for this model")
    batch = llama_cpp.llama_batch_init(n_ctx, 0, 1)
    add_bos = llama_cpp.llama_vocab_get_add_bos(vocab)
    bos = llama_cpp.llama_vocab_bos(vocab)
    try:
        with progress(n_chunks, "imatrix", "chunk", quiet) as bar:
            for c in range(n_chunks):
                llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(ctx), True)
                batch.n_tokens = n_ctx
                for i in range(n_ctx):
                    batch.token[i] = bos if (i == 0 and add_bos) else buf[c * n_ctx + i]
                    batch.pos[i] = i
                    batch.n_seq_id[i] = 1
                    batch.seq_id[i][0] = 0
                    batch.logits[i] = True  # as llama.cpp does: else the last layer runs on 1 row
                rc = llama_cpp.llama_decode(ctx, batch)
                if col.error is not None:
                    if isinstance(col.error, EdgeQwenError):
                        raise col.error
                    raise RuntimeError(f"imatrix collection failed: {col.error!r}") from col.error
                if rc != 0:
                    raise ImatrixError(f"llama.cpp failed to evaluate calibration chunk {c + 1} (code {rc})")
                im.chunk_count = c + 1
                bar.update(1)
    finally:
        llama_cpp.llama_batch_free(batch)
        llama_cpp.llama_free(ctx)
    if not im.sums:
        raise ImatrixError("no weight matrix was seen while running the model; is it a supported model?")
    return im


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
    from .files import check_output

    src = Path(model)
    dest = Path(out) if out else src.with_name(f"{src.stem}.imatrix.gguf")
    check_output(dest, force)  # fail before minutes of work
    t0 = time.perf_counter()
    im = compute_imatrix(src, calibration, n_ctx=n_ctx, chunks=chunks, n_threads=n_threads, quiet=quiet)
    im.save(dest, force=force)
    return ImatrixResult(path=dest, sha256=sha256_file(dest), entries=len(im), chunks=im.chunk_count,
                         tokens=im.chunk_count * n_ctx, seconds=time.perf_counter() - t0,
                         calibration=im.datasets[0] if im.datasets else "")
