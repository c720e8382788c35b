"""Effective rank on matrices with known spectra; layer similarity on known states."""

import numpy as np
import pytest

from polyjax.analysis import effective_rank, ffn_weight_ranks, layer_similarity


def _with_singular_values(s, seed=0):
    rng = np.random.default_rng(seed)
    n = len(s)
    u, _ = np.linalg.qr(rng.normal(size=(n + 3, n)))
    v, _ = np.linalg.qr(rng.normal(size=(n, n)))
    return u @ np.diag(s) @ v.T


@pytest.mark.parametrize("k", [1, 3, 7])
def test_k_equal_singular_values_give_rank_k(k):
    s = np.r_[np.full(k, 2.5), np.zeros(8 - k)]
    assert effective_rank(_with_singular_values(s)) == pytest.approx(k, rel=1e-6)


def test_known_spectrum_entropy():
    s = np.array([4.0, 2.0, 1.0, 1.0])
    p = s / s.sum()
    want = np.exp(-np.sum(p * np.log(p)))
    assert effective_rank(_with_singular_values(s, seed=1)) == pytest.approx(want, rel=1e-6)
    assert effective_rank(np.zeros((3, 3))) == 0.0


def test_ffn_weight_ranks_averages_expert_stacks():
    a = _with_singular_values(np.array([1.0, 1.0, 0, 0]))
    b = _with_singular_values(np.array([1.0, 1.0, 1.0, 1.0]))
    ranks = ffn_weight_ranks({"w_in": a, "experts": np.stack([a, b[:7]]), "bias": np.ones(3)})
    assert ranks == pytest.approx({"w_in": 2.0, "experts": 3.0})


def test_layer_similarity_of_known_states():
    rng = np.random.default_rng(0)
    h0 = rng.normal(size=(50, 16))
    q, _ = np.linalg.qr(rng.normal(size=(16, 16)))
    e = np.eye(16)
    h = np.stack([h0, 3.0 * h0, -h0, np.tile(e[0], (50, 1)), np.tile(e[1], (50, 1))])
    sim = layer_similarity(h)
    assert sim.shape == (5, 5)
    np.testing.assert_allclose(np.diag(sim), 1.0)
    assert sim[0, 1] == pytest.approx(1.0) and sim[0, 2] == pytest.approx(-1.0)
    assert sim[3, 4] == pytest.approx(0.0, abs=1e-12)
    np.testing.assert_allclose(sim, sim.T)
    # rotating every layer's states alike leaves the similarities unchanged
    np.testing.assert_allclose(layer_similarity(h @ q), sim, atol=1e-12)
    # the mask averages over the selected tokens only
    mixed = np.stack([np.r_[h0[:25], h0[:25]], np.r_[h0[:25], -h0[:25]]])
    assert layer_similarity(mixed)[0, 1] == pytest.approx(0.0, abs=1e-12)
    assert layer_similarity(mixed, np.arange(50) < 25)[0, 1] == pytest.approx(1.0)
