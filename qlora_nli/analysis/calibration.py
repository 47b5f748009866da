"""Confidence and calibration from the label scores of scoring.score_labels.

The scores are log p(" <label>" | prompt) for the three labels; the probabilities here are their softmax, i.e. the
label probabilities renormalised over the three answers (the model's mass on every other continuation is dropped).
Confidence is the largest of the three, the prediction its argmax. Temperature scaling divides the scores by one
T > 0 before the softmax: it changes the confidences, never the argmax, so predictions and accuracy stay the same.

NumPy and SciPy only (no torch), so the metrics and their tests run anywhere.
"""
import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import logsumexp

from qlora_nli.analysis.stats import rounded
from qlora_nli.prompts import LABELS

# Search range of fit_temperature, as log T: from T = 0.01 (sharpen a hundredfold) to T = 100 (flatten a
# hundredfold). The fitted T runs toward a bound only when the scores carry next to no label information (large T)
# or separate the labels perfectly (small T, where the NLL flattens out at 0 and any small T is as good).
LOG_T_BOUNDS = (float(np.log(0.01)), float(np.log(100.0)))


def _scores(scores):
    array = np.asarray(scores, dtype=np.float64)
    if array.size == 0:  # [] or an (0, 3) tensor: no pairs, whatever the shape says
        return array.reshape(0, len(LABELS))
    if array.ndim != 2:
        raise ValueError(f"scores must be an (n, labels) table; got shape {array.shape}")
    return array


def label_probabilities(scores, temperature=1.0):
    """softmax(scores / T) per row, as an (n, labels) float64 array; the row maximum is subtracted first, so very
    negative log-likelihoods do not underflow to 0/0."""
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0; got {temperature}")
    scaled = _scores(scores) / temperature
    scaled = scaled - scaled.max(axis=1, keepdims=True) if len(scaled) else scaled
    exp = np.exp(scaled)
    return exp / exp.sum(axis=1, keepdims=True)


def _pairs(confidences, correct):
    conf = np.asarray(confidences, dtype=np.float64).reshape(-1)
    right = np.asarray(correct, dtype=np.float64).reshape(-1)
    if conf.shape != right.shape:
        raise ValueError(f"{conf.size} confidences but {right.size} correctness flags")
    if conf.size and not (np.all(conf >= 0) and np.all(conf <= 1)):
        raise ValueError("confidences must lie in [0, 1]")
    return conf, right


def _edges(n_bins):
    if isinstance(n_bins, bool) or not isinstance(n_bins, int) or n_bins < 1:
        raise ValueError(f"n_bins must be an integer >= 1; got {n_bins!r}")
    return np.linspace(0.0, 1.0, n_bins + 1)


def _bin_index(conf, edges):
    """Bin b holds lower < c <= upper, except the first, which also holds c = 0: so 1.0 falls in the last bin and a
    confidence exactly on an inner edge in the bin below it (edges as np.linspace gives them; lower/upper report
    them to 4 decimals)."""
    return np.clip(np.searchsorted(edges, conf, side="left") - 1, 0, len(edges) - 2)


def reliability_bins(confidences, correct, n_bins=10):
    """n_bins equal-width bins over [0, 1]: [{"lower", "upper", "n", "mean_confidence", "accuracy"}], the mean and
    accuracy None in an empty bin. Bin b is (lower, upper], the first [0, upper]."""
    edges = _edges(n_bins)
    conf, right = _pairs(confidences, correct)
    index = _bin_index(conf, edges)
    bins = []
    for b in range(n_bins):
        inside = index == b
        n = int(inside.sum())
        bins.append({
            "lower": round(float(edges[b]), 4),
            "upper": round(float(edges[b + 1]), 4),
            "n": n,
            "mean_confidence": round(float(conf[inside].mean()), 4) if n else None,
            "accuracy": round(float(right[inside].mean()), 4) if n else None,
        })
    return bins


def _ece_from_index(conf, right, index, n_bins):
    """ECE of pairs already binned (index = bin of each pair)."""
    gap = np.bincount(index, weights=conf, minlength=n_bins) - np.bincount(index, weights=right, minlength=n_bins)
    # sum_b n_b/N |acc_b - conf_b| = sum_b |sum over the bin of (conf - right)| / N
    return float(np.abs(gap).sum() / conf.size)


def expected_calibration_error(confidences, correct, n_bins=10):
    """sum over bins of n_b / N * |accuracy_b - mean confidence_b| (Guo et al. 2017, "On Calibration of Modern
    Neural Networks"), with the bins of reliability_bins; None for no pairs."""
    edges = _edges(n_bins)
    conf, right = _pairs(confidences, correct)
    if conf.size == 0:
        return None
    return _ece_from_index(conf, right, _bin_index(conf, edges), n_bins)


def ece_interval(confidences, correct, n_bins=10, n_resamples=1000, seed=0):
    """95% percentile bootstrap interval [lo, hi] of the ECE, resampling pairs with replacement (numpy default_rng
    seeded with `seed`, so the same call gives the same interval); [None, None] for no pairs.

    ECE is biased upward (bin gaps from noise never cancel), so near zero ECE the whole interval can lie above the
    point estimate; read it as the spread of the estimate, not as a test of ECE = 0.
    """
    edges = _edges(n_bins)
    conf, right = _pairs(confidences, correct)
    if conf.size == 0:
        return [None, None]
    index = _bin_index(conf, edges)
    rng = np.random.default_rng(seed)
    eces = []
    for _ in range(n_resamples):  # one resample at a time: memory stays O(N) whatever n_resamples is
        draw = rng.integers(0, conf.size, size=conf.size)
        eces.append(_ece_from_index(conf[draw], right[draw], index[draw], n_bins))
    lo, hi = np.percentile(eces, [2.5, 97.5])
    return [float(lo), float(hi)]


def _labels(labels, n):
    y = np.asarray(labels, dtype=np.int64).reshape(-1)
    if y.size != n:
        raise ValueError(f"{n} score rows but {y.size} labels")
    return y


def mean_nll(scores, labels, temperature=1.0):
    """Mean negative log-likelihood of the labels under softmax(scores / T)."""
    s = _scores(scores) / temperature
    y = _labels(labels, len(s))
    return float(np.mean(logsumexp(s, axis=1) - s[np.arange(len(s)), y]))


def fit_temperature(scores, labels):
    """The T > 0 minimising mean_nll(scores, labels, T) (Guo et al. 2017's temperature scaling).

    Bounded Brent search on log T over LOG_T_BOUNDS: the NLL is convex in 1/T, hence has a single minimum along
    log T, and the search has no random start, so the same scores give the same T. ValueError for no pairs.
    """
    s = _scores(scores)
    if s.size == 0:
        raise ValueError("fit_temperature needs at least one scored pair")
    y = _labels(labels, len(s))
    result = minimize_scalar(lambda log_t: mean_nll(s, y, float(np.exp(log_t))), bounds=LOG_T_BOUNDS,
                             method="bounded", options={"xatol": 1e-6})
    return float(np.exp(result.x))


def _mean_or_none(values):
    return rounded(values.mean()) if values.size else None


def calibration_summary(test_scores, test_labels, val_scores, val_labels, n_bins=10):
    """Calibration of the test predictions, before and after a temperature fitted on the validation pairs, as a
    JSON-ready dict (floats to 4 decimals, the temperature to 4 significant digits).

    Predictions are the argmax of the scores, which no T > 0 changes: only confidences and ECE move with T.
    """
    scores = _scores(test_scores)
    labels = _labels(test_labels, len(scores))
    temperature = fit_temperature(val_scores, val_labels)

    probs = label_probabilities(scores)
    right = (probs.argmax(axis=1) == labels).astype(np.float64)
    conf = probs.max(axis=1)
    conf_t = label_probabilities(scores, temperature).max(axis=1)
    return {
        "n": int(len(scores)),
        "n_bins": n_bins,
        "ece": rounded(expected_calibration_error(conf, right, n_bins)),
        "ece_ci95": [rounded(x) for x in ece_interval(conf, right, n_bins)],
        "mean_confidence": _mean_or_none(conf),
        "mean_confidence_right": _mean_or_none(conf[right == 1]),
        "mean_confidence_wrong": _mean_or_none(conf[right == 0]),
        "temperature": float(f"{temperature:.4g}"),
        "n_val": int(len(_scores(val_scores))),
        "ece_after_temperature": rounded(expected_calibration_error(conf_t, right, n_bins)),
        "ece_after_temperature_ci95": [rounded(x) for x in ece_interval(conf_t, right, n_bins)],
        "bins": reliability_bins(conf, right, n_bins),
        "bins_after_temperature": reliability_bins(conf_t, right, n_bins),
    }
