"""A stage killed where it matters leaves only complete outputs, and the next run repairs them.

Each stage runs under tests/fault_runner.py, which SIGKILLs it at a chosen OS call of an output's write: just before
the rename that puts a complete new version in place, before the close of the file being written, and (directories)
just after the old version is removed or moved away. Afterwards every output on disk must be the previous complete
version or the new complete version: never partial, never missing when it existed. Then a run without faults must
finish, and leave no temporaries behind. Also: resume through `dvc repro` after a kill, and new training data
starting fresh.
"""
import json
import signal
import sys
from pathlib import Path

import pytest

from pipeline import dvc, make_project, run, set_param

FAULT_RUNNER = Path(__file__).resolve().parent / "fault_runner.py"

STAGES = [  # (script, argument, outputs written through qlora_nli.io), in pipeline order
    ("prepare", None, ["data/train.jsonl", "data/validation.jsonl", "data/test.jsonl", "data/manifest.json"]),
    ("finetune", None, ["metrics/train.json"]),
    ("evaluate", "baseline", ["predictions/baseline.jsonl", "metrics/baseline.json", "plots/baseline/confusion.csv"]),
    ("evaluate", "finetuned", ["predictions/finetuned.jsonl", "metrics/finetuned.json",
                               "plots/finetuned/confusion.csv"]),
    ("failure_cases", None, ["reports/failure_cases.json", "reports/failure_cases.md", "metrics/comparison.json",
                             "plots/accuracy.json"]),
    ("report", None, ["reports/report.md", "reports/model_card.md", "reports/figures"]),
]
ALL_OUTPUTS = [o for _, _, outputs in STAGES for o in outputs] + ["models/adapter"]


def command(stage, arg):
    return [f"stages/{stage}.py"] + ([arg] if arg else [])


def run_with_fault(root, stage, arg, fault):
    return run([sys.executable, str(FAULT_RUNNER), *command(stage, arg)], root, check=False,
               extra_env={"QLORA_NLI_FAULT": json.dumps(fault)})


def snapshot(root, rel):
    """None (missing), the bytes of a file, or {relative path: bytes} of a directory."""
    path = root / rel
    if path.is_dir():
        return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}
    return path.read_bytes() if path.exists() else None


def complete_json(rel, data):
    """Outputs carrying timings differ on every run: for those, complete means the whole JSON document is there."""
    if not isinstance(data, bytes) or not data.endswith(b"\n"):
        return False
    try:
        if rel.endswith(".jsonl"):
            [json.loads(line) for line in data.decode().splitlines()]
        elif rel.endswith(".json"):
            json.loads(data)
        else:
            return False
    except ValueError:
        return False
    return True


def leftovers(root, rel):
    path = root / rel
    return sorted(p.name for p in path.parent.glob(f".{path.name}*")) if path.parent.exists() else []


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """The whole pipeline run once (the "previous versions"), then data params changed so every stage writes new
    versions that differ from them."""
    root = make_project(tmp_path_factory.mktemp("faults") / "project", overrides={"train.epochs": 1})
    for stage, arg, _ in STAGES:
        run(["python", *command(stage, arg)], root)
    set_param(root, "data.n_train", 21)
    set_param(root, "data.n_val", 5)
    set_param(root, "data.n_test", 8)
    return root


def kill_and_check(root, stage, arg, outputs, fault, must_hit=True):
    """Run `stage` with `fault`; return (outputs before, outputs after the kill)."""
    before = {o: snapshot(root, o) for o in outputs}
    result = run_with_fault(root, stage, arg, fault)
    if must_hit:
        assert result.returncode == -signal.SIGKILL, (
            f"{stage}: no {fault['at']} call for {fault['path']} (is it written atomically?)\n{result.stderr[-2000:]}")
    return before, {o: snapshot(root, o) for o in outputs}


@pytest.mark.slow
@pytest.mark.parametrize("stage, arg, outputs", STAGES, ids=[f"{s}{'@' + a if a else ''}" for s, a, _ in STAGES])
def test_kill_mid_write_leaves_previous_or_new_complete_outputs(project, stage, arg, outputs):
    root = project
    runs = []
    for output in outputs:  # killed before the rename that would put the complete new version in place
        before, after = kill_and_check(root, stage, arg, outputs, {"at": "rename", "path": output})
        assert after[output] == before[output], f"{output}: changed although its rename never happened"
        runs.append((before, after))
    # killed before the close of the file being written: a direct (non-atomic) write would leave it truncated
    before, after = kill_and_check(root, stage, arg, outputs, {"at": "close", "path": outputs[0]})
    assert after[outputs[0]] == before[outputs[0]], f"{outputs[0]}: a half-written file is in place"
    runs.append((before, after))

    run(["python", *command(stage, arg)], root)  # the repair: a run without faults
    final = {o: snapshot(root, o) for o in outputs}
    for before, after in runs:
        for o in outputs:
            assert after[o] is not None or before[o] is None, f"{o}: missing after a kill, though it existed"
            assert after[o] in (before[o], final[o]) or complete_json(o, after[o]), f"{o}: neither old nor new"
    for o in outputs:
        assert final[o] is not None and final[o] != runs[0][0][o], f"{o}: the rerun did not write a new version"
        assert not leftovers(root, o), f"{o}: temporaries left after a complete run: {leftovers(root, o)}"
    if stage == "finetune":  # every checkpoint on disk is complete
        for checkpoint in (root / "checkpoints").glob("epoch-*"):
            assert {"state.pt", "adapter_model.safetensors", "adapter_config.json"} <= {
                p.name for p in checkpoint.iterdir()}, checkpoint


@pytest.mark.slow
def test_kill_during_a_directory_replace_keeps_a_complete_adapter(project):
    root = project
    set_param(root, "train.learning_rate", 0.002)  # a new adapter, to replace the existing one
    try:
        for fault in ({"at": "rmtree", "path": "models/adapter"}, {"at": "moveaway", "path": "models/adapter"},
                      {"at": "rename", "path": "models/adapter"}):
            before, after = kill_and_check(root, "finetune", None, ["models/adapter"], fault,
                                           must_hit=fault["at"] == "rename")
            assert before["models/adapter"], "the previous adapter should exist"
            assert after["models/adapter"] == before["models/adapter"] or (
                after["models/adapter"] and "adapter_model.safetensors" in after["models/adapter"]), fault
    finally:
        run(["python", "stages/finetune.py"], root)  # repaired either way, for the tests after this one
    assert "adapter_model.safetensors" in snapshot(root, "models/adapter")


@pytest.mark.slow
def test_dvc_repro_resumes_persisted_checkpoints_after_a_kill(tmp_path):
    root = make_project(tmp_path / "project", overrides={"train.epochs": 2})
    killed = run([sys.executable, "-m", "dvc", "repro"], root, check=False,
                 extra_env={"QLORA_NLI_KILL_AFTER_EPOCH": "1"})
    assert killed.returncode != 0 and not (root / "models/adapter").exists()
    # persist: true, so DVC keeps the finished epoch for the next repro instead of deleting the stage's outputs
    assert sorted(p.name for p in (root / "checkpoints").iterdir()) == ["epoch-1"]
    resumed = dvc(root, "repro")
    assert "resuming after epoch 1" in resumed.stdout + resumed.stderr
    train = json.loads((root / "metrics/train.json").read_text())
    assert train["resumed_from_epoch"] == 1 and train["epochs"] == 2
    per_epoch = train["time"]["per_epoch_seconds"]  # the killed run's epoch time, from the checkpoint's record
    recorded = json.loads((root / "checkpoints/epoch-1/record.json").read_text())["epoch_seconds"]["1"]
    assert per_epoch[0] == round(recorded, 3) and per_epoch[1] > 0
    assert train["time"]["total_seconds"] == round(per_epoch[0] + per_epoch[1], 1)
    assert "resumed epochs not timed" not in (root / "reports/report.md").read_text()
    assert "up to date" in dvc(root, "status").stdout


@pytest.mark.slow
def test_changed_training_data_starts_fresh(tmp_path):
    root = make_project(tmp_path / "project", overrides={"train.epochs": 2})
    run(["python", "stages/prepare.py"], root)
    run(["python", "stages/finetune.py"], root, check=False, extra_env={"QLORA_NLI_KILL_AFTER_EPOCH": "1"})
    assert (root / "checkpoints/epoch-1").is_dir()
    rows = [json.loads(line) for line in (root / "data/train.jsonl").read_text().splitlines()]
    rows[0]["hypothesis"] += " today"  # same params, same number of pairs, one pair changed
    (root / "data/train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = run(["python", "stages/finetune.py"], root)
    assert "resuming" not in result.stderr and "starting fresh" in result.stderr
    metrics = json.loads((root / "metrics/train.json").read_text())
    assert metrics["resumed_from_epoch"] is None and metrics["epochs"] == 2
