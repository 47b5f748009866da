import pytest
import torch
from tiny import made_up_pairs

from qlora_nli import forward
from qlora_nli.forward import answer_loss, mean_answer_nll
from qlora_nli.infer import scoring
from qlora_nli.infer.generate import generate_answers, parse_label
from qlora_nli.infer.scoring import score_labels, score_labels_plain
from qlora_nli.model import loading
from tiny import TEMPLATE
from qlora_nli.prompts import LABELS, encode_answers, encode_prompts


def _model(path, load_in_4bit):
    params = {"name": str(path), "load_in_4bit": load_in_4bit, "compute_dtype": "float32"}
    return loading.load_base_model(params, "cpu"), loading.load_tokenizer(str(path))


def _prompts(n):
    return [TEMPLATE.format(**r) for r in made_up_pairs(n, 5)]


@torch.no_grad()
def brute_force_scores(model, tokenizer, prompts, answers=None):
    """One unpadded sequence per (prompt, label), log-probabilities summed by hand from full logits."""
    answers = answers or encode_answers(tokenizer)
    scores = torch.zeros(len(prompts), len(LABELS))
    for i, p in enumerate(encode_prompts(tokenizer, prompts)):
        for k, a in enumerate(answers):
            logits = model(input_ids=torch.tensor([p + a])).logits[0].float()
            logprobs = torch.log_softmax(logits, -1)
            scores[i, k] = sum(logprobs[len(p) - 1 + j, t] for j, t in enumerate(a))
    return scores


@pytest.mark.parametrize("load_in_4bit", [False, True])
def test_scores_match_brute_force(tiny_model_dir, load_in_4bit):
    model, tokenizer = _model(tiny_model_dir, load_in_4bit)
    assert max(len(a) for a in encode_answers(tokenizer)) > 1, "test tokenizer should split some label words"
    prompts = _prompts(7)  # different lengths -> padding inside batches
    fast = score_labels(model, tokenizer, prompts, batch_size=3)
    slow = brute_force_scores(model, tokenizer, prompts)
    assert torch.allclose(fast, slow, atol=1e-3), (fast - slow).abs().max()


@pytest.mark.parametrize("answers", [[[5], [6], [7]], [[5, 6, 7], [8], [9]], [[5], [6, 7], [8, 9, 10]],
                                     [[5, 6], [5, 7], [8, 9]]], ids=["one token", "one longer", "two longer", "shared"])
@pytest.mark.parametrize("group_prefixes", [True, False])
def test_answers_of_any_token_counts_score_as_one_sequence_each(tiny_model_dir, answers, group_prefixes,
                                                                 monkeypatch):
    """The longest answer's tokens ride along in the prompts' pass, any other answer of several tokens gets the
    second pass over the prompts' cache only: each must score as if it were its own unpadded sequence."""
    model, tokenizer = _model(tiny_model_dir, False)
    monkeypatch.setattr(scoring, "encode_answers", lambda tokenizer: answers)
    prompts = _prompts(7) + [_prompts(1)[0] + " and true is true"]  # related prompts form groups
    fast = (score_labels if group_prefixes else score_labels_plain)(model, tokenizer, prompts, batch_size=3)
    slow = brute_force_scores(model, tokenizer, prompts, answers)
    assert torch.allclose(fast, slow, atol=1e-4), (fast - slow).abs().max()


def test_the_prefix_all_prompts_share_runs_once_per_call(tiny_model_dir):
    """The prefix pass is the only call of the body without an attention mask (one row, nothing padded): once per
    score_labels call on the grouped path, once per batch on the plain one."""
    model, tokenizer = _model(tiny_model_dir, False)
    body, _ = forward.body_and_head(model)
    prompts = _prompts(9)  # 3 batches of 3
    assert forward.shared_prefix_length(encode_prompts(tokenizer, prompts)) > 0
    unmasked = []
    hook = body.register_forward_pre_hook(lambda module, args, kwargs: unmasked.append("attention_mask" not in kwargs),
                                          with_kwargs=True)
    try:
        score_labels(model, tokenizer, prompts, batch_size=3)
        grouped, unmasked[:] = sum(unmasked), []
        score_labels_plain(model, tokenizer, prompts, batch_size=3)
    finally:
        hook.remove()
    assert (grouped, sum(unmasked)) == (1, 3)


def test_answer_loss_is_mean_answer_token_nll(tiny_model_dir):
    model, tokenizer = _model(tiny_model_dir, False)
    prompts, labels = _prompts(5), [0, 1, 2, 0, 2]
    prompt_ids, answers = encode_prompts(tokenizer, prompts), encode_answers(tokenizer)
    with torch.no_grad():
        loss = answer_loss(model, prompt_ids, [answers[k] for k in labels], tokenizer.pad_token_id)
        per_label = brute_force_scores(model, tokenizer, prompts)
    total_tokens = sum(len(answers[k]) for k in labels)
    expected = -sum(per_label[i, k] for i, k in enumerate(labels)) / total_tokens
    assert loss.item() == pytest.approx(expected.item(), abs=1e-4)
    # the validation loss, taken from the label scores, is the same quantity
    scores = score_labels(model, tokenizer, prompts, batch_size=2)
    assert mean_answer_nll(scores, labels, answers) == pytest.approx(loss.item(), abs=1e-4)


# premise/hypothesis pairs of very different lengths, in no length order: batches are formed longest first, so the
# texts must be put back in the original order
UNEVEN_PAIRS = [
    ("a man paints.", "a man."),
    ("the dog climbs the old bridge in the morning and waits beside a small boat near the river.",
     "two kids watch the band on the stage because it is late."),
    ("x", "y"),
    ("three girls clean a red car.", "the girls do not clean."),
    ("an old cook waits beside the river in the morning while the band plays on the stage near the fence.", "a cook."),
    ("a tall player jumps.", "a player jumps over the fence because it is late and the band watches."),
    ("the band.", "a band plays."),
]


def test_generate_equals_one_prompt_at_a_time_greedy_decoding(tiny_model_dir):
    model, tokenizer = _model(tiny_model_dir, load_in_4bit=True)
    # prompts that end in their own words: after the template's fixed ending a random model answers all alike
    prompts = [f"Premise: {p}\nHypothesis: {h}" for p, h in UNEVEN_PAIRS]
    prompt_ids = encode_prompts(tokenizer, prompts)
    assert max(map(len, prompt_ids)) - min(map(len, prompt_ids)) > 50  # batches need real left padding
    reference = []
    with torch.no_grad():
        for ids in prompt_ids:  # alone: no padding, no batch
            out = model.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones_like(torch.tensor([ids])),
                                 max_new_tokens=6, do_sample=False, pad_token_id=tokenizer.pad_token_id)
            reference.append(tokenizer.decode(out[0, len(ids):], skip_special_tokens=True))
    assert len(set(reference)) >= 3, "the random model must answer differently, or a mix-up of rows could not show"
    assert generate_answers(model, tokenizer, prompts, batch_size=3, max_new_tokens=6) == reference


@pytest.mark.parametrize("text, expected", [
    (" entailment", 0), ("Entailment.", 0), (" NEUTRAL\n", 1), ("**contradiction**", 2), (" contradiction, because", 2),
    ("not entailment", None), ("", None), (None, None), (" yes", None), ("entailed", None), ("neutrality", None),
    ("\n\n", None), ("123", None),
])
def test_parse_label(text, expected):
    assert parse_label(text) == expected


def _related_prompts():
    """Prompt variants of made-up pairs, as the evaluation probes build them: groups of different sizes sharing
    prefixes of different lengths (up to the hypothesis, or only up to "Hypothesis:"), an exact duplicate, a pair
    with one variant, and unrelated prompts, one of them not even sharing the template's first token."""
    rows = made_up_pairs(4, 11)
    variants = lambda p, h: [(p, h), (p, f"{h} and true is true"), (p, f"{h} and false is not true"), (p, p)]
    pairs = variants(rows[0]["premise"], rows[0]["hypothesis"]) + [(rows[0]["premise"], rows[0]["hypothesis"])]
    pairs += variants(rows[1]["premise"], rows[1]["hypothesis"])[:2] + [(rows[2]["premise"], rows[2]["hypothesis"])]
    pairs += [(rows[3]["hypothesis"], rows[3]["premise"])]  # swapped
    prompts = [TEMPLATE.format(premise=p, hypothesis=h) for p, h in pairs]
    return prompts + [f"Hypothesis: {rows[3]['hypothesis']}\nRelation:", "the band waits.\nRelation:"]


@pytest.mark.parametrize("batch_size", [3, 4, 16])
def test_token_trees_give_the_per_prompt_scores(tiny_model_dir, batch_size, monkeypatch):
    """Related prompts share tree nodes and several trees share a row: a node that saw anything but its own ancestors
    (another prompt's tokens, another tree, padding) would change the scores."""
    model, tokenizer = _model(tiny_model_dir, False)
    prompts = _related_prompts()
    planned, packed = [], []  # what the call made
    plan, pack = scoring.prompt_trees, scoring.pack_passes
    monkeypatch.setattr(scoring, "prompt_trees", lambda *a: planned.append(plan(*a)) or planned[-1])
    monkeypatch.setattr(scoring, "pack_passes", lambda *a: packed.append(pack(*a)) or packed[-1])
    grouped = score_labels(model, tokenizer, prompts, batch_size)
    assert max(len(tree.reads) for tree in planned[0]) >= 4, "the variants of a pair should share a tree"
    assert any(len(row) >= 2 for rows in packed[0] for row in rows), "rows should hold several trees"
    single = score_labels_plain(model, tokenizer, prompts, batch_size=1)
    assert torch.allclose(grouped, single, atol=1e-4), (grouped - single).abs().max()
    assert torch.equal(grouped.argmax(1), single.argmax(1))
    assert len({tuple(row) for row in single.tolist()}) == len(prompts) - 1  # only the duplicate scores alike
    assert torch.equal(grouped, score_labels(model, tokenizer, prompts, batch_size)), "not reproducible"


def test_prompt_trees_merge_shared_tokens_and_keep_unrelated_prompts_apart(tiny_model_dir):
    tokenizer = loading.load_tokenizer(str(tiny_model_dir))
    prompt_ids = encode_prompts(tokenizer, _related_prompts()[:9])  # those of the template: it is the common prefix
    prefix = forward.shared_prefix_length(prompt_ids)
    answers = [[5], [6, 7], [8, 9, 10]]  # 3 leading answer tokens get nodes after each prompt
    trees = scoring.prompt_trees(prompt_ids, prefix, answers, max_nodes=10_000)
    assert sorted(i for tree in trees for i in tree.reads) == list(range(len(prompt_ids)))
    variants = next(tree for tree in trees if 0 in tree.reads)
    assert set(variants.reads) == {0, 1, 2, 3, 4}  # the four variants of the first pair and its duplicate
    own = {tuple(prompt_ids[i][prefix:]) for i in variants.reads}
    distinct_prefixes = {p[:n] for p in own for n in range(1, len(p) + 1)}
    assert len(variants.tokens) == len(distinct_prefixes) + 3 * len(own)  # each shared token once
    assert all(p < i for i, p in enumerate(variants.parents))
    assert variants.reads[0] == variants.reads[4]  # the duplicate reads the very same nodes
    assert sorted(sorted(tree.reads) for tree in trees) == [[0, 1, 2, 3, 4], [5, 6], [7], [8]]  # unrelated: apart
    capped = scoring.prompt_trees(prompt_ids, prefix, answers, max_nodes=len(variants.tokens) - 1)
    assert max(len(tree.tokens) for tree in capped) < len(variants.tokens)  # within the cap
    assert sorted(i for tree in capped for i in tree.reads) == list(range(len(prompt_ids)))


def test_pack_passes_fills_rows_with_the_largest_trees_that_fit():
    assert scoring.pack_passes([10, 4, 3, 3, 2], budget=20, min_width=6) == [[[0], [1, 2, 3]], [[4]]]
    sizes = [7, 30, 1, 12, 12, 5, 9, 2, 2, 25, 3]
    passes = scoring.pack_passes(sizes, budget=40, min_width=8)
    assert sorted(t for rows in passes for row in rows for t in row) == list(range(len(sizes)))
    for rows in passes:
        width = max(max(sizes[t] for row in rows for t in row), 8)
        assert len(rows) <= max(1, 40 // width) and all(sum(sizes[t] for t in row) <= width for row in rows)
