"""Stage finetune: QLoRA on the training sample. The base model stays frozen in 4-bit NF4; only LoRA adapters train.

Writes checkpoints/epoch-N (resumed if the run is interrupted), models/adapter (the final adapter only, never the
base weights), metrics/train.json and dvclive/ (the curves of every step and epoch); the last three all new or all
as they were, written once training is done. Loss is on the answer tokens only.
With NLI_TORCHRUN set (qlora_nli/runtime/launch.py) it runs data-parallel on several processes: the same batches
and the same result, every rank training its share of each batch; one process per machine (its local rank 0) writes
the outputs, so that every machine's checkout ends with the same files.
"""
import logging

from qlora_nli.config import load_params
from qlora_nli.data.artifacts import data_row_problem, read_rows
from qlora_nli.model import adapters, loading
from qlora_nli.runtime import distributed, launch, threads
from qlora_nli.runtime.code import code_sha256
from qlora_nli.runtime.errors import on_interrupt, run_stage, stage_arguments
from qlora_nli.runtime.files import file_sha256
from qlora_nli.runtime.io import all_or_none
from qlora_nli.runtime.resources import ResourceMonitor
from qlora_nli.train import examples as training_data
from qlora_nli.train.checkpoints import Checkpoints, fingerprint
from qlora_nli.train.loop import build_training, fit
from qlora_nli.train.record import train_metrics, write_record

log = logging.getLogger("finetune")
DATA = ["data/train.jsonl", "data/validation.jsonl"]
# Written together, all new or all as they were. checkpoints/ is not among them: it keeps every complete epoch (each
# written whole on its own), so that a failed or interrupted run resumes.
OUTPUTS = ["models/adapter", "dvclive/plots", "dvclive/metrics.json", "metrics/train.json"]


def main():
    params = load_params()
    m, t = params["model"], params["train"]
    device = loading.pick_device(params["compute"]["device"])
    ranks = launch.start(device, lambda: loading.weights_bytes(m, device))
    threads.configure(params["compute"]["num_threads"], ranks.local_world_size)
    dtype = loading.pick_compute_dtype(device, m["compute_dtype"])
    train_rows, val_rows = (read_rows(path, data_row_problem) for path in DATA)
    loading.check_model_params(params, device)  # before any weights load
    tokenizer = loading.load_tokenizer(m["name"], m["trust_remote_code"])
    examples, validation = training_data.encode(tokenizer, params["prompt"]["template"], train_rows, val_rows,
                                                loading.context_length(m["name"], m["trust_remote_code"]),
                                                t["validation_batch_size"])
    # train.resume decides whether to continue, not what training computes: not part of the fingerprint
    computed_by = {k: v for k, v in t.items() if k != "resume"}
    checkpoints = Checkpoints("checkpoints", fingerprint(m, params["prompt"], params["lora"], computed_by,
                                                         *map(file_sha256, DATA), code_sha256(__file__)),
                              resume=t["resume"])
    distributed.check_same_inputs(ranks, checkpoints.run_fingerprint, "finetune")
    on_interrupt(checkpoints.resume_note)  # Ctrl-C: one line saying which epoch a rerun resumes from

    log.info("loading %s on %s (%s, 4-bit: %s)", m["name"], device, dtype, m["load_in_4bit"])
    with ResourceMonitor() as monitor:
        setup = build_training(params, device, dtype, examples, checkpoints, ranks)
        seconds = fit(setup, examples, validation, t, dtype, checkpoints, ranks, monitor)
        if not ranks.writes:
            distributed.from_rank0(ranks, None)  # the collective in which rank 0 sends the writers its record
            return
        with all_or_none(OUTPUTS) as staged:
            adapters.save_adapter(setup.model, staged["models/adapter"])
            # rank 0's record (its times and resources) in every node's metrics/train.json
            metrics = distributed.from_rank0(ranks, lambda: train_metrics(params, device, dtype, setup, ranks, seconds,
                                                                          examples, monitor, staged["models/adapter"]))
            write_record(setup.history, metrics, *(staged[o] for o in OUTPUTS[1:]))


if __name__ == "__main__":
    stage_arguments(__doc__)
    run_stage(main)
