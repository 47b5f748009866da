"""The pieces of the fine-tuning loop: batching, optimizer, one epoch, and resumable per-epoch checkpoints."""
import hashlib
import json
import logging
import math
import os
import random
import shutil
import signal
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from qlora_nli.io import atomic_path
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


class FrozenBlockStates:
    """The states entering the lowest adapted block, computed once per training example before training.

    With LoRA on the last `lora.layers` blocks only, the blocks below have no adapters and (checked by `usable`) no
    dropout, so they compute the same states for an example in every epoch. Training then runs only the adapted
    blocks on the kept states: the same loss and gradients as the full forward (tested on Llama and Phi), for
    15 of 30 blocks a third less work per epoch. Kept per example after the prompts' common prefix (kept once):
    76 MB for the embedded model's 1,000 pairs."""

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

    def __init__(self, model, sequences, prompt_ids, pad_id, dtype, batch_size=16):
        self.body = body_and_head(model)[0]
        self.blocks = list(self.body.layers)
        self.start = first_trainable_block(model)
        self.common = shared_prefix_length(prompt_ids)
        device = model.device
        captured = []
        hook = self.blocks[self.start - 1].register_forward_hook(lambda module, args, out: captured.append(out))
        order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))  # little padding
        self.rows = [None] * len(sequences)
        self.positions = 0  # computed, padding included
        try:
            with torch.no_grad(), autocast_for(device.type, dtype), running_only(self.body, self.blocks[:self.start]):
                for start in tqdm(range(0, len(order), batch_size), desc="frozen blocks", unit="batch", leave=False):
                    chunk = order[start : start + batch_size]
                    captured.clear()
                    forward_body(self.body, [sequences[i] for i in chunk], self.common, pad_id, device)
                    rows = captured[-1]  # a forward of the prefix (if any), then one of the rows
                    self.prefix = captured[0][0] if self.common else rows.new_zeros(0, rows.size(-1))
                    self.positions += self.common + rows.size(0) * rows.size(1)
                    for r, i in enumerate(chunk):
                        self.rows[i] = rows[r, rows.size(1) - (len(sequences[i]) - self.common):].clone()
        finally:
            hook.remove()
        log.info("kept the states entering block %d for %d examples (%.0f MB): later passes run %d of %d blocks",
                 self.start, len(sequences), sum(x.numel() * x.element_size() for x in self.rows) / 1e6,
                 len(self.blocks) - self.start, len(self.blocks))

    def adapted_blocks_only(self):
        return running_only(self.body, self.blocks[self.start:])

    def embed(self, examples):
        """`forward_body`'s embed for a micro-batch of these example indices."""
        return lambda r, start, stop: torch.cat([self.prefix, self.rows[examples[r]]])[start:stop]


def train_one_epoch(model, batches, prompt_ids, answer_ids, pad_id, optimizer, scheduler, scaler, train_params,
                    dtype, on_step, frozen=None):
    """One pass over `batches`; each batch is split into micro-batches whose gradients accumulate. With `frozen`
    (FrozenBlockStates) only the adapted blocks run."""
    model.train()
    device = model.device.type
    lengths = [len(p) + len(a) for p, a in zip(prompt_ids, answer_ids)]
    losses = []
    for batch in tqdm(batches, desc="train", unit="batch", leave=False):
        optimizer.zero_grad(set_to_none=True)
        n_answer_tokens = sum(len(answer_ids[i]) for i in batch)
        prefix = shared_prefix_length([prompt_ids[i] for i in batch])
        batch_loss = 0.0
        for part in micro_batches(batch, lengths, prefix, train_params["micro_batch_tokens"]):
            with autocast_for(device, dtype), frozen.adapted_blocks_only() if frozen else nullcontext():
                loss = answer_loss(model, [prompt_ids[i] for i in part], [answer_ids[i] for i in part], pad_id,
                                   embed=frozen.embed(part) if frozen else None)
            # weight by answer tokens so accumulation gives the same gradient as one big batch
            weight = sum(len(answer_ids[i]) for i in part) / n_answer_tokens
            scaler.scale(loss * weight).backward()
            batch_loss += loss.item() * weight
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad],
                                       train_params["max_grad_norm"])
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        losses.append(batch_loss)
        on_step(batch_loss, scheduler.get_last_lr()[0])
    return sum(losses) / len(losses)


def fingerprint(*parts):
    """Hash of everything that defines a run (params, data): a checkpoint is resumed only under the same hash."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


class Checkpoints:
    """`checkpoints/epoch-N/`: the adapter plus `state.pt` (optimizer, scheduler, RNG states, history).
    Each is written to a temporary directory and renamed, so a kill or Ctrl-C leaves only complete checkpoints."""

    def __init__(self, root, run_fingerprint):
        self.root = Path(root)
        self.run_fingerprint = run_fingerprint

    def save(self, epoch, model, optimizer, scheduler, scaler, history):
        with atomic_path(self.root / f"epoch-{epoch}") as tmp:
            save_adapter(model, tmp)
            torch.save({
                "fingerprint": self.run_fingerprint,
                "epoch": epoch,
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict(),
                "rng": {"python": random.getstate(), "numpy": np.random.get_state(),
                        "torch": torch.get_rng_state(),
                        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
                "history": history,
            }, tmp / "state.pt")
        # Fault injection for the resume test: die the hard way right after a complete checkpoint.
        if os.environ.get("QLORA_NLI_KILL_AFTER_EPOCH") == str(epoch):
            os.kill(os.getpid(), signal.SIGKILL)

    def latest(self):
        """(epoch, directory, state) of the newest checkpoint of this very run, else None (and stale ones go)."""
        found = sorted(self.root.glob("epoch-*"), key=lambda p: int(p.name.split("-")[1])) if self.root.exists() else []
        if not found:
            return None
        state = torch.load(found[-1] / "state.pt", weights_only=False)
        if state["fingerprint"] != self.run_fingerprint:
            log.info("checkpoints in %s belong to other params or data: starting fresh", self.root)
            shutil.rmtree(self.root)
            return None
        return state["epoch"], found[-1], state

    def restore(self, checkpoint, model, optimizer, scheduler, scaler):
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        epoch, directory, state = checkpoint
        set_peft_model_state_dict(model, load_file(directory / "adapter_model.safetensors"))
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        random.setstate(state["rng"]["python"])
        np.random.set_state(state["rng"]["numpy"])
        torch.set_rng_state(state["rng"]["torch"])
        if state["rng"]["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        return state["history"]


class Timer:
    def __enter__(self):
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.start
