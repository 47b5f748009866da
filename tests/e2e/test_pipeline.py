"""`dvc repro` end to end on a tiny model: every stage runs, reruns are minimal, and results are reproducible."""
import json

import pytest
import yaml
from helpers.calibration import reference_temperature
from pipeline import dvc, make_project, set_param, stages_run
from tiny import write_nli_dir

pytestmark = pytest.mark.slow  # every test here runs stages end to end (subprocesses, dvc, kills)

ALL_STAGES = {"check_params", "prepare", "finetune", "evaluate@baseline", "evaluate@finetuned", "failure_cases", "report"}
MACHINE_SPECIFIC = {"eval_seconds", "pairs_per_second", "model"}  # timings, and the tiny model's tmp path


def project_with_an_extra_set(base):
    ood = write_nli_dir(base / "ood")  # an extra evaluation set whose split has a name of its own, like MNLI's
    (ood / "test.jsonl").rename(ood / "dev_matched.jsonl")
    return make_project(base / "project", overrides={
        "data.extra_sets": {"ood": {"source": str(ood), "split": "dev_matched", "n": 5}}})


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    root = project_with_an_extra_set(tmp_path_factory.mktemp("e2e"))
    first = dvc(root, "repro")
    return root, first.stdout


def _jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def _metrics(root, name):
    return {k: v for k, v in json.loads((root / "metrics" / f"{name}.json").read_text()).items() if k not in MACHINE_SPECIFIC}


def test_repro_runs_every_stage_and_writes_artifacts(project):
    root, output = project
    assert stages_run(output) == ALL_STAGES
    for path in ["data/train.jsonl", "data/manifest.json", "models/adapter/adapter_model.safetensors",
                 "checkpoints/epoch-1/state.pt", "checkpoints/epoch-2/adapter_model.safetensors",
                 "predictions/baseline.jsonl", "predictions/finetuned.jsonl", "plots/baseline/confusion.csv",
                 "reports/failure_cases.md", "reports/report.md", "dvclive/metrics.json", "dvc.lock"]:
        assert (root / path).exists(), path
    train = json.loads((root / "metrics/train.json").read_text())
    assert train["epochs"] == 2 and len(train["val_accuracy_per_epoch"]) == 2
    # LoRA r = 16 on the tiny Phi's last block (tests/pipeline.py): 16 (in + out) for q, k, v, dense (64 -> 64, 32, 32,
    # 64), fc1 (64 -> 128) and fc2 (128 -> 64): 16 (128 + 96 + 96 + 128 + 192 + 192)
    assert train["parameters"]["trainable"] == 16 * 832 < train["parameters"]["total"]
    assert train["resources"]["gpu_unavailable_reason"]  # CPU run: a reason, not zeros
    baseline = json.loads((root / "metrics/baseline.json").read_text())
    rows = _jsonl(root / "predictions/baseline.jsonl")
    assert all(r["pred"] == max(range(3), key=r["scores"].__getitem__) and r["correct"] == (r["pred"] == r["label"])
               for r in rows)
    assert baseline["n"] == len(rows) == 9 and baseline["accuracy"] == round(sum(r["correct"] for r in rows) / 9, 4)
    assert not (root / "models/adapter/model.safetensors").exists()  # adapter only, never base weights
    assert "up to date" in dvc(root, "status").stdout


def test_extra_set_probes_and_calibration_reach_metrics_and_report(project):
    root, _ = project
    report = (root / "reports/report.md").read_text()
    for model in ("baseline", "finetuned"):
        metrics = json.loads((root / f"metrics/{model}.json").read_text())
        ood = json.loads((root / f"metrics/sets/{model}/ood.json").read_text())
        ood_rows = _jsonl(root / f"evidence/{model}/sets/ood.jsonl")
        assert ood["set"] == "ood" and ood["n"] == len(ood_rows) == 5
        assert ood["accuracy"] == round(sum(r["pred"] == r["label"] for r in ood_rows) / 5, 4)
        assert f"{100 * ood['accuracy']:.2f}%" in report
        probes = metrics["probes"]
        assert list(probes) == ["hypothesis_only", "swap_contradiction", "premise_as_hypothesis", "tautology",
                                "negation_tautology"]
        assert probes["hypothesis_only"]["n"] == 9 and probes["tautology"]["n"] == 9
        scored = [json.loads(line) for line in (root / f"evidence/{model}/probes.jsonl").read_text().splitlines()]
        assert sum(r["probe"] == "swap_contradiction" for r in scored) == probes["swap_contradiction"]["n"]
        assert f"{100 * metrics['calibration']['ece']:.2f}%" in report
        validation = _jsonl(root / f"evidence/{model}/validation.jsonl")
        assert metrics["calibration"]["n_val"] == len(validation) == 6
        # fitted on the validation scores (stored to 5 decimals), by a grid search written in the test
        assert metrics["calibration"]["temperature"] == pytest.approx(reference_temperature(validation), rel=1e-2)
        assert (root / f"plots/{model}/reliability.csv").read_text().startswith("confidence,accuracy,n\n")
    shown = dvc(root, "metrics", "show").stdout
    assert "metrics/sets/finetuned/ood.json" in shown and "metrics/sets/baseline/ood.json" in shown
    claims = json.loads((root / "reports/failure_cases.json").read_text())["evidence"]["claims"]
    assert claims and all(claim in report for claim in claims)
    assert "### What the evidence says" in report and "## 8. Out-of-domain sets" in report


def test_second_repro_runs_nothing(project):
    root, _ = project
    assert stages_run(dvc(root, "repro").stdout) == set()


def test_evaluation_param_reruns_only_evaluation(project):
    root, _ = project
    set_param(root, "evaluate.max_new_tokens", 7)
    ran = stages_run(dvc(root, "repro").stdout)
    assert {"evaluate@baseline", "evaluate@finetuned"} <= ran
    assert not ran & {"prepare", "finetune"}


def test_generate_method_is_comparable(project):
    root, _ = project
    set_param(root, "evaluate.method", "generate")
    ran = stages_run(dvc(root, "repro").stdout)
    assert {"evaluate@baseline", "evaluate@finetuned"} <= ran and "finetune" not in ran
    metrics = _metrics(root, "finetuned")
    rows = _jsonl(root / "predictions/finetuned.jsonl")
    assert metrics["method"] == "generate"
    assert metrics["invalid_rate"] == round(sum(r["pred"] is None for r in rows) / len(rows), 4)
    assert metrics["accuracy"] == round(sum(r["pred"] == r["label"] for r in rows) / len(rows), 4)
    assert all(isinstance(r["generation"], str) for r in rows)
    set_param(root, "evaluate.method", "score")
    dvc(root, "repro")


def test_same_params_same_results(project, tmp_path):
    """A second project from scratch with the same params: byte-identical data, identical metrics."""
    root, _ = project
    other = project_with_an_extra_set(tmp_path)
    set_param(other, "evaluate.max_new_tokens", 7)
    dvc(other, "repro")
    for split in ["train", "validation", "test"]:
        assert (root / f"data/{split}.jsonl").read_bytes() == (other / f"data/{split}.jsonl").read_bytes()
    for name in ["baseline", "finetuned", "comparison"]:
        assert _metrics(root, name) == _metrics(other, name)
    a, b = (json.loads((r / "metrics/train.json").read_text()) for r in (root, other))
    for key in ["train_loss_per_epoch", "val_loss_per_epoch", "val_accuracy_per_epoch", "parameters"]:
        assert a[key] == b[key], key


def test_plots_have_data(project):
    """Every plot declared in dvc.yaml resolves to data, so `dvc plots show` renders all eight charts."""
    root, _ = project
    plots = json.loads(dvc(root, "plots", "show", "--json").stdout)["data"]
    assert len(plots) == len(yaml.safe_load((root / "dvc.yaml").read_text())["plots"]) == 8
    for title, entries in plots.items():
        assert entries and entries[0]["content"]["data"]["values"], title
