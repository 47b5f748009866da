"""Turning prompts into predictions: label log-likelihoods (method "score") or greedy generation ("generate").

Training and scoring share one tokenization: prompt tokens (with the tokenizer's special tokens) followed by the
answer tokens of " <label>", so the model is scored on exactly the sequences it was trained to complete.
"""
import copy
import logging
import re
from collections import deque

import torch
import torch.nn.functional as F
from tqdm import tqdm

from qlora_nli import threads
from qlora_nli.distributed import SINGLE, gather_by_index
from qlora_nli.errors import DataError
from qlora_nli.prompts import LABELS, answer_text

log = logging.getLogger(__name__)


def encode_prompts(tokenizer, prompts):
    return [tokenizer(p).input_ids for p in prompts]


def encode_answers(tokenizer):
    """Token ids of each label's answer, index = label id."""
    return [tokenizer(answer_text(k), add_special_tokens=False).input_ids for k in range(len(LABELS))]


def check_prompt_lengths(tokenizer, prompts, context, where, fix, extra_tokens=0, prompt_ids=None):
    """Every prompt, with `extra_tokens` after it (the longest answer, or the tokens to generate), must fit the model's
    `context` (modeling.context_length; None = unknown, nothing checked). `where(i)` names prompt i in the message,
    `fix` ends it. The prompts' texts are already bounded in characters (prompts.MAX_TEXT_CHARS), so tokenizing them
    here is cheap; `prompt_ids` (their token ids) saves even that."""
    if context is None:
        return
    for start in range(0, len(prompts if prompt_ids is None else prompt_ids), 256):
        ids = prompt_ids[start:start + 256] if prompt_ids is not None else \
            tokenizer(list(prompts[start:start + 256])).input_ids
        for i, sequence in enumerate(ids, start):
            if len(sequence) + extra_tokens > context:
                raise DataError(f"{where(i)}: its prompt is {len(sequence):,} tokens, {len(sequence) + extra_tokens:,} "
                                f"with the answer, more than the model's context of {context:,} tokens; {fix}")


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
        threads.adapt()
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
