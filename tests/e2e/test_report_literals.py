"""failure_cases and report against numbers worked out by hand, written here as literals.

The other report tests build their expectations with the project's own statistics and formatters, so a wrong formula
would agree with itself. Here the expected numbers were computed independently: accuracies and slice error rates by
counting the table below, Wilson intervals and the McNemar p-value with scipy.stats.binomtest, and the paired
interval from Newcombe (1998), method 10, written out separately from qlora_nli.analysis.stats.
"""
import pytest
import yaml
from helpers.artifacts import REPO, read, run_ok, train_metrics, write
from tiny import TINY_SAFETENSORS

from qlora_nli.analysis.stats import classification_metrics

# (id, premise, hypothesis, gold, baseline pred, fine-tuned pred); made up, not SNLI. Slices by hand (overlap of the
# hypothesis' content words with the premise; negation word; hypothesis length in words):
PAIRS = [
    (1, "A dog runs in a park.", "A dog runs.", 0, 0, 0),                        # high, no, short: both right
    (2, "A man reads a book.", "A man reads a book.", 0, 1, 0),                  # high, no, short: corrected
    (3, "A woman cooks soup.", "Some people watch fireworks near the city tonight.", 1, 0, 1),  # low, no, medium: corr.
    (4, "A cat sleeps.", "Nobody is here.", 2, 0, 2),                            # low, yes, short: corrected
    (5, "The man is not running.", "The man is not running.", 0, 2, 2),          # high, yes, short: both wrong
    (6, "A dog barks.", "Several tourists photograph colorful birds beside an enormous waterfall during summer "
                        "vacation.", 1, 1, 1),                                   # low, no, long (12): both right
    (7, "Kids play football outside.", "Kids play football.", 0, 0, 2),          # high, no, short: regressed
    (8, "A girl sings.", "Nothing happens.", 2, 2, 2),                           # low, yes, short: both right
    (9, "A chef bakes bread.", "A chef bakes bread for hungry guests at a wedding party.", 1, 1, 1),  # 3/7 low, long
    (10, "Two birds fly south.", "No birds fly.", 2, 1, 0),                      # 2/3 mid, yes, short: both wrong
    (11, "A horse jumps a fence.", "A horse jumps.", 0, 0, 0),                   # high, no, short: both right
    (12, "People wait for a bus.", "Nobody waits.", 2, 2, 2),                    # 1/2 mid, yes, short: both right
]

# baseline right 7/12, fine-tuned right 9/12; both right 6, corrected 3, regressed 1, both wrong 2
BASELINE_CI = [0.3195, 0.8067]  # Wilson 95%, 7 of 12
FINETUNED_CI = [0.4677, 0.9111]  # Wilson 95%, 9 of 12
COMPARISON = {
    "n": 12, "baseline_accuracy": 0.5833, "finetuned_accuracy": 0.75,
    "difference": 0.1667, "difference_ci95": [-0.1758, 0.462],  # Newcombe 10: phi = (ad - bc - n/2)/sqrt(...) = 0.0976
    "corrected": 3, "regressed": 1, "both_right": 6, "both_wrong": 2,
    "mcnemar_p": 0.625,  # 2 * P(Binomial(4, 1/2) <= 1) = 2 * 5/16
}
SLICES = [  # (slice, value, pairs, baseline error, fine-tuned error)
    ("all", "all", 12, 0.4167, 0.25),
    ("overlap", "low", 5, 0.4, 0.0), ("overlap", "mid", 2, 0.5, 0.5), ("overlap", "high", 5, 0.4, 0.4),
    ("negation", "yes", 5, 0.6, 0.4), ("negation", "no", 7, 0.2857, 0.1429),
    ("length", "short", 9, 0.4444, 0.3333), ("length", "medium", 1, 1.0, 0.0), ("length", "long", 2, 0.0, 0.0),
    ("gold label", "entailment", 5, 0.4, 0.4), ("gold label", "neutral", 3, 0.3333, 0.0),
    ("gold label", "contradiction", 4, 0.5, 0.25),
]


@pytest.fixture
def workdir(tmp_path):
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    gold = [p[3] for p in PAIRS]
    for which, column in (("baseline", 4), ("finetuned", 5)):
        preds = [p[column] for p in PAIRS]
        write(tmp_path / f"predictions/{which}.jsonl", [
            {"id": i, "premise": premise, "hypothesis": hypothesis, "label": g, "pred": pred,
             "scores": [-1.0 if k == pred else -3.0 for k in range(3)], "correct": pred == g, "generation": None}
            for (i, premise, hypothesis, g, *_), pred in zip(PAIRS, preds)])
        metrics = classification_metrics(gold, preds)  # what the evaluate stage writes
        metrics.update({"model": "made-up/tiny-model", "method": "score", "adapter": None, "eval_seconds": 1.0,
                        "pairs_per_second": 12.0, "calibration": None, "probes": {}})
        write(tmp_path / f"metrics/{which}.json", metrics)
        (tmp_path / "evidence" / which).mkdir(parents=True)
        (tmp_path / "evidence" / which / "probes.jsonl").write_text("")  # evaluate.probes: []
    write(tmp_path / "metrics/train.json", train_metrics())
    write(tmp_path / "models/adapter/adapter_config.json", {"peft_type": "LORA"})  # the card names its hash
    (tmp_path / "models/adapter/adapter_model.safetensors").write_bytes(TINY_SAFETENSORS)
    write(tmp_path / "data/manifest.json", {"source": "made-up", "read_from": "made-up", "raw_sha256": {},
                                            "counts": {}})
    run_ok("failure_cases", tmp_path)
    run_ok("report", tmp_path)
    return tmp_path


def test_accuracy_intervals_by_hand(workdir):
    base, tuned = read(workdir / "metrics/baseline.json"), read(workdir / "metrics/finetuned.json")
    assert (base["accuracy"], base["accuracy_ci95"]) == (0.5833, BASELINE_CI)
    assert (tuned["accuracy"], tuned["accuracy_ci95"]) == (0.75, FINETUNED_CI)


def test_comparison_by_hand(workdir):
    comparison = read(workdir / "metrics/comparison.json")
    assert {k: comparison[k] for k in COMPARISON} == COMPARISON
    assert read(workdir / "plots/accuracy.json") == [{"model": "baseline", "accuracy": 0.5833},
                                                     {"model": "finetuned", "accuracy": 0.75}]


def test_slice_error_rates_by_hand(workdir):
    failures = read(workdir / "reports/failure_cases.json")
    assert [(s["slice"], s["value"], s["n"], s["baseline_error"], s["finetuned_error"])
            for s in failures["slices"]] == SLICES
    assert failures["counts"] == {"corrected": 3, "not_corrected": 2, "regressed": 1, "both_right": 6}
    assert [c["id"] for c in failures["corrected"]] == [2, 3, 4] and [c["id"] for c in failures["regressed"]] == [7]
    assert failures["confusion_pairs"] == {
        "baseline": {"contradiction -> entailment": 1, "contradiction -> neutral": 1, "entailment -> contradiction": 1,
                     "entailment -> neutral": 1, "neutral -> entailment": 1},
        "finetuned": {"entailment -> contradiction": 2, "contradiction -> entailment": 1},
    }


def test_markdown_shows_the_numbers_by_hand(workdir):
    failure_md = (workdir / "reports/failure_cases.md").read_text()
    report = (workdir / "reports/report.md").read_text()
    headline = ("Accuracy 58.33% (baseline) -> 75.00% (fine-tuned): +16.67 pp, 95% CI [-17.58 pp, +46.20 pp], "
                "exact McNemar p = 0.625.")
    assert headline in failure_md
    for row in ("| overlap | low | 5 | 40.00% | 0.00% | -40.00 pp |",
                "| negation | yes | 5 | 60.00% | 40.00% | -20.00 pp |",
                "| negation | no | 7 | 28.57% | 14.29% | -14.29 pp |",  # -1/7, not 14.29% - 28.57% of rounded rates
                "| length | short | 9 | 44.44% | 33.33% | -11.11 pp |",
                "| all | all | 12 | 41.67% | 25.00% | -16.67 pp |",
                "| gold label | neutral | 3 | 33.33% | 0.00% | -33.33 pp |"):
        assert row in failure_md and row in report, row
    for needle in ("| baseline (pretrained) | 58.33% | [31.95%, 80.67%] |",
                   "| fine-tuned | 75.00% | [46.77%, 91.11%] |",
                   "Difference (fine-tuned minus baseline): +16.67 pp, 95% CI [-17.58 pp, +46.20 pp]; the interval "
                   "includes 0: on 12 pairs the difference is not resolved at 95%.",
                   "Exact McNemar p = 0.625 (3 pairs corrected, 1 regressed, 6 right for both, 2 wrong for both).",
                   "Of 12 test pairs, fine-tuning corrected 3, left 2 wrong, and broke 1 (6 were right for both).",
                   "overall: baseline 41.67%, fine-tuned 25.00%",
                   "Error change by slice ranges from overlap = low (5 pairs, 40.00% -> 0.00%, -40.00 pp) to ",
                   "Most frequent fine-tuned confusions (gold -> predicted): entailment -> contradiction (2), "
                   "contradiction -> entailment (1)."):
        assert needle in report, needle
