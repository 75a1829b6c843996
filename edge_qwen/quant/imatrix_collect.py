"""Running llama.cpp to collect importance-matrix statistics (see edge_qwen.quant.imatrix for the what).

The scheduler's eval callback (`llama_context_params.cb_eval`) is asked about every node of the
graph; `_Collector` says yes to MUL_MAT / MUL_MAT_ID nodes whose weight is a `blk.*` tensor and
reads their input with numpy once computed. `ggml_tensor` is read through a ctypes mirror of
ggml.h's struct, checked against ggml's own accessors on first use. `llama_log` routes
llama.cpp's log to Python for the duration of a call (the quantizer uses it for progress).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
from collections.abc import Callable, Iterator

from ..errors import EdgeQwenError, ModelFileError
from .imatrix import DEFAULT_CTX, Imatrix, ImatrixError, calibration_text


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


def collect(model: str | os.PathLike, calibration: str | os.PathLike | None = "default",
            n_ctx: int = DEFAULT_CTX, chunks: int | None = None, n_threads: int | None = None,
            quiet: bool = False) -> Imatrix:
    """`edge_qwen.quant.imatrix.compute_imatrix`: load the model, tokenize, decode chunk by chunk."""
    import llama_cpp

    from ..device import guard_cpu_kernels
    from ..gguf_file import check_gguf
    from ..progress import progress

    check_gguf(model)
    guard_cpu_kernels()
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
