"""Perplexity, KL divergence and friends against values worked out by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from edge_qwen.bench import metrics


def test_log_softmax_is_normalised_and_stable():
    x = np.array([[1000.0, 1000.0, 1000.0], [0.0, math.log(3.0), -1e4]])
    lp = metrics.log_softmax(x)
    assert lp.dtype == np.float64
    np.testing.assert_allclose(np.exp(lp).sum(axis=1), [1.0, 1.0])
    np.testing.assert_allclose(lp[0], [-math.log(3.0)] * 3)
    np.testing.assert_allclose(lp[1, :2], [math.log(1 / 4), math.log(3 / 4)])


@pytest.mark.parametrize("vocab", [2, 7, 151_936])
def test_uniform_logits_give_perplexity_vocab_size(vocab):
    logits = np.zeros((3, vocab), dtype=np.float32)
    assert metrics.perplexity(logits, [0, vocab - 1, 1]) == pytest.approx(vocab, rel=1e-9)


def test_two_token_hand_example():
    # row 0: p = [1/2, 1/2], target 0 -> nll ln 2; row 1: p = [3/4, 1/4], target 1 -> nll ln 4
    logits = np.array([[0.0, 0.0], [math.log(3.0), 0.0]])
    nll = metrics.token_nll(logits, [0, 1])
    np.testing.assert_allclose(nll, [math.log(2), math.log(4)])
    assert metrics.perplexity(logits, [0, 1]) == pytest.approx(math.sqrt(8.0))  # exp((ln2 + ln4) / 2)
    assert metrics.perplexity_from_nll([math.log(2), math.log(8)]) == pytest.approx(4.0)


def test_kl_hand_example_and_direction():
    p = np.array([[0.0, 0.0]])                # P = [1/2, 1/2]
    q = np.array([[math.log(3.0), 0.0]])      # Q = [3/4, 1/4]
    # KL(P||Q) = 1/2 ln(1/2 / 3/4) + 1/2 ln(1/2 / 1/4) = 1/2 ln(4/3)
    assert metrics.kl_divergence(p, q)[0] == pytest.approx(0.5 * math.log(4 / 3))
    # KL(Q||P) = 3/4 ln(3/2) + 1/4 ln(1/2): not symmetric
    assert metrics.kl_divergence(q, p)[0] == pytest.approx(0.75 * math.log(1.5) + 0.25 * math.log(0.5))


def test_identical_logits_have_zero_kl_even_when_shifted():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(5, 1000)).astype(np.float32)
    np.testing.assert_array_equal(metrics.kl_divergence(a, a), np.zeros(5))
    # adding a constant per row does not change the distribution
    np.testing.assert_allclose(metrics.kl_divergence(a, a + 123.0), np.zeros(5), atol=1e-9)
    assert (metrics.kl_divergence(a, rng.normal(size=(5, 1000))) > 0).all()


def test_kl_survives_huge_logits():
    p = np.array([[5e4, 0.0, -5e4]])
    q = np.array([[5e4, 5e4, -5e4]])  # Q = [1/2, 1/2, 0], P = [1, 0, 0] -> KL = ln 2
    kl = metrics.kl_divergence(p, q)
    assert np.isfinite(kl).all() and kl[0] == pytest.approx(math.log(2))


def test_same_top_token_rate():
    ref = np.array([[3, 1, 0], [0, 5, 1], [0, 0, 9], [2, 1, 0]], dtype=np.float32)
    test = np.array([[2, 1, 0], [0, 1, 5], [0, 0, 8], [9, 1, 0]], dtype=np.float32)
    np.testing.assert_array_equal(metrics.top_token_agreement(ref, test), [True, False, True, True])
    assert metrics.same_top_token_rate(ref, test) == 0.75
    assert metrics.same_top_token_rate(ref, ref) == 1.0


def test_summary_stats():
    s = metrics.summary_stats([4, 1, 100, 3, 2])
    assert s["mean"] == pytest.approx(22.0)
    assert s["median"] == 3.0
    assert s["max"] == 100.0
    assert s["p99"] == pytest.approx(4 + 0.96 * 96)  # linear interpolation at rank 3.96 of 0..4


def test_bits_per_weight():
    assert metrics.bits_per_weight(1000, 2000) == 4.0
    assert metrics.bits_per_weight(491_400_064, 630_167_424) == pytest.approx(6.2383, abs=1e-4)
    with pytest.raises(ValueError):
        metrics.bits_per_weight(1, 0)


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match="targets"):
        metrics.token_nll(np.zeros((2, 3)), [0])
    with pytest.raises(ValueError, match="shape"):
        metrics.kl_divergence(np.zeros((2, 3)), np.zeros((2, 4)))
    with pytest.raises(ValueError, match="zero tokens"):
        metrics.perplexity_from_nll([])
    with pytest.raises(ValueError, match="empty"):
        metrics.summary_stats([])
