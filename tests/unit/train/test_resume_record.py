"""train.resume and the record a checkpoint keeps of the run that trained it (fast: no model, no DVC)."""
import json

import pytest
import torch
from tiny import TINY_SAFETENSORS

from qlora_nli.runtime.distributed import SINGLE
from qlora_nli.train.checkpoints import Checkpoints
from qlora_nli.train.examples import Examples
from qlora_nli.train.loop import TrainingSetup
from qlora_nli.train.record import carried_epoch_seconds, train_metrics

PARAMS = {"model": {"name": "tiny", "load_in_4bit": True}}
RECORD = {"epoch_seconds": {"1": 12.3456, "2": 7.25}, "device": "cpu (earlier machine)", "world_size": 2,
          "backend": "gloo", "resources": {"wall_seconds": 30.0, "process_rss_peak_mb": 900.0}}
HISTORY = {"epochs": [{"epoch": 1, "step": 3, "train_loss": 1.5, "val_loss": 1.4, "val_accuracy": 0.5},
                      {"epoch": 2, "step": 6, "train_loss": 1.0, "val_loss": 1.1, "val_accuracy": 0.75}],
           "steps": []}


class NoMonitor:
    def summary(self, outputs=()):
        return {"wall_seconds": 1.0, "measured_by": "this run"}


def _setup(record, resumed_epoch=2):
    return TrainingSetup(model=None, optimizer=None, optimizer_name="adamw", scheduler=None, scaler=None,
                         base_parameters={"total": 1000, "numel_as_stored": 600}, n_parameters={"trainable": 10},
                         history=HISTORY, resumed=(resumed_epoch, None, None), record=record)


def test_a_run_that_trains_nothing_reports_the_recorded_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    metrics = train_metrics(PARAMS, "cpu", torch.float32, _setup(RECORD), SINGLE, {}, Examples([[1, 2]] * 4, [[3]] * 4, 0),
                            NoMonitor())
    assert metrics["carried_over"] is True and metrics["resumed_from_epoch"] == 2
    assert metrics["time"] == {"total_seconds": 19.6, "per_epoch_seconds": [12.346, 7.25]}  # 12.3456 + 7.25
    assert (metrics["world_size"], metrics["backend"], metrics["device"]) == (2, "gloo", "cpu (earlier machine)")
    assert metrics["resources"] == RECORD["resources"]
    assert metrics["train_loss_per_epoch"] == [1.5, 1.0] and metrics["val_accuracy_per_epoch"] == [0.5, 0.75]
    # 4 examples x 2 epochs in 12.346 + 7.25 = 19.596 s (the rounded epoch times); 3 tokens each
    assert metrics["throughput"] == {"examples_per_second": round(8 / 19.596, 2),
                                     "tokens_per_second": round(24 / 19.596, 1)}


def test_a_partly_resumed_run_keeps_the_earlier_epochs_time_and_reports_itself(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    earlier = {**RECORD, "epoch_seconds": {"1": 12.3456}}
    metrics = train_metrics(PARAMS, "cpu", torch.float32, _setup(earlier, resumed_epoch=1), SINGLE, {2: 5.0},
                            Examples([[1]] * 4, [[3]] * 4, 0), NoMonitor())
    assert metrics["carried_over"] is False
    assert metrics["time"] == {"total_seconds": 17.3, "per_epoch_seconds": [12.346, 5.0]}
    assert metrics["world_size"] == 1 and metrics["resources"] == {"wall_seconds": 1.0, "measured_by": "this run"}


def test_without_a_record_earlier_epochs_have_no_time(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    metrics = train_metrics(PARAMS, "cpu", torch.float32, _setup(None, resumed_epoch=1), SINGLE, {2: 5.0},
                            Examples([[1]] * 4, [[3]] * 4, 0), NoMonitor())
    assert metrics["time"] == {"total_seconds": 5.0, "per_epoch_seconds": [None, 5.0]}
    assert metrics["carried_over"] is False


@pytest.mark.parametrize("seconds, expected", [
    ({"1": 2.5, "3": 4}, {1: 2.5, 3: 4}),
    ({"x": 1.0, "2": "fast", "4": True}, {}),  # a hand-edited record: nothing usable, nothing invented
    ("not a mapping", {}),
])
def test_carried_epoch_seconds_reads_only_epochs_and_numbers(seconds, expected):
    assert carried_epoch_seconds({"epoch_seconds": seconds}) == expected
    assert carried_epoch_seconds(None) == {}


@pytest.mark.parametrize("resume", [True, False])
def test_resume_false_deletes_the_checkpoints_of_this_very_run(tmp_path, resume):
    root = tmp_path / "checkpoints"
    directory = root / "epoch-1"
    directory.mkdir(parents=True)
    (directory / "run.json").write_text(json.dumps({"fingerprint": "run-a", "epoch": 1}))
    torch.save({"fingerprint": "run-a", "epoch": 1}, directory / "state.pt")
    (directory / "adapter_model.safetensors").write_bytes(TINY_SAFETENSORS)
    found = Checkpoints(root, "run-a", resume=resume).latest()
    if resume:
        assert found[0] == 1 and found[1] == directory
    else:
        assert found is None and not root.exists()
