import pytest

from qlora_nli.analysis.features import (
    confusion_pairs,
    error_rates_by_slice,
    explain,
    has_negation,
    length_bucket,
    overlap_bucket,
    pair_features,
    slices_of,
    tag_features,
)

# made-up pairs, not from SNLI


@pytest.mark.parametrize("text", [
    "The cat is not asleep.", "The cat isn't asleep.", "Nobody is in the kitchen.", "The cat never sleeps.",
    "There is nothing on the table.", "NO dogs are barking.", "He can't swim.", "Neither child is running.",
])
def test_negation_found(text):
    assert has_negation(text)


@pytest.mark.parametrize("text", ["A sailor ties a knot.", "The notebook is on a nose.", "Snow covers the town."])
def test_negation_not_fooled_by_substrings(text):
    assert not has_negation(text)


def test_overlap_and_new_words():
    f = pair_features("A woman rides a red bicycle down the hill.", "The woman rides two bicycles!")
    # content words: woman, rides, two, bicycles; "bicycles" matches "bicycle" by plural folding
    assert f["new_words"] == ["two"]
    assert f["word_overlap"] == 0.75
    assert f["hypothesis_length"] == 5
    assert f["has_negation"] is False


def test_overlap_ignores_case_punctuation_and_repeats():
    f = pair_features("Children, laughing, chase a ball.", "CHILDREN chase... children chase a BALL")
    assert f["new_words"] == [] and f["word_overlap"] == 1.0


def test_negation_word_counts_as_new_content():
    f = pair_features("A man sings.", "A man does not sing loudly.")
    assert f["new_words"] == ["not", "loudly"]  # "sing" matches "sings" by the same s-folding
    assert f["word_overlap"] == 0.5


def test_hypothesis_of_only_stopwords_has_full_overlap():
    assert pair_features("A dog runs.", "It is there.")["word_overlap"] == 1.0


def test_bucket_boundaries():
    assert [overlap_bucket(x) for x in (0.0, 0.4999, 0.5, 0.7999, 0.8, 1.0)] == ["low", "low", "mid", "mid",
                                                                                "high", "high"]
    assert [length_bucket(n) for n in (1, 5, 6, 10, 11)] == ["short", "short", "medium", "medium", "long"]


def test_slices_and_tags():
    f = pair_features("A boy kicks a ball in a park.", "A boy is not kicking anything.")
    assert slices_of(f) == {"overlap": "low", "negation": "yes", "length": "medium"}
    assert slices_of(f, 2)["gold label"] == "contradiction"
    assert tag_features(f) == ["negation in hypothesis", "low overlap (25%)", "medium hypothesis (6 words)",
                               "3 new words: not, kicking, anything"]
    same = pair_features("A boy kicks a ball.", "A boy kicks.")
    assert tag_features(same) == ["high overlap (100%)", "short hypothesis (3 words)", "no new words"]


def _row(premise, hypothesis, label, base_ok, tuned_ok):
    return {"premise": premise, "hypothesis": hypothesis, "label": label,
            "baseline_correct": base_ok, "finetuned_correct": tuned_ok}


ROWS = [
    _row("A girl reads a book.", "A girl does not read.", 2, False, True),     # negation, low overlap
    _row("A girl reads a book.", "Nobody reads.", 2, False, False),             # negation, mid overlap
    _row("A girl reads a book.", "A girl reads.", 0, True, True),               # high overlap
    _row("A girl reads a book.", "A girl reads a long novel at home.", 1, True, False),  # low overlap
]


def test_error_rates_by_slice():
    table = {(r["slice"], r["value"]): r for r in error_rates_by_slice(ROWS)}
    assert table[("all", "all")] == {"slice": "all", "value": "all", "n": 4, "baseline_errors": 2,
                                     "finetuned_errors": 2, "baseline_error": 0.5, "finetuned_error": 0.5}
    assert table[("negation", "yes")] == {"slice": "negation", "value": "yes", "n": 2, "baseline_errors": 2,
                                          "finetuned_errors": 1, "baseline_error": 1.0, "finetuned_error": 0.5}
    assert table[("negation", "no")]["baseline_error"] == 0.0
    assert table[("gold label", "contradiction")]["n"] == 2
    assert ("gold label", "neutral") in table and ("length", "long") not in table  # empty slices are left out
    assert error_rates_by_slice(ROWS)[0]["slice"] == "all"


def test_confusion_pairs_counts_only_wrong_predictions():
    pairs = confusion_pairs([0, 0, 1, 2, 2, 2], [0, 1, 2, 0, 0, None])
    assert pairs == {"contradiction -> entailment": 2, "contradiction -> invalid": 1,
                     "entailment -> neutral": 1, "neutral -> contradiction": 1}


def test_explain_cites_only_clearly_worse_slices():
    slices = [
        {"slice": "all", "value": "all", "n": 100, "baseline_error": 0.4, "finetuned_error": 0.2},
        {"slice": "negation", "value": "yes", "n": 20, "baseline_error": 0.7, "finetuned_error": 0.45},
        {"slice": "overlap", "value": "high", "n": 40, "baseline_error": 0.5, "finetuned_error": 0.25},
        {"slice": "length", "value": "long", "n": 3, "baseline_error": 1.0, "finetuned_error": 1.0},
    ]
    case = {"negation": "yes", "overlap": "high", "length": "long"}
    text = explain(case, slices, "finetuned")
    assert "negation = yes (20 pairs) 45%" in text and "vs 20% overall" in text
    assert "overlap" not in text  # 25% is under 10 points above 20%
    assert "length" not in text  # 3 pairs are too few to be evidence
    assert "baseline error rate" in explain(case, slices, "baseline").lower()
    none = explain({"overlap": "high"}, slices, "finetuned")
    assert "do not explain" in none
