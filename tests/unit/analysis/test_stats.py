import pytest
from hypothesis import given
from hypothesis import strategies as st
from scipy.stats import binomtest

from qlora_nli.analysis.stats import (
    classification_metrics,
    mcnemar_exact,
    paired_accuracy_difference,
    wilson_interval,
)


def test_wilson_known_values():
    assert wilson_interval(50, 100) == pytest.approx((0.4038, 0.5962), abs=1e-4)
    assert wilson_interval(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    assert wilson_interval(10, 10) == pytest.approx((0.7225, 1.0), abs=1e-4)
    assert wilson_interval(0, 0) == (0.0, 1.0)


@pytest.mark.parametrize("k,n", [(1, 7), (37, 50), (81, 263), (999, 1000)])
def test_wilson_matches_scipy(k, n):
    ref = binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
    assert wilson_interval(k, n) == pytest.approx((ref.low, ref.high), abs=1e-9)


@given(st.integers(1, 500).flatmap(lambda n: st.tuples(st.integers(0, n), st.just(n))))
def test_wilson_contains_estimate(kn):
    k, n = kn
    lo, hi = wilson_interval(k, n)
    assert 0.0 <= lo <= k / n <= hi <= 1.0


@pytest.mark.parametrize("b,c", [(0, 0), (0, 1), (3, 3), (6, 16), (16, 6), (2, 30), (40, 55)])
def test_mcnemar_matches_binomial_test(b, c):
    expected = 1.0 if b + c == 0 else binomtest(b, b + c, 0.5).pvalue
    assert mcnemar_exact(b, c) == pytest.approx(expected, rel=1e-12)


def test_classification_metrics_by_hand():
    gold = [0, 0, 0, 1, 1, 2, 2, 2]
    pred = [0, 0, 1, 1, None, 2, 0, None]
    m = classification_metrics(gold, pred)
    assert m["n"] == 8
    assert m["accuracy"] == 0.5  # 0, 0, 1, 2 right
    assert m["accuracy_ci95"] == [0.2152, 0.7848]  # Wilson 95% of 4/8: scipy.stats.binomtest(4, 8).proportion_ci
    assert m["confusion_matrix"] == [[2, 1, 0], [0, 1, 0], [1, 0, 1]]  # the two invalid outputs are not in it
    assert m["predicted_distribution"] == {"entailment": 3, "neutral": 2, "contradiction": 1, "invalid": 2}
    assert m["invalid_rate"] == 0.25
    # entailment: P 2/3, R 2/3; neutral: P 1/2, R 1/2 (invalid counts as a miss); contradiction: P 1, R 1/3
    assert m["per_class"]["entailment"] == {"precision": 0.6667, "recall": 0.6667, "f1": 0.6667, "support": 3}
    assert m["per_class"]["neutral"] == {"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2}
    assert m["per_class"]["contradiction"] == {"precision": 1.0, "recall": 0.3333, "f1": 0.5, "support": 3}
    assert m["macro_f1"] == round((2 / 3 + 0.5 + 0.5) / 3, 4)


def test_classification_metrics_never_predicted_class_has_zero_scores():
    m = classification_metrics([0, 1, 2], [0, 0, 0])
    assert m["per_class"]["neutral"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}


def _outcomes(both_right, corrected, regressed, both_wrong):
    base = [True] * both_right + [False] * corrected + [True] * regressed + [False] * both_wrong
    tuned = [True] * both_right + [True] * corrected + [False] * regressed + [False] * both_wrong
    return base, tuned


def test_paired_difference_reference_example():
    # Fagerland, Lydersen & Laake (2017), ch. 8, Cavo et al. (2012) table [[59, 6], [16, 80]]:
    # Newcombe square-and-add interval -0.0621 (-0.1186 to -0.0046)
    d = paired_accuracy_difference(*_outcomes(both_right=59, corrected=6, regressed=16, both_wrong=80))
    assert d["difference"] == -0.0621
    assert d["difference_ci95"] == [-0.1186, -0.0046]
    assert (d["corrected"], d["regressed"], d["both_right"], d["both_wrong"]) == (6, 16, 59, 80)
    assert d["mcnemar_p"] == pytest.approx(binomtest(6, 22, 0.5).pvalue, rel=1e-3)


def test_paired_difference_is_antisymmetric():
    up = paired_accuracy_difference(*_outcomes(59, 16, 6, 80))
    down = paired_accuracy_difference(*_outcomes(59, 6, 16, 80))
    assert up["difference"] == -down["difference"]
    assert up["difference_ci95"] == [-down["difference_ci95"][1], -down["difference_ci95"][0]]
    assert up["mcnemar_p"] == down["mcnemar_p"]


def test_paired_difference_identical_models():
    d = paired_accuracy_difference(*_outcomes(7, 0, 0, 3))
    assert d["difference"] == 0.0 and d["mcnemar_p"] == 1.0
    lo, hi = d["difference_ci95"]
    assert lo < 0 < hi  # no discordant pairs is little evidence on 10 pairs, not a zero-width interval


@given(st.lists(st.tuples(st.booleans(), st.booleans()), min_size=1, max_size=200))
def test_paired_interval_contains_difference(pairs):
    base, tuned = zip(*pairs)
    d = paired_accuracy_difference(list(base), list(tuned))
    lo, hi = d["difference_ci95"]
    assert -1.0 <= lo <= d["difference"] <= hi <= 1.0
