"""Stage finetune: QLoRA on the training sample. The base model stays frozen in 4-bit NF4; only LoRA adapters train.

Writes checkpoints/epoch-N (resumed if the run is interrupted), models/adapter (the final adapter only, never the
base weights), metrics/train.json and dvclive/ (live curves). Loss is on the answer tokens only.
With QLORA_NLI_TORCHRUN set (qlora_nli/distributed.py) it runs data-parallel on several processes: the same batches
and the same result, every rank training its share of each batch; only rank 0 writes outputs.
"""
import logging

import torch
from dvclive import Live

from qlora_nli import distributed, modeling
from qlora_nli.errors import RunError, run_stage
from qlora_nli.artifacts import data_row_problem, read_rows
from qlora_nli.io import atomic_path, file_sha256, tree_size_bytes, write_json
from qlora_nli.params import load_params
from qlora_nli.prompts import format_prompt
from qlora_nli.resources import ResourceMonitor
from qlora_nli.scoring import encode_answers, encode_prompts, mean_answer_nll, score_labels
from qlora_nli.training import (Checkpoints, FrozenBlockStates, Timer, fingerprint, length_grouped_batches,
                                make_optimizer, make_scheduler, set_seed, train_one_epoch)

log = logging.getLogger("finetune")


@torch.no_grad()
def validate(model, tokenizer, prompts, labels, answers, batch_size, ranks):
    model.eval()
    scores = score_labels(model, tokenizer, prompts, batch_size, desc="validate", ranks=ranks)
    accuracy = (scores.argmax(1) == torch.tensor(labels)).float().mean().item()
    return mean_answer_nll(scores, labels, answers), accuracy


def main():
    params = load_params()
    t = params["train"]
    device = modeling.pick_device(params["model"]["device"])
    ranks = distributed.start(device)
    distributed.set_cpu_threads(t["num_threads"], ranks)
    dtype = modeling.pick_compute_dtype(device, params["model"]["compute_dtype"])
    train_rows = read_rows("data/train.jsonl", data_row_problem)
    val_rows = read_rows("data/validation.jsonl", data_row_problem)
    modeling.check_model_params(params, device)  # before any weights load

    tokenizer = modeling.load_tokenizer(params["model"]["name"], params["model"]["trust_remote_code"])
    answers = encode_answers(tokenizer)
    template = params["prompt"]["template"]
    train_prompt_ids = encode_prompts(tokenizer, [format_prompt(template, r) for r in train_rows])
    train_answer_ids = [answers[r["label"]] for r in train_rows]
    val_prompts = [format_prompt(template, r) for r in val_rows]
    val_labels = [r["label"] for r in val_rows]
    lengths = [len(p) + len(a) for p, a in zip(train_prompt_ids, train_answer_ids)]

    log.info("loading %s on %s (%s, 4-bit: %s)", params["model"]["name"], device, dtype, params["model"]["load_in_4bit"])
    with ResourceMonitor() as monitor:
        set_seed(t["seed"])
        model = modeling.load_base_model(params["model"], device)
        base_parameters = modeling.count_parameters(model)
        model = modeling.attach_lora(model, params["lora"], t["gradient_checkpointing"])
        n_parameters = modeling.count_parameters(model)
        steps_per_epoch = -(-len(train_rows) // t["batch_size"])
        optimizer, optimizer_name = make_optimizer(model, t, device)
        scheduler = make_scheduler(optimizer, steps_per_epoch * t["epochs"], t["warmup_ratio"])
        scaler = torch.amp.GradScaler(device, enabled=dtype == torch.float16)

        run_id = fingerprint(params["model"], params["prompt"], params["lora"], t, file_sha256("data/train.jsonl"),
                             file_sha256("data/validation.jsonl"))
        checkpoints = Checkpoints("checkpoints", run_id)
        history = {"epochs": [], "steps": []}
        with distributed.main_first(ranks):  # rank 0 alone removes stale checkpoints; every rank resumes
            last = checkpoints.latest()
        distributed.check_same_on_every_rank(ranks, last[0] if last else None, "the epoch to resume after")
        if last is not None:
            history = checkpoints.restore(last, model, optimizer, scheduler, scaler)
            log.info("resuming after epoch %d from %s", last[0], last[1])

        frozen = None
        why_not = FrozenBlockStates.usable(model, t)
        if why_not:
            log.info("every epoch runs all blocks: %s", why_not)
        elif len(history["epochs"]) < t["epochs"]:
            frozen = FrozenBlockStates(model, [p + a for p, a in zip(train_prompt_ids, train_answer_ids)],
                                       train_prompt_ids, tokenizer.pad_token_id, dtype, t["batch_size"])

        with distributed.on_main(ranks, Live, "dvclive", dvcyaml=None, save_dvc_exp=False, report=None) as live:
            # A resumed run replays the saved history, so the curves match an uninterrupted run.
            for record in history["steps"]:
                live.step = record["step"]
                live.log_metric("train/step_loss", record["loss"])
                live.log_metric("train/learning_rate", record["lr"])
            for record in history["epochs"]:
                live.step = record["step"]
                for key in ("train_loss", "val_loss", "val_accuracy"):
                    live.log_metric(f"epoch/{key}", record[key])

            def on_step(loss, lr):
                step = len(history["steps"]) + 1
                history["steps"].append({"step": step, "loss": loss, "lr": lr})  # unrounded: a resumed run replays it
                live.step = step
                live.log_metric("train/step_loss", loss)
                live.log_metric("train/learning_rate", lr)

            measured_seconds = {}  # epoch -> seconds, for the epochs this process trains (not resumed ones)
            try:
                for epoch in range(len(history["epochs"]) + 1, t["epochs"] + 1):
                    batches = length_grouped_batches(lengths, t["batch_size"], seed=t["seed"] * 1000 + epoch)
                    with Timer() as timer:
                        train_loss = train_one_epoch(model, batches, train_prompt_ids, train_answer_ids,
                                                     tokenizer.pad_token_id, optimizer, scheduler, scaler, t, dtype,
                                                     on_step, frozen, ranks)
                    val_loss, val_accuracy = validate(model, tokenizer, val_prompts, val_labels, answers,
                                                      t["batch_size"], ranks)
                    # The checkpoint's history holds no time: same params and data, same bytes (and DVC hash).
                    record = {"epoch": epoch, "step": len(history["steps"]), "train_loss": round(train_loss, 6),
                              "val_loss": round(val_loss, 6), "val_accuracy": round(val_accuracy, 4)}
                    history["epochs"].append(record)
                    measured_seconds[epoch] = round(timer.seconds, 3)
                    for key in ("train_loss", "val_loss", "val_accuracy"):
                        live.log_metric(f"epoch/{key}", record[key])
                    log.info("epoch %d: train loss %.4f, val loss %.4f, val accuracy %.3f, %.0f s",
                             epoch, train_loss, val_loss, val_accuracy, timer.seconds)
                    if ranks.is_main:
                        checkpoints.save(epoch, model, optimizer, scheduler, scaler, history)
            except torch.OutOfMemoryError:
                raise RunError(f"finetune: GPU out of memory; lower params.yaml train.micro_batch_tokens "
                               f"(now {t['micro_batch_tokens']}) or set train.gradient_checkpointing: true")

        if not ranks.is_main:
            return
        with atomic_path("models/adapter") as tmp:
            modeling.save_adapter(model, tmp)

    epochs = history["epochs"]
    seconds = [measured_seconds.get(e["epoch"]) for e in epochs]  # None: trained by an interrupted earlier run
    measured = [s for s in seconds if s is not None]
    write_json("metrics/train.json", {
        "model": params["model"]["name"],
        "device": modeling.describe_device(device),
        "compute_dtype": str(dtype).replace("torch.", ""),
        "load_in_4bit": params["model"]["load_in_4bit"],
        "optimizer": optimizer_name,
        "world_size": ranks.world_size,
        "backend": ranks.backend,
        "epochs": len(epochs),
        "train_examples": len(train_rows),
        "resumed_from_epoch": last[0] if last else None,
        "time": {"total_seconds": round(sum(measured), 1), "per_epoch_seconds": seconds},
        "train_loss_per_epoch": [e["train_loss"] for e in epochs],
        "val_loss_per_epoch": [e["val_loss"] for e in epochs],
        "val_accuracy_per_epoch": [e["val_accuracy"] for e in epochs],
        "parameters": {
            "total": base_parameters["total"],
            "trainable": n_parameters["trainable"],
            "trainable_percent": round(100 * n_parameters["trainable"] / base_parameters["total"], 4),
            "numel_as_stored": base_parameters["numel_as_stored"],
        },
        "adapter_bytes": tree_size_bytes("models/adapter"),
        "throughput": {  # over the epochs this process trained
            "examples_per_second": round(len(train_rows) * len(measured) / sum(measured), 2) if measured else None,
            "tokens_per_second": round(sum(lengths) * len(measured) / sum(measured), 1) if measured else None,
        },
        "resources": monitor.summary(outputs=["models/adapter", "checkpoints"]),
    })


if __name__ == "__main__":
    run_stage(main)
