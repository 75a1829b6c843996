"""Long context for llama.cpp: YaRN past the trained length, quantized KV cache, flash attention.

Qwen2.5 is trained on 32,768 tokens; Qwen's own guidance extends it to 131,072 with YaRN
(`rope_scaling: {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}`).
`context_options` turns a requested `n_ctx` into llama.cpp's context parameters: YaRN with
factor n_ctx / trained length when the window is longer than the trained one (up to Qwen's
factor 4), and nothing when it fits. Static YaRN applies to every position, so it is only
switched on when asked for a longer window, as Qwen advises.

The KV cache can be f16 (llama.cpp's default), q8_0 or q4_0: about half and a quarter of the
f16 memory (34 and 18 bytes per 32 values). llama.cpp needs flash attention for a quantized
V cache, so a quantized `kv_type` turns it on; asking for a quantized cache with flash
attention off is refused rather than left to fail inside llama.cpp.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .errors import RequestError

# kv_type -> ggml type id (llama_cpp.GGML_TYPE_*); names in a table.
KV_TYPES = {"f16": 1, "q8_0": 8, "q4_0": 2}
ROPE_SCALINGS = ("yarn", "none")
MAX_YARN_FACTOR = 4.0  # Qwen2.5's published YaRN setting: 32K trained -> 128K


@dataclass(frozen=True)
class ContextOptions:
    """What `context_options` decided for one model load."""

    n_ctx: int
    kv_type: str
    flash_attn: bool
    rope_scaling: str  # "yarn" | "none"
    yarn_factor: float  # 1.0 without YaRN
    n_ctx_train: int

    def llama_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for llama_cpp.Llama."""
        import llama_cpp

        kw: dict[str, Any] = {"type_k": KV_TYPES[self.kv_type], "type_v": KV_TYPES[self.kv_type],
                              "flash_attn": self.flash_attn}
        if self.rope_scaling == "yarn":
            kw.update(rope_scaling_type=llama_cpp.LLAMA_ROPE_SCALING_TYPE_YARN, rope_freq_scale=1.0 / self.yarn_factor,
                      yarn_orig_ctx=self.n_ctx_train)
        return kw


def context_options(n_ctx: Any, n_ctx_train: int, kv_type: Any = "f16", flash_attn: Any = None,
                    rope_scaling: Any = None) -> ContextOptions:
    """Validate a context request and decide YaRN and flash attention; RequestError naming the bad value.

    rope_scaling None: YaRN exactly when n_ctx > n_ctx_train; "yarn": YaRN with factor
    max(1, n_ctx / n_ctx_train); "none": the trained positions only. flash_attn None: on when the
    KV cache is quantized (llama.cpp requires it), else off.
    """
    if kv_type not in KV_TYPES:
        raise RequestError(f"kv_type={kv_type!r} is not a KV cache type; use one of {', '.join(KV_TYPES)}",
                           param="kv_type")
    if rope_scaling is not None and rope_scaling not in ROPE_SCALINGS:
        raise RequestError(f"rope_scaling={rope_scaling!r}; use 'yarn', 'none' or leave it out (YaRN when n_ctx "
                           f"exceeds the trained {n_ctx_train})", param="rope_scaling")
    if flash_attn is not None and not isinstance(flash_attn, bool):
        raise RequestError(f"flash_attn={flash_attn!r} must be true, false or left out", param="flash_attn")
    limit = n_ctx_train if rope_scaling == "none" else int(n_ctx_train * MAX_YARN_FACTOR)
    if not isinstance(n_ctx, int) or isinstance(n_ctx, bool) or not 16 <= n_ctx <= limit:
        how = ("without rope scaling" if rope_scaling == "none" else
               f"with YaRN (factor up to {MAX_YARN_FACTOR:g} over the trained {n_ctx_train})")
        raise RequestError(f"n_ctx={n_ctx!r} must be an integer between 16 and {limit} {how}", param="n_ctx")
    quantized = kv_type != "f16"
    if quantized and flash_attn is False:
        raise RequestError(f"kv_type={kv_type!r} needs flash attention (llama.cpp cannot quantize the V cache "
                           "without it); drop flash_attn=False or use kv_type='f16'", param="flash_attn")
    yarn = rope_scaling == "yarn" or (rope_scaling is None and n_ctx > n_ctx_train)
    return ContextOptions(n_ctx, kv_type, quantized if flash_attn is None else flash_attn,
                          "yarn" if yarn else "none", max(1.0, n_ctx / n_ctx_train) if yarn else 1.0, n_ctx_train)


def kv_bytes_table(metadata: dict[str, Any], n_ctx: int) -> dict[str, int]:
    """KV cache bytes for each kv_type at `n_ctx` tokens, for `doctor` and `recommend`."""
    from .device import kv_cache_bytes

    return {name: kv_cache_bytes(metadata, n_ctx, t, t) for name, t in KV_TYPES.items()}
