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


def _splitmix_reference(rid: str, seed: int) -> float:
    """random_control's rule, one id at a time in Python integers (mod 2**64)."""
    mask = 2**64 - 1

    def mix(x):
        x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & mask
        x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & mask
        return x ^ (x >> 31)

    data = rid.encode()
    h = mix((seed & mask) ^ 0x9E3779B97F4A7C15)
    for k in range(0, max(len(data), 1), 8):  # the empty id folds one zero word
        h = mix(h ^ int.from_bytes(data[k:k + 8].ljust(8, b"\0"), "little"))
    return (mix(h ^ len(data)) >> 11) / 2.0**53


def test_random_control_matches_a_scalar_reference_and_is_uniform():
    ids = [f"{i:032x}" for i in range(20000)] + ["", "é", "a" * 41, "b" * 8]
    got = c.random_control(ids, seed=7)
    # mixed lengths pad to the longest id's words: the value of an id does not depend on its batch mates
    assert [c.random_control([i], seed=7)[0] for i in ids[-4:]] == list(got[-4:])
    np.testing.assert_array_equal(got[-4:], [_splitmix_reference(i, 7) for i in ids[-4:]])
    np.testing.assert_array_equal(got[:50], [_splitmix_reference(i, 7) for i in ids[:50]])
    deciles = np.histogram(got[:20000], bins=10, range=(0, 1))[0]
    assert deciles.min() > 1800 and deciles.max() < 2200  # uniform: 2000 each, ~45 standard deviation
    assert np.corrcoef(got[:20000], np.arange(20000))[0, 1] ** 2 < 1e-3  # no trace of the id's order


def test_all_metrics_equal_the_single_metric_functions():
    g = np.random.default_rng(3).gamma(2.0, 1.0, (64, 210)).astype(np.float32)
    ids = [str(i) for i in range(64)]
    got = c.all_metrics(g, ids, seed=0)
    for name, fn in (("gini", c.gini), ("cv", c.cv), ("kurtosis", c.kurtosis), ("magnitude", c.magnitude)):
        np.testing.assert_array_equal(got[name], fn(g))
    np.testing.assert_array_equal(got["random"], c.random_control(ids, 0))
