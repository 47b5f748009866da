"""The fine-tuning loop: setup (`build_training`: model, LoRA, optimizer, schedule, a resumed checkpoint, kept frozen
states), then `fit`, which owns the epochs: each one trained (`train_one_epoch`), validated, recorded and checkpointed."""
import logging
import math
import random
import time
from contextlib import nullcontext
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm import tqdm

from qlora_nli.forward import (
    answer_loss,
    autocast_for,
    mean_answer_nll,
    shared_prefix_length,
)
from qlora_nli.infer.scoring import score_labels
from qlora_nli.model import adapters, loading
from qlora_nli.runtime import distributed, threads
from qlora_nli.runtime.distributed import SINGLE, sum_gradients
from qlora_nli.runtime.errors import RunError
from qlora_nli.train import record
from qlora_nli.train.batches import epoch_batches, micro_batches
from qlora_nli.train.checkpoints import newest_common_checkpoint
from qlora_nli.train.states import FrozenBlockStates

log = logging.getLogger(__name__)


def set_seed(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def make_optimizer(model, train_params, device):
    """Paged 8-bit AdamW on GPU (optimizer state in 8 bit, paged to RAM under pressure); plain AdamW on CPU,
    where bitsandbytes' paged optimizers do not run."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    kwargs = dict(lr=train_params["learning_rate"], weight_decay=train_params["weight_decay"])
    if device == "cuda":
        import bitsandbytes as bnb
        return bnb.optim.PagedAdamW8bit(trainable, **kwargs), "paged_adamw_8bit"
    return torch.optim.AdamW(trainable, **kwargs), "adamw"


def make_scheduler(optimizer, total_steps, warmup_ratio):
    """Linear warmup, then linear decay to zero."""
    warmup = math.ceil(total_steps * warmup_ratio)

    def factor(step):
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def train_one_epoch(setup, examples, batches, train_params, dtype, on_step=None, ranks=SINGLE):
    """One pass over `batches` of `examples` (Examples); each batch is split into micro-batches whose gradients
    accumulate. With `setup.frozen` (FrozenBlockStates) only the adapted blocks run. With several ranks, each takes
    every world_size-th example of each batch (similar lengths, as batches are length-grouped), in micro-batches of
    its own, and the gradients are summed over ranks before the step: each micro-batch's loss is weighted by its
    share of the whole batch's answer tokens, so the sum is the one-process gradient, and every rank then clips and
    steps on the same numbers. Examples rather than whole micro-batches are shared out because at the default token
    budget most batches are one micro-batch, which would leave all ranks but one idle. `on_step(loss, lr)` is called
    after every optimizer step."""
    model, frozen, optimizer, scheduler, scaler = setup.model, setup.frozen, setup.optimizer, setup.scheduler, setup.scaler
    prompt_ids, answer_ids, lengths = examples.prompt_ids, examples.answer_ids, examples.lengths
    model.train()
    device = model.device.type
    trainable = [p for p in model.parameters() if p.requires_grad]
    losses = []
    for batch in tqdm(batches, desc="train", unit="batch", leave=False):
        optimizer.zero_grad(set_to_none=True)
        n_answer_tokens = sum(len(answer_ids[i]) for i in batch)
        prefix = shared_prefix_length([prompt_ids[i] for i in batch])
        batch_loss = 0.0
        mine = ranks.share(batch)  # a rank may get none (a last batch smaller than world_size): it adds zeros
        for part in micro_batches(mine, lengths, prefix, train_params["micro_batch_tokens"]) if mine else []:
            threads.adapt()
            with autocast_for(device, dtype), frozen.adapted_blocks_only() if frozen else nullcontext():
                loss = answer_loss(model, [prompt_ids[i] for i in part], [answer_ids[i] for i in part],
                                   examples.pad_id, embed=frozen.embed(part) if frozen else None)
            # weight by answer tokens so accumulation gives the same gradient as one big batch
            weight = sum(len(answer_ids[i]) for i in part) / n_answer_tokens
            scaler.scale(loss * weight).backward()
            batch_loss += loss.item() * weight
        if ranks.world_size > 1:
            batch_loss = sum_gradients(trainable, batch_loss)
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(trainable, train_params["max_grad_norm"])
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        losses.append(batch_loss)
        if on_step is not None:
            on_step(batch_loss, scheduler.get_last_lr()[0])
    return sum(losses) / len(losses)


class Timer:
    def __enter__(self):
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.start


@dataclass
class TrainingSetup:
    """Everything one fine-tuning run trains with, as built by `build_training`."""
    model: object
    optimizer: object
    optimizer_name: str
    scheduler: object
    scaler: object
    base_parameters: dict
    n_parameters: dict
    history: dict = field(default_factory=lambda: {"epochs": [], "steps": []})
    resumed: tuple = None  # (epoch, directory, state) of the checkpoint resumed from, else None
    record: dict = None  # `run_record` of the run that wrote the resumed checkpoint, else None
    frozen: object = None  # FrozenBlockStates, or None when every epoch runs all blocks
    device: str = "cpu"  # where it trains ("cpu" or "cuda")


def build_training(params, device, dtype, examples, checkpoints=None, ranks=SINGLE):
    """Seed, 4-bit base model, LoRA, optimizer, linear schedule and gradient scaler for training on these examples;
    restored from the newest of `checkpoints` of this run if there is one; then the frozen blocks' states, kept
    when usable and epochs remain. The seed is set before the weights load, so the adapters start the same."""
    t = params["train"]
    set_seed(t["seed"])
    model = loading.load_base_model(params["model"], device)
    base_parameters = loading.count_parameters(model)
    model = adapters.attach_lora(model, params["lora"], t["gradient_checkpointing"])
    n_parameters = loading.count_parameters(model)
    steps_per_epoch = -(-len(examples.prompt_ids) // t["batch_size"])
    optimizer, optimizer_name = make_optimizer(model, t, device)
    scheduler = make_scheduler(optimizer, steps_per_epoch * t["epochs"], t["warmup_ratio"])
    scaler = torch.amp.GradScaler(device, enabled=dtype == torch.float16)
    setup = TrainingSetup(model, optimizer, optimizer_name, scheduler, scaler, base_parameters, n_parameters,
                          device=device)

    if checkpoints is not None:
        with distributed.main_first(ranks):  # each node's writer alone removes stale checkpoints; every rank resumes
            setup.resumed = checkpoints.latest()
        setup.resumed = newest_common_checkpoint(checkpoints, setup.resumed, ranks)
        if setup.resumed is not None:
            setup.history, setup.record = checkpoints.restore(setup.resumed, model, optimizer, scheduler, scaler,
                                                              ranks.rank)
            log.info("resuming after epoch %d from %s", setup.resumed[0], setup.resumed[1])

    why_not = FrozenBlockStates.usable(model, t)
    if why_not:
        log.info("every epoch runs all blocks: %s", why_not)
    elif len(setup.history["epochs"]) < t["epochs"]:
        setup.frozen = FrozenBlockStates(model, [p + a for p, a in zip(examples.prompt_ids, examples.answer_ids)],
                                         examples.prompt_ids, examples.pad_id, dtype, t["batch_size"])
    return setup


@torch.no_grad()
def validate(model, validation, ranks=SINGLE):
    """(mean answer NLL, accuracy) of `model` on `validation` (Validation), scored as `evaluate` scores."""
    model.eval()
    scores = score_labels(model, validation.tokenizer, validation.prompts, validation.batch_size, desc="validate",
                          ranks=ranks)
    accuracy = (scores.argmax(1) == torch.tensor(validation.labels)).float().mean().item()
    return mean_answer_nll(scores, validation.labels, validation.answers), accuracy


def fit(setup, examples, validation, train_params, dtype, checkpoints=None, ranks=SINGLE, monitor=None):
    """The training loop: every epoch after those in `setup.history`, up to train.epochs, is its batches
    (`epoch_batches`), one timed pass of `train_one_epoch`, validation, the epoch's entry in the history and, with
    `checkpoints`, a checkpoint that a later run resumes from; with `monitor` (ResourceMonitor) too, the checkpoint
    keeps the run's record (record.run_record: every epoch's seconds, where it ran, what it used). Returns
    {epoch: seconds} for the epochs trained here."""
    t = train_params
    history = setup.history
    epoch_seconds = record.carried_epoch_seconds(setup.record)  # every epoch's time, whichever run trained it
    seconds = {}
    try:
        for epoch in range(len(history["epochs"]) + 1, t["epochs"] + 1):
            with Timer() as timer:
                train_loss = train_one_epoch(setup, examples, epoch_batches(examples.lengths, t, epoch), t, dtype,
                                             lambda loss, lr: record.add_step(history, loss, lr), ranks)
            seconds[epoch] = epoch_seconds[epoch] = timer.seconds
            val_loss, val_accuracy = validate(setup.model, validation, ranks)
            record.add_epoch(history, epoch, train_loss, val_loss, val_accuracy, timer.seconds)
            if checkpoints is not None:
                run = None if monitor is None else record.run_record(setup.device, ranks, epoch_seconds, monitor)
                checkpoints.save_epoch(epoch, setup, ranks, run)
    except torch.OutOfMemoryError:
        raise RunError(f"finetune: GPU out of memory; lower params.yaml train.micro_batch_tokens "
                       f"(now {t['micro_batch_tokens']}) or set train.gradient_checkpointing: true")
    return seconds
