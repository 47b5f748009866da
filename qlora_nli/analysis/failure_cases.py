"""Which test pairs fine-tuning fixed, left wrong or broke, and what those pairs have in common: the
cases joined from both models' predictions, their slices and probe answers, the comparison and the examples."""
import logging
from pathlib import Path

from qlora_nli.analysis.calibration import label_probabilities
from qlora_nli.analysis.features import (
    confusion_pairs,
    error_rates_by_slice,
    explain,
    pair_features,
    slices_of,
    tag_features,
)
from qlora_nli.analysis.probes import HYPOTHESIS_ONLY
from qlora_nli.analysis.stats import paired_accuracy_difference
from qlora_nli.data.artifacts import prediction_row_problem, read_rows
from qlora_nli.prompts import LABELS
from qlora_nli.runtime.errors import ArtifactError

log = logging.getLogger(__name__)

BASELINE = Path("predictions/baseline.jsonl")
FINETUNED = Path("predictions/finetuned.jsonl")
PROBES = {"baseline": Path("evidence/baseline/probes.jsonl"), "finetuned": Path("evidence/finetuned/probes.jsonl")}


CATEGORIES = {  # (baseline correct, fine-tuned correct) -> category
    (False, True): "corrected",
    (False, False): "not_corrected",
    (True, False): "regressed",
    (True, True): "both_right",
}
MEANING = {
    "corrected": "baseline wrong, fine-tuned right",
    "not_corrected": "both wrong",
    "regressed": "baseline right, fine-tuned wrong",
    "both_right": "both right",
}
SELECTION_RULE = (
    "corrected: largest gain in the probability of the gold label (fine-tuned minus baseline); "
    "not_corrected and regressed: highest fine-tuned confidence in its wrong answer (the most confidently wrong). "
    "Confidence = softmax of the three label log-likelihoods; without scores (method generate) cases go by id. "
    "Ties go by id."
)


def load_predictions(path):
    rows = read_rows(path, prediction_row_problem)
    by_id = {r["id"]: r for r in rows}
    if len(by_id) != len(rows):
        raise ArtifactError(f"{path}: {len(rows) - len(by_id)} duplicate ids; rerun dvc repro")
    return by_id


def model_view(row):
    # the model's probability of each label, given that it picks one
    probs = None if row["scores"] is None else label_probabilities([row["scores"]])[0].tolist()
    pred = row["pred"]
    return {
        "pred": pred,
        "pred_label": "invalid" if pred is None else LABELS[pred],
        "correct": pred == row["label"],
        "scores": row["scores"],
        "probabilities": None if probs is None else [round(p, 4) for p in probs],
        "confidence": None if probs is None or pred is None else round(probs[pred], 4),
        "generation": row.get("generation"),
    }


def build_case(base, tuned):
    feats = pair_features(base["premise"], base["hypothesis"])
    b, t = model_view(base), model_view(tuned)
    gain = None
    if b["probabilities"] and t["probabilities"]:
        gain = round(t["probabilities"][base["label"]] - b["probabilities"][base["label"]], 4)
    return {
        "id": base["id"],
        "premise": base["premise"],
        "hypothesis": base["hypothesis"],
        "gold": base["label"],
        "gold_label": LABELS[base["label"]],
        "category": CATEGORIES[(b["correct"], t["correct"])],
        "baseline": b,
        "finetuned": t,
        "gold_probability_gain": gain,
        "features": feats,
        "slices": slices_of(feats, base["label"]),
        "tags": tag_features(feats),
    }


def join(base, tuned):
    if base.keys() != tuned.keys():
        raise ArtifactError(f"{BASELINE} and {FINETUNED}: ids differ ({len(base.keys() - tuned.keys())} only in baseline, "
                            f"{len(tuned.keys() - base.keys())} only in finetuned); rerun dvc repro")
    for i in base:
        if any(base[i][k] != tuned[i][k] for k in ("premise", "hypothesis", "label")):
            raise ArtifactError(f"{BASELINE} and {FINETUNED}: id {i} has a different premise, hypothesis or label; "
                                "rerun dvc repro")
    return [build_case(base[i], tuned[i]) for i in sorted(base)]


def probe_row_problem(row):
    problem = prediction_row_problem(row)
    if problem:
        return problem
    if not isinstance(row.get("probe"), str) or not isinstance(row.get("test_index"), int):
        return "missing 'probe' (a name) or 'test_index' (an integer)"
    return None


def attach_probes(cases, test_order):
    """Each case gains {probe: {"gold", "baseline", "finetuned"}} (predicted label ids on the probe pair) and tags
    for what the probes show; `test_order` is the ids in the order evaluate scored the test pairs."""
    by_id = {c["id"]: c for c in cases}
    for model, path in PROBES.items():
        for row in read_rows(path, probe_row_problem, allow_empty=True):
            if not 0 <= row["test_index"] < len(test_order):
                raise ArtifactError(f"{path}: test_index {row['test_index']} is outside the test predictions; "
                                    "rerun dvc repro")
            case = by_id[test_order[row["test_index"]]]
            case.setdefault("probes", {}).setdefault(row["probe"], {"gold": row["label"]})[model] = row["pred"]
    for c in cases:
        c.setdefault("probes", {})
        alone = c["probes"].get(HYPOTHESIS_ONLY, {})
        if alone.get("finetuned") is not None and alone["finetuned"] == c["gold"] and c["category"] == "corrected":
            c["tags"].append("fine-tuned right from the hypothesis alone: possibly an annotation artifact, not inference")
        elif alone and alone.get("finetuned") == c["finetuned"]["pred"]:
            c["tags"].append("fine-tuned gives the same answer from the hypothesis alone")
        for probe, answers in c["probes"].items():
            if probe != HYPOTHESIS_ONLY and c["finetuned"]["correct"] and answers.get("finetuned") != answers["gold"]:
                c["tags"].append(f"fine-tuned flips under {probe.replace('_', ' ')}")


def probe_evidence(cases, by_category):
    """Counts behind the probe claims, per category and per probe."""
    hypothesis_only = {}
    for category, members in by_category.items():
        with_probe = [c for c in members if "finetuned" in c["probes"].get(HYPOTHESIS_ONLY, {})]
        hypothesis_only[category] = {
            "n": len(with_probe),
            "same_answer_as_full": sum(c["probes"][HYPOTHESIS_ONLY]["finetuned"] == c["finetuned"]["pred"]
                                       for c in with_probe),
            "right_from_hypothesis_alone": sum(c["probes"][HYPOTHESIS_ONLY]["finetuned"] == c["gold"]
                                               for c in with_probe),
        }
    flips = {}
    for probe in sorted({p for c in cases for p in c["probes"]} - {HYPOTHESIS_ONLY}):
        for model in ("baseline", "finetuned"):
            pairs = [c for c in cases if model in c["probes"].get(probe, {})]
            right = [c for c in pairs if c[model]["correct"]]
            flips.setdefault(probe, {})[model] = {
                "n": len(pairs), "probe_right": sum(c["probes"][probe][model] == c["probes"][probe]["gold"]
                                                    for c in pairs),
                "original_right": len(right),
                "flipped": sum(c["probes"][probe][model] != c["probes"][probe]["gold"] for c in right)}
    return {"hypothesis_only": hypothesis_only, "probes": flips}


def evidence_claims(evidence):
    """One sentence per measured fact, each with its number and its n."""
    claims = []
    corrected = evidence[HYPOTHESIS_ONLY].get("corrected", {})
    if corrected.get("n"):
        claims.append(f"{corrected['right_from_hypothesis_alone']} of the {corrected['n']} corrected pairs are also "
                      "right for the fine-tuned model from the hypothesis alone (premise left out): for those, "
                      "the fix may come from hypothesis words, not from inference.")
    for category in ("corrected", "not_corrected", "regressed", "both_right"):
        h = evidence[HYPOTHESIS_ONLY].get(category, {})
        if h.get("n"):
            claims.append(f"{MEANING[category].capitalize()} ({category}): the fine-tuned answer equals its "
                          f"hypothesis-only answer on {h['same_answer_as_full']} of {h['n']} pairs.")
    for probe, models in evidence["probes"].items():
        t, b = models.get("finetuned"), models.get("baseline")
        if t and t["n"]:
            claims.append(f"{probe.replace('_', ' ').capitalize()}: the fine-tuned model is right on {t['probe_right']} "
                          f"of {t['n']} probe pairs (baseline {b['probe_right'] if b else 'n/a'}), and flips "
                          f"{t['flipped']} of the {t['original_right']} it got right on the original pair.")
    return claims


def select(cases, category, n):
    def strength(c):  # None without scores (method "generate"): those cases sort last, in id order
        return c["gold_probability_gain"] if category == "corrected" else c["finetuned"]["confidence"]

    return sorted(cases, key=lambda c: (strength(c) is None, -(strength(c) or 0.0), c["id"]))[:n]


def analyse(n_examples):
    """(failure_cases.json's document, comparison.json's, the `n_examples` shown per category) from both models'
    predictions and probe answers."""
    log.info("joining %s and %s", BASELINE, FINETUNED)
    cases = join(load_predictions(BASELINE), load_predictions(FINETUNED))
    rows = [{"premise": c["premise"], "hypothesis": c["hypothesis"], "label": c["gold"],
             "baseline_correct": c["baseline"]["correct"], "finetuned_correct": c["finetuned"]["correct"]}
            for c in cases]
    slices = error_rates_by_slice(rows)
    attach_probes(cases, [r["id"] for r in read_rows(BASELINE, prediction_row_problem)])
    for c in cases:
        # a corrected pair is explained by why the baseline failed; the others by why the fine-tuned model fails
        c["explanation"] = explain(c["slices"], slices, "baseline" if c["category"] == "corrected" else "finetuned")

    by_category = {k: [c for c in cases if c["category"] == k] for k in CATEGORIES.values()}
    paired = paired_accuracy_difference([c["baseline"]["correct"] for c in cases],
                                        [c["finetuned"]["correct"] for c in cases])
    n = len(cases)
    comparison = {
        "n": n,
        "baseline_accuracy": round(sum(r["baseline_correct"] for r in rows) / n, 4),
        "finetuned_accuracy": round(sum(r["finetuned_correct"] for r in rows) / n, 4),
        **paired,
    }
    evidence = probe_evidence(cases, by_category)
    evidence["claims"] = evidence_claims(evidence)
    gold = [c["gold"] for c in cases]
    result = {
        "n": n,
        "counts": {k: len(v) for k, v in by_category.items()},
        "selection_rule": SELECTION_RULE,
        "slices": slices,
        "confusion_pairs": {m: confusion_pairs(gold, [c[m]["pred"] for c in cases]) for m in ("baseline", "finetuned")},
        "evidence": evidence,
        **{k: by_category[k] for k in ("corrected", "not_corrected", "regressed")},
    }
    examples = {k: select(by_category[k], k, n_examples) for k in ("corrected", "not_corrected", "regressed")}
    return result, comparison, examples
