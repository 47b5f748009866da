"""A stage killed where it matters leaves only complete outputs, and the next run repairs them; a stage whose write
of any one output fails, or that is interrupted by Ctrl-C, leaves every output as it was.

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
import yaml
from pipeline import REPO, dvc, kill_after_epoch, make_project, run, set_param

FAULT_RUNNER = REPO / "tests" / "fault_runner.py"


def dvc_stages():
    """(stage, argument, outputs) of every stage of dvc.yaml in its order, a foreach stage once per item: the outs and
    metrics DVC records for it."""
    for name, stage in yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"].items():
        body = stage.get("do", stage)
        paths = [o if isinstance(o, str) else next(iter(o)) for o in body.get("outs", []) + body.get("metrics", [])]
        for key in stage.get("foreach", [None]):
            yield name, key, [p.replace("${key}", key) if key else p for p in paths]


DVC_STAGES = list(dvc_stages())

STAGES = [  # (stage, argument, outputs written through qlora_nli.runtime.io), in pipeline order
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
    """The stage as dvc.yaml runs it (fault_runner.py's -m runs a module)."""
    return ["-m", f"stages.{stage}"] + ([arg] if arg else [])


def run_with_fault(root, stage, arg, fault):
    return run([sys.executable, str(FAULT_RUNNER), *command(stage, arg)], root, check=False,
               extra_env={"NLI_FAULT": json.dumps(fault)})


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
        run(["python", "-m", "stages.finetune"], root)  # repaired either way, for the tests after this one
    assert "adapter_model.safetensors" in snapshot(root, "models/adapter")


@pytest.mark.slow
def test_dvc_repro_resumes_persisted_checkpoints_after_a_kill(tmp_path):
    root = make_project(tmp_path / "project", overrides={"train.epochs": 2})
    killed = run([sys.executable, "-m", "dvc", "repro"], root, check=False,
                 extra_env=kill_after_epoch(root, 1))
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
    run(["python", "-m", "stages.prepare"], root)
    run(["python", "-m", "stages.finetune"], root, check=False, extra_env=kill_after_epoch(root, 1))
    assert (root / "checkpoints/epoch-1").is_dir()
    rows = [json.loads(line) for line in (root / "data/train.jsonl").read_text().splitlines()]
    rows[0]["hypothesis"] += " today"  # same params, same number of pairs, one pair changed
    (root / "data/train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = run(["python", "-m", "stages.finetune"], root)
    assert "resuming" not in result.stderr and "starting fresh" in result.stderr
    metrics = json.loads((root / "metrics/train.json").read_text())
    assert metrics["resumed_from_epoch"] is None and metrics["epochs"] == 2


# --- a write that fails (full disk) at any one output, and Ctrl-C --------------------------------------------------

@pytest.fixture(scope="module")
def changed_project(tmp_path_factory):
    """The whole pipeline run once with an extra set (the "previous versions"), then data params changed so that
    every stage writes new versions that differ from them."""
    base = tmp_path_factory.mktemp("write-faults")
    root = make_project(base / "project", overrides={"train.epochs": 1})
    extra = {"more": {"source": str(base / "project-nli"), "split": "validation", "n": 4}}  # make_project's data
    set_param(root, "data.extra_sets", extra)
    for stage, arg, _ in DVC_STAGES:
        run(["python", *command(stage, arg)], root)
    set_param(root, "data.n_train", 21)
    set_param(root, "data.n_val", 5)
    set_param(root, "data.n_test", 8)
    set_param(root, "data.extra_sets", {"more": {**extra["more"], "n": 5}})
    return root


def only_complete_checkpoints(root):
    for checkpoint in (root / "checkpoints").glob("epoch-*"):
        assert {"state.pt", "adapter_model.safetensors", "adapter_config.json", "run.json"} <= {
            p.name for p in checkpoint.iterdir()}, checkpoint
    return True


@pytest.mark.slow
@pytest.mark.parametrize("stage, arg, outputs", DVC_STAGES, ids=[f"{s}{'@' + a if a else ''}" for s, a, _ in DVC_STAGES])
def test_a_failed_write_of_any_output_leaves_every_output_of_the_stage_as_it_was(changed_project, stage, arg,
                                                                                  outputs):
    """For each output of the stage: its rename into place fails (ENOSPC), after the outputs swapped in before it
    (which must be put back), and for a file, its close fails while it is written. Each time: one line naming that
    output, exit status 1, every output byte-identical, no temporaries. checkpoints/ is the exception by design: it
    keeps every complete epoch, so that the next run resumes (finetune starts by deleting those of other params)."""
    root = changed_project
    before = {o: snapshot(root, o) for o in outputs}
    # checkpoints first: once a run has saved the new epoch, the runs after it resume and write no checkpoint
    faults = [{"at": "rename", "path": o, "raise": "ENOSPC"} for o in sorted(outputs, key="checkpoints".__ne__)]
    faults += [{"at": "close", "path": o, "raise": "ENOSPC"} for o in outputs if (root / o).is_file()]
    for fault in faults:
        result = run_with_fault(root, stage, arg, fault)
        last = result.stderr.strip().splitlines()[-1]
        assert result.returncode == 1 and "Traceback" not in result.stderr, (fault, result.stderr[-3000:])
        # the output, or (an error that names no file) the outputs written with it
        named = last.split(": cannot write")[0].split(", ")
        assert any(n == fault["path"] or n.startswith(fault["path"] + "/") for n in named), (fault, last)
        assert "No space left on device" in last, (fault, last)
        for o in outputs:
            if o == "checkpoints":
                assert only_complete_checkpoints(root)
            else:
                assert snapshot(root, o) == before[o], f"{fault}: {o} changed"
            assert not leftovers(root, o), f"{fault}: temporaries left: {leftovers(root, o)}"

    # Ctrl-C while the first file output is written: one line, the shell's status 130, nothing changed
    first_file = next(o for o in outputs if (root / o).is_file())
    result = run_with_fault(root, stage, arg, {"at": "close", "path": first_file, "signal": "SIGINT"})
    assert result.returncode == 130 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert result.stderr.strip().splitlines()[-1] == f"{stage}: interrupted; {interrupted_note(root, stage)}"
    assert {o: snapshot(root, o) for o in outputs if o != "checkpoints"} == {
        o: v for o, v in before.items() if o != "checkpoints"}
    # Ctrl-C while the outputs are swapped in: it waits until all of them are, then the same line and status
    result = run_with_fault(root, stage, arg, {"at": "rename", "path": outputs[-1], "signal": "SIGINT"})
    assert result.returncode == 130 and "Traceback" not in result.stderr, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    if stage == "finetune":
        assert last == f"{stage}: interrupted; {interrupted_note(root, stage)}", last
    else:
        prefix, suffix = f"{stage}: interrupted; ", " already written in full, nothing is half-written"
        assert last.startswith(prefix) and last.endswith(suffix), last
        assert set(last[len(prefix):-len(suffix)].split(", ")) == set(outputs), last
    interrupted = {o: snapshot(root, o) for o in outputs}

    run(["python", *command(stage, arg)], root)  # without a fault: the new versions, for the next stage's inputs
    if stage != "check_params":  # its output has the same bytes for every valid params.yaml
        changed = [o for o in outputs if snapshot(root, o) != before[o]]
        assert len(changed) == len(outputs), f"the test needs new versions that differ: only {changed} did"
        assert all(interrupted[o] != before[o] for o in outputs), "Ctrl-C during the swaps left a mix"


def interrupted_note(root, stage):
    """The end of the line a stage interrupted before its outputs were written prints, from what is on disk
    (finetune: its complete checkpoints)."""
    if stage == "finetune":
        epochs = [int(p.name.split("-")[1]) for p in (root / "checkpoints").glob("epoch-*")]
        return (f"epoch {max(epochs)} is complete, `dvc repro` resumes from it" if epochs
                else "no epoch is complete yet; `dvc repro` starts the training again")
    return "no output was changed; run it again to finish"


@pytest.mark.slow
def test_ctrl_c_in_finetune_names_the_epoch_a_rerun_resumes_from(tmp_path):
    root = make_project(tmp_path / "project", overrides={"train.epochs": 2})
    run(["python", "-m", "stages.prepare"], root)
    run(["python", "-m", "stages.finetune"], root)  # the previous outputs
    set_param(root, "train.learning_rate", 0.002)  # a new run, which deletes the previous run's checkpoints
    outputs = ["models/adapter", "dvclive/plots", "dvclive/metrics.json", "metrics/train.json"]
    before = {o: snapshot(root, o) for o in outputs}

    def interrupted(fault, line, epochs):
        result = run_with_fault(root, "finetune", None, {**fault, "signal": "SIGINT"})
        assert result.returncode == 130 and "Traceback" not in result.stderr, result.stderr[-3000:]
        assert result.stderr.strip().splitlines()[-1] == f"finetune: interrupted; {line}"
        assert {o: snapshot(root, o) for o in outputs} == before
        assert sorted(p.name for p in (root / "checkpoints").glob("*")) == epochs
        assert only_complete_checkpoints(root)

    # Ctrl-C just after the previous run's checkpoints are gone, before any epoch of this run
    interrupted({"at": "rmtree", "path": "checkpoints"},
                "no epoch is complete yet; `dvc repro` starts the training again", [])
    # Ctrl-C while epoch 1's checkpoint is renamed into place: it waits until the rename is done
    interrupted({"at": "rename", "path": "checkpoints/epoch-1"},
                "epoch 1 is complete, `dvc repro` resumes from it", ["epoch-1"])
    resumed = run(["python", "-m", "stages.finetune"], root)
    assert "resuming after epoch 1" in resumed.stderr
    assert json.loads((root / "metrics/train.json").read_text())["resumed_from_epoch"] == 1


@pytest.mark.slow
@pytest.mark.parametrize("name, arguments, output, at", [
    ("nli-predict", ["--adapter", "models/adapter", "--premise", "A man sleeps.", "--hypothesis", "A man rests.",
                     "--output", "out.jsonl"], "out.jsonl", "out.jsonl"),
    ("nli-export", ["--adapter", "models/adapter", "--out", "exported", "--no-card", "--no-lm-eval"], "exported",
     "EXPORT.json"),
])
def test_ctrl_c_in_nli_predict_and_export_is_one_line_and_writes_nothing(changed_project, name, arguments, output, at):
    root = changed_project
    result = run([sys.executable, str(FAULT_RUNNER), "-m", "qlora_nli.cli", name.split("-")[1], *arguments], root,
                 check=False, extra_env={"NLI_FAULT": json.dumps({"at": "close", "path": at,
                                                                       "signal": "SIGINT"})})
    assert result.returncode == 130 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert result.stderr.strip().splitlines()[-1] == f"{name}: interrupted; no output was changed; run it again to finish"
    assert not (root / output).exists() and not leftovers(root, output)


def test_ctrl_c_before_a_stage_starts_is_one_line_too():
    """While an entry point still imports (torch takes seconds): the same line and status, from sys.excepthook."""
    script = ("import os, signal, sys, time\n"
              "import qlora_nli.runtime.errors\n"
              "sys.argv[0] = 'stages/report.py'\n"
              "os.kill(os.getpid(), signal.SIGINT)\n"
              "time.sleep(30)\n")
    result = run([sys.executable, "-c", script], REPO, check=False)
    assert result.returncode == 130 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.strip() == "report: interrupted; no output was changed; run it again to finish"


def test_a_failed_swap_puts_back_the_outputs_swapped_before_it(tmp_path, monkeypatch):
    """In-process, quick: three outputs (a file, a directory, a new file); the second swap fails."""
    import errno
    import os

    import qlora_nli.runtime.io as io
    from qlora_nli.runtime.errors import OutputError
    from qlora_nli.runtime.files import write_text

    monkeypatch.chdir(tmp_path)
    Path("a.json").write_text("old a")
    Path("figures").mkdir()
    Path("figures/x.svg").write_text("old x")
    real = io.exchange_paths

    def fails_for_figures(a, b):
        if Path(b).name == "figures":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), os.fspath(a), None, os.fspath(b))
        return real(a, b)

    monkeypatch.setattr(io, "exchange_paths", fails_for_figures)
    with pytest.raises(OutputError) as e:
        with io.all_or_none(["a.json", "figures", "c.md"]) as staged:
            write_text(staged["a.json"], "new a")
            staged["figures"].mkdir()
            write_text(staged["figures"] / "x.svg", "new x")
            write_text(staged["c.md"], "new c")
    assert str(e.value) == ("figures: cannot write it (No space left on device); nothing was changed there, nor in the "
                            "2 other outputs written with it; free disk space (or raise the quota) on that file "
                            "system, then rerun")
    assert sorted(str(p) for p in tmp_path.rglob("*")) == [str(tmp_path / n) for n in ("a.json", "figures",
                                                                                        "figures/x.svg")]
    assert Path("a.json").read_text() == "old a" and Path("figures/x.svg").read_text() == "old x"
