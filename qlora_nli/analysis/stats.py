"""Accuracy with uncertainty: a 100-pair test set moves accuracy by 1 point per pair, so every number gets an interval.

Pure Python (no torch), so the metrics and their tests run anywhere.
"""
import math

from qlora_nli.prompts import LABELS

Z95 = 1.959963984540054  # standard normal quantile for a two-sided 95% interval


def rounded(x, digits=4):
    """`x` as a float rounded for a metrics file (None stays None)."""
    return None if x is None else round(float(x), digits)


def wilson_interval(k, n, z=Z95):
    """Wilson score interval for k successes in n trials, as fractions.

    Unlike the Wald interval it stays inside [0, 1] and keeps its coverage near 0% and 100% accuracy.
    n = 0 carries no information: the interval is all of [0, 1].
    """
    if n == 0:
        return 0.0, 1.0
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    # the limits are exactly 0 and 1 at k = 0 and k = n; floating point would leave 1e-16 gaps
    return (0.0 if k == 0 else centre - half), (1.0 if k == n else centre + half)


def _f1(precision, recall):
    return 2 * precision * recall / (precision + recall) if precision + recall else 0.0


def classification_metrics(gold, pred):
    """Accuracy (with Wilson 95% interval), per-class and macro F1, confusion matrix, output distribution.

    pred[i] is None when the model's output could not be parsed: it counts as wrong for accuracy and recall,
    it is left out of the confusion matrix, and it is counted under "invalid".
    """
    if len(gold) != len(pred):
        raise ValueError(f"gold has {len(gold)} labels but pred has {len(pred)}")
    n = len(gold)
    if n == 0:
        raise ValueError("no predictions to score")
    k = len(LABELS)
    matrix = [[0] * k for _ in range(k)]
    invalid = 0
    for g, p in zip(gold, pred):
        if p is None:
            invalid += 1
        else:
            matrix[g][p] += 1
    correct = sum(matrix[i][i] for i in range(k))

    per_class, f1s = {}, []
    for i, name in enumerate(LABELS):
        support = sum(1 for g in gold if g == i)  # includes invalid outputs: they are misses for recall
        predicted = sum(matrix[g][i] for g in range(k))
        precision = matrix[i][i] / predicted if predicted else 0.0
        recall = matrix[i][i] / support if support else 0.0
        f1s.append(_f1(precision, recall))
        per_class[name] = {"precision": rounded(precision), "recall": rounded(recall), "f1": rounded(f1s[-1]), "support": support}

    lo, hi = wilson_interval(correct, n)
    distribution = {name: sum(matrix[g][i] for g in range(k)) for i, name in enumerate(LABELS)}
    distribution["invalid"] = invalid
    return {
        "n": n,
        "accuracy": rounded(correct / n),
        "accuracy_ci95": [rounded(lo), rounded(hi)],
        "macro_f1": rounded(sum(f1s) / k),
        "per_class": per_class,
        "confusion_matrix": matrix,
        "predicted_distribution": distribution,
        "invalid_rate": rounded(invalid / n),
    }


def mcnemar_exact(b, c):
    """Two-sided exact McNemar test: under H0 the b + c discordant pairs split Binomial(b + c, 1/2)."""
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(b, c) + 1))
    return min(1.0, 2 * tail / 2**n)  # exact integer arithmetic, then one division


def paired_accuracy_difference(base_correct, tuned_correct, z=Z95):
    """Accuracy gain of the fine-tuned model over the baseline on the same pairs, with a paired 95% interval.

    The interval is Newcombe's (1998) method 10 for paired proportions: Wilson score limits of each
    accuracy, combined by square-and-add with the phi correlation of the 2x2 table (phi continuity-corrected
    as in the paper). It respects [-1, 1] and, unlike Wald, does not collapse to a point when the
    models disagree on few pairs. Reference values: Fagerland, Lydersen & Laake (2017), ch. 8.
    """
    if len(base_correct) != len(tuned_correct):
        raise ValueError(f"{len(base_correct)} baseline vs {len(tuned_correct)} fine-tuned outcomes")
    n = len(base_correct)
    if n == 0:
        raise ValueError("no paired outcomes")
    pairs = list(zip(map(bool, base_correct), map(bool, tuned_correct)))
    both_right = pairs.count((True, True))
    corrected = pairs.count((False, True))
    regressed = pairs.count((True, False))
    both_wrong = pairs.count((False, False))

    tuned_right, base_right = both_right + corrected, both_right + regressed
    p1, p2 = tuned_right / n, base_right / n
    l1, u1 = wilson_interval(tuned_right, n, z)
    l2, u2 = wilson_interval(base_right, n, z)
    margins = tuned_right * (n - tuned_right) * base_right * (n - base_right)
    phi = 0.0  # correlation of the two models' outcomes; agreement narrows the interval
    if margins:
        a = both_right * both_wrong - corrected * regressed  # positive a is shrunk by n/2, as Newcombe does
        phi = (a - n / 2 if a > n / 2 else min(a, 0)) / math.sqrt(margins)
    d = p1 - p2
    lo = d - math.sqrt(max(0.0, (p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2))
    hi = d + math.sqrt(max(0.0, (u1 - p1) ** 2 - 2 * phi * (u1 - p1) * (p2 - l2) + (p2 - l2) ** 2))
    return {
        "difference": rounded(d),
        "difference_ci95": [rounded(max(-1.0, lo)), rounded(min(1.0, hi))],
        "ci_method": "Newcombe (1998) method 10: Wilson score limits combined for paired data",
        "corrected": corrected,
        "regressed": regressed,
        "both_right": both_right,
        "both_wrong": both_wrong,
        # 4 significant digits, not 4 decimals: a small p stays visible
        "mcnemar_p": float(f"{mcnemar_exact(corrected, regressed):.4g}"),
    }
