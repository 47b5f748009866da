import logging
import os
import tempfile
import time
from contextlib import contextmanager

import torch
from tqdm import tqdm

from qlora_nli.forward import (
    autocast_for,
    body_and_head,
    forward_body,
    shared_prefix_length,
)
from qlora_nli.runtime import threads
from qlora_nli.runtime.errors import RunError

log = logging.getLogger(__name__)


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
