"""The forward pass that training and scoring share, and the training loss on the answer tokens.

Prompts are left-padded after their common prefix, which is computed once per pass; only the answer positions
reach the vocabulary projection."""
import logging
from contextlib import nullcontext

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)


def left_pad(sequences, pad_id, device):
    """Left padding puts every sequence's last token in the last column, so answers line up at the end.
    Position ids restart at 0 on the first real token, as if there were no padding."""
    width = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, s in enumerate(sequences):
        input_ids[i, width - len(s):] = torch.tensor(s)
        mask[i, width - len(s):] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return input_ids.to(device), mask.to(device), positions.to(device)


def body_and_head(model):
    """The transformer body and the vocabulary projection of a causal LM (LoRA-wrapped or not). Calling them
    separately lets us project only the rows that need logits, as one plain 2-D matmul: the model's own
    `logits_to_keep` slice is not contiguous, and torch then runs the projection as a batched matmul over a copy
    of the vocabulary matrix per row, a large share of a CPU training step (docs/performance.md)."""
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    return lm.base_model, lm.get_output_embeddings()


def common_prefix_length(a, b):
    n = min(len(a), len(b))
    return next((j for j in range(n) if a[j] != b[j]), n)


def shared_prefix_length(sequences):
    """Length of the token prefix all sequences share, leaving each at least one token of its own."""
    if len(sequences) < 2:
        return 0
    return min(min(len(s) for s in sequences) - 1, *(common_prefix_length(sequences[0], s) for s in sequences[1:]))


def forward_body(body, sequences, prefix, pad_id, device, use_cache=False, embed=None):
    """Hidden states of a batch, the shared prompt prefix computed once. Every prompt starts with the template's
    fixed text: it runs once with batch size 1, its keys/values are repeated over the batch, and only each
    sequence's own tokens (left-padded) run per row. Gradients flow through the repeated prefix, so training
    is exact too. Gradient checkpointing recomputes without a cache, so it gets the plain forward.
    `prefix` (at most the shared_prefix_length) is chosen by the caller, so that positions needing logits stay in
    the per-row part. `embed(i, start, stop)`, if given, supplies the input vectors of positions start..stop-1 of
    sequence i instead of the token embeddings (training.FrozenBlockStates).
    Returns (hidden states of the per-row part, attention mask over prefix + part, cache)."""
    if body.is_activation_checkpointing and body.training:
        prefix = 0
    cache = None
    if prefix:
        first = ({"inputs_embeds": embed(0, 0, prefix)[None]} if embed else
                 {"input_ids": torch.tensor([sequences[0][:prefix]], device=device)})
        cache = body(**first, use_cache=True).past_key_values
        cache.batch_repeat_interleave(len(sequences))
    input_ids, mask, positions = left_pad([s[prefix:] for s in sequences], pad_id, device)
    rows = {"input_ids": input_ids}
    if embed:
        width = input_ids.size(1)
        own = [embed(i, prefix, len(s)) for i, s in enumerate(sequences)]
        states = own[0].new_zeros(len(sequences), width, own[0].size(-1))  # padding: masked out, any value works
        for i, x in enumerate(own):
            states[i, width - len(x):] = x
        rows = {"inputs_embeds": states}
    mask = torch.cat([torch.ones(len(sequences), prefix, dtype=mask.dtype, device=device), mask], dim=1)
    out = body(**rows, attention_mask=mask, position_ids=positions + prefix, past_key_values=cache,
               use_cache=use_cache or cache is not None)
    return out.last_hidden_state, mask, out.past_key_values


def answer_loss(model, prompt_ids, answer_ids, pad_id, embed=None):
    """Mean cross-entropy over the answer tokens only, with logits computed at exactly those positions."""
    device = model.device
    body, head = body_and_head(model)
    sequences = [p + a for p, a in zip(prompt_ids, answer_ids)]
    hidden, _, _ = forward_body(body, sequences, shared_prefix_length(prompt_ids), pad_id, device, embed=embed)
    # Left padding puts each answer in the last columns; position t predicts token t + 1.
    width = hidden.size(1)
    rows = [i for i, a in enumerate(answer_ids) for _ in a]
    cols = [width - 1 - len(a) + j for a in answer_ids for j in range(len(a))]
    targets = torch.tensor([t for a in answer_ids for t in a], device=device)
    return F.cross_entropy(head(hidden[rows, cols]).float(), targets)


def mean_answer_nll(scores, labels, answers):
    """The validation loss (`answer_loss` over a whole set) from label scores already computed: the summed
    log-likelihood of each true answer, per answer token."""
    return -sum(scores[i, k].item() for i, k in enumerate(labels)) / sum(len(answers[k]) for k in labels)


@torch.no_grad()
def common_prefix_cache(body, prompt_ids, device):
    """(length, cache) of the prefix every prompt shares (shared_prefix_length: the template's fixed text), run once
    with batch size 1, so that the passes of a scoring call reuse it; (0, None) when they share nothing."""
    length = shared_prefix_length(prompt_ids)
    if not length:
        return 0, None
    return length, body(input_ids=torch.tensor([prompt_ids[0][:length]], device=device), use_cache=True).past_key_values


def autocast_for(device, dtype):
    if device == "cuda" and dtype != torch.float32:
        return torch.autocast("cuda", dtype=dtype)
    return nullcontext()
