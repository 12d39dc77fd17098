import numpy as np
import pytest

from curate.corpus.route import RouteConfig, assign, corpus_threshold


def test_median_split_sends_half_to_each_side():
    v = np.array([5, 1, 4, 2, 3, 6], np.float32)
    thr = corpus_threshold(v, RouteConfig())
    routes = assign(v, thr, reverse=False)
    assert thr == 3
    assert list(routes) == ["rl", "sft", "rl", "sft", "sft", "rl"]


def test_ties_stay_together_on_the_sft_side():
    v = np.array([1, 2, 2, 2, 3], np.float32)
    routes = assign(v, corpus_threshold(v, RouteConfig()), reverse=False)
    assert list(routes) == ["sft", "sft", "sft", "sft", "rl"]


def test_fixed_threshold_quantile_and_reverse():
    v = np.arange(10, dtype=np.float32)
    assert corpus_threshold(v, RouteConfig(threshold=6.5)) == 6.5
    thr = corpus_threshold(v, RouteConfig(quantile=0.8))
    assert (assign(v, thr, False) == "sft").sum() == 8
    assert (assign(v, thr, True) == "sft").sum() == 2


def test_bad_options_are_rejected():
    with pytest.raises(ValueError, match="unknown metric"):
        RouteConfig(metric="entropy")
    with pytest.raises(ValueError, match="quantile"):
        RouteConfig(quantile=1.5)
