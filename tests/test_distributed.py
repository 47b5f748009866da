"""Data-parallel stages (qlora_nli/runtime/distributed.py, runtime/launch.py): 2 gloo processes under torchrun train and predict what 1 process
does, only rank 0 writes, a killed run resumes, and `dvc repro` runs with the switch. Plus the frozen-block states
kept in a file: the same bits as kept in memory."""
import json

import pytest
import torch
from pipeline import dvc, make_project, run
from safetensors.torch import load_file
from tiny import lora_model, made_up_pairs

from qlora_nli.infer.scoring import length_sorted_batches
from qlora_nli.model import loading
from qlora_nli.prompts import TEMPLATE, encode_answers, encode_prompts
from qlora_nli.runtime.distributed import SAME_RESULT_RELATIVE, Ranks, pick_backend
from qlora_nli.runtime.errors import ParamsError
from qlora_nli.runtime.launch import torchrun_arguments
from qlora_nli.train.examples import Examples
from qlora_nli.train.states import FrozenBlockStates

# one torch thread per rank: the 2 ranks then use what 1 process uses, and runs are repeatable
TWO = {"QLORA_NLI_TORCHRUN": "2", "OMP_NUM_THREADS": "1"}
ONE = {"OMP_NUM_THREADS": "1"}
ADAPTER = "models/adapter/adapter_model.safetensors"
STEP_LOSSES = "dvclive/plots/metrics/train/step_loss.tsv"
RELATIVE = SAME_RESULT_RELATIVE  # why this value: qlora_nli/runtime/distributed.py


def test_the_switch_maps_to_torchrun_arguments():
    assert torchrun_arguments("") == [] and torchrun_arguments("1") == []
    assert torchrun_arguments("2") == ["--standalone", "--nproc-per-node=2"]
    multi_node = "--nnodes 2 --node-rank 1 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint head:29500"
    assert torchrun_arguments(multi_node) == multi_node.split()
    for bad in ("0", "--nnodes 2"):
        with pytest.raises(ParamsError, match="QLORA_NLI_TORCHRUN"):
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
    monkeypatch.setenv("QLORA_NLI_TORCHRUN", switch)
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


def test_frozen_states_in_a_file_are_the_in_memory_bits(tiny_model_dir):
    model, tokenizer = lora_model(tiny_model_dir, layers=1), loading.load_tokenizer(str(tiny_model_dir))
    prompt_ids = encode_prompts(tokenizer, [TEMPLATE.format(**r) for r in made_up_pairs(9, 5)])
    answers = encode_answers(tokenizer)
    sequences = [p + answers[k % 3] for k, p in enumerate(prompt_ids)]
    kept = [FrozenBlockStates(model, sequences, prompt_ids, tokenizer.pad_token_id, torch.float32, batch_size=4,
                              in_memory=in_memory) for in_memory in (True, False)]
    in_memory, in_file = kept
    assert in_file.rows.nbytes == in_memory.rows.nbytes > 0
    for part in ([0, 1, 2], [8, 3], [5]):
        a, b = in_memory.embed(part), in_file.embed(part)
        for r, i in enumerate(part):
            assert torch.equal(a(r, 0, len(sequences[i])), b(r, 0, len(sequences[i]))), (part, i)


@pytest.fixture(scope="module")
def projects(tmp_path_factory):
    """The same tiny project fine-tuned and evaluated by 1 process and by 2."""
    roots = {}
    for name, extra in (("one", ONE), ("two", TWO)):
        root = make_project(tmp_path_factory.mktemp(name) / "project")
        for script in (["stages/prepare.py"], ["stages/finetune.py"], ["stages/evaluate.py", "finetuned"]):
            run(["python", *script], root, extra_env=extra)
        roots[name] = root
    return roots


def _step_losses(root):
    return [float(line.split("\t")[1]) for line in (root / STEP_LOSSES).read_text().splitlines()[1:]]


def _predictions(root, name):
    return [json.loads(line) for line in (root / f"predictions/{name}.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_two_processes_train_and_predict_what_one_does(projects):
    one, two = projects["one"], projects["two"]
    losses = _step_losses(one)
    assert len(losses) == 6 and _step_losses(two) == pytest.approx(losses, rel=RELATIVE)
    a, b = load_file(one / ADAPTER), load_file(two / ADAPTER)
    assert a.keys() == b.keys()
    for key in a:
        assert (a[key] - b[key]).abs().max() <= RELATIVE * a[key].abs().max(), key
    p1, p2 = _predictions(one, "finetuned"), _predictions(two, "finetuned")
    assert [p["pred"] for p in p1] == [p["pred"] for p in p2]
    for x, y in zip(p1, p2):
        assert y["scores"] == pytest.approx(x["scores"], rel=RELATIVE, abs=1e-4)
    m1, m2 = (json.loads((r / "metrics/train.json").read_text()) for r in (one, two))
    assert (m1["world_size"], m1["backend"], m2["world_size"], m2["backend"]) == (1, None, 2, "gloo")
    # rank 0 alone writes: one dvclive run, one checkpoint per epoch, no stray temporary outputs
    assert sorted(p.name for p in (two / "checkpoints").iterdir()) == ["epoch-1", "epoch-2"]
    assert not [p for d in ("checkpoints", "metrics", "models", "predictions") for p in (two / d).glob(".*")]


@pytest.mark.slow
def test_sharded_evaluation_is_byte_identical(projects):
    root = projects["one"]
    outputs = {}
    for name, extra in (("one", ONE), ("two", TWO)):
        run(["python", "stages/evaluate.py", "baseline"], root, extra_env=extra)
        metrics = json.loads((root / "metrics/baseline.json").read_text())
        for wall_clock in ("eval_seconds", "pairs_per_second"):
            del metrics[wall_clock]
        outputs[name] = ((root / "predictions/baseline.jsonl").read_bytes(),
                         (root / "plots/baseline/confusion.csv").read_bytes(), metrics)
    # 9 test pairs in batches of 4: rank 0 scores 2 batches, rank 1 one; gathered in the data's order
    assert outputs["one"] == outputs["two"]


@pytest.mark.slow
def test_killed_two_process_run_resumes_to_the_uninterrupted_result(projects, tmp_path):
    root = make_project(tmp_path / "project")
    run(["python", "stages/prepare.py"], root)
    killed = run(["python", "stages/finetune.py"], root, check=False,
                 extra_env={**TWO, "QLORA_NLI_KILL_AFTER_EPOCH": "1"})
    assert killed.returncode != 0
    assert sorted(p.name for p in (root / "checkpoints").iterdir()) == ["epoch-1"]
    assert not (root / "models/adapter").exists()
    resumed = run(["python", "stages/finetune.py"], root, extra_env=TWO)
    assert resumed.stderr.count("resuming after epoch 1") == 2  # each rank restores the checkpoint
    uninterrupted = projects["two"]
    assert (root / ADAPTER).read_bytes() == (uninterrupted / ADAPTER).read_bytes()
    assert (root / STEP_LOSSES).read_text() == (uninterrupted / STEP_LOSSES).read_text()
    assert json.loads((root / "metrics/train.json").read_text())["resumed_from_epoch"] == 1


@pytest.mark.slow
def test_dvc_repro_with_the_switch(tmp_path):
    root = make_project(tmp_path / "project")
    result = run(["python", "-m", "dvc", "repro"], root, extra_env=TWO)
    assert "--nproc-per-node=2" in result.stdout + result.stderr  # the stages really re-executed under torchrun
    train = json.loads((root / "metrics/train.json").read_text())
    assert (train["world_size"], train["backend"]) == (2, "gloo")
    assert "Data-parallel processes: 2 (torch.distributed backend: gloo)" in (root / "reports/report.md").read_text()
    assert len(_predictions(root, "baseline")) == len(_predictions(root, "finetuned")) == 9
    # the switch is not a param: without it, nothing is out of date
    assert "up to date" in dvc(root, "status").stdout
