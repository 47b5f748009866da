"""Which examples train together: length-grouped shuffled batches per epoch, split into micro-batches by a
token budget."""
import logging

import torch

log = logging.getLogger(__name__)


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
