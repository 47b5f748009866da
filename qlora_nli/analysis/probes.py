"""Label-preserving probes: test pairs rewritten so that the gold label is known by construction.

A model that understands the relation keeps its answer (or moves to the constructed label) on these pairs; a model
that leans on surface cues does not. Each probe maps one row {"id", "premise", "hypothesis", "label"} to a new row
with the same id and the constructed gold label, or to None where its rule does not apply to that row.

Pure Python (no torch), like stats.py, so the probes and their statistics run and are tested anywhere.
"""
import re

from qlora_nli.analysis.stats import rounded

ENTAILMENT, NEUTRAL, CONTRADICTION = 0, 1, 2  # qlora_nli.prompts.LABELS order

# Sentence-final punctuation at the end of a hypothesis: the appended clause goes before it, so the rewritten
# hypothesis is still one sentence that ends as the original did.
_FINAL_MARKS = re.compile(r"[.!?]+$")


def _row(row, premise, hypothesis, label):
    return {"id": row["id"], "premise": premise, "hypothesis": hypothesis, "label": label}


def _append_clause(hypothesis, clause):
    """hypothesis with " <clause>" appended before its final punctuation, if any.

    Surrounding whitespace is dropped; a run of final marks (".", "!", "?", also "..." or "?!") stays at the end as
    it was: "A man sleeps." -> "A man sleeps and true is true.", "A man sleeps" -> "A man sleeps and true is true".
    """
    text = hypothesis.strip()
    match = _FINAL_MARKS.search(text)
    end = match.group(0) if match else ""
    body = text[:len(text) - len(end)].rstrip()
    return (body + " " + clause).lstrip() + end


def swap_contradiction(row):
    """Contradiction only: premise and hypothesis swapped, still contradiction (None for other labels).

    Contradiction is symmetric, entailment and neutral are not: Minervini & Riedel (2018), "Adversarially
    Regularising Neural NLI Models to Integrate Logical Background Knowledge".
    """
    if row["label"] != CONTRADICTION:
        return None
    return _row(row, row["hypothesis"], row["premise"], CONTRADICTION)


def premise_as_hypothesis(row):
    """Every row: the premise as its own hypothesis, entailment.

    Entailment is reflexive: Minervini & Riedel (2018), "Adversarially Regularising Neural NLI Models to Integrate
    Logical Background Knowledge".
    """
    return _row(row, row["premise"], row["premise"], ENTAILMENT)


def tautology(row):
    """Every row: " and true is true" appended to the hypothesis (before its final punctuation), label unchanged.

    A tautology adds words without changing the relation: the word-overlap test of Naik et al. (2018), "Stress Test
    Evaluation for Natural Language Inference".
    """
    return _row(row, row["premise"], _append_clause(row["hypothesis"], "and true is true"), row["label"])


def negation_tautology(row):
    """Every row: " and false is not true" appended to the hypothesis (before its final punctuation), label unchanged.

    A negation word that changes nothing: the negation test of Naik et al. (2018), "Stress Test Evaluation for Natural
    Language Inference".
    """
    return _row(row, row["premise"], _append_clause(row["hypothesis"], "and false is not true"), row["label"])


PERTURBATIONS = {
    "swap_contradiction": swap_contradiction,
    "premise_as_hypothesis": premise_as_hypothesis,
    "tautology": tautology,
    "negation_tautology": negation_tautology,
}


# The probe that is a prompt rather than a perturbation: the test pair without its premise
# (evaluate.hypothesis_only_template)
HYPOTHESIS_ONLY = "hypothesis_only"
NAMES = (HYPOTHESIS_ONLY, *PERTURBATIONS)  # every probe evaluate.probes may name, in the order of params.yaml


def perturb(rows, names):
    """[(probe_name, source_index, new_row)] for every named probe (in the order given; params.py checks the names of
    evaluate.probes) and every row it applies to (in the order of `rows`; source_index is the row's index in `rows`)."""
    out = []
    for name in names:
        probe = PERTURBATIONS[name]
        for index, row in enumerate(rows):
            new = probe(row)
            if new is not None:
                out.append((name, index, new))
    return out


def probe_summary(probe_preds, probe_gold, original_preds, original_gold):
    """Accuracy on the probe pairs and how they relate to the original pairs they were made from (aligned lists).

    A prediction of None (an output that could not be parsed) is wrong and agrees with nothing, not even another
    None. "flipped_when_original_right" counts pairs the model got right in the original form but wrong in the
    probe form: the failures a probe exists to find.
    """
    n = len(probe_preds)
    if not (len(probe_gold) == len(original_preds) == len(original_gold) == n):
        raise ValueError(f"probe_summary needs aligned lists; got {n} probe predictions, {len(probe_gold)} probe "
                         f"labels, {len(original_preds)} original predictions, {len(original_gold)} original labels")
    probe_right = [p is not None and p == g for p, g in zip(probe_preds, probe_gold)]
    original_right = [p is not None and p == g for p, g in zip(original_preds, original_gold)]
    agree = [p is not None and p == o for p, o in zip(probe_preds, original_preds)]
    return {
        "n": n,
        "accuracy": rounded(sum(probe_right) / n) if n else None,
        "agreement_with_original": rounded(sum(agree) / n) if n else None,
        "flipped_when_original_right": sum(o and not p for o, p in zip(original_right, probe_right)),
        "original_right": sum(original_right),
    }
