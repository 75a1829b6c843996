"""Quantizing GGUF models with llama.cpp's own quantizer, plus recipe controls and provenance.

`quantize()` checks everything it can before llama.cpp sees the file (the input with
`check_gguf`, the type names, the importance matrix against the model's tensors, the outputs),
then calls `llama_cpp.llama_model_quantize` once per type, multi-threaded, writing under a
temporary name that is renamed only on success. llama.cpp's per-tensor log lines drive the
progress bar and, for `dry_run`, give the type each tensor would get, from which we compute the
exact size. Provenance (source hash, type, imatrix hash, calibration) is written into the output's
`general.quantize.*` keys through the quantizer's KV overrides.
"""

from __future__ import annotations

import ctypes
import os
import re
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import __version__
from ..errors import EdgeQwenError, ModelFileError
from ..files import check_output, sha256_file
from .imatrix import Imatrix, ImatrixError, compute_imatrix, load_imatrix
from .imatrix_collect import llama_log
from .provenance import (HASH_PLACEHOLDER, cached_sha256, hash_in_background, kv_bytes, kv_overrides,
                               patch_string, source_sha256)
from .types import QuantType, QuantTypeError, quant_types, tensor_type

FLOAT_TYPES = {"F32", "F16", "BF16"}
_ALIGN = 32  # GGUF_DEFAULT_ALIGNMENT: every tensor's data is padded to it
_TENSOR_LINE = re.compile(r"^\[\s*(\d+)/\s*(\d+)\]\s+(\S+)\s+- \[[^\]]*\], type =\s*(\w+),\s*(.*)$")
_STRIP_SUFFIXES = ("-f16", "-bf16", "-f32", "-fp16", "-fp32", "_f16", "_bf16", "_f32", ".f16", ".bf16", ".f32")

class QuantizeError(EdgeQwenError):
    """llama.cpp refused or failed to quantize (the message carries llama.cpp's reason)."""

    code = "quantize_failed"


@dataclass
class QuantizedFile:
    """One output of `quantize()` (for a dry run: what it would be)."""

    qtype: str
    path: Path | None
    size: int
    n_params: int
    tensor_types: dict[str, int]
    fallbacks: int
    seconds: float
    dry_run: bool = False
    needs_imatrix: bool = False

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.size / max(self.n_params, 1)


@dataclass
class QuantizeResult:
    """All outputs of one `quantize()` call, with the provenance written into them."""

    source: Path
    files: list[QuantizedFile] = field(default_factory=list)
    source_sha256: str | None = None
    imatrix: Path | None = None
    imatrix_sha256: str | None = None
    calibration: str | None = None

    @property
    def path(self) -> Path | None:
        """The output path when one type was asked for."""
        return self.files[0].path if self.files else None

    def __iter__(self):
        return iter(self.files)


def default_output_name(src: str | os.PathLike, qtype: str | QuantType) -> str:
    """`<src stem without -f16/-bf16/-f32 or an old type suffix>-<type in lower case>.gguf`."""
    from .types import ALIASES, QUANT_TYPES

    q = quant_types(qtype)[0]
    stem = Path(src).name
    if stem.lower().endswith(".gguf"):
        stem = stem[:-5]
    low = stem.lower()
    for suffix in _STRIP_SUFFIXES + tuple(f"-{n.lower()}" for n in list(QUANT_TYPES) + list(ALIASES)):
        if low.endswith(suffix) and len(stem) > len(suffix):
            stem = stem[: -len(suffix)]
            break
    return f"{stem}-{q.name.lower()}.gguf"


def parse_overrides(overrides: Any) -> list[tuple[str, int]]:
    """Per-tensor type overrides as [(regex, ggml type)]: from {"attn_v": "Q8_0"} or ["attn_v=Q8_0"]."""
    if not overrides:
        return []
    items = overrides.items() if isinstance(overrides, dict) else []
    if not isinstance(overrides, dict):
        pairs = []
        for o in ([overrides] if isinstance(overrides, str) else overrides):
            if "=" not in str(o):
                raise QuantTypeError(f"override {o!r} is not PATTERN=TYPE (e.g. 'attn_v=Q8_0' or 'blk\\.0\\..*=Q6_K')",
                                     param="override")
            pat, _, typ = str(o).rpartition("=")
            pairs.append((pat, typ))
        items = pairs
    out = []
    for pat, typ in items:
        if not pat:
            raise QuantTypeError(f"override {pat}={typ} has an empty tensor-name pattern", param="override")
        try:
            re.compile(pat)
        except re.error as e:
            raise QuantTypeError(f"override pattern {pat!r} is not a valid regular expression ({e})",
                                 param="override") from None
        out.append((pat, tensor_type(typ).ggml_type))
    return out


def _check_source(src: Path, allow_requantize: bool):
    from ..gguf_file import check_gguf

    info = check_gguf(src)
    quantized = {t: n for t, n in info.tensor_types.items() if t not in FLOAT_TYPES}
    if quantized and not allow_requantize:
        kinds = ", ".join(f"{t} x{n}" for t, n in sorted(quantized.items()))
        raise ModelFileError(
            f"{src} is already quantized ({kinds}); quantizing again loses quality. Quantize from an "
            "f16/bf16/f32 GGUF (`edge-qwen convert`), or pass --allow-requantize (allow_requantize=True)")
    return info


def _outputs(src: Path, out: Any, types: list[QuantType]) -> list[Path]:
    if out is None:
        return [src.with_name(default_output_name(src, q)) for q in types]
    o = Path(out).expanduser()
    if o.is_dir() or str(out).endswith(os.sep) or (len(types) > 1 and "{type}" not in str(out)):
        if o.suffix.lower() == ".gguf":
            raise QuantTypeError(f"{len(types)} types need one output each: give a folder for -o, or a name "
                                 "with {type} in it (e.g. model-{type}.gguf)", param="out")
        return [o / default_output_name(src, q) for q in types]
    return [Path(str(o).replace("{type}", q.name.lower())) for q in types]


def _imatrix_array(llama_cpp, im: Imatrix):
    values = im.importance()
    arr = (llama_cpp.llama_model_imatrix_data * (len(values) + 1))()
    keep = []
    for i, (name, v) in enumerate(sorted(values.items())):
        b = name.encode()
        keep += [b, v]
        arr[i].name = b
        arr[i].data = v.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        arr[i].size = v.size
    return arr, keep


def _size_from_types(tensors, data_start: int, targets: dict[str, str]) -> int:
    from .types import TENSOR_TYPES_BY_ID, TENSOR_TYPES

    total = data_start
    for name, shape, ttype, _off in tensors:
        t = TENSOR_TYPES.get(targets.get(name, "")) or TENSOR_TYPES_BY_ID[ttype]
        rows = 1
        for d in shape[1:]:
            rows *= d
        n = rows * t.row_bytes(shape[0])
        total += n + (-n % _ALIGN)
    return total


def _run_one(llama_cpp, src: Path, dest: Path, q: QuantType, params, n_tensors: int, quiet: bool):
    from ..progress import progress

    targets: dict[str, str] = {}
    state: dict[str, Any] = {"fallbacks": 0, "errors": [], "last": None}

    with progress(n_tensors, f"quantize {q.name}", "tensor", quiet) as bar:
        def on_line(level: int, line: str) -> None:
            m = _TENSOR_LINE.match(line)
            # "converting to" may come on a later line when llama.cpp interjects a message
            # (e.g. "did not find weights for token_embd.weight") in the middle of a tensor's line.
            conv = re.search(r"converting to (\w+)", line) or re.search(r"MiB \((\w+)\)\s*$", line)
            if "failed to quantize" in line:  # may end a tensor's line, so test it first
                state["errors"].append(line.strip())
            if m:
                state["last"] = m.group(3)
                targets[m.group(3)] = (conv.group(1) if conv else m.group(4)).upper()
                bar.update(1)
            elif conv and state.get("last"):
                targets[state["last"]] = conv.group(1).upper()
            elif "falling back to" in line:
                state["fallbacks"] += 1
            elif level == 3 and "failed to quantize" not in line:
                state["errors"].append(line.strip())

        with llama_log(on_line):
            rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dest).encode(), ctypes.byref(params))
    if rc != 0:
        reason = next((e.split("failed to quantize:", 1)[1].strip() for e in reversed(state["errors"])
                       if "failed to quantize:" in e), "; ".join(e for e in state["errors"] if e.strip()) or "unknown")
        if "iostream" in reason or "write" in reason.lower():  # llama.cpp's C++ streams hide the errno
            from ..files import output_failure

            raise output_failure(dest, f"llama.cpp could not write it ({reason})")
        if "imatrix" in reason or "importance matrix" in reason:
            raise ImatrixError(f"llama.cpp needs an importance matrix for {q.name} on {src}: {reason}; "
                               "pass --imatrix FILE or --calibration default")
        if "has invalid data" in reason:  # ggml_validate_row_data: NaN or infinite values in the source
            reason += (" (NaN or infinite values: the source file is damaged; convert it again from its "
                       "checkpoint, which `edge-qwen convert` checks tensor by tensor)")
        raise QuantizeError(f"llama.cpp could not quantize {src} to {q.name}: {reason}")
    return targets, state["fallbacks"]


def _check_space(dests: list[Path], types: list[QuantType], n_params: int) -> None:
    """Refuse before llama.cpp starts when the outputs surely cannot fit their disk.

    The estimate is the nominal bits per weight (a lower bound: llama.cpp falls back to larger
    types for some tensors), so a refusal here is certain; a disk that fills up during the
    run is still one clear error.
    """
    from ..files import check_free_space

    by_folder: dict[Path, list[tuple[Path, int]]] = {}
    for d, q in zip(dests, types):
        by_folder.setdefault(d.parent.resolve(), []).append((d, int(n_params * q.bits_per_weight / 8)))
    for items in by_folder.values():
        check_free_space(items[0][0], sum(n for _d, n in items))


def _check_imatrix_args(imatrix: Any, calibration: Any) -> None:
    """--imatrix / --calibration checked before any slow work (conversion, hashing, model loads)."""
    from .imatrix import calibration_text
    from ..files import InputFileError, check_input_file

    if imatrix is not None and calibration is not None:
        raise ImatrixError("give either an imatrix (--imatrix) or calibration text to compute one "
                           "(--calibration), not both")
    if calibration is not None:
        calibration_text(calibration)  # read and checked whole (small): empty, not UTF-8, binary
    if imatrix is not None and not isinstance(imatrix, Imatrix):
        try:
            check_input_file(imatrix, "imatrix file", "make one with `edge-qwen imatrix MODEL`")
        except InputFileError as e:
            raise ImatrixError(e.message, param="imatrix") from None


def quantize(src: str | os.PathLike, out: str | os.PathLike | None = None, qtype: Any = "Q4_K_M",
             imatrix: str | os.PathLike | Imatrix | None = None, calibration: str | os.PathLike | None = None,
             embedding_type: str | None = None, output_type: str | None = None, pure: bool = False,
             overrides: Any = None, dry_run: bool = False, allow_requantize: bool = False,
             n_threads: int | None = None, force: bool = False, quiet: bool = False,
             chunks: int | None = None, source_name: str | os.PathLike | None = None) -> QuantizeResult:
    """Quantize the GGUF `src` to one or several types ("Q4_K_M" or "Q8_0,Q4_K_M" or a list).

    `out`: the output file for one type, or a folder (or a name with `{type}`) for several;
    default `<src stem>-<type>.gguf` beside `src`. `imatrix`: an imatrix file (GGUF or legacy
    .dat) or an `Imatrix`; `calibration`: a text file or "default" to compute one first (saved as
    `<stem>.imatrix.gguf` beside the outputs). `overrides`: {regex: tensor type} or
    ["regex=TYPE", ...]. `dry_run` writes nothing and reports the exact resulting sizes.
    `source_name` (a path beside `src`) is what default output names and the provenance's
    source_file are taken from instead of `src` (for a temporary intermediate).
    """
    import llama_cpp

    types = quant_types(qtype)
    _check_imatrix_args(imatrix, calibration)
    embd = tensor_type(embedding_type) if embedding_type else None
    outp = tensor_type(output_type) if output_type else None
    tt = parse_overrides(overrides)
    src = Path(src).expanduser()
    info = _check_source(src, allow_requantize)
    if dry_run:  # shapes, for computing sizes from llama.cpp's per-tensor decisions
        from ..gguf_file import read_header

        _, tensors, data_start = read_header(src)
    named = Path(source_name).expanduser() if source_name is not None else src
    dests = [] if dry_run else _outputs(named, out, types)
    for d in dests:
        if d.resolve() == src.resolve():
            raise QuantTypeError(f"output {d} is the input file; choose another output name", param="out")
        check_output(d, force)
    _check_space(dests, types, info.n_params)

    result = QuantizeResult(source=src)
    im: Imatrix | None = None
    if isinstance(imatrix, Imatrix):
        im = imatrix
    elif imatrix is not None:
        im = load_imatrix(imatrix)
    if im is not None:
        im.check_model(src)
    needing = [q.name for q in types if q.needs_imatrix]
    if im is None and calibration is not None and not dry_run:
        base = (dests[0] if dests else src).parent / f"{default_output_name(named, 'F16')[:-9]}.imatrix.gguf"
        if base.exists() and not force:
            from ..errors import OutputExistsError

            raise OutputExistsError(f"{base} already exists (an imatrix from an earlier run); reuse it with "
                                    f"--imatrix {base}, or pass --force to compute it again")
        im = compute_imatrix(src, calibration, chunks=chunks, n_threads=n_threads, quiet=quiet)
        im.save(base, force=force)
    if im is None and needing and not dry_run:
        q = next(q for q in types if q.needs_imatrix)
        raise ImatrixError(f"{', '.join(needing)} needs an importance matrix: {q.imatrix_reason}. "
                           "Pass --imatrix FILE (make one with `edge-qwen imatrix`) or --calibration default")
    if im is not None:
        result.imatrix = im.path
        # the file's sha256; an imatrix passed in memory is identified by a digest of its data
        result.imatrix_sha256 = sha256_file(im.path) if im.path else f"data:{im.digest()}"
        result.calibration = ", ".join(im.datasets) or "unknown"

    # Hash the source while llama.cpp works: it is a pass over the whole file.
    hasher = None
    known = cached_sha256(src)
    if known is None and not dry_run:
        hasher = threading.Thread(target=hash_in_background, args=(src,), daemon=True)
        hasher.start()

    imat_arr, keep = _imatrix_array(llama_cpp, im) if im is not None else (None, [])
    tt_arr = None
    if tt:
        tt_arr = (llama_cpp.llama_model_tensor_override * (len(tt) + 1))()
        for i, (pat, gt) in enumerate(tt):
            keep.append(pat.encode())
            tt_arr[i].pattern, tt_arr[i].type = keep[-1], gt
    recipe = ", ".join(filter(None, ["pure" if pure else "", f"token_embd={embd.name}" if embd else "",
                                     f"output={outp.name}" if outp else "",
                                     *(f"{p}={tensor_type(g).name}" for p, g in tt)])) or "default"
    threads = n_threads or os.cpu_count() or 1
    for i, q in enumerate(types):
        t0 = time.perf_counter()
        params = llama_cpp.llama_model_quantize_default_params()
        params.nthread, params.ftype = threads, q.ftype
        params.allow_requantize, params.pure, params.dry_run = allow_requantize, pure, dry_run
        if embd:
            params.token_embedding_type = embd.ggml_type
        if outp:
            params.output_tensor_type = outp.ggml_type
        if imat_arr is not None:
            params.imatrix = ctypes.cast(imat_arr, ctypes.POINTER(llama_cpp.llama_model_imatrix_data))
        if tt_arr is not None:
            params.tt_overrides = ctypes.cast(tt_arr, ctypes.POINTER(llama_cpp.llama_model_tensor_override))
        src_hash = known or cached_sha256(src) or HASH_PLACEHOLDER
        kv: dict[str, str | int] = {
            "general.quantize.tool": f"edge-qwen {__version__} (llama-cpp-python {llama_cpp.__version__})",
            "general.quantize.type": q.name,
            "general.quantize.source_file": named.name,
            "general.quantize.source_sha256": src_hash,
            "general.quantize.recipe": recipe,
            "general.quantize.imatrix_sha256": result.imatrix_sha256 or "none",
            "general.quantize.calibration": result.calibration or "none",
        }
        if im is not None:  # the keys llama.cpp's own quantize tool writes
            kv.update({"quantize.imatrix.file": (im.path.name if im.path else "in-memory"),
                       "quantize.imatrix.dataset": result.calibration or "unknown",
                       "quantize.imatrix.entries_count": len(im),
                       "quantize.imatrix.chunks_count": int(im.chunk_count)})
        kv_arr = kv_overrides(llama_cpp, kv)
        params.kv_overrides = ctypes.cast(kv_arr, ctypes.POINTER(llama_cpp.llama_model_kv_override))
        if dry_run:
            targets, fb = _run_one(llama_cpp, src, src.with_name(".dry-run"), q, params, info.n_tensors, quiet)
            size = _size_from_types(tensors, data_start, targets) + kv_bytes(kv, info.metadata)
            result.files.append(QuantizedFile(q.name, None, size, info.n_params, dict(Counter(targets.values())),
                                              fb, time.perf_counter() - t0, True,
                                              q.needs_imatrix and im is None and calibration is None))
            continue
        dest = dests[i]
        from ..files import atomic_output

        with atomic_output(dest, force) as tmp:
            targets, fb = _run_one(llama_cpp, src, tmp, q, params, info.n_tensors, quiet)
            if src_hash == HASH_PLACEHOLDER:
                hasher.join()
                known = source_sha256(src)
                patch_string(tmp, "general.quantize.source_sha256", HASH_PLACEHOLDER, known)
        result.files.append(QuantizedFile(q.name, dest, dest.stat().st_size, info.n_params,
                                          dict(Counter(targets.values())), fb, time.perf_counter() - t0))
    if hasher is not None:
        hasher.join()
    result.source_sha256 = cached_sha256(src)
    return result


def convert_and_quantize(checkpoint: str | os.PathLike, out: str | os.PathLike | None = None,
                         qtype: Any = "Q4_K_M", keep_f16: bool = False, force: bool = False,
                         quiet: bool = False, mtp: bool = True, **quantize_kwargs: Any) -> QuantizeResult:
    """Convert a Hugging Face checkpoint to f16 GGUF, then quantize it, in one step.

    The f16 intermediate is written beside the outputs (under a temporary name) and removed
    afterwards, unless `keep_f16` (then it is `<checkpoint>-f16.gguf`, refused if it exists and not `force`).
    `out` works as in `quantize()`; default outputs go to the store's models folder.
    """
    try:
        from ..convert.writer import convert
    except ImportError:
        raise QuantizeError("conversion is not available in this install (edge_qwen.convert.writer is missing)") from None
    from ..store import models_dir

    types = quant_types(qtype)
    _check_imatrix_args(quantize_kwargs.get("imatrix"), quantize_kwargs.get("calibration"))
    ckpt = Path(checkpoint)
    folder = (Path(out).parent if out and len(types) == 1 and Path(out).suffix == ".gguf"
              else Path(out) if out else models_dir())
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        from ..files import write_error

        raise write_error(e, folder) from None
    f16_name = folder / f"{ckpt.name.replace('/', '-').lower() or 'model'}-f16.gguf"
    # The intermediate is written under a partial name unless kept: it never meets (or replaces) a
    # file of that name the user has, and a run killed with SIGKILL leaves only a partial file
    # that the next run in this folder removes.
    from ..files import partial_path, remove_quietly

    from ..errors import OutputWriteError

    if out is None:
        out = folder if len(types) > 1 else folder / default_output_name(f16_name, types[0])
    for d in _outputs(f16_name, out, types):  # an existing output is refused before converting
        check_output(d, force)
    f16 = f16_name if keep_f16 else partial_path(f16_name)
    try:
        made = convert(str(checkpoint), f16, outtype="f16", force=force or not keep_f16, quiet=quiet, mtp=mtp)
    except OutputWriteError as e:  # name the intermediate as the user would know it, not its temporary name
        raise type(e)(e.message.replace(str(f16), f"{f16_name} (the f16 intermediate)"), param=e.param) from None
    f16 = Path(getattr(made, "path", made) or f16)
    try:
        return quantize(f16, out, types, force=force, quiet=quiet, source_name=f16_name, **quantize_kwargs)
    finally:
        if not keep_f16:
            remove_quietly(f16)
