"""The pieces of the fine-tuning loop: batching, optimizer, one epoch, and resumable per-epoch checkpoints."""
import hashlib
import json
import logging
import math
import os
import pickle
import random
import shutil
import signal
import tempfile
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from qlora_nli import distributed, modeling, threads
from qlora_nli.artifacts import ADAPTER_WEIGHTS, check_weights_file
from qlora_nli.distributed import SINGLE, sum_gradients
from qlora_nli.errors import CheckpointError, RunError
from qlora_nli.io import atomic_path, tree_size_bytes
from qlora_nli.modeling import save_adapter
from qlora_nli.scoring import answer_loss, body_and_head, forward_body, shared_prefix_length

log = logging.getLogger(__name__)


def set_seed(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def length_grouped_batches(lengths, batch_size, seed):
    """Shuffled batches of similar-length examples: padding (wasted compute) shrinks, while which examples meet in
    a batch and the batch order still change every epoch. Depends only on `seed`, so a resumed run sees the same
    batches as an uninterrupted one."""
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(lengths), generator=g).tolist()
    window = batch_size * 16
    batches = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start : start + window], key=lambda i: lengths[i])
        batches += [chunk[j : j + batch_size] for j in range(0, len(chunk), batch_size)]
    return [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()]


def epoch_batches(lengths, train_params, epoch):
    """The batches of `epoch` (1-based): a seed of their own per epoch, derived from train.seed, so every epoch
    differs and a resumed run, a benchmark and the stage all see the same order."""
    return length_grouped_batches(lengths, train_params["batch_size"], seed=train_params["seed"] * 1000 + epoch)


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


def autocast_for(device, dtype):
    if device == "cuda" and dtype != torch.float32:
        return torch.autocast("cuda", dtype=dtype)
    return nullcontext()


def micro_batches(batch, lengths, prefix, max_tokens):
    """Consecutive slices of `batch` of at most `max_tokens` computed tokens each (rows x padded length beyond the
    shared prefix), one row at least. Activation memory grows with these tokens, not with the number of rows,
    so a token budget caps memory for short and long examples alike; short examples get more rows per pass."""
    parts, current, longest = [], [], 0
    for i in batch:
        longest_with_i = max(longest, lengths[i] - prefix)
        if current and longest_with_i * (len(current) + 1) > max_tokens:
            parts.append(current)
            current, longest_with_i = [], lengths[i] - prefix
        current.append(i)
        longest = longest_with_i
    return parts + [current]


def first_trainable_block(model):
    """Index of the lowest transformer block with trainable weights; 0 if anything below the blocks trains."""
    return min(int(name.split(".layers.")[1].split(".")[0]) if ".layers." in name else 0
               for name, p in model.named_parameters() if p.requires_grad)


@contextmanager
def running_only(body, blocks):
    """Let `body` (a Llama or Phi model) run `blocks` as its whole stack; each attention layer indexes the KV cache
    by its position in the stack, so they are renumbered for the time being."""
    every = body.layers
    body.layers = torch.nn.ModuleList(blocks)
    for j, block in enumerate(blocks):
        block.self_attn.layer_idx = j
    try:
        yield
    finally:
        body.layers = every
        for j, block in enumerate(every):
            block.self_attn.layer_idx = j


class _RowsInMemory:
    """Kept rows as tensors on the model's device."""

    def __init__(self):
        self.rows, self.nbytes = [], 0

    def append(self, row):
        self.rows.append(row.clone())
        self.nbytes += row.numel() * row.element_size()
        return len(self.rows) - 1

    def read(self, key):
        return self.rows[key]


class _RowsInFile:
    """Kept rows in an anonymous temporary file (in TMPDIR), read back with explicit reads: their bytes live in the
    kernel's page cache, which is reclaimable and not part of this process's RSS, unlike the touched pages of a
    memory map. The file is unlinked when created, so it vanishes when the process ends, however it ends."""

    def __init__(self, device):
        self.file = tempfile.TemporaryFile(prefix="qlora-nli-frozen-states-")
        self.device, self.where, self.nbytes = device, [], 0

    def append(self, row):
        data = row.detach().contiguous().cpu()
        raw = data.view(torch.uint8).numpy()
        if os.pwrite(self.file.fileno(), raw, self.nbytes) != raw.nbytes:
            raise RunError(f"finetune: short write to the frozen-block states file in {tempfile.gettempdir()}; "
                           f"free disk space there or point TMPDIR at a disk with room")
        self.where.append((self.nbytes, data.shape, data.dtype))
        self.nbytes += raw.nbytes
        return len(self.where) - 1

    def read(self, key):
        offset, shape, dtype = self.where[key]
        row = torch.empty(shape, dtype=dtype)
        raw = row.view(torch.uint8).numpy()
        if os.preadv(self.file.fileno(), [raw], offset) != raw.nbytes:
            raise RunError(f"finetune: the frozen-block states file in {tempfile.gettempdir()} was cut short; "
                           f"rerun the stage")
        return row.to(self.device)


class FrozenBlockStates:
    """The states entering the lowest adapted block, computed once per training example before training.

    With LoRA on the last `lora.layers` blocks only, the blocks below have no adapters and (checked by `usable`) no
    dropout, so they compute the same states for an example in every epoch. Training then runs only the adapted
    blocks on the kept states: the same loss and gradients as the full forward (tested on Llama and Phi), and the
    fewer blocks are adapted, the less work per epoch. Kept per example after the prompts' common prefix (kept once);
    their size grows with the training set, so they go to a temporary file (`in_memory=False`, the default)
    and each micro-batch reads back its rows: memory stays flat as the training set grows, and the numbers are
    the same bits as kept in memory (tested)."""

    @staticmethod
    def usable(model, train_params):
        """Why the full forward must run every epoch, or None if the states can be kept."""
        if first_trainable_block(model) == 0:
            return "every block is adapted"
        if train_params["gradient_checkpointing"]:
            return "gradient checkpointing recomputes the blocks anyway"
        rates = {k: v for k, v in model.config.to_dict().items()
                 if ("dropout" in k or "pdrop" in k) and isinstance(v, (int, float)) and v}
        return f"the frozen blocks use dropout ({rates}), so they differ every epoch" if rates else None

    def __init__(self, model, sequences, prompt_ids, pad_id, dtype, batch_size=16, in_memory=False):
        self.body = body_and_head(model)[0]
        self.blocks = list(self.body.layers)
        self.start = first_trainable_block(model)
        self.common = shared_prefix_length(prompt_ids)
        device = model.device
        self.rows = _RowsInMemory() if in_memory else _RowsInFile(device)
        captured = []
        hook = self.blocks[self.start - 1].register_forward_hook(lambda module, args, out: captured.append(out))
        started = time.perf_counter()
        order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))  # little padding
        self.keys = [None] * len(sequences)
        self.positions = 0  # computed, padding included
        try:
            with torch.no_grad(), autocast_for(device.type, dtype), running_only(self.body, self.blocks[:self.start]):
                for start in tqdm(range(0, len(order), batch_size), desc="frozen blocks", unit="batch", leave=False):
                    chunk = order[start : start + batch_size]
                    threads.adapt()
                    captured.clear()
                    forward_body(self.body, [sequences[i] for i in chunk], self.common, pad_id, device)
                    rows = captured[-1]  # a forward of the prefix (if any), then one of the rows
                    self.prefix = captured[0][0] if self.common else rows.new_zeros(0, rows.size(-1))
                    self.positions += self.common + rows.size(0) * rows.size(1)
                    for r, i in enumerate(chunk):
                        self.keys[i] = self.rows.append(rows[r, rows.size(1) - (len(sequences[i]) - self.common):])
        finally:
            hook.remove()
        self.seconds = time.perf_counter() - started  # part of training's cost, for benchmarks
        log.info("kept the states entering block %d for %d examples (%.0f MB, %s): later passes run %d of %d blocks",
                 self.start, len(sequences), self.rows.nbytes / 1e6,
                 "in memory" if in_memory else "in a temporary file",
                 len(self.blocks) - self.start, len(self.blocks))

    def adapted_blocks_only(self):
        return running_only(self.body, self.blocks[self.start:])

    def embed(self, examples):
        """`forward_body`'s embed for a micro-batch of these example indices (their rows read once)."""
        rows = [torch.cat([self.prefix, self.rows.read(self.keys[i])]) for i in examples]
        return lambda r, start, stop: rows[r][start:stop]


def train_one_epoch(model, batches, prompt_ids, answer_ids, pad_id, optimizer, scheduler, scaler, train_params,
                    dtype, on_step, frozen=None, ranks=SINGLE):
    """One pass over `batches`; each batch is split into micro-batches whose gradients accumulate. With `frozen`
    (FrozenBlockStates) only the adapted blocks run. With several ranks, each takes every world_size-th example of
    each batch (similar lengths, as batches are length-grouped), in micro-batches of its own, and the gradients
    are summed over ranks before the step: each micro-batch's loss is weighted by its share of the whole batch's
    answer tokens, so the sum is the one-process gradient, and every rank then clips and steps on the same numbers.
    Examples rather than whole micro-batches are shared out because at the default token budget most batches are
    one micro-batch, which would leave all ranks but one idle."""
    model.train()
    device = model.device.type
    lengths = [len(p) + len(a) for p, a in zip(prompt_ids, answer_ids)]
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
                loss = answer_loss(model, [prompt_ids[i] for i in part], [answer_ids[i] for i in part], pad_id,
                                   embed=frozen.embed(part) if frozen else None)
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
        on_step(batch_loss, scheduler.get_last_lr()[0])
    return sum(losses) / len(losses)


def fingerprint(*parts):
    """Hash of everything that defines a run (params, data, code): a checkpoint is resumed only under the same hash."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


CHECKPOINT_WEIGHTS = ADAPTER_WEIGHTS[0]  # the adapter weights save_adapter writes into a checkpoint, restore loads


class Checkpoints:
    """`checkpoints/epoch-N/`: the adapter, `run.json` (which run and epoch), `state.pt` (optimizer, scheduler,
    RNG states, history) and `record.json` (`run_record`: the seconds each epoch took and what the run used, kept apart
    so that `state.pt` has the same bytes on every run of the same params, data and code). Each is written to a
    temporary directory and renamed, so a kill or Ctrl-C leaves only complete checkpoints.

    Nothing read back can run code: a checkpoint may come from a DVC remote or be dropped into the folder. `run.json`
    is JSON, the adapter is safetensors, and `state.pt` holds only tensors and plain Python values (NumPy's RNG state
    is stored as a tensor and ints), so it loads with `torch.load(weights_only=True)`; anything else is refused.
    Owner: the finetune process of this workspace (rank 0 when there are several): it alone writes and deletes here.
    With `resume=False` (params train.resume) `latest` deletes every checkpoint and finds none: training starts over."""

    def __init__(self, root, run_fingerprint, resume=True):
        self.root = Path(root)
        self.run_fingerprint = run_fingerprint
        self.resume = resume

    def save(self, epoch, model, optimizer, scheduler, scaler, history, record=None, rng_of_ranks=None):
        """`rng_of_ranks` (several processes): every rank's `rng_states()`, so that each rank resumes its own and every
        node writes the same bytes."""
        with atomic_path(self.root / f"epoch-{epoch}") as tmp:
            save_adapter(model, tmp)
            (tmp / "run.json").write_text(json.dumps({"fingerprint": self.run_fingerprint, "epoch": epoch}) + "\n")
            if record is not None:
                (tmp / "record.json").write_text(json.dumps(record, sort_keys=True) + "\n")
            torch.save({
                "fingerprint": self.run_fingerprint,
                "epoch": epoch,
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict(),
                "rng": rng_of_ranks[0] if rng_of_ranks else rng_states(),
                **({"rng_of_ranks": rng_of_ranks} if rng_of_ranks else {}),
                "history": history,
            }, tmp / "state.pt")
        # Fault injection for the resume test: die the hard way right after a complete checkpoint.
        if os.environ.get("QLORA_NLI_KILL_AFTER_EPOCH") == str(epoch):
            os.kill(os.getpid(), signal.SIGKILL)

    def epochs(self):
        """The epochs of this very run found in the folder, oldest first."""
        found = self.root.glob("epoch-*") if self.root.exists() else []
        return sorted(int(p.name.split("-")[1]) for p in found
                      if p.name.split("-")[1].isdigit() and self._run_of(p) == self.run_fingerprint)

    def resume_note(self):
        """What the next run does after this one is interrupted, by the complete checkpoints of this run on disk."""
        epochs = self.epochs()
        if not epochs:
            return "no epoch is complete yet; `dvc repro` starts the training again"
        if not self.resume:
            return f"epoch {epochs[-1]} is complete, but train.resume is false: `dvc repro` starts over"
        return f"epoch {epochs[-1]} is complete, `dvc repro` resumes from it"

    def _run_of(self, directory):
        """The fingerprint `directory` was written under, from JSON only; None if it has none (older format)."""
        try:
            return json.loads((directory / "run.json").read_text()).get("fingerprint")
        except (OSError, ValueError, AttributeError):
            return None

    def latest(self):
        """(epoch, directory, state) of the newest checkpoint of this very run, else None (and others' go)."""
        found = sorted(self.root.glob("epoch-*"), key=lambda p: int(p.name.split("-")[1])) if self.root.exists() else []
        if not found:
            return None
        if not self.resume:
            log.info("train.resume is false: deleting %s, training starts from epoch 1", self.root)
            shutil.rmtree(self.root)
            return None
        if self._run_of(found[-1]) != self.run_fingerprint:  # decided before unpickling anything
            log.info("checkpoints in %s belong to other params or data (or an older format): starting fresh", self.root)
            shutil.rmtree(self.root)
            return None
        return self.load(found[-1])

    def load(self, directory):
        """(epoch, directory, state) of the checkpoint in `directory`, checked (see `latest`)."""
        directory = Path(directory)
        state_file = directory / "state.pt"
        fix = f"delete {self.root}/ to start fresh (rm -r {self.root})"
        older = [e for e in self.epochs() if f"epoch-{e}" != directory.name]
        if older:
            fix = f"delete {directory} to resume from epoch-{older[-1]} (rm -r {directory}), or " + fix
        try:
            state = torch.load(state_file, weights_only=True)
        except pickle.UnpicklingError:
            raise CheckpointError(f"{state_file}: refused to load, it holds objects other than tensors and plain "
                                  f"values (an older version's checkpoint, another program's file, or a crafted one); "
                                  f"nothing in it was run; {fix}") from None
        except (RuntimeError, EOFError, OSError, ValueError) as e:
            raise CheckpointError(f"{state_file}: cannot be read ({type(e).__name__}: truncated or not a "
                                  f"checkpoint); {fix}") from None
        if not isinstance(state, dict) or state.get("fingerprint") != self.run_fingerprint:
            raise CheckpointError(f"{state_file}: does not belong to {directory / 'run.json'}; {fix}")
        # What `restore` loads into the model, checked before the base model loads. A checkpoint is written whole
        # (renamed into place), so one with missing or damaged weights was changed by something else: refused, as a
        # damaged state.pt is, rather than silently trained from an older epoch.
        weights = directory / CHECKPOINT_WEIGHTS
        if not weights.is_file():
            raise CheckpointError(f"{directory}: no {CHECKPOINT_WEIGHTS}, the checkpoint is incomplete; {fix}")
        check_weights_file(weights, fix, CheckpointError)
        return state["epoch"], directory, state

    def restore(self, checkpoint, model, optimizer, scheduler, scaler, rank=0):
        """Load `checkpoint` (from `latest`) into the model, optimizer, scheduler, scaler and the RNGs (`rank`'s own
        where the checkpoint holds every rank's); returns its (history, record), the record None if it has none."""
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        epoch, directory, state = checkpoint
        set_peft_model_state_dict(model, load_file(directory / CHECKPOINT_WEIGHTS))
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        of_ranks = state.get("rng_of_ranks") or [state["rng"]]
        rng = of_ranks[rank] if rank < len(of_ranks) else state["rng"]
        random.setstate(rng["python"])
        np.random.set_state(_numpy_rng_from_plain(rng["numpy"]))
        torch.set_rng_state(rng["torch"])
        if rng["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        try:
            record = json.loads((directory / "record.json").read_text())
        except (OSError, ValueError):
            record = None  # written without one, or unreadable: metrics/train.json then times only this run's epochs
        if not isinstance(record, dict) or not RECORD_KEYS <= set(record):
            record = None
        return state["history"], record


def rng_states():
    """This process's Python, NumPy, torch and CUDA RNG states, as a checkpoint keeps them."""
    return {"python": random.getstate(), "numpy": _numpy_rng_to_plain(np.random.get_state()),
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def _numpy_rng_to_plain(state):
    """NumPy's legacy RNG state ('MT19937', uint32 keys, pos, has_gauss, cached_gaussian) without NumPy objects, so
    that `torch.load(weights_only=True)` reads it back without allow-listing NumPy types."""
    name, keys, pos, has_gauss, cached_gaussian = state
    return {"name": str(name), "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
            "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)}


def _numpy_rng_from_plain(plain):
    keys = plain["keys"].numpy().astype(np.uint32)
    return plain["name"], keys, plain["pos"], plain["has_gauss"], plain["cached_gaussian"]


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


def build_training(params, device, dtype, prompt_ids, answer_ids, pad_id, checkpoints=None, ranks=SINGLE):
    """Seed, 4-bit base model, LoRA, optimizer, linear schedule and gradient scaler for training on these examples;
    restored from the newest of `checkpoints` of this run if there is one; then the frozen blocks' states, kept
    when usable and epochs remain. The seed is set before the weights load, so the adapters start the same."""
    t = params["train"]
    set_seed(t["seed"])
    model = modeling.load_base_model(params["model"], device)
    base_parameters = modeling.count_parameters(model)
    model = modeling.attach_lora(model, params["lora"], t["gradient_checkpointing"])
    n_parameters = modeling.count_parameters(model)
    steps_per_epoch = -(-len(prompt_ids) // t["batch_size"])
    optimizer, optimizer_name = make_optimizer(model, t, device)
    scheduler = make_scheduler(optimizer, steps_per_epoch * t["epochs"], t["warmup_ratio"])
    scaler = torch.amp.GradScaler(device, enabled=dtype == torch.float16)
    setup = TrainingSetup(model, optimizer, optimizer_name, scheduler, scaler, base_parameters, n_parameters)

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
        setup.frozen = FrozenBlockStates(model, [p + a for p, a in zip(prompt_ids, answer_ids)], prompt_ids, pad_id,
                                         dtype, t["batch_size"])
    return setup


def newest_common_checkpoint(checkpoints, newest, ranks):
    """The checkpoint every rank resumes: `newest` (from `latest`) for one process; with several, the newest epoch
    that every rank's checkpoints/ holds (each node keeps its own: one that died while writing epoch N, or a fresh
    checkout, holds fewer), so that all ranks restore the same state. None: training starts over everywhere."""
    if ranks.world_size == 1:
        return newest
    held = distributed.gather_by_index(ranks, {ranks.rank: checkpoints.epochs()})
    common = set.intersection(*(set(epochs) for epochs in held.values()))
    epoch = max(common, default=None)
    if epoch != (newest[0] if newest else None):
        log.info("resuming after epoch %s, the newest that every node holds (checkpoints per rank: %s)", epoch,
                 ", ".join(f"rank {r}: {e or 'none'}" for r, e in sorted(held.items())))
        return checkpoints.load(checkpoints.root / f"epoch-{epoch}") if epoch is not None else None
    return newest


def train_remaining_epochs(setup, train_params, dtype, prompt_ids, answer_ids, pad_id, on_step, after_epoch,
                           ranks=SINGLE, max_batches=None):
    """Train the epochs after those in `setup.history`, up to train.epochs. Per epoch: its batches
    (`epoch_batches`, at most `max_batches` of them if given), `train_one_epoch` timed, then
    `after_epoch(epoch, train_loss, seconds)`. Returns {epoch: seconds} for the epochs trained here."""
    t = train_params
    lengths = [len(p) + len(a) for p, a in zip(prompt_ids, answer_ids)]
    seconds = {}
    try:
        for epoch in range(len(setup.history["epochs"]) + 1, t["epochs"] + 1):
            batches = epoch_batches(lengths, t, epoch)[:max_batches]
            with Timer() as timer:
                train_loss = train_one_epoch(setup.model, batches, prompt_ids, answer_ids, pad_id, setup.optimizer,
                                             setup.scheduler, setup.scaler, t, dtype, on_step, setup.frozen, ranks)
            seconds[epoch] = timer.seconds
            after_epoch(epoch, train_loss, timer.seconds)
    except torch.OutOfMemoryError:
        raise RunError(f"finetune: GPU out of memory; lower params.yaml train.micro_batch_tokens "
                       f"(now {t['micro_batch_tokens']}) or set train.gradient_checkpointing: true")
    return seconds


def record_steps(history):
    """The `on_step(loss, lr)` of `train_remaining_epochs` that appends each step to `history` (unrounded: a resumed
    run replays it); dvclive gets the whole history at the end, by `live_curves`."""
    def on_step(loss, lr):
        history["steps"].append({"step": len(history["steps"]) + 1, "loss": loss, "lr": lr})

    return on_step


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
            "device": modeling.describe_device(device), "world_size": ranks.world_size, "backend": ranks.backend,
            "resources": monitor.summary(outputs=["models/adapter", "checkpoints"])}


def carried_epoch_seconds(record):
    """{epoch: seconds} of a `run_record` (None: {}); entries that are not an epoch number and seconds are left out."""
    seconds = (record or {}).get("epoch_seconds")
    return {int(e): s for e, s in seconds.items() if str(e).isdigit() and isinstance(s, (int, float))
            and not isinstance(s, bool)} if isinstance(seconds, dict) else {}


def train_metrics(params, device, dtype, setup, ranks, seconds, prompt_ids, answer_ids, monitor,
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
        "device": modeling.describe_device(device), "world_size": ranks.world_size, "backend": ranks.backend,
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
        "train_examples": len(prompt_ids),
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
            "examples_per_second": round(len(prompt_ids) * len(measured) / sum(measured), 2) if measured else None,
            "tokens_per_second": round(sum(len(p) + len(a) for p, a in zip(prompt_ids, answer_ids)) * len(measured)
                                       / sum(measured), 1) if measured else None,
        },
        "resources": run["resources"],
    }
