"""Stage finetune: QLoRA on the training sample. The base model stays frozen in 4-bit NF4; only LoRA adapters train.

Writes checkpoints/epoch-N (resumed if the run is interrupted), models/adapter (the final adapter only, never the
base weights), metrics/train.json and dvclive/ (the curves of every step and epoch); the last three all new or all
as they were, written once training is done. Loss is on the answer tokens only.
With QLORA_NLI_TORCHRUN set (qlora_nli/distributed.py) it runs data-parallel on several processes: the same batches
and the same result, every rank training its share of each batch; one process per machine (its local rank 0) writes
the outputs, so that every machine's checkout ends with the same files.
"""
import logging
import shutil
import tempfile
from pathlib import Path

import torch
from dvclive import Live

from qlora_nli import distributed, modeling, threads
from qlora_nli.errors import on_interrupt, run_stage, stage_arguments
from qlora_nli.artifacts import data_row_problem, read_rows
from qlora_nli.code import code_sha256
from qlora_nli.io import all_or_none, file_sha256, write_json
from qlora_nli.params import load_params
from qlora_nli.prompts import format_prompt
from qlora_nli.resources import ResourceMonitor
from qlora_nli.scoring import check_prompt_lengths, encode_answers, encode_prompts, mean_answer_nll, score_labels
from qlora_nli.training import (Checkpoints, build_training, carried_epoch_seconds, fingerprint, live_curves,
                                record_steps, rng_states, run_record, train_metrics, train_remaining_epochs)

log = logging.getLogger("finetune")
# Written together, all new or all as they were. checkpoints/ is not among them: it keeps every complete epoch (each
# written whole on its own), so that a failed or interrupted run resumes.
OUTPUTS = ["models/adapter", "dvclive/plots", "dvclive/metrics.json", "metrics/train.json"]


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
    ranks = distributed.start(device, lambda: modeling.weights_bytes(params["model"], device))
    threads.configure(t["num_threads"], ranks.local_world_size)
    dtype = modeling.pick_compute_dtype(device, params["model"]["compute_dtype"])
    train_rows = read_rows("data/train.jsonl", data_row_problem)
    val_rows = read_rows("data/validation.jsonl", data_row_problem)
    modeling.check_model_params(params, device)  # before any weights load

    tokenizer = modeling.load_tokenizer(params["model"]["name"], params["model"]["trust_remote_code"])
    answers = encode_answers(tokenizer)
    template = params["prompt"]["template"]
    prompt_ids = encode_prompts(tokenizer, [format_prompt(template, r) for r in train_rows])
    answer_ids = [answers[r["label"]] for r in train_rows]
    val_prompts, val_labels = [format_prompt(template, r) for r in val_rows], [r["label"] for r in val_rows]
    # Before the weights load: a pair longer than the model's context cannot be trained on (nor scored).
    context = modeling.context_length(params["model"]["name"], params["model"]["trust_remote_code"])
    fix = "remove the pair from data.source and rerun `dvc repro prepare`, or use a model with a longer context"
    longest_answer = max(map(len, answers))
    check_prompt_lengths(tokenizer, None, context, lambda i: f"data/train.jsonl row {i + 1}", fix,
                         longest_answer, prompt_ids)
    check_prompt_lengths(tokenizer, val_prompts, context, lambda i: f"data/validation.jsonl row {i + 1}", fix,
                         longest_answer)
    # train.resume decides whether to continue, not what training computes: not part of the fingerprint
    computed_by = {k: v for k, v in t.items() if k != "resume"}
    checkpoints = Checkpoints("checkpoints", fingerprint(params["model"], params["prompt"], params["lora"], computed_by,
                                                         file_sha256("data/train.jsonl"),
                                                         file_sha256("data/validation.jsonl"),
                                                         code_sha256(__file__)), resume=t["resume"])
    distributed.check_same_inputs(ranks, checkpoints.run_fingerprint, "finetune")

    on_interrupt(checkpoints.resume_note)  # Ctrl-C: one line saying which epoch a rerun resumes from

    log.info("loading %s on %s (%s, 4-bit: %s)", params["model"]["name"], device, dtype, params["model"]["load_in_4bit"])
    with ResourceMonitor() as monitor:
        setup = build_training(params, device, dtype, prompt_ids, answer_ids, tokenizer.pad_token_id,
                               checkpoints, ranks)
        history = setup.history
        epoch_seconds = carried_epoch_seconds(setup.record)  # every epoch's time, whichever run trained it

        def after_epoch(epoch, train_loss, seconds):
            val_loss, val_accuracy = validate(setup.model, tokenizer, val_prompts, val_labels, answers,
                                              t["batch_size"], ranks)
            # The history holds no time (record.json does): same params, data and code, same state.pt bytes.
            record = {"epoch": epoch, "step": len(history["steps"]), "train_loss": round(train_loss, 6),
                      "val_loss": round(val_loss, 6), "val_accuracy": round(val_accuracy, 4)}
            history["epochs"].append(record)
            log.info("epoch %d: train loss %.4f, val loss %.4f, val accuracy %.3f, %.0f s",
                     epoch, train_loss, val_loss, val_accuracy, seconds)
            epoch_seconds[epoch] = seconds
            # rank 0's times and resources, and every rank's RNG states: the same checkpoint on every node
            record = distributed.from_rank0(ranks, lambda: run_record(device, ranks, epoch_seconds, monitor))
            rng = distributed.gather_by_index(ranks, {ranks.rank: rng_states()}) if ranks.world_size > 1 else {}
            if ranks.writes:
                checkpoints.save(epoch, setup.model, setup.optimizer, setup.scheduler, setup.scaler, history,
                                 record, [rng[r] for r in sorted(rng)])

        seconds = train_remaining_epochs(setup, t, dtype, prompt_ids, answer_ids, tokenizer.pad_token_id,
                                         record_steps(history), after_epoch, ranks)
        if not ranks.writes:
            distributed.from_rank0(ranks, None)  # the collective in which rank 0 sends the writers its record
            return
        with all_or_none(OUTPUTS) as staged:
            modeling.save_adapter(setup.model, staged["models/adapter"])
            # dvclive writes the whole history (the same curves for a resumed run) to a scratch folder outside the
            # repository, whose files then join the other outputs
            with tempfile.TemporaryDirectory(prefix="qlora-nli-dvclive-") as scratch:
                with Live(scratch, dvcyaml=None, save_dvc_exp=False, report=None) as live:
                    live_curves(live, history)
                shutil.move(Path(scratch) / "plots", staged["dvclive/plots"])
                shutil.move(Path(scratch) / "metrics.json", staged["dvclive/metrics.json"])
            # rank 0's record (its times and resources) in every node's metrics/train.json
            metrics = distributed.from_rank0(ranks, lambda: train_metrics(params, device, dtype, setup, ranks, seconds,
                                                                          prompt_ids, answer_ids, monitor,
                                                                          staged["models/adapter"]))
            write_json(staged["metrics/train.json"], metrics)


if __name__ == "__main__":
    stage_arguments(__doc__)
    run_stage(main)
