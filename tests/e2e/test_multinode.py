"""Several machines with one command each (docs/distributed.md, "Several machines"): two "nodes" of one process
each, in two checkouts on this machine, `dvc repro` in both at the same time, meeting over loopback (gloo). Every node
ends with the same outputs and dvc.lock; a node killed after an epoch resumes with the other; a node that never
arrives stops the first within the join timeout, with one line and nothing written."""
import json
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from pipeline import dvc, env, kill_after_epoch, make_project, run
from safetensors.torch import load_file

from qlora_nli.runtime.distributed import SAME_RESULT_RELATIVE
from qlora_nli.runtime.launch import node_count, per_stage_rendezvous, stage_name

JOIN_TIMEOUT = 20  # seconds the first node waits for the others in tests (torchrun's default: 600)
ADAPTER = "models/adapter/adapter_model.safetensors"
STEP_LOSSES = "dvclive/plots/metrics/train/step_loss.tsv"


def test_each_stage_rendezvouses_under_an_id_of_its_own():
    two_nodes = ["--nnodes", "2", "--node-rank", "1", "--rdzv-id", "run7", "--nproc-per-node", "1"]
    assert per_stage_rendezvous(two_nodes, ["-m", "stages.evaluate", "baseline"]) == [
        "--nnodes", "2", "--node-rank", "1", "--rdzv-id=run7-evaluate-baseline", "--nproc-per-node", "1"]
    assert per_stage_rendezvous(["--nnodes=1:4", "--rdzv_id=x"], ["stages/finetune.py"]) == [
        "--nnodes=1:4", "--rdzv-id=x-finetune"]
    assert per_stage_rendezvous(["--nnodes", "2"], ["-m", "stages.finetune"]) == [
        "--nnodes", "2", "--rdzv-id", "qlora-nli-finetune"]
    one_node = ["--standalone", "--nproc-per-node=2"]
    assert per_stage_rendezvous(one_node, ["-m", "stages.finetune"]) == one_node  # unchanged on one machine
    assert (node_count(["--nnodes", "3"]), node_count(["--nnodes=2:5"]), node_count([])) == (3, 5, 1)
    assert stage_name(["-m", "stages.evaluate", "fine tuned"]) == "evaluate-fine_tuned"


class _HeldCheckpoints:
    """Stands in for training.Checkpoints: the epochs a node holds, and which one is loaded."""
    root = Path("checkpoints")

    def __init__(self, epochs):
        self.held, self.loaded = epochs, []

    def epochs(self):
        return self.held

    def load(self, directory):
        self.loaded.append(Path(directory).name)
        return int(Path(directory).name.split("-")[1]), directory, {}


@pytest.mark.parametrize("held, expected", [
    ({0: [1, 2], 1: [1]}, "epoch-1"),  # node 1 died while writing epoch 2
    ({0: [1, 2, 3], 1: [1, 2, 3]}, None),  # the same everywhere: the newest, as `latest` found it
    ({0: [1, 2], 1: []}, "nothing"),  # a fresh checkout: every node starts over
])
def test_every_rank_resumes_the_newest_epoch_all_hold(monkeypatch, held, expected):
    from qlora_nli.runtime import distributed
    from qlora_nli.train.checkpoints import newest_common_checkpoint

    monkeypatch.setattr(distributed, "gather_by_index", lambda ranks, pieces: held)
    checkpoints = _HeldCheckpoints(held[0])
    newest = (held[0][-1], Path(f"checkpoints/epoch-{held[0][-1]}"), {})
    chosen = newest_common_checkpoint(checkpoints, newest, distributed.Ranks(rank=0, world_size=2))
    if expected == "nothing":
        assert chosen is None and checkpoints.loaded == []
    elif expected is None:
        assert chosen is newest and checkpoints.loaded == []
    else:
        assert chosen[0] == 1 and checkpoints.loaded == [expected]


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _switch(node, port, nodes=2):
    return {"NLI_TORCHRUN": f"--nnodes {nodes} --node-rank {node} --nproc-per-node 1 --rdzv-backend c10d "
                                  f"--rdzv-endpoint 127.0.0.1:{port} --rdzv-id test "
                                  f"--rdzv-conf join_timeout={JOIN_TIMEOUT}",
            "OMP_NUM_THREADS": "1"}


def _checkouts(tmp_path):
    """Two checkouts of the same project: the same params (model and data where node 0's copy put them)."""
    first = make_project(tmp_path / "node0")
    params = yaml.safe_load((first / "params.yaml").read_text())
    second = make_project(tmp_path / "node1", overrides={"model.name": params["model"]["name"],
                                                         "data.source": params["data"]["source"]})
    assert (first / "params.yaml").read_bytes() == (second / "params.yaml").read_bytes()
    return first, second


def _on_every_node(roots, command, port, extra=None):
    """`command` in every checkout at once, node i with --node-rank i; [(returncode, output, seconds)]. Output goes to
    files: a node blocked on a full pipe would stall the others in a collective."""
    started, processes = time.monotonic(), []
    for node, root in enumerate(roots):
        log = open(root.parent / f"{root.name}.{len(list(root.parent.glob(f'{root.name}.*.log')))}.log", "w+")
        processes.append((subprocess.Popen(command, cwd=root, stdout=log, stderr=subprocess.STDOUT, text=True,
                                           env={**env(root), **_switch(node, port, len(roots)),
                                                **((extra or {}).get(node, {}))}), log))
    results = []
    for process, log in processes:
        process.wait()
        results.append((process.returncode, Path(log.name).read_text(), time.monotonic() - started))
        log.close()
    return results


def _repro(roots, *targets, extra=None):
    return _on_every_node(roots, [sys.executable, "-m", "dvc", "repro", *targets], _free_port(), extra)


def _files(root):
    """{path: bytes} of every file of a checkout outside .git, .dvc and __pycache__ (which holds source mtimes)."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*")
            if p.is_file() and p.relative_to(root).parts[0] not in (".git", ".dvc") and "__pycache__" not in p.parts}


def _step_losses(root):
    return [float(line.split("\t")[1]) for line in (root / STEP_LOSSES).read_text().splitlines()[1:]]


def _predictions(root, name):
    return [json.loads(line) for line in (root / f"predictions/{name}.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def nodes(tmp_path_factory):
    """Two checkouts, `dvc repro` in both at once, two nodes of one process each."""
    roots = _checkouts(tmp_path_factory.mktemp("nodes"))
    results = _repro(roots)
    for node, (code, output, seconds) in enumerate(results):
        assert code == 0, f"node {node}:\n{output[-6000:]}"
        print(f"node {node}: dvc repro {seconds:.0f} s")
    return roots, results


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    root = make_project(tmp_path_factory.mktemp("one") / "project")
    for script in (["-m", "stages.prepare"], ["-m", "stages.finetune"], ["-m", "stages.evaluate", "finetuned"]):
        run(["python", *script], root, extra_env={"OMP_NUM_THREADS": "1"})
    return root


@pytest.mark.slow
def test_every_node_ends_with_the_outputs_of_one_process(nodes, one_process):
    (first, second), results = nodes
    # the 3 torchrun stages really ran across the nodes: on each node, one rank of 2 per stage (ranks are numbered in
    # the order the nodes join)
    for _, output, _ in results:
        assert len(re.findall(r"rank [01] of 2 \(gloo\)", output)) == 3, output[-3000:]
    assert (first / "dvc.lock").read_bytes() == (second / "dvc.lock").read_bytes()
    for root in (first, second):  # every output DVC recorded is in each workspace, as recorded
        assert "up to date" in dvc(root, "status").stdout, root
    first_files, second_files = _files(first), _files(second)
    assert {ADAPTER, "reports/report.md", "checkpoints/epoch-2/state.pt", "checkpoints/epoch-2/record.json",
            "predictions/finetuned.jsonl", "metrics/train.json", "dvclive/metrics.json"} <= set(second_files)
    assert sorted(second_files) == sorted(first_files)
    for path in first_files:  # the same bytes, also where times and resources are recorded (rank 0's)
        assert second_files[path] == first_files[path], path
    train = json.loads((second / "metrics/train.json").read_text())
    assert (train["world_size"], train["backend"]) == (2, "gloo")
    a, b = load_file(one_process / ADAPTER), load_file(second / ADAPTER)
    assert a.keys() == b.keys()
    for key in a:
        assert (a[key] - b[key]).abs().max() <= SAME_RESULT_RELATIVE * a[key].abs().max(), key
    assert _step_losses(second) == pytest.approx(_step_losses(one_process), rel=SAME_RESULT_RELATIVE)
    p1, p2 = _predictions(one_process, "finetuned"), _predictions(second, "finetuned")
    assert [p["pred"] for p in p1] == [p["pred"] for p in p2] and len(p1) == 9
    for x, y in zip(p1, p2):
        assert y["scores"] == pytest.approx(x["scores"], rel=SAME_RESULT_RELATIVE, abs=1e-4)


@pytest.mark.slow
def test_a_node_killed_after_an_epoch_resumes_with_the_other(nodes, tmp_path):
    roots = _checkouts(tmp_path)
    killed = _repro(roots, "finetune", extra={1: kill_after_epoch(roots[1], 1)})
    print(f"killed run: node 0 ended {killed[0][2]:.0f} s after the start, node 1 {killed[1][2]:.0f} s")
    for node, (code, output, _) in enumerate(killed):
        assert code != 0, f"node {node}:\n{output[-3000:]}"
        assert sorted(p.name for p in (roots[node] / "checkpoints").iterdir()) == ["epoch-1"], node
        assert not (roots[node] / "models/adapter").exists()
    assert re.search(r"NLI_TORCHRUN: rank [01] failed \(killed by SIGKILL\); its output is above; rerun `dvc "
                     r"repro` on every node", killed[1][1]), killed[1][1][-3000:]
    resumed = _repro(roots, "finetune")
    uninterrupted = nodes[0][0]
    for node, (code, output, _) in enumerate(resumed):
        assert code == 0, f"node {node}:\n{output[-6000:]}"
        assert "resuming after epoch 1" in output, node
        assert (roots[node] / ADAPTER).read_bytes() == (uninterrupted / ADAPTER).read_bytes(), node
        assert (roots[node] / STEP_LOSSES).read_text() == (uninterrupted / STEP_LOSSES).read_text(), node
        assert json.loads((roots[node] / "metrics/train.json").read_text())["resumed_from_epoch"] == 1
    assert (roots[0] / "dvc.lock").read_bytes() == (roots[1] / "dvc.lock").read_bytes()


@pytest.mark.slow
def test_a_node_that_never_arrives_stops_the_first_with_one_line(nodes):
    first = nodes[0][0]
    before = _files(first)
    started = time.monotonic()
    alone = run(["python", "-m", "stages.evaluate", "finetuned"], first, check=False,
                extra_env=_switch(0, _free_port()))
    seconds = time.monotonic() - started
    print(f"node 0 alone: stopped after {seconds:.1f} s (join timeout {JOIN_TIMEOUT} s)")
    assert alone.returncode == 1
    assert "Traceback" not in alone.stderr
    lines = [line for line in alone.stderr.splitlines() if "joined the rendezvous" in line]
    assert len(lines) == 1 and lines[0] == alone.stderr.strip().splitlines()[-1], alone.stderr[-3000:]
    assert "not all 2 nodes joined the rendezvous test-evaluate-finetuned" in lines[0]
    assert f"join_timeout={JOIN_TIMEOUT} s" in lines[0]
    assert JOIN_TIMEOUT <= seconds < JOIN_TIMEOUT + 60  # it waited the join timeout, and no longer than startup
    assert _files(first) == before
