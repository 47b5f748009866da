"""The failure_cases and report stages, run as DVC runs them (a subprocess in the workspace) on made-up artifacts."""
import json

import yaml
from helpers.artifacts import (
    ADAPTER_SHA256,
    PAIRS,
    prediction_rows,
    read,
    run_ok,
    run_stage,
    scores_for,
    softmax,
    train_metrics,
    write,
)

from qlora_nli.prompts import LABELS

EXPECTED = {"corrected": [1, 2, 3], "not_corrected": [4, 5], "regressed": [6],
            "both_right": [7, 8, 9, 10, 11, 12]}
# The error-rate table's rows for all pairs and by gold label, counted by hand from PAIRS (errors of baseline and
# fine-tuned: all 5 and 3; entailment ids 2 / 6; neutral ids 3, 5 / 5; contradiction ids 1, 4 / 4)
SLICE_ROWS = ["| slice | value | pairs | baseline error | fine-tuned error | change |\n|---|---|---|---|---|---|\n",
              "| all | all | 12 | 41.67% | 25.00% | -16.67 pp |",
              "| gold label | entailment | 5 | 20.00% | 20.00% | +0.00 pp |",
              "| gold label | neutral | 3 | 66.67% | 33.33% | -33.33 pp |",
              "| gold label | contradiction | 4 | 50.00% | 25.00% | -25.00 pp |"]



def test_failure_cases_categories(workdir):
    run_ok("failure_cases", workdir)
    result = read(workdir / "reports/failure_cases.json")
    assert result["n"] == 12
    assert result["counts"] == {k: len(v) for k, v in EXPECTED.items()}
    for category in ("corrected", "not_corrected", "regressed"):
        cases = result[category]
        assert [c["id"] for c in cases] == EXPECTED[category]
        assert all(c["category"] == category for c in cases)
    case = result["regressed"][0]
    assert case["gold_label"] == "entailment" and case["finetuned"]["pred_label"] == "contradiction"
    assert case["finetuned"]["confidence"] == round(softmax(scores_for(2, 1.0))[2], 4)
    assert case["features"]["word_overlap"] == 1.0 and "high overlap (100%)" in case["tags"]
    assert case["explanation"] and result["selection_rule"]
    assert result["confusion_pairs"]["finetuned"] == {"entailment -> contradiction": 1, "contradiction -> neutral": 1,
                                                      "neutral -> entailment": 1}
    # counted by hand from PAIRS: (n, baseline errors, fine-tuned errors)
    table = {(r["slice"], r["value"]): (r["n"], r["baseline_errors"], r["finetuned_errors"]) for r in result["slices"]}
    assert table[("all", "all")] == (12, 5, 3)
    assert table[("gold label", "entailment")] == (5, 1, 1)      # ids 2, 6, 7, 10, 12: baseline misses 2, tuned 6
    assert table[("gold label", "neutral")] == (3, 2, 1)         # ids 3, 5, 9: baseline misses 3 and 5, tuned 5
    assert table[("gold label", "contradiction")] == (4, 2, 1)   # ids 1, 4, 8, 11: baseline misses 1 and 4, tuned 4
    assert result["slices"][0]["baseline_error"] == round(5 / 12, 4)


def test_comparison_metrics_and_plot(workdir):
    run_ok("failure_cases", workdir)
    comparison = read(workdir / "metrics/comparison.json")
    base = [p[4] == p[3] for p in sorted(PAIRS)]
    tuned = [p[6] == p[3] for p in sorted(PAIRS)]
    assert comparison["n"] == 12
    assert comparison["baseline_accuracy"] == read(workdir / "metrics/baseline.json")["accuracy"] == round(7 / 12, 4)
    assert comparison["finetuned_accuracy"] == read(workdir / "metrics/finetuned.json")["accuracy"] == round(9 / 12, 4)
    # by hand from PAIRS: both right 7-12, corrected 1-3, regressed 6, both wrong 4 and 5
    assert (comparison["both_right"], comparison["corrected"], comparison["regressed"], comparison["both_wrong"]) \
        == (6, 3, 1, 2)
    assert comparison["difference"] == round(9 / 12 - 7 / 12, 4)
    assert comparison["mcnemar_p"] == 0.625  # exact: 2 * (C(4,0) + C(4,1)) / 2**4
    # Newcombe (1998) method 10 by hand for the table (6, 3; 1, 2), as in test_report_literals (the same counts)
    assert comparison["difference_ci95"] == [-0.1758, 0.462]
    assert sum(base) == 7 and sum(tuned) == 9
    assert read(workdir / "plots/accuracy.json") == [{"model": "baseline", "accuracy": round(7 / 12, 4)},
                                                     {"model": "finetuned", "accuracy": 0.75}]


def test_failure_cases_markdown(workdir):
    run_ok("failure_cases", workdir)
    result = read(workdir / "reports/failure_cases.json")
    text = (workdir / "reports/failure_cases.md").read_text()
    for heading in ("# Failure cases", "## Error rate by feature slice", "## Most frequent confusions", "## Examples",
                    "### Corrected: 2 of 3", "### Not corrected: 2 of 2", "### Regressed: 1 of 1"):
        assert heading in text
    for row in SLICE_ROWS:
        assert row in text, row
    assert "| corrected | baseline wrong, fine-tuned right | 3 |" in text
    assert result["selection_rule"] in text
    # corrected examples: the two largest gains in gold-label probability, largest first
    gains = {c["id"]: c["gold_probability_gain"] for c in result["corrected"]}
    top2 = sorted(gains, key=lambda i: -gains[i])[:2]
    shown = [i for i in gains if f"**#{i}**" in text]
    assert sorted(shown) == sorted(top2) and text.index(f"**#{top2[0]}**") < text.index(f"**#{top2[1]}**")
    # not-corrected examples: most confident fine-tuned answer first (#5 has margin 3.5, #4 has 2.0)
    assert text.index("**#5**") < text.index("**#4**")
    for case in result["corrected"] + result["not_corrected"] + result["regressed"]:
        if f"**#{case['id']}**" in text:
            assert "; ".join(case["tags"]) in text and case["explanation"] in text


def test_report_sections_and_numbers(workdir):
    run_ok("failure_cases", workdir)
    run_ok("report", workdir)
    text = (workdir / "reports/report.md").read_text()
    base, tuned = read(workdir / "metrics/baseline.json"), read(workdir / "metrics/finetuned.json")
    comparison, train = read(workdir / "metrics/comparison.json"), read(workdir / "metrics/train.json")
    failures = read(workdir / "reports/failure_cases.json")

    for heading in ("## Data", "## Evaluation method", "## 1. Accuracy", "## 2. Fine-tuning time", "## 3. Parameters",
                    "## 4. Resources", "## 5. Failure cases"):
        assert heading in text
    # data provenance
    for needle in ("made-up/snli-like", "/made/up/mirror", "a" * 64, "c" * 64, "| test | 900 | 3 | 12 |", "sampling"):
        assert needle in text
    # 1. accuracy
    # by hand from PAIRS: 7 and 9 of 12 right, Wilson intervals (scipy.stats.binomtest), macro-F1 from the confusions
    # below (baseline (2/3 + 2/5 + 4/7) / 3, fine-tuned (4/5 + 2/3 + 3/4) / 3)
    assert "| 58.33% | [31.95%, 80.67%] | 0.5460 |" in text and "| 75.00% | [46.77%, 91.11%] | 0.7389 |" in text
    confusion = "| gold \\ predicted | entailment | neutral | contradiction |\n|---|---|---|---|\n"
    assert confusion + "| entailment | 4 | 1 | 0 |\n| neutral | 1 | 1 | 1 |\n| contradiction | 2 | 0 | 2 |\n" in text
    assert confusion + "| entailment | 4 | 0 | 1 |\n| neutral | 1 | 2 | 0 |\n| contradiction | 0 | 1 | 3 |\n" in text
    assert "+16.67 pp, 95% CI [-17.58 pp, +46.20 pp]" in text
    assert "McNemar p = 0.625" in text
    assert "3 pairs corrected, 1 regressed" in text
    # 2. time
    assert "125.4 s (2.1 min)" in text and "| 1 | 60.1 | 0.9123 | 0.8123 | 0.5500 |" in text and "| 2 | 62.9 |" in text
    # 3. parameters, with the packed 4-bit explanation
    assert "| 134,515,008 | 4,884,480 | 3.6312% | 106,137,600 |" in text and "two per byte" in text
    # 4. resources: CPU run prints the reason, never zeros
    assert "peak 2345.6 MB, mean 2100.4 MB" in text and "mean 71.3%, peak 98.8%" in text
    assert "GPU: none used: no CUDA GPU visible to torch (CPU run)." in text
    assert "18.7 MB" in text
    # 5. failure cases
    assert "[failure_cases.md](failure_cases.md)" in text
    for row in SLICE_ROWS:
        assert row in text, row
    assert "corrected 3, left 2 wrong, and broke 1" in text


def test_report_gpu_fields_missing_are_not_zero(workdir):
    write(workdir / "metrics/train.json", train_metrics(gpu=True))
    run_ok("failure_cases", workdir)
    run_ok("report", workdir)
    text = (workdir / "reports/report.md").read_text()
    assert "GPU: Made-up GPU 80GB" in text and "peak 5123.4 MB, mean 4000.2 MB" in text
    assert "Memory of this process (NVML): peak not measured" in text  # null in train.json
    assert "torch max allocated: 3456.7 MB" in text


def test_mismatched_ids_give_one_line_error(workdir):
    rows = prediction_rows("finetuned")
    rows[0]["id"] = 99
    write(workdir / "predictions/finetuned.jsonl", rows)
    proc = run_stage("failure_cases", workdir)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert "predictions/baseline.jsonl" in last and "predictions/finetuned.jsonl" in last
    assert "rerun dvc repro" in last


def test_report_missing_input_gives_one_line_error(workdir):
    run_ok("failure_cases", workdir)
    (workdir / "metrics/train.json").unlink()
    proc = run_stage("report", workdir)
    assert proc.returncode != 0
    assert proc.stderr.strip() == "metrics/train.json: missing; rerun `dvc repro finetune`"


def test_report_refuses_stale_metrics(workdir):
    run_ok("failure_cases", workdir)
    stale = read(workdir / "metrics/finetuned.json")
    stale["accuracy"] = 0.5
    write(workdir / "metrics/finetuned.json", stale)
    proc = run_stage("report", workdir)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "stale" in proc.stderr and "metrics/finetuned.json" in proc.stderr


def test_generate_method_without_scores(workdir):
    for which in ("baseline", "finetuned"):
        rows = prediction_rows(which)
        for r in rows:
            r["scores"], r["generation"] = None, LABELS[r["pred"]]
        if which == "baseline":  # an unparseable answer: invalid, counted as wrong
            rows[1].update(pred=None, correct=False, generation="I am not sure")
        write(workdir / f"predictions/{which}.jsonl", rows)
    run_ok("failure_cases", workdir)
    result = read(workdir / "reports/failure_cases.json")
    assert result["counts"] == {k: len(v) for k, v in EXPECTED.items()}  # pair 2 was wrong for the baseline anyway
    case = next(c for c in result["corrected"] if c["id"] == 2)
    assert case["baseline"]["pred_label"] == "invalid" and case["baseline"]["confidence"] is None
    assert result["confusion_pairs"]["baseline"]["entailment -> invalid"] == 1
    text = (workdir / "reports/failure_cases.md").read_text()
    assert "baseline: invalid" in text and "**#1**" in text  # without scores, examples go by id


def test_probe_evidence_by_hand(workdir):
    assert run_stage("failure_cases", workdir).returncode == 0
    evidence = json.loads((workdir / "reports/failure_cases.json").read_text())["evidence"]
    # fine-tuned full answers: 1->2, 2->0, 3->1 (corrected); 4->1, 5->0; 6->2; 7..12 -> 0, 2, 1, 0, 2, 0
    assert evidence["hypothesis_only"]["corrected"] == {"n": 3, "same_answer_as_full": 2, "right_from_hypothesis_alone": 2}
    assert evidence["hypothesis_only"]["not_corrected"]["same_answer_as_full"] == 1  # pair 5
    assert evidence["hypothesis_only"]["both_right"]["same_answer_as_full"] == 3  # pairs 7, 10, 12
    # right on the original: fine-tuned 9 (1-3, 7-12), baseline 7 (6-12); the fine-tuned model flips pair 7
    assert evidence["probes"]["tautology"] == {
        "baseline": {"n": 12, "probe_right": 7, "original_right": 7, "flipped": 0},
        "finetuned": {"n": 12, "probe_right": 8, "original_right": 9, "flipped": 1}}
    claims = evidence["claims"]
    assert claims[0].startswith("2 of the 3 corrected pairs are also right for the fine-tuned model from the hypothesis")
    assert ("Tautology: the fine-tuned model is right on 8 of 12 probe pairs (baseline 7), and flips 1 of the 9 it got "
            "right on the original pair.") in claims
    cases = {c["id"]: c for c in json.loads((workdir / "reports/failure_cases.json").read_text())["corrected"]}
    assert any("annotation artifact" in t for t in cases[1]["tags"])
    assert not any("annotation artifact" in t for t in cases[2]["tags"])
    assert "## What the probes show" in (workdir / "reports/failure_cases.md").read_text()
    assert run_stage("report", workdir).returncode == 0
    report = (workdir / "reports/report.md").read_text()
    assert all(f"- {claim}" in report for claim in claims)
    # calibration, probes and the extra set: the numbers of the metrics files
    assert "| fine-tuned | 12 | 23.45% | [12.34%, 45.67%] | 0.750 | 0.600 | 1.88 | 7.89% | [4.56%, 30.12%] |" in report
    assert "| baseline | 12 | 34.56% |" in report
    assert "| ood | `made-up/ood` dev_matched | 30 | 40.00% [24.59%, 57.68%] | 56.67% [39.20%, 72.62%] | +16.67 pp |" in report
    assert "| tautology | 12 | 58.33% | 66.67% | 0 / 7 | 1 / 9 |" in report


FIGURES = ("accuracy.svg", "confusion.svg", "training.svg", "reliability.svg", "probes.svg")


def test_report_shows_its_figures(workdir):
    """Every figure is a well-formed SVG beside the report, linked from it, and draws the fixture's numbers."""
    import xml.etree.ElementTree as ET

    run_ok("failure_cases", workdir)
    run_ok("report", workdir)
    text = (workdir / "reports/report.md").read_text()
    texts = {}
    for name in FIGURES:
        path = workdir / "reports/figures" / name
        root = ET.parse(path).getroot()  # raises on a broken file
        assert root.tag.endswith("svg")
        assert f"](figures/{name})" in text, name
        texts[name] = " ".join(t.text or "" for t in root.iter() if t.tag.endswith("text"))
        assert path.stat().st_size < 100_000, (name, path.stat().st_size)  # small enough for git
    # Fixture numbers, by hand: fine-tuned right on 9 of 12 (3 corrected + 6 both right), the baseline on 7 of 12;
    # the OOD set's accuracies are the fixture's literals; the baseline predicts entailment for 9 pairs of gold 0..2.
    assert "75.0% (n=12)" in texts["accuracy.svg"] and "58.3% (n=12)" in texts["accuracy.svg"]
    assert "56.7% (n=30)" in texts["accuracy.svg"] and "40.0% (n=30)" in texts["accuracy.svg"]
    assert "ECE 34.6%" in texts["reliability.svg"] and "ECE 7.9%" in texts["reliability.svg"]  # 0.3456, 0.0789
    assert "1 / 9" in texts["probes.svg"]  # the fine-tuned model flips pair 7 of its 9 right answers on tautology
    for word in LABELS:
        assert word in texts["confusion.svg"]


def test_figures_are_byte_identical_across_runs(workdir):
    run_ok("failure_cases", workdir)
    run_ok("report", workdir)
    first = {n: (workdir / "reports/figures" / n).read_bytes() for n in FIGURES}
    run_ok("report", workdir)
    assert {n: (workdir / "reports/figures" / n).read_bytes() for n in FIGURES} == first


def test_model_card_is_valid_hub_metadata_with_the_measured_numbers(workdir):
    """Parsed by huggingface_hub's own card parser: base model, peft, datasets and the model-index results."""
    from huggingface_hub import ModelCard

    run_ok("failure_cases", workdir)
    run_ok("report", workdir)
    card = ModelCard((workdir / "reports/model_card.md").read_text())
    data = card.data
    assert data.library_name == "peft"
    assert data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct"  # params.yaml's embedded model, by its Hub id
    assert data.datasets == ["made-up/snli-like", "made-up/ood"]
    assert data.to_dict()["adapter_sha256"] == ADAPTER_SHA256
    results = {(r.dataset_type, r.metric_type): r.metric_value for r in data.eval_results}
    assert results == {("made-up/snli-like", "accuracy"): 0.75, ("made-up/ood", "accuracy"): 0.5667}
    body = card.text
    assert "[More Information Needed]" not in body
    assert "75.00% [46.77%, 91.11%]" in body  # Wilson 95% interval of 9/12, computed by hand: (0.4677, 0.9111)
    assert "hypothesis alone" in body and "1 of 9 right answers flip" in body
    params = yaml.safe_load((workdir / "params.yaml").read_text())
    assert f"r={params['lora']['r']}, alpha={params['lora']['alpha']}" in body
    assert params["prompt"]["template"] in body


def test_model_card_claims_no_hub_base_for_a_local_model(workdir):
    from huggingface_hub import ModelCard

    params = yaml.safe_load((workdir / "params.yaml").read_text())
    params["model"]["name"] = str(workdir / "some-local-model")
    (workdir / "params.yaml").write_text(yaml.safe_dump(params))
    run_ok("failure_cases", workdir)
    run_ok("report", workdir)
    assert ModelCard((workdir / "reports/model_card.md").read_text()).data.base_model is None


def test_hub_base_model_names_only_hub_ids(tmp_path, monkeypatch):
    from qlora_nli.report.model_card import hub_base_model

    monkeypatch.chdir(tmp_path)
    (tmp_path / "models" / "base").mkdir(parents=True)
    assert hub_base_model("embedded:smollm2-135m-instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert hub_base_model("microsoft/phi-2") == "microsoft/phi-2"
    assert hub_base_model("gpt2") == "gpt2"  # a Hub id without an owner
    for local in ("models/base", "./x", "/abs/model", "~/model", "a/b/c", "C:\\models\\x"):
        assert hub_base_model(local) is None, local
