"""Quality and size metrics for quantized models: pure functions on numpy arrays.

Everything here is deterministic and free of llama.cpp, so the math is unit-tested on small
hand-computed arrays (tests/test_metrics.py) and the benchmark only ever calls these
functions, never re-derives them. Logit math runs in float64: the vocabulary is 151,936
wide and float32 log-sum-exp loses the small KL values that separate Q8_0 from Q6_K.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np


def log_softmax(logits: Any, axis: int = -1) -> np.ndarray:
    """Log-probabilities from logits, computed stably in float64 (max subtracted first)."""
    x = np.asarray(logits, dtype=np.float64)
    m = np.max(x, axis=axis, keepdims=True)
    shifted = x - m
    return shifted - np.log(np.sum(np.exp(shifted), axis=axis, keepdims=True))


def token_nll(logits: Any, targets: Any) -> np.ndarray:
    """Negative log-likelihood (nats) of each target token under its row of logits.

    `logits` is (n, vocab); `targets` is (n,) token ids, `targets[i]` being the token that
    follows the position whose logits are row i.
    """
    logp = log_softmax(logits)
    t = np.asarray(targets, dtype=np.int64)
    if logp.ndim != 2 or t.shape != (logp.shape[0],):
        raise ValueError(f"logits must be (n, vocab) and targets (n,), got {logp.shape} and {t.shape}")
    return -logp[np.arange(t.shape[0]), t]


def perplexity_from_nll(nll: Any) -> float:
    """Perplexity exp(mean NLL) from per-token negative log-likelihoods (nats)."""
    a = np.asarray(nll, dtype=np.float64)
    if a.size == 0:
        raise ValueError("perplexity of zero tokens is undefined")
    return float(math.exp(float(np.mean(a))))


def perplexity(logits: Any, targets: Any) -> float:
    """Perplexity of `targets` under `logits` ((n, vocab) and (n,))."""
    return perplexity_from_nll(token_nll(logits, targets))


def kl_divergence(ref_logits: Any, test_logits: Any) -> np.ndarray:
    """KL(P_ref || P_test) per position, in nats, from two (n, vocab) logit arrays.

    Computed from float64 log-softmax of both sides; tiny negative values from rounding are
    clipped to zero (KL is never negative).
    """
    lp = log_softmax(ref_logits)
    lq = log_softmax(test_logits)
    if lp.shape != lq.shape:
        raise ValueError(f"reference and test logits differ in shape: {lp.shape} vs {lq.shape}")
    kl = np.sum(np.exp(lp) * (lp - lq), axis=-1)
    return np.maximum(kl, 0.0)


def top_token_agreement(ref_logits: Any, test_logits: Any) -> np.ndarray:
    """Per position: True where both models' most likely next token is the same."""
    a = np.asarray(ref_logits)
    b = np.asarray(test_logits)
    if a.shape != b.shape:
        raise ValueError(f"reference and test logits differ in shape: {a.shape} vs {b.shape}")
    return np.argmax(a, axis=-1) == np.argmax(b, axis=-1)


def same_top_token_rate(ref_logits: Any, test_logits: Any) -> float:
    """Fraction of positions where the reference and test argmax tokens agree."""
    agree = top_token_agreement(ref_logits, test_logits)
    return float(np.mean(agree)) if agree.size else float("nan")


def summary_stats(values: Any) -> dict[str, float]:
    """mean, median, p99 and max of a 1-D sample (p99 by linear interpolation)."""
    a = np.asarray(values, dtype=np.float64).ravel()
    if a.size == 0:
        raise ValueError("summary of an empty sample is undefined")
    return {
        "mean": float(np.mean(a)),
        "median": float(np.median(a)),
        "p99": float(np.percentile(a, 99)),
        "max": float(np.max(a)),
    }


def bits_per_weight(size_bytes: int | float, n_params: int | float) -> float:
    """Bits per weight of a model file: 8 * bytes / parameters (metadata included)."""
    if n_params <= 0:
        raise ValueError(f"n_params must be positive, got {n_params}")
    return 8.0 * float(size_bytes) / float(n_params)
