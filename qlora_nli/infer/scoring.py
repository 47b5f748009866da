"""Turning prompts into predictions: label log-likelihoods (method "score") or greedy generation ("generate").

Training and scoring share one tokenization: prompt tokens (with the tokenizer's special tokens) followed by the
answer tokens of " <label>", so the model is scored on exactly the sequences it was trained to complete.
"""
import copy
import logging
from collections import deque

import torch
from tqdm import tqdm

from qlora_nli.forward import (
    body_and_head,
    common_prefix_cache,
    common_prefix_length,
    forward_body,
    shared_prefix_length,
)
from qlora_nli.prompts import encode_answers, encode_prompts
from qlora_nli.runtime import threads
from qlora_nli.runtime.distributed import SINGLE, gather_by_index

log = logging.getLogger(__name__)


@torch.no_grad()
def _score_batch(model, prompt_ids, answers, pad_id):
    """Log-likelihood of each answer after each prompt (the plain path of score_labels, the reference the token trees
    must equal). The batch's shared prefix runs once, then one pass over the prompts, each followed by the leading
    tokens of the longest answer (causal attention keeps the prompt's own positions blind to them), gives the first
    token of every answer and every token of the longest; a second, short pass over the KV cache of the prompts
    scores the other answers that have more than one token, all at once."""
    device = model.device
    body, head = body_and_head(model)
    batch = len(prompt_ids)
    longest = max(range(len(answers)), key=lambda k: len(answers[k]))
    ride = answers[longest][:-1]
    sequences = [p + ride for p in prompt_ids]
    hidden, mask, cache = forward_body(body, sequences, shared_prefix_length(prompt_ids), pad_id, device,
                                       use_cache=True)
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


class TokenTree:
    """Related prompts (after the prefix common to all prompts of a call) merged into one tree of tokens: a token
    that several prompts share at the same place is one node, computed once. Each prompt also gets nodes for the
    leading tokens of every answer of several tokens, so one forward pass over the tree gives every answer token's
    log-probability. `reads[i][k]`: the (node, token) pairs whose log-probabilities sum to prompt i's score for answer
    k. Nodes are numbered in the order they are made, so a node's parent always comes before it."""

    def __init__(self):
        self.tokens, self.parents, self.depths, self.reads, self._children = [], [], [], {}, {}

    def _node(self, parent, token):
        key = (parent, token)
        if key not in self._children:
            self._children[key] = len(self.tokens)
            self.tokens.append(token)
            self.parents.append(parent)
            self.depths.append(self.depths[parent] + 1 if parent >= 0 else 0)
        return self._children[key]

    def add(self, index, own_tokens, answers):
        end = -1
        for token in own_tokens:
            end = self._node(end, token)
        self.reads[index] = []
        for answer in answers:
            at, steps = end, []
            for j, token in enumerate(answer):
                steps.append((at, token))
                if j < len(answer) - 1:
                    at = self._node(at, token)
            self.reads[index].append(steps)

    def ancestry(self):
        """(nodes, nodes) bool: node i may attend to node j, j being i or one of its ancestors."""
        allowed = torch.eye(len(self.tokens), dtype=torch.bool)
        for i, parent in enumerate(self.parents):
            if parent >= 0:
                allowed[i] |= allowed[parent]
        return allowed


def prompt_trees(prompt_ids, prefix, answers, max_nodes):
    """The prompts as TokenTrees of related prompts: neighbours in lexicographic token order share a tree when they
    share at least half of the shorter one's tokens beyond `prefix` (e.g. the variants of one premise/hypothesis
    pair), while the tree stays within `max_nodes`; unrelated prompts get a tree each."""
    leading = sum(len(a) - 1 for a in answers)
    trees, before = [], None
    for i in sorted(range(len(prompt_ids)), key=lambda i: prompt_ids[i]):
        own = prompt_ids[i][prefix:]
        if before is not None:
            shared = common_prefix_length(own, before)
            # sorted order: a new prompt's tokens beyond its common prefix with the one before are new nodes
            if 2 * shared >= min(len(own), len(before)) and \
                    len(trees[-1].tokens) + len(own) - shared + leading <= max_nodes:
                trees[-1].add(i, own, answers)
                before = own
                continue
        trees.append(TokenTree())
        trees[-1].add(i, own, answers)
        before = own
    return trees


def pack_passes(sizes, budget, min_width):
    """Trees of `sizes` nodes packed into passes of rows: a pass is as wide as its largest tree (at least
    `min_width`, so that a row holds several small trees) and has budget // width rows; each row is filled with the
    largest trees that still fit, so little is padding. Returns [[tree indices of a row, ...] per pass]."""
    queues = {}
    for t in sorted(range(len(sizes)), key=lambda t: (-sizes[t], t)):
        queues.setdefault(sizes[t], deque()).append(t)
    lengths = sorted(queues, reverse=True)

    def largest_fitting(room):
        return next((queues[n].popleft() for n in lengths if n <= room and queues[n]), None)

    passes, left = [], len(sizes)
    while left:
        width = max(next(n for n in lengths if queues[n]), min_width)
        rows = []
        for _ in range(max(1, budget // width)):
            row, room = [], width
            while (t := largest_fitting(room)) is not None:
                row.append(t)
                room -= sizes[t]
            if not row:
                break
            rows.append(row)
            left -= len(row)
        passes.append(rows)
    return passes


@torch.no_grad()
def _score_trees(model, rows, prefix, prefix_cache, pad_id):
    """{prompt index: (n_labels,) log-likelihoods} of the prompts in `rows` (lists of TokenTrees laid side by side),
    in one forward pass. Each node attends to the call's common prefix (`prefix_cache`, copied) and to its own
    ancestors only, and sits at the position it has in its prompt, so it computes what it would in an unpadded
    sequence of its own. Padding attends only to itself."""
    device = model.device
    body, head = body_and_head(model)
    width = max(sum(len(tree.tokens) for tree in row) for row in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    positions = torch.zeros((len(rows), width), dtype=torch.long)
    allowed = torch.eye(width, dtype=torch.bool).repeat(len(rows), 1, 1)
    reads = []  # (prompt index, answer, row, column, token)
    for r, row in enumerate(rows):
        start = 0
        for tree in row:
            stop = start + len(tree.tokens)
            input_ids[r, start:stop] = torch.tensor(tree.tokens)
            positions[r, start:stop] = prefix + torch.tensor(tree.depths)
            allowed[r, start:stop, start:stop] = tree.ancestry()
            reads += [(i, k, r, start + node, token) for i, per_answer in tree.reads.items()
                      for k, steps in enumerate(per_answer) for node, token in steps]
            start = stop
    mask = torch.cat([torch.ones(len(rows), width, prefix, dtype=torch.bool), allowed], dim=2)[:, None]
    cache = None
    if prefix:
        cache = copy.deepcopy(prefix_cache)
        cache.batch_repeat_interleave(len(rows))
    hidden = body(input_ids=input_ids.to(device), attention_mask=mask.to(device), position_ids=positions.to(device),
                  past_key_values=cache, use_cache=cache is not None).last_hidden_state
    spots = sorted({(r, c) for _, _, r, c, _ in reads})
    spot = {rc: j for j, rc in enumerate(spots)}
    rc = torch.tensor(spots, device=device)
    logprobs = torch.log_softmax(head(hidden[rc[:, 0], rc[:, 1]]).float(), dim=-1)  # rows of one 2-D matmul
    prompts = sorted({i for i, *_ in reads})
    n_labels = max(k for _, k, *_ in reads) + 1
    slot = {i: j for j, i in enumerate(prompts)}
    picked = logprobs[[spot[(r, c)] for _, _, r, c, _ in reads], [token for *_, token in reads]]
    scores = torch.zeros(len(prompts) * n_labels, device=device).index_add_(
        0, torch.tensor([slot[i] * n_labels + k for i, k, *_ in reads], device=device), picked)
    return dict(zip(prompts, scores.view(len(prompts), n_labels).cpu()))


def score_labels(model, tokenizer, prompts, batch_size, desc="scoring", ranks=SINGLE, group_prefixes=True):
    """(n, 3) tensor of log p(" <label>" | prompt); the prediction is the argmax. The prefix all prompts share runs
    once for the whole call; related prompts share their common tokens too (prompt_trees), and the trees are packed
    into passes of about `batch_size` average prompts' tokens (pack_passes), each pass one forward of the body. Each
    rank scores its share of the passes, planned from all prompts (so a pair is computed alike whatever the number of
    ranks), and every rank gets all the scores. `group_prefixes=False` gives the plain path (length-sorted batches of
    `batch_size` prompts, the prefix common to a batch run once per batch), the reference the trees must equal."""
    prompt_ids = encode_prompts(tokenizer, prompts)
    answers = encode_answers(tokenizer)
    if not prompts:
        return torch.empty(0, len(answers))
    if group_prefixes:
        prefix, cache = common_prefix_cache(body_and_head(model)[0], prompt_ids, model.device)
        leading = sum(len(a) - 1 for a in answers)  # answer tokens that get a node of their own after each prompt
        mean_nodes = -(-sum(len(p) - prefix for p in prompt_ids) // len(prompt_ids)) + leading
        budget = batch_size * mean_nodes
        trees = prompt_trees(prompt_ids, prefix, answers, budget)
        # a row at least 3 average prompts wide: small trees share rows, and attention over a row stays cheap
        passes = pack_passes([len(tree.tokens) for tree in trees], budget, 3 * mean_nodes)
        score = lambda rows: _score_trees(model, [[trees[t] for t in row] for row in rows], prefix, cache,
                                          tokenizer.pad_token_id)
    else:
        passes = length_sorted_batches(prompt_ids, batch_size)
        score = lambda idx: dict(zip(idx, _score_batch(model, [prompt_ids[i] for i in idx], answers,
                                                       tokenizer.pad_token_id)))
    mine = {}
    for work in tqdm(ranks.share(passes), desc=desc, unit="pass", leave=False):
        threads.adapt()
        mine.update(score(work))
    every = gather_by_index(ranks, mine)
    return torch.stack([every[i] for i in range(len(prompts))])
