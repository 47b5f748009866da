"""The probes of qlora_nli/analysis/probes.py on hand-made pairs: exact strings and constructed labels."""
import pytest

from qlora_nli.analysis.probes import (
    PERTURBATIONS,
    negation_tautology,
    perturb,
    premise_as_hypothesis,
    probe_summary,
    swap_contradiction,
    tautology,
)
from qlora_nli.config import PROBES, template_has_fields
from qlora_nli.prompts import without_premise

ENT = {"id": 7, "premise": "A man sleeps on a bench.", "hypothesis": "A man rests.", "label": 0}
NEU = {"id": 8, "premise": "A dog runs.", "hypothesis": "A dog runs to its owner", "label": 1}
CON = {"id": 9, "premise": "A woman sings.", "hypothesis": "Nobody is singing!", "label": 2, "extra": "dropped"}


def test_swap_contradiction_only_for_contradiction():
    assert swap_contradiction(CON) == {"id": 9, "premise": "Nobody is singing!", "hypothesis": "A woman sings.",
                                       "label": 2}
    assert swap_contradiction(ENT) is None
    assert swap_contradiction(NEU) is None


@pytest.mark.parametrize("row", [ENT, NEU, CON])
def test_premise_as_hypothesis_is_entailment(row):
    assert premise_as_hypothesis(row) == {"id": row["id"], "premise": row["premise"], "hypothesis": row["premise"],
                                          "label": 0}


@pytest.mark.parametrize("hypothesis,expected", [
    ("A man sleeps.", "A man sleeps and true is true."),  # the clause goes before the final period
    ("A man sleeps", "A man sleeps and true is true"),  # no final mark, none added
    ("Is he asleep?", "Is he asleep and true is true?"),
    ("He waits...", "He waits and true is true..."),  # a run of marks is kept whole
    ("  A man sleeps .  ", "A man sleeps and true is true."),  # outer spaces and the space before the mark go
    ("3.5 men sleep", "3.5 men sleep and true is true"),  # an inner period is no final mark
])
def test_tautology_appends_before_the_final_mark(hypothesis, expected):
    row = {"id": 1, "premise": "P.", "hypothesis": hypothesis, "label": 1}
    assert tautology(row) == {"id": 1, "premise": "P.", "hypothesis": expected, "label": 1}


@pytest.mark.parametrize("row,expected", [
    (ENT, "A man rests and false is not true."),
    (NEU, "A dog runs to its owner and false is not true"),
    (CON, "Nobody is singing and false is not true!"),
])
def test_negation_tautology_keeps_the_label(row, expected):
    assert negation_tautology(row) == {"id": row["id"], "premise": row["premise"], "hypothesis": expected,
                                       "label": row["label"]}


def test_registry_order():
    assert list(PERTURBATIONS) == ["swap_contradiction", "premise_as_hypothesis", "tautology", "negation_tautology"]


def test_perturb_orders_by_probe_then_row_and_skips_what_does_not_apply():
    rows = [ENT, CON, NEU]
    out = perturb(rows, ["swap_contradiction", "premise_as_hypothesis"])  # the order given, not the registry's
    assert [(name, index) for name, index, _ in out] == [
        ("swap_contradiction", 1),  # only the contradiction pair
        ("premise_as_hypothesis", 0), ("premise_as_hypothesis", 1), ("premise_as_hypothesis", 2),
    ]
    assert out[0][2] == {"id": 9, "premise": "Nobody is singing!", "hypothesis": "A woman sings.", "label": 2}
    assert out[1][2] == {"id": 7, "premise": "A man sleeps on a bench.", "hypothesis": "A man sleeps on a bench.",
                         "label": 0}
    assert perturb(rows, []) == []


def test_params_know_every_probe():
    assert PROBES == ("hypothesis_only", *PERTURBATIONS)  # evaluate.probes is checked against this list


@pytest.mark.parametrize("template", ["Hypothesis: {hypothesis}\nRelation:", "{hypothesis} {{not a field}}"])
def test_hypothesis_only_template_accepted(template):
    assert template_has_fields(template, ["hypothesis"])


@pytest.mark.parametrize("template", [
    "Premise: {premise}\nHypothesis: {hypothesis}",  # sees the premise
    "Relation:",  # no hypothesis
    "{hypothesis} {hypothesis}",  # twice
    "{hypothesis!r}",  # not plain
    "{hypothesis} {label}",  # another field
    "{hypothesis",  # a lone brace
])
def test_hypothesis_only_template_refused(template):
    assert not template_has_fields(template, ["hypothesis"])


@pytest.mark.parametrize("template, expected", [
    ("Classify the relation of the hypothesis to the premise as entailment, neutral or contradiction.\n"
     "Premise: {premise}\nHypothesis: {hypothesis}\nRelation:",
     "Classify the relation of the hypothesis to the premise as entailment, neutral or contradiction.\n"
     "Hypothesis: {hypothesis}\nRelation:"),
    ("P: {premise}\nH: {hypothesis}", "H: {hypothesis}"),
    ("A {{premise}} is literal text.\nP: {premise}\nH: {hypothesis}\n",
     "A {{premise}} is literal text.\nH: {hypothesis}\n"),
    ("H: {hypothesis}\nP: {premise}\nAnswer:", "H: {hypothesis}\nAnswer:"),
    ("{premise} => {hypothesis}", None),  # one line holds both: nothing to leave out
])
def test_the_hypothesis_only_prompt_is_the_template_without_its_premise_line(template, expected):
    assert without_premise(template) == expected


def test_probe_summary_by_hand():
    # pair:            0  1  2  3     4
    original_gold = [0, 1, 2, 2, 1]
    original_preds = [0, 1, 2, 0, None]  # right: 0, 1, 2 -> original_right = 3
    probe_gold = [0, 1, 2, 2, 1]
    probe_preds = [0, 2, 2, 0, None]
    # probe right: 0, 2 -> accuracy 2/5 = 0.4
    # agree with original: 0, 2, 3 (pair 4: None agrees with nothing) -> 3/5 = 0.6
    # right on the original, wrong on the probe: pair 1 -> 1
    assert probe_summary(probe_preds, probe_gold, original_preds, original_gold) == {
        "n": 5, "accuracy": 0.4, "agreement_with_original": 0.6, "flipped_when_original_right": 1,
        "original_right": 3}


def test_probe_summary_empty_and_misaligned():
    assert probe_summary([], [], [], []) == {"n": 0, "accuracy": None, "agreement_with_original": None,
                                             "flipped_when_original_right": 0, "original_right": 0}
    with pytest.raises(ValueError):
        probe_summary([0], [0], [0, 1], [0, 1])
