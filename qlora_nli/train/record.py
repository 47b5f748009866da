"""The training record: the history of steps and epochs, what a checkpoint keeps of the run, dvclive's curves and
metrics/train.json, each written here and nowhere else."""
import logging
import os
import shutil
import tempfile
from pathlib import Path

from dvclive import Live
from qlora_nli.model import loading
from qlora_nli.runtime.files import tree_size_bytes, write_json

log = logging.getLogger(__name__)


def add_step(history, loss, lr):
    """Append one optimizer step to `history` (unrounded: a resumed run replays it into dvclive)."""
    history["steps"].append({"step": len(history["steps"]) + 1, "loss": loss, "lr": lr})


def add_epoch(history, epoch, train_loss, val_loss, val_accuracy, seconds):
    """Append one epoch to `history`. The history holds no time (record.json does): the same params, data and code
    give the same state.pt bytes."""
    history["epochs"].append({"epoch": epoch, "step": len(history["steps"]), "train_loss": round(train_loss, 6),
                              "val_loss": round(val_loss, 6), "val_accuracy": round(val_accuracy, 4)})
    log.info("epoch %d: train loss %.4f, val loss %.4f, val accuracy %.3f, %.0f s",
             epoch, train_loss, val_loss, val_accuracy, seconds)


def write_record(history, metrics, plots_dir, live_metrics_file, metrics_file):
    """The training record: dvclive's curves of `history` (written whole to a scratch folder outside the repository,
    the same curves for a resumed run, then moved to `plots_dir` and `live_metrics_file`) and `metrics` as
    `metrics_file` (metrics/train.json)."""
    with tempfile.TemporaryDirectory(prefix="qlora-nli-dvclive-") as scratch:
        # dvclive started from the scratch folder finds no repository: in one, it asks Git for the current commit,
        # which fails in a repository without commits (dvclive 3.49), and these files need nothing of the repository.
        workspace = os.getcwd()
        os.chdir(scratch)
        try:
            with Live(scratch, dvcyaml=None, save_dvc_exp=False, report=None) as live:
                live_curves(live, history)
        finally:
            os.chdir(workspace)
        shutil.move(Path(scratch) / "plots", plots_dir)
        shutil.move(Path(scratch) / "metrics.json", live_metrics_file)
    write_json(metrics_file, metrics)


def live_curves(live, history):
    """Log `history` into the dvclive `live`: every step's loss and learning rate, every epoch's losses and accuracy
    at the step it ended on. The same curves whether the run was resumed or not."""
    for record in history["steps"]:
        live.step = record["step"]
        live.log_metric("train/step_loss", record["loss"])
        live.log_metric("train/learning_rate", record["lr"])
    for record in history["epochs"]:
        live.step = record["step"]
        for key in ("train_loss", "val_loss", "val_accuracy"):
            live.log_metric(f"epoch/{key}", record[key])


RECORD_KEYS = {"epoch_seconds", "device", "world_size", "backend", "resources"}


def run_record(device, ranks, epoch_seconds, monitor):
    """What a checkpoint keeps of the training so far, for the metrics/train.json of a later run that resumes it:
    the measured seconds of each epoch (`epoch_seconds`, {epoch: seconds}, whichever run trained it), and where the
    run ran and what it used up to now."""
    return {"epoch_seconds": {str(e): s for e, s in sorted(epoch_seconds.items())},
            "device": loading.describe_device(device), "world_size": ranks.world_size, "backend": ranks.backend,
            "resources": monitor.summary(outputs=["models/adapter", "checkpoints"])}


def carried_epoch_seconds(record):
    """{epoch: seconds} of a `run_record` (None: {}); entries that are not an epoch number and seconds are left out."""
    seconds = (record or {}).get("epoch_seconds")
    return {int(e): s for e, s in seconds.items() if str(e).isdigit() and isinstance(s, (int, float))
            and not isinstance(s, bool)} if isinstance(seconds, dict) else {}


def train_metrics(params, device, dtype, setup, ranks, seconds, examples, monitor,
                  adapter_dir="models/adapter"):
    """metrics/train.json's content. `adapter_dir`: where the adapter it describes is (its staging folder while the
    outputs are written). `seconds`: {epoch: seconds} of the epochs this process trained. Epochs an earlier
    run trained keep the seconds recorded in the resumed checkpoint (None if it recorded none). A run that trains no
    epoch (it resumed a finished training) reports the device, processes and resources recorded by the run that
    trained the last epoch, and says so with `carried_over: true`."""
    epochs = setup.history["epochs"]
    known = {**carried_epoch_seconds(setup.record), **seconds}
    per_epoch = [round(known[e["epoch"]], 3) if e["epoch"] in known else None for e in epochs]
    measured = [s for s in per_epoch if s is not None]
    base, adapted = setup.base_parameters, setup.n_parameters
    carried = not seconds and setup.record is not None
    run = setup.record if carried else {
        "device": loading.describe_device(device), "world_size": ranks.world_size, "backend": ranks.backend,
        "resources": monitor.summary(outputs=[adapter_dir, "checkpoints"])}
    return {
        "model": params["model"]["name"],
        "device": run["device"],
        "compute_dtype": str(dtype).replace("torch.", ""),
        "load_in_4bit": params["model"]["load_in_4bit"],
        "optimizer": setup.optimizer_name,
        "world_size": run["world_size"],
        "backend": run["backend"],
        "epochs": len(epochs),
        "train_examples": len(examples.prompt_ids),
        "resumed_from_epoch": setup.resumed[0] if setup.resumed else None,
        "carried_over": carried,
        "time": {"total_seconds": round(sum(measured), 1), "per_epoch_seconds": per_epoch},
        "train_loss_per_epoch": [e["train_loss"] for e in epochs],
        "val_loss_per_epoch": [e["val_loss"] for e in epochs],
        "val_accuracy_per_epoch": [e["val_accuracy"] for e in epochs],
        "parameters": {
            "total": base["total"],
            "trainable": adapted["trainable"],
            "trainable_percent": round(100 * adapted["trainable"] / base["total"], 4),
            "numel_as_stored": base["numel_as_stored"],
        },
        "adapter_bytes": tree_size_bytes(adapter_dir),
        "throughput": {  # over the epochs with a measured time
            "examples_per_second": round(len(examples.prompt_ids) * len(measured) / sum(measured), 2) if measured else None,
            "tokens_per_second": round(sum(examples.lengths) * len(measured)
                                       / sum(measured), 1) if measured else None,
        },
        "resources": run["resources"],
    }
