"""Intervals and paired tests against SciPy (an independent implementation) and hand-checked cases."""

import random

import pytest
from scipy import stats as scipy_stats

from c2c.stats import Z95, binomial_two_sided_p, mean_interval, paired_by_id, paired_comparison, pgr, wilson_interval


@pytest.mark.parametrize("k,n", [(0, 10), (3, 10), (10, 10), (51, 100), (290, 1172), (1, 1)])
def test_wilson_interval_matches_scipy(k, n):
    expected = scipy_stats.binomtest(k, n).proportion_ci(0.95, method="wilson")
    lo, hi = wilson_interval(k, n)
    assert lo == pytest.approx(expected.low, abs=1e-9) and hi == pytest.approx(expected.high, abs=1e-9)


@pytest.mark.parametrize("k,n", [(0, 0), (0, 5), (2, 5), (10, 30), (150, 280), (3, 1000)])
def test_exact_mcnemar_is_a_two_sided_binomial_test(k, n):
    expected = scipy_stats.binomtest(k, n, 0.5).pvalue if n else 1.0
    assert binomial_two_sided_p(k, n) == pytest.approx(expected, rel=1e-9, abs=1e-300)


def test_paired_comparison_counts_discordant_items_and_its_interval_covers_the_truth():
    a = [True, True, False, False, True, True]
    b = [True, False, True, False, False, False]
    c = paired_comparison(a, b)
    assert (c.n, c.a_only, c.b_only) == (6, 3, 1)
    assert c.difference == pytest.approx(4 / 6 - 2 / 6)
    assert c.p_value == pytest.approx(scipy_stats.binomtest(3, 4, 0.5).pvalue)
    # coverage: two methods with true accuracies 0.6 / 0.5, 400 items, 300 repetitions
    rng = random.Random(0)
    covered = 0
    for _ in range(300):
        x = [rng.random() < 0.6 for _ in range(400)]
        y = [rng.random() < 0.5 for _ in range(400)]
        lo, hi = paired_comparison(x, y).interval
        covered += lo <= 0.1 <= hi
    assert 0.92 <= covered / 300 <= 0.98
    with pytest.raises(ValueError, match="same items"):
        paired_comparison([True], [True, False])


def test_pgr_is_the_share_of_the_gap_recovered():
    assert pgr(0.51, 0.257, 0.60) == pytest.approx((0.51 - 0.257) / (0.60 - 0.257))
    assert pgr(0.3, 0.3, 0.3) is None
    assert pgr(26.58, 28.86, 23.95) is None  # a sharer below the receiver leaves no gap (not a recovery of 46%)
    # the paper's Table 9, C2C-C on ARC-C: (80.96 - 41.04) / (87.48 - 41.04) = 85.96%
    assert pgr(80.96, 41.04, 87.48) == pytest.approx(0.8596, abs=1e-4)


def test_paired_by_id_compares_only_the_items_both_answered_in_the_first_order():
    a = [{"id": "x", "correct": True}, {"id": "y", "correct": False}, {"id": "z", "correct": True}]
    b = [{"id": "z", "correct": False}, {"id": "x", "correct": True}, {"id": "w", "correct": True}]
    c = paired_by_id(a, b)
    assert (c.n, c.a_only, c.b_only) == (2, 1, 0)  # x: both right; z: only a; y and w: one side only, left out
    assert c == paired_comparison([True, True], [True, False])
    assert paired_by_id(a, [{"id": "w", "correct": True}]) is None


def test_mean_interval_against_a_hand_computation():
    low, high = mean_interval([0.25, 0.5, 0.75])  # mean 0.5, sample sd 0.25
    assert low == pytest.approx(0.5 - Z95 * 0.25 / 3**0.5) and high == pytest.approx(0.5 + Z95 * 0.25 / 3**0.5)
    assert mean_interval([0.25]) == (0.25, 0.25)
    assert mean_interval([0.0] * 12 + [1.0])[0] == 0.0  # the normal interval would reach below 0
    with pytest.raises(ValueError, match="at least one item"):
        mean_interval([])


def test_paired_comparison_of_scores_is_a_sign_test():
    result = paired_comparison([0.5, 1.0, 0.2, 0.3], [0.25, 0.0, 0.2, 0.6])
    assert result.a_only == 2 and result.b_only == 1 and result.difference == pytest.approx((0.25 + 1.0 - 0.3) / 4)
    assert result.p_value == 1.0 and result.accuracy_a == pytest.approx(0.5)
