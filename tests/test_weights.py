"""DRIFT weight and return math against hand-computed values, including the extremes."""

import math

import numpy as np
import pytest

from curate.returns import ReturnConfig, trajectory_return
from curate.corpus.weights import WeightsConfig, assign, ess, group_weights, log_weights


def test_weights_match_hand_computed_values():
    # R = (1, 0), beta = 0.5: exp(2), exp(0); mean = (e^2 + 1)/2
    w = group_weights([1.0, 0.0], 0.5)
    e2 = math.exp(2)
    assert w == pytest.approx([2 * e2 / (e2 + 1), 2 / (e2 + 1)], rel=1e-15)
    # R = (0.9, 0.81, 0), beta = 0.1: exp(9), exp(8.1), 1
    w = group_weights([0.9, 0.81, 0.0], 0.1)
    z = [math.exp(9), math.exp(8.1), 1.0]
    assert w == pytest.approx([3 * x / sum(z) for x in z], rel=1e-14)


def test_equal_returns_give_weight_exactly_one():
    for r in ([0.0] * 8, [-0.1, -0.1], [1e6] * 3, [0.3]):
        assert group_weights(r, 0.1).tolist() == [1.0] * len(r)
        assert ess(group_weights(r, 0.1)) == pytest.approx(len(r))


@pytest.mark.parametrize("beta", [1e-3, 1e-12, 1e-300, 5e-324, 0.0])
def test_tiny_beta_is_the_hard_max_limit_without_overflow(beta):
    with np.errstate(over="raise", invalid="raise", divide="raise"):   # underflow to 0 is fine
        w = group_weights([1.0, 0.0, 1.0, -0.2], beta)
    assert np.isfinite(w).all()
    np.testing.assert_allclose(w, [2.0, 0.0, 2.0, 0.0], atol=1e-12)
    assert ess(w) == pytest.approx(2.0)


def test_large_returns_and_large_beta():
    w = group_weights([1e8, 1e8 - 1, -1e8], 1.0)
    assert np.isfinite(w).all() and w[0] == pytest.approx(3 / (1 + math.exp(-1)))
    assert w[2] == 0.0
    np.testing.assert_allclose(group_weights([1.0, 0.0], 1e12), [1.0, 1.0], rtol=1e-11)  # beta -> inf: uniform
    lw = log_weights([500.0, 0.0], 1e-3)   # exp(5e5) would overflow; its log does not
    assert lw[0] == pytest.approx(math.log(2)) and lw[1] == pytest.approx(-5e5 + math.log(2), rel=1e-12)


def test_mean_weight_per_group_is_one_under_keep():
    rng = np.random.default_rng(0)
    groups = np.repeat(np.arange(50), 8)
    returns = rng.choice([0.0, 1.0, 0.9, 0.81, -0.1, -0.35], size=len(groups))
    res = assign(groups, returns, returns > 0.5, WeightsConfig(beta=0.1))
    for g in range(50):
        assert res.weight[groups == g].mean() == pytest.approx(1.0, abs=1e-14)
    assert res.keep.all() and res.stats["mean_weight"] == pytest.approx(1.0, abs=1e-14)


def test_all_fail_and_all_success_groups():
    groups = ["a", "a", "b", "b", "b", "c", "c"]
    returns = [0.0, -0.1, 1.0, 0.9, 1.0, 0.0, 0.0]
    success = [False, False, True, True, True, False, False]
    keep = assign(groups, returns, success, WeightsConfig(beta=0.1))
    assert keep.stats["groups"] == 3 and keep.stats["groups_all_fail"] == 2 and keep.stats["groups_all_success"] == 1
    # all-fail kept: weights still follow the penalties; all-zero returns: uniform
    assert keep.weight[:2] == pytest.approx(2 * np.exp([0.0, -1.0]) / (1 + math.exp(-1)))
    assert keep.weight[5:].tolist() == [1.0, 1.0]
    b = 3 * np.exp([10.0, 9.0, 10.0]) / np.exp([10.0, 9.0, 10.0]).sum()
    assert keep.weight[2:5] == pytest.approx(b)
    assert keep.group_ess[2] == pytest.approx(ess(b))

    drop = assign(groups, returns, success, WeightsConfig(beta=0.1, all_fail="drop"))
    assert drop.keep.tolist() == [False, False, True, True, True, False, False]
    assert drop.stats["groups_dropped"] == 2 and drop.stats["rows_dropped"] == 4 and drop.stats["rows"] == 3
    assert drop.weight[2:5] == pytest.approx(b) and np.isnan(drop.weight[~drop.keep]).all()


def test_clip_counts_and_ess():
    res = assign([0, 0, 0, 0], [1.0, 0.0, 0.0, 0.0], [True, False, False, False],
                 WeightsConfig(beta=0.1, max_weight=2.0))
    assert res.stats["clipped"] == 1 and res.weight[0] == 2.0
    assert ess([1, 1, 1, 1]) == 4 and ess([4, 0, 0, 0]) == 1 and ess([0, 0]) == 0
    assert ess([2, 1, 1]) == pytest.approx(16 / 6)
    assert res.stats["ess"] == pytest.approx(ess(res.weight))


def test_config_validation():
    for bad in (dict(beta=-1), dict(all_fail="maybe"), dict(max_weight=0)):
        with pytest.raises(ValueError):
            WeightsConfig(**bad)


def test_returns_components():
    cfg = ReturnConfig(gamma=0.9, format_penalty=-0.1, repetition_penalty=0.5)
    first = trajectory_return([True], [True], ["18"], cfg)
    assert (first.outcome, first.format, first.repetition, first.t_star, first.total) == (1.0, 0.0, 0.0, 1, 1.0)
    third = trajectory_return([False, False, True], [True, False, True], ["5", None, "18"], cfg)
    assert third.t_star == 3 and third.outcome == pytest.approx(0.81) and third.format == pytest.approx(-0.1)
    assert third.repetition == 0.0 and third.total == pytest.approx(0.71)
    stuck = trajectory_return([False] * 4, [True] * 4, ["5", "5", "5", "7"], cfg)
    assert stuck.t_star is None and not stuck.success and stuck.outcome == 0.0
    assert stuck.repetition == pytest.approx(-0.5 * (1 - 2 / 4)) and stuck.total == pytest.approx(-0.25)
    silent = trajectory_return([False, False], [False, False], [None, None], cfg)
    assert silent.format == pytest.approx(-0.2) and silent.repetition == 0.0
    recorded = trajectory_return([False], [True], [None], cfg, recorded=0.75)
    assert recorded.outcome == 0.75 and recorded.total == 0.75
    with pytest.raises(ValueError):
        ReturnConfig(gamma=0.0)
