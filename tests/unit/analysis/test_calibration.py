"""qlora_nli/analysis/calibration.py on hand-made scores and on scores whose calibration is known by construction."""
import numpy as np
import pytest
from helpers.calibration import reference_temperature

from qlora_nli.analysis.calibration import (
    LOG_T_BOUNDS,
    calibration_summary,
    ece_interval,
    expected_calibration_error,
    fit_temperature,
    label_probabilities,
    mean_nll,
    reliability_bins,
)

# n_bins = 5: edges 0, 0.2, 0.4, 0.6, 0.8, 1; bins [0, 0.2], (0.2, 0.4], (0.4, 0.6], (0.6, 0.8], (0.8, 1]
CONF = [0.1, 0.2, 0.5, 0.9, 1.0, 0.85]
RIGHT = [0, 1, 1, 1, 0, 1]
# bin 0: 0.1 and 0.2 (on the edge: upper is inclusive) -> n 2, confidence 0.15, accuracy 0.5, gap 0.35
# bin 1: empty
# bin 2: 0.5 -> n 1, confidence 0.5, accuracy 1, gap 0.5
# bin 3: empty
# bin 4: 0.9, 1.0 (exactly 1: last bin), 0.85 -> n 3, confidence 2.75/3 = 0.9167, accuracy 2/3 = 0.6667, gap 0.25
# ECE = 2/6 * 0.35 + 1/6 * 0.5 + 3/6 * 0.25 = (0.7 + 0.5 + 0.75) / 6 = 1.95 / 6 = 0.325


def test_reliability_bins_by_hand():
    assert reliability_bins(CONF, RIGHT, n_bins=5) == [
        {"lower": 0.0, "upper": 0.2, "n": 2, "mean_confidence": 0.15, "accuracy": 0.5},
        {"lower": 0.2, "upper": 0.4, "n": 0, "mean_confidence": None, "accuracy": None},
        {"lower": 0.4, "upper": 0.6, "n": 1, "mean_confidence": 0.5, "accuracy": 1.0},
        {"lower": 0.6, "upper": 0.8, "n": 0, "mean_confidence": None, "accuracy": None},
        {"lower": 0.8, "upper": 1.0, "n": 3, "mean_confidence": 0.9167, "accuracy": 0.6667},
    ]


def test_ece_by_hand():
    assert expected_calibration_error(CONF, RIGHT, n_bins=5) == pytest.approx(0.325, abs=1e-12)
    assert expected_calibration_error([], [], n_bins=5) is None


def test_bins_reject_bad_input():
    with pytest.raises(ValueError):
        reliability_bins([1.2], [1])
    with pytest.raises(ValueError):
        expected_calibration_error([0.5, 0.6], [1])


def test_label_probabilities_stable_and_sum_to_one():
    scores = [[0.0, -1.0, -2.0], [-1000.0, -1001.0, -1002.0]]  # same differences: same probabilities
    p = label_probabilities(scores)
    e = np.exp([0.0, -1.0, -2.0])
    assert p == pytest.approx(np.vstack([e / e.sum()] * 2), abs=1e-12)
    assert label_probabilities(scores, 2.0)[0] == pytest.approx(np.exp([0, -0.5, -1]) / np.exp([0, -0.5, -1]).sum())
    assert label_probabilities([]).shape == (0, 3)


def _sampled(seed, n=20000):
    """Scores and labels drawn from softmax(scores): calibrated by construction (T = 1 is the true temperature)."""
    rng = np.random.default_rng(seed)
    scores = rng.normal(size=(n, 3)) * 2
    p = label_probabilities(scores)
    labels = (rng.random(n)[:, None] > np.cumsum(p, axis=1)).sum(axis=1)
    return scores, labels


def test_fit_temperature_recovers_the_true_temperature():
    scores, labels = _sampled(seed=0)
    # the tolerance is a few times the seed-to-seed spread of the fitted T at this n (the labels are random draws)
    assert fit_temperature(scores, labels) == pytest.approx(1.0, rel=0.03)
    # scores three times too sharp: the fit must divide them by about 3
    t = fit_temperature(3 * scores, labels)
    assert t == pytest.approx(3.0, rel=0.03)
    nll = mean_nll(3 * scores, labels, t)
    for other in (1.0, t * 1.1, t / 1.1):
        assert nll <= mean_nll(3 * scores, labels, other)
    assert LOG_T_BOUNDS[0] < np.log(t) < LOG_T_BOUNDS[1]


def test_fit_temperature_empty_and_equal_to_a_grid_search():
    with pytest.raises(ValueError):
        fit_temperature([], [])
    scores, labels = _sampled(seed=1, n=500)
    rows = [{"scores": s, "label": y} for s, y in zip((2.5 * scores).tolist(), labels.tolist())]
    assert fit_temperature(2.5 * scores, labels) == pytest.approx(reference_temperature(rows), rel=2e-3)


def _overconfident(seed, n=2000):
    """Confidences and correctness of scores three times too sharp: ECE well above 0, where the bootstrap of the
    ECE is not lopsided."""
    scores, labels = _sampled(seed, n)
    p = label_probabilities(3 * scores)
    return p.max(axis=1), p.argmax(axis=1) == labels


def test_ece_interval_contains_the_estimate_and_is_deterministic():
    conf, right = _overconfident(seed=2)
    ece = expected_calibration_error(conf, right)
    lo, hi = ece_interval(conf, right, n_resamples=300, seed=5)
    assert lo <= ece <= hi and lo < hi
    # its width matches the spread of the ECE over fresh samples of the same size: a 95% interval is about
    # 2 * 1.96 standard deviations wide; the bounds leave room for the noise of both estimates
    spread = np.std([expected_calibration_error(*_overconfident(seed=100 + i)) for i in range(100)])
    assert 0.6 < (hi - lo) / (2 * 1.96 * spread) < 1.5
    assert ece_interval(conf, right, n_resamples=300, seed=5) == [lo, hi]
    assert ece_interval(conf, right, n_resamples=300, seed=6) != [lo, hi]
    assert ece_interval([], []) == [None, None]


def test_calibration_summary():
    val_scores, val_labels = _sampled(seed=3, n=3000)
    test_scores, test_labels = _sampled(seed=4, n=1000)
    s = calibration_summary(3 * test_scores, test_labels, 3 * val_scores, val_labels, n_bins=10)
    assert s["n"] == 1000 and s["n_val"] == 3000 and s["n_bins"] == 10
    assert s["temperature"] == pytest.approx(3.0, rel=0.1)
    # over-confident before, much closer after: temperature scaling is what the ECE drop comes from
    assert s["ece_after_temperature"] < s["ece"] / 2
    assert s["ece_ci95"][0] <= s["ece"] <= s["ece_ci95"][1]
    assert s["mean_confidence_wrong"] < s["mean_confidence"] < s["mean_confidence_right"]
    # T moves confidences, never predictions: the same pairs are right, so each binning covers all pairs with the
    # same overall accuracy
    for key in ("bins", "bins_after_temperature"):
        bins = [b for b in s[key] if b["n"]]
        assert sum(b["n"] for b in s[key]) == 1000
        accuracy = sum(b["n"] * b["accuracy"] for b in bins) / 1000
        right = (test_scores.argmax(axis=1) == test_labels).mean()
        assert accuracy == pytest.approx(right, abs=1e-3)
    for value in (s["ece"], s["mean_confidence"], *s["ece_ci95"], s["bins"][-1]["mean_confidence"]):
        assert value == round(value, 4)
