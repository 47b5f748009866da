"""Through DVC, on a tiny model: a resumed run keeps the record of the epochs it did not train, a finished training
rerun with `-f` reports the run that trained it (not zeros), and `train.resume=false` trains from scratch
(docs/experiments.md)."""
import json
import sys

import pytest
from pipeline import dvc, kill_after_epoch, make_project, run

pytestmark = pytest.mark.slow


def _train(root):
    return json.loads((root / "metrics/train.json").read_text())


def _record(root, epoch):
    return json.loads((root / f"checkpoints/epoch-{epoch}/record.json").read_text())


def _params_of_experiments(show):
    """Every params.yaml mapping found in `dvc exp show --json` output."""
    found = []

    def walk(node):
        if isinstance(node, dict):
            if "params.yaml" in node and isinstance(node["params.yaml"], dict) and "data" in node["params.yaml"]:
                found.append(node["params.yaml"]["data"])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(show)
    return found


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    root = make_project(tmp_path_factory.mktemp("retrain") / "project", overrides={"train.epochs": 2})
    dvc(root, "repro", "prepare")
    return root


def test_resume_keeps_times_a_finished_training_carries_its_record_and_resume_false_retrains(project):
    root = project
    killed = run([sys.executable, "-m", "dvc", "repro", "finetune"], root, check=False,
                 extra_env=kill_after_epoch(root, 1))
    assert killed.returncode != 0 and sorted(p.name for p in (root / "checkpoints").iterdir()) == ["epoch-1"]
    epoch_1 = _record(root, 1)["epoch_seconds"]["1"]
    assert epoch_1 > 0

    # resumed after epoch 1: epoch 1's time comes from its checkpoint, epoch 2's from this run
    resumed = dvc(root, "repro", "finetune")
    assert "resuming after epoch 1" in resumed.stdout + resumed.stderr
    first = _train(root)
    assert first["resumed_from_epoch"] == 1 and first["carried_over"] is False
    assert first["time"]["per_epoch_seconds"][0] == round(epoch_1, 3)
    assert first["time"]["per_epoch_seconds"][1] > 0
    assert first["time"]["total_seconds"] == round(sum(first["time"]["per_epoch_seconds"]), 1)
    adapter = (root / "models/adapter/adapter_model.safetensors").read_bytes()

    # `dvc repro -f` keeps the persisted checkpoints: nothing to train, the record of the run that trained it
    forced = dvc(root, "repro", "-f", "finetune")
    assert "resuming after epoch 2" in forced.stdout + forced.stderr
    again = _train(root)
    recorded = _record(root, 2)
    assert again["carried_over"] is True and again["resumed_from_epoch"] == 2
    assert again["time"] == first["time"] and again["time"]["total_seconds"] > 0
    for key in ("world_size", "backend", "device", "train_loss_per_epoch", "val_loss_per_epoch",
                "val_accuracy_per_epoch", "throughput"):
        assert again[key] == first[key], key
    assert again["resources"] == recorded["resources"] and again["resources"]["samples"] > 0
    assert again["resources"]["wall_seconds"] > 0 and again["resources"]["process_rss_peak_mb"] > 0

    # an experiment with train.resume=false trains both epochs again, from scratch, and DVC records the param
    fresh = dvc(root, "exp", "run", "finetune", "-S", "train.resume=false")
    log = fresh.stdout + fresh.stderr
    assert "train.resume is false" in log and "resuming" not in log
    assert "epoch 1: train loss" in log and "epoch 2: train loss" in log
    retrained = _train(root)
    assert retrained["resumed_from_epoch"] is None and retrained["carried_over"] is False
    assert all(s > 0 for s in retrained["time"]["per_epoch_seconds"])
    assert retrained["train_loss_per_epoch"] == first["train_loss_per_epoch"]  # same params: same training
    assert (root / "models/adapter/adapter_model.safetensors").read_bytes() == adapter
    show = json.loads(dvc(root, "exp", "show", "--json").stdout)
    resume_values = [p["train"]["resume"] for p in _params_of_experiments(show)]
    assert False in resume_values and True in resume_values, resume_values  # the experiment and its baseline
