"""The training loop does what the params say, checked against hand-computed values: the learning rate warms up then
decays linearly to zero, gradients are clipped to train.max_grad_norm, every epoch has its own batch order, a resume
starts from the newest checkpoint with the RNG states it saved, the 4-bit base is NF4 with double quantization, and
data-parallel ranks sum their gradients (fast: tiny models, two gloo processes)."""
import json
import random

import numpy as np
import pytest
import torch
from pipeline import REPO
from tiny import TINY_SAFETENSORS, lora_model, made_up_pairs

from qlora_nli.model import loading
from tiny import TEMPLATE
from qlora_nli.prompts import encode_answers, encode_prompts
from qlora_nli.train import loop
from qlora_nli.train.batches import epoch_batches
from qlora_nli.train.checkpoints import Checkpoints
from qlora_nli.train.examples import Examples
from qlora_nli.train.loop import TrainingSetup, fit, make_scheduler, train_one_epoch


def _examples(path, n=6):
    tokenizer = loading.load_tokenizer(str(path))
    answers = encode_answers(tokenizer)
    rows = made_up_pairs(n, 5)
    return tokenizer, encode_prompts(tokenizer, [TEMPLATE.format(**r) for r in rows]), [answers[r["label"]] for r in rows]


def test_learning_rate_warms_up_then_decays_linearly_to_zero():
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2.0)
    scheduler = make_scheduler(optimizer, total_steps=10, warmup_ratio=0.2)  # 2 warmup steps, 8 of decay
    seen = [scheduler.get_last_lr()[0]]
    for _ in range(10):
        optimizer.step()
        scheduler.step()
        seen.append(scheduler.get_last_lr()[0])
    # step k: (k+1)/2 while k < 2, then (10-k)/8; times lr 2.0
    assert seen == pytest.approx([1.0, 2.0, 2.0, 1.75, 1.5, 1.25, 1.0, 0.75, 0.5, 0.25, 0.0])


def test_each_optimizer_step_moves_the_schedule_and_clips_the_gradient(tiny_model_dir):
    """SGD at lr 1: each step moves the weights by exactly the clipped gradient, whose norm is max_grad_norm when the
    raw gradient is larger; the learning rate reported per step follows the schedule."""
    model = lora_model(tiny_model_dir)
    tokenizer, prompt_ids, answer_ids = _examples(tiny_model_dir)
    trainable = [p for p in model.parameters() if p.requires_grad]
    max_norm = 1e-3
    optimizer = torch.optim.SGD(trainable, lr=1.0)
    scheduler = make_scheduler(optimizer, total_steps=4, warmup_ratio=0.0)  # 1, 3/4, 1/2, 1/4
    before = [p.detach().clone() for p in trainable]
    seen, moved = [], []

    def on_step(loss, lr):
        seen.append(lr)
        moved.append(torch.sqrt(sum(((p.detach() - b) ** 2).sum() for p, b in zip(trainable, before))).item())
        for p, b in zip(trainable, before):
            b.copy_(p.detach())

    setup = TrainingSetup(model, optimizer, "sgd", scheduler, torch.amp.GradScaler("cpu", enabled=False), {}, {})
    train_one_epoch(setup, Examples(prompt_ids, answer_ids, tokenizer.pad_token_id),
                    [[0, 1, 2], [3, 4, 5], [0, 3], [1, 4]],
                    {"micro_batch_tokens": 10_000, "max_grad_norm": max_norm}, torch.float32, on_step)
    assert seen == pytest.approx([0.75, 0.5, 0.25, 0.0])  # the lr after each step: the schedule moves once per batch
    # the raw gradient of the first batch is far above max_norm (checked here), so each step moves by lr x max_norm
    model.zero_grad()
    from qlora_nli.forward import answer_loss
    answer_loss(model, [prompt_ids[i] for i in (0, 1, 2)], [answer_ids[i] for i in (0, 1, 2)],
                tokenizer.pad_token_id).backward()
    assert torch.sqrt(sum((p.grad ** 2).sum() for p in trainable)).item() > 100 * max_norm
    assert moved[:3] == pytest.approx([1.0 * max_norm, 0.75 * max_norm, 0.5 * max_norm], rel=1e-3)


def test_every_epoch_trains_its_own_batch_order(monkeypatch):
    lengths = [(7 * i) % 23 + 1 for i in range(100)]  # more than one length-sorting window (16 batches)
    t = {"batch_size": 4, "seed": 42, "epochs": 3, "micro_batch_tokens": 100}
    seen = []
    monkeypatch.setattr(loop, "train_one_epoch", lambda setup, examples, batches, *a, **k: seen.append(batches) or 1.0)
    monkeypatch.setattr(loop, "validate", lambda model, validation, ranks: (1.0, 0.5))
    setup = TrainingSetup(None, None, "sgd", None, None, {}, {})
    seconds = fit(setup, Examples([[0] * n for n in lengths], [[1]] * len(lengths), 0), None, t, torch.float32)
    assert len(seen) == 3 and sorted(seconds) == [1, 2, 3] and len(setup.history["epochs"]) == 3
    for batches in seen:  # each epoch: every example exactly once, in batches of at most batch_size
        assert sorted(i for b in batches for i in b) == list(range(100)) and all(len(b) <= 4 for b in batches)
    orders = [[i for b in batches for i in b] for batches in seen]
    assert orders[0] != orders[1] and orders[1] != orders[2] and orders[0] != orders[2]
    assert epoch_batches(lengths, t, 2) == seen[1]  # a resumed run recomputes epoch 2's order from the seed alone


def _write_checkpoint(root, epoch, fingerprint="run-a"):
    directory = root / f"epoch-{epoch}"
    directory.mkdir(parents=True)
    (directory / "run.json").write_text(json.dumps({"fingerprint": fingerprint, "epoch": epoch}))
    torch.save({"fingerprint": fingerprint, "epoch": epoch}, directory / "state.pt")
    (directory / "adapter_model.safetensors").write_bytes(TINY_SAFETENSORS)


def test_latest_is_the_newest_epoch_by_number(tmp_path):
    for epoch in (1, 2, 10, 9):  # 10 sorts before 2 as text
        _write_checkpoint(tmp_path / "checkpoints", epoch)
    epoch, directory, state = Checkpoints(tmp_path / "checkpoints", "run-a").latest()
    assert (epoch, directory.name, state["epoch"]) == (10, "epoch-10", 10)


def test_restore_gives_back_the_rng_states_of_the_save(tiny_model_dir, tmp_path):
    """With lora.dropout > 0 the next epoch's dropout masks come from the torch RNG: a resume must continue it."""
    model = lora_model(tiny_model_dir, dropout=0.1)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-3)
    scheduler = make_scheduler(optimizer, total_steps=4, warmup_ratio=0.0)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    checkpoints = Checkpoints(tmp_path / "checkpoints", "run-a")
    torch.manual_seed(123), random.seed(123), np.random.seed(123)
    checkpoints.save(1, model, optimizer, scheduler, scaler, {"epochs": [], "steps": []})
    expected = (torch.rand(4), random.random(), np.random.rand())
    tokenizer, prompt_ids, answer_ids = _examples(tiny_model_dir, 2)
    from qlora_nli.forward import answer_loss
    mask_loss = answer_loss(model, prompt_ids, answer_ids, tokenizer.pad_token_id).item()  # dropout after the draws

    torch.manual_seed(0), random.seed(0), np.random.seed(0)
    checkpoints.restore(checkpoints.latest(), model, optimizer, scheduler, scaler)
    got = (torch.rand(4), random.random(), np.random.rand())
    assert torch.equal(got[0], expected[0]) and got[1:] == expected[1:]
    assert answer_loss(model, prompt_ids, answer_ids, tokenizer.pad_token_id).item() == mask_loss
    torch.manual_seed(999)  # the control: other dropout masks give another loss, so the RNG state matters here
    assert answer_loss(model, prompt_ids, answer_ids, tokenizer.pad_token_id).item() != mask_loss


# NF4's 16 levels (Dettmers et al. 2023, QLoRA, appendix E), normalised to [-1, 1]
NF4 = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
       -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
       0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0]


def test_the_4bit_base_is_nf4_with_double_quantization(tiny_model_dir):
    import bitsandbytes as bnb

    model = loading.load_base_model({"name": str(tiny_model_dir), "load_in_4bit": True, "compute_dtype": "auto"},
                                     "cpu")
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(layers) >= 2 * 6  # Phi: q, k, v, dense, fc1, fc2 per block; Llama: q, k, v, o, gate, up, down
    assert [n for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and not isinstance(m, bnb.nn.Linear4bit)] == ["lm_head"]
    for m in layers:
        state = m.weight.quant_state
        assert state.quant_type == "nf4" and m.weight.quant_type == "nf4"
        assert state.nested and state.state2 is not None  # double quantization: the block scales quantized too
        assert state.code.float().tolist() == pytest.approx(NF4, abs=1e-6)


RANK_SCRIPT = """
import sys, torch, torch.distributed as dist
from qlora_nli.runtime import distributed
rank, init, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
dist.init_process_group("gloo", init_method="file://" + init, rank=rank, world_size=2)
a, b, c = (torch.nn.Parameter(torch.zeros(*shape)) for shape in ((2, 2), (3,), (1,)))
a.grad = torch.full((2, 2), rank + 1.0)                           # 1 on rank 0, 2 on rank 1
b.grad = None if rank == 0 else torch.tensor([1.0, 2.0, 3.0])     # rank 0 ran no micro-batch touching b
loss = distributed.sum_gradients([a, b, c], 0.5 * (rank + 1))
torch.save({"a": a.grad, "b": b.grad, "c": c.grad, "loss": loss}, out)
dist.destroy_process_group()
"""


def test_two_ranks_sum_their_gradients_and_losses(tmp_path):
    """Each rank's gradient is a sum over its share of the batch, weighted by the whole batch's answer tokens: the
    ranks' gradients add up to the one-process gradient, so they are summed, not averaged."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": str(REPO)}
    procs = [subprocess.Popen([sys.executable, "-c", RANK_SCRIPT, str(rank), str(tmp_path / "init"),
                               str(tmp_path / f"rank{rank}.pt")], env=env) for rank in (0, 1)]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    for rank in (0, 1):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert torch.equal(got["a"], torch.full((2, 2), 3.0))        # 1 + 2, not their mean 1.5
        assert torch.equal(got["b"], torch.tensor([1.0, 2.0, 3.0]))  # zeros + rank 1's
        assert got["c"] is None                                      # None on every rank stays None
        assert got["loss"] == pytest.approx(1.5)                     # 0.5 + 1.0
