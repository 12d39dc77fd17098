import numpy as np
import pytest

from curate import concentration as c


def gini_by_pairs(g):
    """Independent definition: mean absolute difference over all pairs / (2 * mean)."""
    g = np.asarray(g, float)
    return np.abs(g[:, None] - g[None, :]).mean() / (2 * g.mean())


def test_known_values():
    assert c.gini(np.ones(7))[0] == pytest.approx(0.0)
    for n in (2, 5, 210):
        one_hot = np.zeros(n)
        one_hot[n // 2] = 3.0
        assert c.gini(one_hot)[0] == pytest.approx(1 - 1 / n)
    assert c.cv(np.ones(4))[0] == 0 and c.kurtosis(np.ones(4))[0] == 0
    assert c.gini(np.zeros(5))[0] == 0


def test_against_numpy_formulas():
    rng = np.random.default_rng(0)
    g = rng.lognormal(size=(6, 210))
    np.testing.assert_allclose(c.gini(g), [gini_by_pairs(r) for r in g], rtol=1e-10)
    np.testing.assert_allclose(c.cv(g), g.std(axis=1) / g.mean(axis=1), rtol=1e-12)
    mu, sd = g.mean(axis=1, keepdims=True), g.std(axis=1)
    np.testing.assert_allclose(c.kurtosis(g), ((g - mu) ** 4).mean(axis=1) / sd**4, rtol=1e-10)
    np.testing.assert_allclose(c.magnitude(g), np.linalg.norm(g, axis=1), rtol=1e-12)


def test_scale_invariance_and_order_independence():
    rng = np.random.default_rng(1)
    g = rng.random(50)
    assert c.gini(g * 1000)[0] == pytest.approx(c.gini(g)[0])
    assert c.gini(rng.permutation(g))[0] == pytest.approx(c.gini(g)[0])


def test_random_control_is_seeded_and_order_free():
    ids = [f"id{i}" for i in range(100)]
    a = c.random_control(ids, seed=1)
    assert np.array_equal(a, c.random_control(ids, seed=1))
    assert np.array_equal(a[::-1], c.random_control(ids[::-1], seed=1))
    assert not np.array_equal(a, c.random_control(ids, seed=2))
    assert ((a >= 0) & (a < 1)).all() and 0.35 < a.mean() < 0.65
