"""Micro-batching by token budget and the shared-prefix forward: same loss and same LoRA gradients as the plain way."""
import pytest
import torch
from tiny import lora_model, made_up_pairs

from qlora_nli.forward import answer_loss, body_and_head, shared_prefix_length
from qlora_nli.model import loading
from tiny import TEMPLATE
from qlora_nli.prompts import encode_answers, encode_prompts
from qlora_nli.train.batches import micro_batches
from qlora_nli.train.examples import Examples
from qlora_nli.train.loop import TrainingSetup, make_scheduler, train_one_epoch
from qlora_nli.train.states import FrozenBlockStates


@pytest.mark.parametrize("lengths, budget, expected", [
    ([10, 10, 10, 10], 40, [[0, 1, 2, 3]]),
    ([10, 10, 10, 10], 39, [[0, 1, 2], [3]]),
    ([5, 10, 20, 20], 40, [[0, 1], [2, 3]]),       # the longest row sets the padded width
    ([50, 60], 10, [[0], [1]]),                    # a row longer than the budget still runs, alone
])
def test_micro_batches_respect_the_token_budget(lengths, budget, expected):
    assert micro_batches(list(range(len(lengths))), lengths, 0, budget) == expected


def test_micro_batches_count_only_tokens_past_the_shared_prefix():
    assert micro_batches([0, 1, 2, 3], [30, 30, 30, 30], prefix=20, max_tokens=40) == [[0, 1, 2, 3]]


@pytest.mark.parametrize("sequences, expected", [
    ([[1, 2, 3, 4], [1, 2, 5]], 2),
    ([[1, 2, 3], [1, 2, 3]], 2),  # identical: each keeps one token of its own
    ([[1, 2, 3], [4, 2, 3]], 0),
    ([[1, 2, 3]], 0),             # a single sequence gains nothing
])
def test_shared_prefix_length(sequences, expected):
    assert shared_prefix_length(sequences) == expected


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_shared_prefix_and_micro_batches_give_the_one_sequence_at_a_time_gradient(tiny_model_dir):
    model, tokenizer = lora_model(tiny_model_dir), loading.load_tokenizer(str(tiny_model_dir))
    prompt_ids = encode_prompts(tokenizer, [TEMPLATE.format(**r) for r in made_up_pairs(6, 3)])
    answers = encode_answers(tokenizer)
    answer_ids = [answers[k % 3] for k in range(6)]
    assert shared_prefix_length(prompt_ids) > 5, "the default template should start with shared text"
    n_tokens = sum(len(a) for a in answer_ids)

    # reference: each sequence alone (no padding, no shared prefix), summed per answer token
    model.zero_grad()
    reference_loss = 0.0
    for p, a in zip(prompt_ids, answer_ids):
        loss = answer_loss(model, [p], [a], tokenizer.pad_token_id) * len(a) / n_tokens
        loss.backward()
        reference_loss += loss.item()
    reference = _grads(model)

    # the training path: train_one_epoch on the batch, split into micro-batches, each with its shared prefix
    # computed once; an optimizer with learning rate 0 keeps the weights, on_step sees the accumulated gradient
    lengths = [len(p) + len(a) for p, a in zip(prompt_ids, answer_ids)]
    budget = 3 * max(lengths)
    assert len(micro_batches(list(range(6)), lengths, shared_prefix_length(prompt_ids), budget)) > 1
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)
    scheduler = make_scheduler(optimizer, total_steps=1, warmup_ratio=0.0)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    seen = []
    setup = TrainingSetup(model, optimizer, "sgd", scheduler, scaler, {}, {})
    epoch_loss = train_one_epoch(setup, Examples(prompt_ids, answer_ids, tokenizer.pad_token_id), [list(range(6))],
                                 {"micro_batch_tokens": budget, "max_grad_norm": 1e9}, torch.float32,
                                 on_step=lambda loss, lr: seen.append(_grads(model)))
    assert len(seen) == 1 and epoch_loss == pytest.approx(reference_loss, rel=1e-5)
    batched = seen[0]
    for name, g in reference.items():
        assert torch.allclose(batched[name], g, atol=1e-5, rtol=1e-4), name
    assert any(g.abs().sum() > 0 for n, g in reference.items() if "layers.0." in n), "gradients reach layer 0"


def test_frozen_block_states_give_the_full_forward_loss_and_gradient(tiny_model_dir):
    model, tokenizer = lora_model(tiny_model_dir, layers=1), loading.load_tokenizer(str(tiny_model_dir))
    prompt_ids = encode_prompts(tokenizer, [TEMPLATE.format(**r) for r in made_up_pairs(7, 4)])
    answers = encode_answers(tokenizer)
    answer_ids = [answers[k % 3] for k in range(7)]
    pad = tokenizer.pad_token_id
    assert FrozenBlockStates.usable(model, {"gradient_checkpointing": False}) is None
    frozen = FrozenBlockStates(model, [p + a for p, a in zip(prompt_ids, answer_ids)], prompt_ids, pad,
                               torch.float32, batch_size=3)
    assert frozen.start == 1 and frozen.common == shared_prefix_length(prompt_ids) > 0

    def loss_and_grads(part, use_frozen):
        model.zero_grad()
        with frozen.adapted_blocks_only() if use_frozen else torch.enable_grad():
            loss = answer_loss(model, [prompt_ids[i] for i in part], [answer_ids[i] for i in part], pad,
                               embed=frozen.embed(part) if use_frozen else None)
        loss.backward()
        return loss.item(), _grads(model)

    for part in ([0, 1, 2, 3], [6, 2, 5], [4]):  # other batches than the states were computed in; one alone
        loss, grads = loss_and_grads(part, use_frozen=False)
        frozen_loss, frozen_grads = loss_and_grads(part, use_frozen=True)
        assert frozen_loss == pytest.approx(loss, rel=1e-5, abs=1e-6)
        assert grads.keys() == frozen_grads.keys() and all(".layers.1." in name for name in grads)
        for name, g in grads.items():
            assert torch.allclose(frozen_grads[name], g, atol=1e-5, rtol=1e-4), name
    body = body_and_head(model)[0]
    assert len(body.layers) == 2 and [b.self_attn.layer_idx for b in body.layers] == [0, 1]  # stack restored


def test_frozen_block_states_only_where_they_are_exact(tiny_model_dir):
    everywhere = lora_model(tiny_model_dir, layers="all")
    assert "every block" in FrozenBlockStates.usable(everywhere, {"gradient_checkpointing": False})
    last = lora_model(tiny_model_dir, layers=1)
    assert "checkpointing" in FrozenBlockStates.usable(last, {"gradient_checkpointing": True})
    last.config.attention_dropout = 0.1
    assert "dropout" in FrozenBlockStates.usable(last, {"gradient_checkpointing": False})
