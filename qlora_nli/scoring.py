"""Turning prompts into predictions: label log-likelihoods (method "score") or greedy generation ("generate").

Training and scoring share one tokenization: prompt tokens (with the tokenizer's special tokens) followed by the
answer tokens of " <label>", so the model is scored on exactly the sequences it was trained to complete.
"""
import copy
import logging
import re

import torch
import torch.nn.functional as F
from tqdm import tqdm

from qlora_nli.distributed import SINGLE, gather_by_index
from qlora_nli.prompts import LABELS, answer_text

log = logging.getLogger(__name__)


def encode_prompts(tokenizer, prompts):
    return [tokenizer(p).input_ids for p in prompts]


def encode_answers(tokenizer):
    """Token ids of each label's answer, index = label id."""
    return [tokenizer(answer_text(k), add_special_tokens=False).input_ids for k in range(len(LABELS))]


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


def forward_body(body, sequences, prefix, pad_id, device, use_cache=False, embed=None, prefix_cache=None):
    """Hidden states of a batch, the shared prompt prefix computed once. Every prompt starts with the template's
    fixed text: it runs once with batch size 1, its keys/values are repeated over the batch, and only each
    sequence's own tokens (left-padded) run per row. Gradients flow through the repeated prefix, so training
    is exact too. Gradient checkpointing recomputes without a cache, so it gets the plain forward.
    `prefix` (at most the shared_prefix_length) is chosen by the caller, so that positions needing logits stay in
    the per-row part. `embed(i, start, stop)`, if given, supplies the input vectors of positions start..stop-1 of
    sequence i instead of the token embeddings (training.FrozenBlockStates). `prefix_cache`, if given, is the cache
    of those `prefix` tokens already computed (common_prefix_cache(); it is copied, not changed).
    Returns (hidden states of the per-row part, attention mask over prefix + part, cache)."""
    if body.is_activation_checkpointing and body.training:
        prefix = 0
    cache = None
    if prefix:
        if prefix_cache is None:
            first = ({"inputs_embeds": embed(0, 0, prefix)[None]} if embed else
                     {"input_ids": torch.tensor([sequences[0][:prefix]], device=device)})
            cache = body(**first, use_cache=True).past_key_values
        else:
            cache = copy.deepcopy(prefix_cache)
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


def plan_groups(sequences, prefix):
    """Groups of rows that share more than the batch's common `prefix`, as (member rows, length of the prefix they
    share beyond `prefix`), chosen to minimise the tokens the batch computes: each group's shared prefix once (one row
    per group, padded to the longest), then every row's remaining tokens (padded to the longest). Padding counts
    because it is computed too. Returns [] when computing every row's tokens beyond `prefix` (forward_body) costs no
    more, e.g. when no prompts are related.

    For a width w of the rows' own part, a row longer than prefix + w must get its first tokens from a group; a group
    of rows that are neighbours in lexicographic order shares their common prefix, so filling groups greedily in that
    order gives the fewest group rows. The group prefix is kept as short as its members allow: the group pass is
    padded to its longest group prefix, while the own part is padded to w anyway."""
    rows = sorted(range(len(sequences)), key=lambda i: sequences[i])
    shared = [[common_prefix_length(sequences[i], sequences[j]) for j in range(len(sequences))]
              for i in range(len(sequences))]
    widest = max(len(s) for s in sequences) - prefix
    best_cost, best = len(rows) * widest, []
    for width in range(1, widest):
        groups = []  # [members, group prefix length, shortest member length]
        for i in rows:
            need = len(sequences[i]) - prefix - width
            if need <= 0:
                continue
            if groups:
                members, length, shortest = groups[-1]
                shortest = min(shortest, len(sequences[i]))
                length = max(length, need)
                # every member keeps at least one token of its own, the last one, whose hidden state is scored
                if min(shared[members[0]][i], shortest - 1) - prefix >= length:
                    groups[-1] = [members + [i], length, shortest]
                    continue
            groups.append([[i], need, len(sequences[i])])
        cost = len(groups) * (widest - width) + len(rows) * width
        if cost < best_cost:
            best_cost, best = cost, [(members, length) for members, length, _ in groups]
    return best


def forward_grouped(body, sequences, prefix, groups, pad_id, device, prefix_cache=None):
    """forward_body for prompts that share more than the batch's `prefix` (scoring only, without gradients; training
    keeps forward_body): the batch prefix runs once (or comes as `prefix_cache`), then each group's shared prefix once
    (one row per group, left-padded), its keys/values are copied to the group's members, then every row's own tokens
    (left-padded). A row in no group sees the batch prefix only: the group columns are masked out for it, so its mask
    has a hole there.
    Returns what forward_body returns: (hidden states of the own part, attention mask over all columns, cache)."""
    heads = [sequences[members[0]][: prefix + length] for members, length in groups]
    _, head_mask, cache = forward_body(body, heads, prefix, pad_id, device, use_cache=True, prefix_cache=prefix_cache)
    source, skip = [0] * len(sequences), [0] * len(sequences)
    for g, (members, length) in enumerate(groups):
        for i in members:
            source[i], skip[i] = g, length
    alone = [i for i in range(len(sequences)) if not skip[i]]
    head_mask = head_mask[source]  # advanced indexing copies
    head_mask[alone, prefix:] = 0
    cache.batch_select_indices(torch.tensor(source, device=device))
    input_ids, own_mask, positions = left_pad([s[prefix + k:] for s, k in zip(sequences, skip)], pad_id, device)
    mask = torch.cat([head_mask, own_mask], dim=1)
    positions = positions + prefix + torch.tensor(skip, device=device)[:, None]
    out = body(input_ids=input_ids, attention_mask=mask, position_ids=positions, past_key_values=cache,
               use_cache=True)
    return out.last_hidden_state, mask, out.past_key_values


@torch.no_grad()
def common_prefix_cache(body, prompt_ids, device):
    """(length, cache) of the prefix every prompt shares (shared_prefix_length: the template's fixed text), run once
    with batch size 1, so that the batches of a scoring call reuse it; (0, None) when they share nothing."""
    length = shared_prefix_length(prompt_ids)
    if not length:
        return 0, None
    return length, body(input_ids=torch.tensor([prompt_ids[0][:length]], device=device), use_cache=True).past_key_values


@torch.no_grad()
def _score_batch(model, prompt_ids, answers, pad_id, common=None):
    """Log-likelihood of each answer after each prompt. One forward pass over the prompts, each followed by the
    leading tokens of the longest answer (causal attention keeps the prompt's own positions blind to them), gives the
    first token of every answer and every token of the longest; a second, short pass over the KV cache of the prompts
    scores the other answers that have more than one token, all at once (none for the embedded model).
    `common` = common_prefix_cache() of all the prompts scored gives the grouped path: that prefix comes from the
    cache, and prefixes shared by groups of prompts beyond it are computed once when that computes fewer tokens.
    Without it, the plain path: the batch's shared prefix is run for this batch alone."""
    device = model.device
    body, head = body_and_head(model)
    batch = len(prompt_ids)
    longest = max(range(len(answers)), key=lambda k: len(answers[k]))
    ride = answers[longest][:-1]
    sequences = [p + ride for p in prompt_ids]
    if common is None:
        prefix, cache, groups = shared_prefix_length(prompt_ids), None, []
    else:
        (prefix, cache), groups = common, plan_groups(prompt_ids, common[0])
    if groups:
        hidden, mask, cache = forward_grouped(body, sequences, prefix, groups, pad_id, device, prefix_cache=cache)
    else:
        hidden, mask, cache = forward_body(body, sequences, prefix, pad_id, device, use_cache=True, prefix_cache=cache)
    # Left padding puts each prompt's last token at column -1 - len(ride); position t predicts token t + 1.
    last = hidden[:, -1 - len(ride):].reshape(batch * (1 + len(ride)), -1)  # rows of one 2-D matmul (body_and_head)
    logprobs = torch.log_softmax(head(last).float(), dim=-1).view(batch, 1 + len(ride), -1)
    scores = torch.stack([logprobs[:, 0, a[0]] for a in answers], dim=1)  # (batch, n_labels)
    for t, token in enumerate(answers[longest][1:]):
        scores[:, longest] += logprobs[:, 1 + t, token]
    others = [k for k, a in enumerate(answers) if len(a) > 1 and k != longest]
    if not others:
        return scores.cpu()
    # Row order after repeat_interleave: example 0 answer others[0], example 0 answer others[1], ..., example 1 ...
    n, width = len(others), max(len(answers[k]) for k in others) - 1
    cache.batch_repeat_interleave(n)
    if ride:
        mask[:, -len(ride):] = 0  # the other answers follow the prompt, not the longest answer's tokens
    rest = torch.full((batch * n, width), pad_id, dtype=torch.long)
    rest_mask = torch.zeros_like(rest)
    for j, k in enumerate(others):
        rest[j::n, : len(answers[k]) - 1] = torch.tensor(answers[k][:-1], dtype=torch.long)
        rest_mask[j::n, : len(answers[k]) - 1] = 1
    rest, rest_mask = rest.to(device), rest_mask.to(device)
    prompt_lengths = mask.sum(-1).repeat_interleave(n)
    out = body(
        input_ids=rest,
        attention_mask=torch.cat([mask.repeat_interleave(n, 0), rest_mask], dim=1),
        position_ids=prompt_lengths[:, None] + torch.arange(width, device=device)[None, :],
        past_key_values=cache,
        use_cache=True,
    )
    logprobs = torch.log_softmax(head(out.last_hidden_state.reshape(batch * n * width, -1)).float(), dim=-1)
    logprobs = logprobs.view(batch, n, width, -1)
    for j, k in enumerate(others):
        for t, token in enumerate(answers[k][1:]):
            scores[:, k] += logprobs[:, j, t, token]
    return scores.cpu()


def length_sorted_batches(prompt_ids, batch_size):
    """Batches of indices, longest prompts first: batches of similar length waste little on padding, and a memory
    error shows up early. Ranks split these very batches, so each pair is computed in the same batch whatever the
    number of processes, and gives the same numbers."""
    order = sorted(range(len(prompt_ids)), key=lambda i: -len(prompt_ids[i]))
    return [order[start : start + batch_size] for start in range(0, len(order), batch_size)]


def prefix_sharing_batches(prompt_ids, batch_size):
    """length_sorted_batches with related prompts kept together, so that a batch can compute their shared prefix
    once (plan_groups): prompts are clustered with their neighbours in lexicographic order when the two share at
    least half of the shorter one's tokens beyond the prefix common to all prompts (e.g. the variants of one
    premise/hypothesis pair), and clusters go longest first. Without such prompts every cluster is one prompt and the
    batches are length_sorted_batches'. Built from all prompts, so ranks split these very batches."""
    common = shared_prefix_length(prompt_ids)
    lexical = sorted(range(len(prompt_ids)), key=lambda i: prompt_ids[i])
    clusters = []
    for before, i in zip([None] + lexical, lexical):
        a, b = prompt_ids[i], before is not None and prompt_ids[before]
        if b and 2 * (common_prefix_length(a, b) - common) >= min(len(a), len(b)) - common:
            clusters[-1].append(i)
        else:
            clusters.append([i])
    clusters.sort(key=lambda c: (-max(len(prompt_ids[i]) for i in c), min(c)))
    order = [i for c in clusters for i in c]
    return [order[start : start + batch_size] for start in range(0, len(order), batch_size)]


def score_labels(model, tokenizer, prompts, batch_size, desc="scoring", ranks=SINGLE, group_prefixes=True):
    """(n, 3) tensor of log p(" <label>" | prompt); the prediction is the argmax. Each rank scores its share of the
    batches and every rank gets all the scores. The prefix all prompts share runs once for the whole call, and
    related prompts share more (prefix_sharing_batches, plan_groups). `group_prefixes=False` gives the plain path
    (length-sorted batches, the prefix common to a batch computed once per batch), the reference the grouped path
    must equal."""
    prompt_ids = encode_prompts(tokenizer, prompts)
    answers = encode_answers(tokenizer)
    make_batches = prefix_sharing_batches if group_prefixes else length_sorted_batches
    common = None
    if group_prefixes and prompts:
        common = common_prefix_cache(body_and_head(model)[0], prompt_ids, model.device)
    mine = {}
    for idx in tqdm(ranks.share(make_batches(prompt_ids, batch_size)), desc=desc, unit="batch", leave=False):
        scores = _score_batch(model, [prompt_ids[i] for i in idx], answers, tokenizer.pad_token_id, common)
        mine.update(zip(idx, scores))
    every = gather_by_index(ranks, mine)
    return torch.stack([every[i] for i in range(len(prompts))]) if prompts else torch.empty(0, len(answers))


def parse_label(text):
    """Label id from a generated answer, or None. Only the first word counts: "Entailment." -> 0, but
    "not entailment" -> None, because a reader could not tell which of the other two labels was meant."""
    words = re.findall(r"[a-z]+", (text or "").lower())
    return LABELS.index(words[0]) if words and words[0] in LABELS else None


@torch.no_grad()
def generate_answers(model, tokenizer, prompts, batch_size, max_new_tokens, desc="generating", ranks=SINGLE):
    """Greedy continuation of each prompt, decoded to text (special tokens dropped). Each rank generates its share
    of the batches and every rank gets all the texts."""
    device = model.device
    prompt_ids = encode_prompts(tokenizer, prompts)
    mine = {}
    for idx in tqdm(ranks.share(length_sorted_batches(prompt_ids, batch_size)), desc=desc, unit="batch", leave=False):
        input_ids, mask, _ = left_pad([prompt_ids[i] for i in idx], tokenizer.pad_token_id, device)
        out = model.generate(
            input_ids=input_ids,
            attention_mask=mask,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
        )
        for i, row in zip(idx, out[:, input_ids.size(1):]):
            mine[i] = tokenizer.decode(row, skip_special_tokens=True)
    every = gather_by_index(ranks, mine)
    return [every[i] for i in range(len(prompts))]
