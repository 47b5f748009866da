"""What evaluate writes, checked against a recomputation from the label scores it wrote (fast: the stage runs in this
process on made-up scores; no model). pred is the argmax of the scores, correct is pred == label, accuracy is the mean
of correct, the temperature is fitted on the validation scores (not the test ones), and each probe row belongs to
the test pair it names. Also finetune's validation accuracy on known scores."""
import hashlib
import json

import numpy as np
import pytest
import torch
import yaml
from helpers.calibration import reference_temperature
from pipeline import REPO
from tiny import made_up_pairs

COMMITTED = yaml.safe_load((REPO / "params.yaml").read_text())
VALIDATION_MARK = "at night"  # the fake scorer makes validation scores sharper than test scores


def _fake_scores(prompts):
    """Label scores that depend on the prompt only: random-looking, far from calibrated, sharper on validation."""
    rows = []
    for prompt in prompts:
        rng = np.random.default_rng(int(hashlib.sha256(prompt.encode()).hexdigest()[:8], 16))
        s = rng.normal(0.0, 1.0, 3) * (4.0 if VALIDATION_MARK in prompt else 1.0) - 6.0
        rows.append(s)
    return torch.tensor(np.array(rows), dtype=torch.float32)


def _rows(n, seed, first_id):
    rows = made_up_pairs(n, seed)
    return [{"id": first_id + i, **r} for i, r in enumerate(rows)]


@pytest.fixture
def evaluated(tmp_path, monkeypatch):
    from stages import evaluate

    params = json.loads(json.dumps(COMMITTED))
    params["data"]["extra_sets"] = {}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    (tmp_path / "data").mkdir()
    val = [{**r, "premise": r["premise"].replace("in the morning", VALIDATION_MARK)} for r in _rows(30, 2, 1000)]
    for name, rows in (("test", _rows(24, 3, 0)), ("validation", val)):
        (tmp_path / f"data/{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(evaluate.loading, "check_model_params", lambda *a, **k: None)
    monkeypatch.setattr(evaluate.loading, "load_tokenizer", lambda *a, **k: None)
    # no tokenizer here: the context-length check (tested in test_bad_input.py) is not what these tests are about
    monkeypatch.setattr(evaluate, "encode_answers", lambda tokenizer: [[0]])
    monkeypatch.setattr(evaluate, "check_prompt_lengths", lambda *a, **k: None)
    monkeypatch.setattr(evaluate.loading, "context_length", lambda *a, **k: None)
    monkeypatch.setattr(evaluate.adapters, "load_for_inference", lambda *a, **k: None)
    monkeypatch.setattr("qlora_nli.analysis.evaluation.score_labels",
                        lambda model, tok, prompts, *a, **k: _fake_scores(prompts))
    evaluate.main("baseline")

    def read(path):
        text = (tmp_path / path).read_text()
        return json.loads(text) if path.endswith(".json") else [json.loads(line) for line in text.splitlines()]

    return read


def _check_rows(rows):
    for r in rows:
        assert r["pred"] == int(np.argmax(r["scores"])), r
        assert r["correct"] == (r["pred"] == r["label"]), r


def test_pred_is_the_argmax_and_correct_is_pred_equals_label(evaluated):
    test = evaluated("predictions/baseline.jsonl")
    assert len(test) == 24
    _check_rows(test)
    _check_rows(evaluated("evidence/baseline/validation.jsonl"))
    _check_rows(evaluated("evidence/baseline/probes.jsonl"))
    # the scores are those of each row's own prompt (the fake scorer depends on it), not another row's
    template = COMMITTED["prompt"]["template"]
    expected = _fake_scores([template.format(premise=r["premise"], hypothesis=r["hypothesis"]) for r in test])
    assert np.allclose([r["scores"] for r in test], expected.numpy(), atol=1e-5)


def test_accuracy_and_confusion_matrix_follow_from_the_rows(evaluated):
    test, metrics = evaluated("predictions/baseline.jsonl"), evaluated("metrics/baseline.json")
    assert metrics["n"] == 24
    assert metrics["accuracy"] == round(sum(r["pred"] == r["label"] for r in test) / 24, 4)
    matrix = [[sum(1 for r in test if r["label"] == g and r["pred"] == p) for p in range(3)] for g in range(3)]
    assert metrics["confusion_matrix"] == matrix
    val = evaluated("evidence/baseline/validation.jsonl")
    assert metrics["validation_accuracy"] == round(sum(r["pred"] == r["label"] for r in val) / len(val), 4)
    assert 0 < metrics["accuracy"] < 1  # made-up scores: some right, some wrong, so argmin and argmax differ


def test_temperature_is_fitted_on_validation_not_test(evaluated):
    metrics = evaluated("metrics/baseline.json")
    on_validation = reference_temperature(evaluated("evidence/baseline/validation.jsonl"))
    on_test = reference_temperature(evaluated("predictions/baseline.jsonl"))
    assert abs(on_validation / on_test - 1) > 0.2, "the made-up scores should give clearly different temperatures"
    assert metrics["calibration"]["temperature"] == pytest.approx(on_validation, rel=2e-3)
    assert metrics["calibration"]["n_val"] == 30


def test_probe_rows_belong_to_the_test_pair_they_name(evaluated):
    test, probes = evaluated("predictions/baseline.jsonl"), evaluated("evidence/baseline/probes.jsonl")
    hypothesis_only = [r for r in probes if r["probe"] == "hypothesis_only"]
    assert [r["test_index"] for r in hypothesis_only] == list(range(24))
    for r in probes:
        original = test[r["test_index"]]
        assert r["id"] == original["id"], r
        if r["probe"] == "hypothesis_only":
            assert (r["premise"], r["hypothesis"], r["label"]) == (original["premise"], original["hypothesis"],
                                                                   original["label"])
            # evaluate.hypothesis_only_template: auto, the committed prompt.template without its premise line
            template = ("Classify the relation of the hypothesis to the premise as entailment, neutral or "
                        "contradiction.\nHypothesis: {hypothesis}\nRelation:")
            own = _fake_scores([template.format(premise=r["premise"], hypothesis=r["hypothesis"])])[0]
            assert np.allclose(r["scores"], own.numpy(), atol=1e-5)
    metrics = evaluated("metrics/baseline.json")["probes"]["hypothesis_only"]
    assert metrics["accuracy"] == round(sum(r["pred"] == r["label"] for r in hypothesis_only) / 24, 4)
    agree = sum(r["pred"] == test[r["test_index"]]["pred"] for r in hypothesis_only)
    assert metrics["agreement_with_original"] == round(agree / 24, 4)


def test_finetune_validation_accuracy_is_the_argmax_accuracy(monkeypatch):
    from qlora_nli.train import loop
    from qlora_nli.train.examples import Validation

    scores = torch.tensor([[0.0, 1.0, 2.0], [5.0, 1.0, 0.0], [0.0, 3.0, 1.0], [1.0, 0.0, -1.0], [0.0, 2.0, 1.0]]) - 6
    labels = [2, 0, 1, 0, 0]  # argmax is right on the first four, wrong on the last: 4/5
    monkeypatch.setattr(loop, "score_labels", lambda *a, **k: scores)

    class Model:
        def eval(self):
            return self

    answers = {0: [1, 2], 1: [3], 2: [4, 5, 6]}
    loss, accuracy = loop.validate(Model(), Validation(None, ["p"] * 5, labels, answers, 4))
    assert accuracy == pytest.approx(0.8)
    # mean NLL per answer token: -(-4 - 1 - 3 - 5 - 6) / (3 + 2 + 1 + 2 + 2)
    assert loss == pytest.approx(19 / 10)


def test_metrics_keys_come_in_their_published_order(evaluated):
    """metrics/<model>.json's bytes are part of what a run reproduces: the classification metrics, then what ran and
    how long, then calibration, validation accuracy and probes."""
    assert list(evaluated("metrics/baseline.json")) == [
        "n", "accuracy", "accuracy_ci95", "macro_f1", "per_class", "confusion_matrix", "predicted_distribution",
        "invalid_rate", "model", "method", "adapter", "eval_seconds", "pairs_scored", "pairs_per_second",
        "calibration", "validation_accuracy", "probes"]
