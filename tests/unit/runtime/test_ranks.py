"""Data parallelism in one process (qlora_nli/runtime/distributed.py, runtime/launch.py): the torchrun switch and
the threads it starts with, the backend, how ranks share batches, that ranks' gradients add up to the one-process
gradient and sharded scoring gives every rank the one-process scores, and the frozen-block states kept in a file (the
same bits as kept in memory). The stages under torchrun: tests/e2e/test_distributed.py."""
import pytest
import torch
from tiny import lora_model, made_up_pairs

from qlora_nli.infer.scoring import length_sorted_batches
from qlora_nli.model import loading
from tiny import TEMPLATE
from qlora_nli.prompts import encode_answers, encode_prompts
from qlora_nli.runtime.distributed import Ranks, pick_backend
from qlora_nli.runtime.errors import ParamsError
from qlora_nli.runtime.launch import torchrun_arguments
from qlora_nli.train.examples import Examples
from qlora_nli.train.states import FrozenBlockStates


def test_the_switch_maps_to_torchrun_arguments():
    assert torchrun_arguments("") == [] and torchrun_arguments("1") == []
    assert torchrun_arguments("2") == ["--standalone", "--nproc-per-node=2"]
    multi_node = "--nnodes 2 --node-rank 1 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint head:29500"
    assert torchrun_arguments(multi_node) == multi_node.split()
    for bad in ("0", "--nnodes 2"):
        with pytest.raises(ParamsError, match="NLI_TORCHRUN"):
            torchrun_arguments(bad)


@pytest.mark.parametrize("switch, preset, expected", [
    ("2", None, "1"),  # torchrun would set 1 itself and print a banner saying so
    ("2", "3", "3"),  # the user's value stays
    ("--nnodes 2 --nproc-per-node 1 --rdzv-endpoint head:29500", None, None),  # torchrun leaves it unset for 1
    ("--nnodes 2 --nproc_per_node 4 --rdzv-endpoint head:29500", None, "1"),
    ("--nproc-per-node=auto", None, None),  # a count torchrun resolves: left to torchrun
])
def test_torchrun_starts_with_the_openmp_threads_it_would_set_itself(monkeypatch, switch, preset, expected):
    """torchrun prints a banner per stage when OMP_NUM_THREADS is unset and it starts more than one process per
    node (torch/distributed/run.py), then sets 1; `start` sets that value before re-executing."""
    import os

    from qlora_nli.runtime import launch

    started = {}

    def instead_of_torchrun(arguments):
        started.update(arguments=arguments, omp=os.environ.get("OMP_NUM_THREADS"))
        raise SystemExit  # instead of starting torchrun

    monkeypatch.setattr(launch, "launch", instead_of_torchrun)
    monkeypatch.setattr(launch, "usable_cpus", lambda: (8, "8 CPUs (made up)"))  # room for 4 ranks
    monkeypatch.setenv("OMP_NUM_THREADS", "unset below")  # recorded, so that the test leaves it as it found it
    monkeypatch.delenv("OMP_NUM_THREADS")
    if preset is not None:
        monkeypatch.setenv("OMP_NUM_THREADS", preset)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.setenv("NLI_TORCHRUN", switch)
    with pytest.raises(SystemExit):
        launch.start("cpu")
    given = torchrun_arguments(switch)  # several nodes: a per-stage --rdzv-id follows (test_multinode.py)
    assert started["arguments"][:len(given)] == given and started["omp"] == expected


def test_backend_is_nccl_only_with_a_gpu_per_rank():
    # NCCL refuses two ranks on one GPU ("Duplicate GPU detected"): ranks that share one use gloo
    assert pick_backend("cuda", local_world_size=2, n_gpus=2) == "nccl"
    assert pick_backend("cuda", local_world_size=1, n_gpus=8) == "nccl"
    assert pick_backend("cuda", local_world_size=2, n_gpus=1) == "gloo"
    assert pick_backend("cpu", local_world_size=2, n_gpus=0) == "gloo"


def test_ranks_share_every_batch_exactly_once():
    batches = length_sorted_batches([[0] * n for n in (5, 9, 2, 7, 7, 3, 1)], batch_size=2)
    shares = [Ranks(rank=r, world_size=3).share(batches) for r in range(3)]
    assert sorted(b for share in shares for b in share) == sorted(batches)
    assert [len(s) for s in shares] == [2, 1, 1]  # uneven: 4 batches over 3 ranks


class _Captured(Exception):
    """Raised where a rank would talk to the others: the test has what it needs from this rank."""


def test_two_ranks_gradients_add_up_to_the_one_process_gradient(tiny_model_dir, monkeypatch):
    """Fast version of the two-process run: each rank of 2 computes its share of one batch (its examples, in its own
    micro-batches, weighted by the whole batch's answer tokens); their gradients and losses, summed as
    `sum_gradients` does (test_training_loop: summed, not averaged), are the one-process gradient and loss."""
    from qlora_nli.forward import answer_loss
    from qlora_nli.model import loading
    from qlora_nli.train import loop

    tokenizer = loading.load_tokenizer(str(tiny_model_dir))
    prompt_ids = encode_prompts(tokenizer, [TEMPLATE.format(**r) for r in made_up_pairs(7, 4)])
    answers = encode_answers(tokenizer)
    answer_ids = [answers[k % 3] for k in range(7)]
    assert len({len(a) for a in answer_ids}) > 1, "answers of different token counts make the weighting matter"
    t = {"micro_batch_tokens": 120, "max_grad_norm": 1.0}  # several micro-batches per rank
    batch = [list(range(7))]
    captured = {}

    def run(ranks):
        model = lora_model(tiny_model_dir)
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
        scaler = torch.amp.GradScaler("cpu", enabled=False)
        setup = loop.TrainingSetup(model, optimizer, "sgd", scheduler, scaler, {}, {})
        with pytest.raises(_Captured):
            loop.train_one_epoch(setup, Examples(prompt_ids, answer_ids, tokenizer.pad_token_id), batch, t,
                                 torch.float32, on_step=lambda *a: None, ranks=ranks)
        return captured.pop("grads"), captured.pop("loss", None), model

    def at_the_all_reduce(parameters, loss):  # where the ranks would sum
        captured.update(grads=[p.grad.clone() if p.grad is not None else None for p in parameters], loss=loss)
        raise _Captured

    def at_the_clip(parameters, max_norm):  # one process: the gradient before clipping
        captured.update(grads=[p.grad.clone() for p in parameters])
        raise _Captured

    monkeypatch.setattr(loop, "sum_gradients", at_the_all_reduce)
    shares = [run(Ranks(rank=r, world_size=2)) for r in (0, 1)]
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", at_the_clip)
    one, _, model = run(Ranks())
    reference_loss = answer_loss(model.eval(), prompt_ids, answer_ids, tokenizer.pad_token_id).item()
    assert shares[0][1] + shares[1][1] == pytest.approx(reference_loss, rel=1e-5)
    for i, whole in enumerate(one):
        summed = shares[0][0][i] + shares[1][0][i]
        assert torch.allclose(summed, whole, rtol=1e-4, atol=1e-7), (i, (summed - whole).abs().max())
    differ = max((shares[0][0][i] - one[i]).abs().max().item() for i in range(len(one)))
    assert differ > 1e-3 * max(g.abs().max().item() for g in one), "one rank alone should not give the whole gradient"


def test_sharded_scoring_gives_every_rank_the_one_process_scores_in_order(tiny_model_dir, monkeypatch):
    """Fast version of the sharded evaluation: each rank of 2 scores its share of the passes; gathered (all_gather
    replaced by handing each rank both ranks' pieces), every rank holds the one-process scores, row for row."""
    from qlora_nli.infer import scoring
    from qlora_nli.model import loading
    from qlora_nli.runtime import distributed

    model, tokenizer = lora_model(tiny_model_dir).eval(), loading.load_tokenizer(str(tiny_model_dir))
    prompts = [TEMPLATE.format(**r) for r in made_up_pairs(11, 6)]
    one = scoring.score_labels(model, tokenizer, prompts, batch_size=2)
    pieces = {}

    def record(everyone, mine):
        pieces[len(pieces)] = mine
        raise _Captured

    monkeypatch.setattr(distributed.dist, "all_gather_object", record)
    for r in (0, 1):
        with pytest.raises(_Captured):
            scoring.score_labels(model, tokenizer, prompts, batch_size=2, ranks=Ranks(rank=r, world_size=2))
    assert pieces[0] and pieces[1] and not set(pieces[0]) & set(pieces[1])  # both ranks work, on different prompts
    assert sorted([*pieces[0], *pieces[1]]) == list(range(len(prompts)))

    def hand_out(everyone, mine):
        everyone[:] = [pieces[0], pieces[1]]

    monkeypatch.setattr(distributed.dist, "all_gather_object", hand_out)
    for r in (0, 1):
        got = scoring.score_labels(model, tokenizer, prompts, batch_size=2, ranks=Ranks(rank=r, world_size=2))
        assert torch.allclose(got, one, atol=1e-5), (r, (got - one).abs().max())


class RowsInMemory:
    """The rows kept as tensors: what the file store (RowsInFile, the default) must give back bit for bit."""

    def __init__(self):
        self.rows, self.nbytes = [], 0

    def append(self, row):
        self.rows.append(row.clone())
        self.nbytes += row.numel() * row.element_size()
        return len(self.rows) - 1

    def read(self, key):
        return self.rows[key]


def test_frozen_states_in_a_file_are_the_in_memory_bits(tiny_model_dir):
    model, tokenizer = lora_model(tiny_model_dir, layers=1), loading.load_tokenizer(str(tiny_model_dir))
    prompt_ids = encode_prompts(tokenizer, [TEMPLATE.format(**r) for r in made_up_pairs(9, 5)])
    answers = encode_answers(tokenizer)
    sequences = [p + answers[k % 3] for k, p in enumerate(prompt_ids)]
    kept = [FrozenBlockStates(model, sequences, prompt_ids, tokenizer.pad_token_id, torch.float32, batch_size=4,
                              store=store) for store in (RowsInMemory(), None)]
    in_memory, in_file = kept
    assert in_file.rows.nbytes == in_memory.rows.nbytes > 0
    for part in ([0, 1, 2], [8, 3], [5]):
        a, b = in_memory.embed(part), in_file.embed(part)
        for r, i in enumerate(part):
            assert torch.equal(a(r, 0, len(sequences[i])), b(r, 0, len(sequences[i]))), (part, i)
