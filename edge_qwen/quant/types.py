"""The quantization types: every file type llama.cpp's quantizer makes, and every tensor type.

Two tables, kept apart because llama.cpp keeps them apart:

* `QUANT_TYPES` - *file* types (`llama_ftype`), what `edge-qwen quantize --type` takes. A file
  type is a recipe: "Q4_K_M" puts most tensors in Q4_K but some in Q6_K, and falls back to
  other types where a row length is not a multiple of the block (see docs/quantize.md).
* `TENSOR_TYPES` - *tensor* types (`ggml_type`), what `--embedding-type`, `--output-type` and
  per-tensor overrides take.

The numbers are the enum values of llama.h / ggml.h in the llama.cpp that llama-cpp-python
0.3.36 ships (tests check them against the `llama_cpp` module). Pure Python: importing this
module is free, so the CLI can list types without loading llama.cpp.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import EdgeQwenError


class QuantTypeError(EdgeQwenError):
    """An unknown quantization or tensor type name."""

    code = "invalid_quant_type"


@dataclass(frozen=True)
class TensorType:
    """A ggml tensor type: `block` weights stored in `block_bytes` bytes."""

    name: str
    ggml_type: int
    block: int
    block_bytes: int

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.block_bytes / self.block

    def row_bytes(self, n: int) -> int:
        """Bytes of one row of `n` weights (n must be a multiple of `block`)."""
        return n // self.block * self.block_bytes


# name, ggml_type, block size, bytes per block (ggml.h / ggml-common.h).
TENSOR_TYPES: dict[str, TensorType] = {t.name: t for t in (
    TensorType("F32", 0, 1, 4),
    TensorType("F16", 1, 1, 2),
    TensorType("Q4_0", 2, 32, 18),
    TensorType("Q4_1", 3, 32, 20),
    TensorType("Q5_0", 6, 32, 22),
    TensorType("Q5_1", 7, 32, 24),
    TensorType("Q8_0", 8, 32, 34),
    TensorType("Q2_K", 10, 256, 84),
    TensorType("Q3_K", 11, 256, 110),
    TensorType("Q4_K", 12, 256, 144),
    TensorType("Q5_K", 13, 256, 176),
    TensorType("Q6_K", 14, 256, 210),
    TensorType("IQ2_XXS", 16, 256, 66),
    TensorType("IQ2_XS", 17, 256, 74),
    TensorType("IQ3_XXS", 18, 256, 98),
    TensorType("IQ1_S", 19, 256, 50),
    TensorType("IQ4_NL", 20, 32, 18),
    TensorType("IQ3_S", 21, 256, 110),
    TensorType("IQ2_S", 22, 256, 82),
    TensorType("IQ4_XS", 23, 256, 136),
    TensorType("IQ1_M", 29, 256, 56),
    TensorType("BF16", 30, 1, 2),
    TensorType("TQ1_0", 34, 256, 54),
    TensorType("TQ2_0", 35, 256, 66),
    TensorType("MXFP4", 39, 32, 17),
    TensorType("NVFP4", 40, 64, 36),
    TensorType("Q1_0", 41, 128, 18),
    TensorType("Q2_0", 42, 64, 18),
)}
TENSOR_TYPES_BY_ID: dict[int, TensorType] = {t.ggml_type: t for t in TENSOR_TYPES.values()}


@dataclass(frozen=True)
class QuantType:
    """A llama.cpp file type (`llama_ftype`) as `edge-qwen quantize --type` knows it."""

    name: str
    ftype: int
    tensor_type: str          # the main tensor type of the recipe
    bits_per_weight: float    # nominal: llama.cpp's stated figure for mixes, else the main type's
    needs_imatrix: bool       # refused without an importance matrix
    description: str
    imatrix_reason: str = ""

    @property
    def is_float(self) -> bool:
        return self.name in ("F32", "F16", "BF16")


_LLAMA_REFUSES = ("llama.cpp refuses it without one: its {t} tensors are too coarse to quantize "
                  "well without knowing which weights matter")
_POLICY = ("its 3-bit IQ codebooks are fitted with importance weights; without them quality "
           "collapses, so edge-qwen requires one for the whole IQ1/IQ2/IQ3 family")


def _q(name: str, ftype: int, tensor: str, desc: str, bpw: float | None = None,
       imatrix: str = "") -> QuantType:
    t = TENSOR_TYPES[tensor]
    return QuantType(name, ftype, tensor, bpw if bpw is not None else t.bits_per_weight,
                     bool(imatrix), desc, imatrix)


# Every llama_ftype of llama.h except GUESSED and NVFP4 (llama.h lists it, but the quantizer in
# llama-cpp-python 0.3.36 answers "invalid output file type 39"), in the order of llama.cpp's
# quantize tool.
QUANT_TYPES: dict[str, QuantType] = {q.name: q for q in (
    _q("Q1_0", 40, "Q1_0", "1-bit, group 128"),
    _q("Q2_0", 41, "Q2_0", "2-bit, group 64"),
    _q("Q4_0", 2, "Q4_0", "4-bit legacy, one scale per 32"),
    _q("Q4_1", 3, "Q4_1", "4-bit legacy, scale and min per 32"),
    _q("MXFP4_MOE", 38, "MXFP4", "MXFP4 for MoE experts, Q8_0 elsewhere"),
    _q("Q5_0", 8, "Q5_0", "5-bit legacy, one scale per 32"),
    _q("Q5_1", 9, "Q5_1", "5-bit legacy, scale and min per 32"),
    _q("IQ2_XXS", 19, "IQ2_XXS", "2-bit i-quant", 2.06, _LLAMA_REFUSES.format(t="IQ2_XXS")),
    _q("IQ2_XS", 20, "IQ2_XS", "2-bit i-quant", 2.31, _LLAMA_REFUSES.format(t="IQ2_XS")),
    _q("IQ2_S", 28, "IQ2_XS", "2-bit i-quant mix", 2.5, _LLAMA_REFUSES.format(t="IQ2_XS")),
    _q("IQ2_M", 29, "IQ2_S", "2-bit i-quant mix", 2.7, _LLAMA_REFUSES.format(t="IQ2_S")),
    _q("IQ1_S", 24, "IQ1_S", "1-bit i-quant", 1.56, _LLAMA_REFUSES.format(t="IQ1_S")),
    _q("IQ1_M", 31, "IQ1_M", "1-bit i-quant", 1.75, _LLAMA_REFUSES.format(t="IQ1_M")),
    _q("TQ1_0", 36, "TQ1_0", "ternary (for ternary-trained models)", 1.69),
    _q("TQ2_0", 37, "TQ2_0", "ternary (for ternary-trained models)", 2.06),
    _q("Q2_K", 10, "Q2_K", "2-bit K-quant mix"),
    _q("Q2_K_S", 21, "Q2_K", "2-bit K-quant, small", None, _LLAMA_REFUSES.format(t="Q2_K")),
    _q("IQ3_XXS", 23, "IQ3_XXS", "3-bit i-quant", 3.06, _LLAMA_REFUSES.format(t="IQ3_XXS")),
    _q("IQ3_S", 26, "IQ3_S", "3-bit i-quant", 3.44, _POLICY),
    _q("IQ3_M", 27, "IQ3_S", "3-bit i-quant mix", 3.66, _POLICY),
    _q("IQ3_XS", 22, "IQ3_S", "3-bit i-quant mix", 3.3, _LLAMA_REFUSES.format(t="IQ3_XXS")),
    _q("Q3_K_S", 11, "Q3_K", "3-bit K-quant, small"),
    _q("Q3_K_M", 12, "Q3_K", "3-bit K-quant mix, medium"),
    _q("Q3_K_L", 13, "Q3_K", "3-bit K-quant mix, large"),
    _q("IQ4_NL", 25, "IQ4_NL", "4-bit non-linear, blocks of 32"),
    _q("IQ4_XS", 30, "IQ4_XS", "4-bit non-linear, blocks of 256"),
    _q("Q4_K_S", 14, "Q4_K", "4-bit K-quant, small"),
    _q("Q4_K_M", 15, "Q4_K", "4-bit K-quant mix, medium (the usual choice)"),
    _q("Q5_K_S", 16, "Q5_K", "5-bit K-quant, small"),
    _q("Q5_K_M", 17, "Q5_K", "5-bit K-quant mix, medium"),
    _q("Q6_K", 18, "Q6_K", "6-bit K-quant"),
    _q("Q8_0", 7, "Q8_0", "8-bit, near lossless"),
    _q("F16", 1, "F16", "16-bit float"),
    _q("BF16", 32, "BF16", "16-bit bfloat"),
    _q("F32", 0, "F32", "32-bit float"),
)}

# Short names llama.cpp's quantize tool accepts too.
ALIASES = {"Q3_K": "Q3_K_M", "Q4_K": "Q4_K_M", "Q5_K": "Q5_K_M"}


def _normalize(name: str) -> str:
    key = str(name).strip().upper().replace("-", "_")
    for prefix in ("LLAMA_FTYPE_", "GGML_TYPE_"):
        if key.startswith(prefix):
            key = key[len(prefix):]
    if key.startswith("MOSTLY_"):
        key = key[len("MOSTLY_"):]
    if key == "ALL_F32":
        key = "F32"
    return key


def valid_quant_names() -> str:
    """The accepted --type names, for error messages."""
    return ", ".join(list(QUANT_TYPES) + list(ALIASES))


def quant_type(name: str | int | QuantType) -> QuantType:
    """Look up a file type by name (any case, `MOSTLY_`/`LLAMA_FTYPE_` prefixes allowed) or ftype number."""
    if isinstance(name, QuantType):
        return name
    key = _normalize(str(name))
    key = ALIASES.get(key, key)
    if key in QUANT_TYPES:
        return QUANT_TYPES[key]
    if key.isdigit():
        for q in QUANT_TYPES.values():
            if q.ftype == int(key):
                return q
    raise QuantTypeError(f"unknown quantization type {str(name)!r}; valid types: {valid_quant_names()} "
                         "(see `edge-qwen quantize --list`)", param="type")


def quant_types(names: str | int | QuantType | list | tuple) -> list[QuantType]:
    """Parse one type or several ("Q8_0,Q4_K_M" or a list) into QuantTypes, duplicates dropped."""
    if isinstance(names, (list, tuple)):
        parts = [p for n in names for p in (str(n).split(",") if not isinstance(n, QuantType) else [n])]
    elif isinstance(names, QuantType):
        parts = [names]
    else:
        parts = str(names).split(",")
    out: list[QuantType] = []
    for p in parts:
        if isinstance(p, str) and not p.strip():
            continue
        q = quant_type(p)
        if q not in out:
            out.append(q)
    if not out:
        raise QuantTypeError(f"no quantization type given; valid types: {valid_quant_names()}", param="type")
    return out


def tensor_type(name: str | int) -> TensorType:
    """Look up a ggml tensor type by name (any case, e.g. q8_0, Q6_K, f16) or number."""
    key = _normalize(str(name))
    if key in TENSOR_TYPES:
        return TENSOR_TYPES[key]
    if key.isdigit() and int(key) in TENSOR_TYPES_BY_ID:
        return TENSOR_TYPES_BY_ID[int(key)]
    raise QuantTypeError(f"unknown tensor type {str(name)!r}; valid tensor types: {', '.join(TENSOR_TYPES)}",
                         param="tensor_type")


def tensor_type_name(ggml_type: int) -> str:
    """The name of a ggml type number ("Q4_K"), or "type N" if this table does not know it."""
    t = TENSOR_TYPES_BY_ID.get(ggml_type)
    return t.name if t else f"type {ggml_type}"


def format_table() -> str:
    """The `edge-qwen quantize --list` table: name, ftype, main tensor type, bpw, imatrix need."""
    lines = [f"{'type':<10} {'ftype':>5}  {'tensors':<8} {'bpw':>5}  {'imatrix':<8}  description"]
    for q in QUANT_TYPES.values():
        need = "required" if q.needs_imatrix else "-"
        lines.append(f"{q.name:<10} {q.ftype:>5}  {q.tensor_type:<8} {q.bits_per_weight:>5.2f}  {need:<8}  "
                     f"{q.description}")
    lines.append("aliases: " + ", ".join(f"{a} = {b}" for a, b in ALIASES.items()))
    lines.append("bpw is nominal (the main tensor type); real files are larger: run with --dry-run for the true size.")
    return "\n".join(lines)
