"""Whole-tensor transforms of the hybrid Qwen models, as llama.cpp's converter applies them.

A table row names its transforms (`Row.fn`); each takes the float32 tensor and the config's
sizes and returns the tensor the GGUF holds. They mirror `Qwen3NextModel.modify_tensors` and
`_LinearAttentionVReorderBase` in llama.cpp's conversion/qwen.py, in float32 as there:

- `neg_exp`: A_log -> A = -exp(A_log) (correctly rounded; see _neg_exp);
- `plus_one`: Qwen3-Next/3.5 RMS norms store `w - 1` (the model multiplies by `1 + w`);
- `squeeze`: the depthwise conv1d kernel [C, 1, K] -> [C, K];
- `v_*`: the linear-attention V heads, stored grouped by K head in the checkpoint, reordered to
  the tiled order ggml broadcasts over (only when there are more V heads than K heads);
- `qkvz_qkv` / `qkvz_z`: Qwen3-Next's fused in_proj_qkvz, interleaved per K head, split into
  the q|k|v projection and the output gate.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np


def _reorder(t: np.ndarray, axis: int, sizes: dict[str, int], head_dim: int) -> np.ndarray:
    """V heads from grouped (by K head) to tiled order along `axis`."""
    nk, nv = sizes["NK"], sizes["NV"]
    if nk == nv:
        return t
    axis %= t.ndim
    shape = list(t.shape)
    split = shape[:axis] + [nk, nv // nk, head_dim] + shape[axis + 1:]
    return np.ascontiguousarray(t.reshape(split).swapaxes(axis, axis + 1)).reshape(shape)


def _neg_exp(t: np.ndarray, sizes: dict[str, int]) -> np.ndarray:
    # Correctly rounded float32 (exp in float64). llama.cpp's converter computes it with torch's
    # vectorized float32 exp, which is 1 ulp off on about 1% of inputs (and differs between
    # AVX2 and AVX-512 machines); tests compare these few values to 1 ulp.
    return (-np.exp(t.astype(np.float64))).astype(np.float32)


def _plus_one(t: np.ndarray, sizes: dict[str, int]) -> np.ndarray:
    return t + np.float32(1)


def _squeeze(t: np.ndarray, sizes: dict[str, int]) -> np.ndarray:
    return t.reshape(t.shape[0], t.shape[-1])


def _v_heads(t: np.ndarray, sizes: dict[str, int]) -> np.ndarray:
    """A [NV * DV, ...] tensor (in_proj_z)."""
    return _reorder(t, 0, sizes, sizes["DV"])


def _v_single(t: np.ndarray, sizes: dict[str, int]) -> np.ndarray:
    """One row or value per V head (in_proj_a/b, A_log, dt_bias)."""
    return _reorder(t, 0, sizes, 1)


def _v_cols(t: np.ndarray, sizes: dict[str, int]) -> np.ndarray:
    """out_proj: its input columns are V heads."""
    return _reorder(t, 1, sizes, sizes["DV"])


def _v_after_qk(t: np.ndarray, sizes: dict[str, int]) -> np.ndarray:
    """in_proj_qkv rows / conv1d channels: q and k stay, the V part is reordered."""
    qk = 2 * sizes["NK"] * sizes["DK"]
    return np.concatenate([t[:qk], _reorder(t[qk:], 0, sizes, sizes["DV"])], axis=0)


def _qkvz(t: np.ndarray, sizes: dict[str, int]) -> tuple[np.ndarray, np.ndarray]:
    nk, nv, dk, dv = sizes["NK"], sizes["NV"], sizes["DK"], sizes["DV"]
    per = nv // nk * dv
    g = t.T.reshape(t.shape[1], nk, 2 * dk + 2 * per)  # (hidden, K head, [q k v z])
    q, k, v, z = np.split(g, [dk, 2 * dk, 2 * dk + per], axis=-1)
    flat = [np.ascontiguousarray(x).reshape(t.shape[1], -1) for x in (q, k, v, z)]
    return np.ascontiguousarray(np.concatenate(flat[:3], axis=-1).T), np.ascontiguousarray(flat[3].T)


TRANSFORMS: dict[str, Callable[[np.ndarray, dict[str, int]], np.ndarray]] = {
    "neg_exp": _neg_exp,
    "plus_one": _plus_one,
    "squeeze": _squeeze,
    "v_heads": _v_heads,
    "v_single": _v_single,
    "v_cols": _v_cols,
    "v_after_qk": _v_after_qk,
    "qkvz_qkv": lambda t, sizes: _qkvz(t, sizes)[0],
    "qkvz_z": lambda t, sizes: _qkvz(t, sizes)[1],
}


def apply(names: tuple[str, ...], data: Any, sizes: dict[str, int]) -> np.ndarray:
    """`data` (float32) through the named transforms, in order."""
    out = np.asarray(data, dtype=np.float32)
    for name in names:
        out = TRANSFORMS[name](out, sizes)
    return np.ascontiguousarray(out, dtype=np.float32)
