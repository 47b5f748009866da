"""Many experiments: the documented commands in a new shell, the DVC queue with parallel workers, the sweep table,
remote storage and `dvc exp push/pull`, and outputs that hash the same on every run (docs/experiments.md)."""
import contextlib
import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from pipeline import REPO, dvc, make_project, run, stages_run
from qlora_nli import modeling
from qlora_nli.data import resolve_source
from qlora_nli.errors import DataError
from tiny import make_tiny_model, write_nli_dir

SYSTEM_PATH = "/usr/local/bin:/usr/bin:/bin"  # a new shell: no virtual environment on PATH
QUEUE_TIMEOUT_S = 600  # celery workers start slowly, and two experiments share the cores with everything else
GIT = ["git", "-c", "user.name=test", "-c", "user.email=test@example.com"]
WORKERS = Path(".dvc/tmp/exps/celery")  # dvc-task's files of each queue worker: <worker>.json (pid, returncode), .out


# --- a relative NLI_DATA_MIRROR (fast) ----------------------------------------------------------------------------

def test_relative_mirror_is_taken_from_the_repository_dvc_names(tmp_path, monkeypatch):
    """A queued experiment runs in .dvc/tmp/exps/tmp*/ of the repository; DVC_ROOT names the repository itself."""
    repo = tmp_path / "repo"
    executor = repo / ".dvc" / "tmp" / "exps" / "tmpabc"
    executor.mkdir(parents=True)
    write_nli_dir(tmp_path / "mirror" / "snli", n_train=3, n_val=3, n_test=3)
    monkeypatch.chdir(executor)
    monkeypatch.setenv("NLI_DATA_MIRROR", "../mirror")
    monkeypatch.setenv("DVC_ROOT", str(repo))
    assert resolve_source("stanfordnlp/snli") == ("mirror", str((tmp_path / "mirror" / "snli").resolve()))


def test_relative_mirror_that_does_not_exist_says_where_it_looked(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("NLI_DATA_MIRROR", "../nowhere")
    monkeypatch.delenv("DVC_ROOT", raising=False)
    with pytest.raises(DataError) as error:
        resolve_source("stanfordnlp/snli")
    message = str(error.value)
    assert "\n" not in message and f"{tmp_path}/../nowhere/snli" in message
    assert f"is relative: taken from {tmp_path}" in message and "absolute path" in message


# --- stable adapter files (fast) ------------------------------------------------------------------------------------

def test_saved_adapter_config_is_sorted_and_names_the_embedded_alias(tmp_path, monkeypatch):
    """peft writes target_modules in hash order and the base model as the per-user cache path of the conversion."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    alias = "embedded:smollm2-135m-instruct"
    converted = modeling._cache_dir() / alias.split(":", 1)[1]
    make_tiny_model("llama", converted)  # stands in for the converted GGUF: resolve_model_path finds it, no export
    model = modeling.load_base_model({"name": alias, "load_in_4bit": False, "compute_dtype": "auto"}, "cpu")
    model = modeling.attach_lora(model, {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": "all-linear",
                                         "layers": 1})
    modeling.save_adapter(model, tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert len(config["target_modules"]) == 7 and config["target_modules"] == sorted(config["target_modules"])
    assert config["base_model_name_or_path"] == alias
    assert str(tmp_path) not in (tmp_path / "adapter" / "README.md").read_text()
    reloaded = modeling.load_adapter(modeling.load_base_model(
        {"name": alias, "load_in_4bit": False, "compute_dtype": "auto"}, "cpu"), tmp_path / "adapter")
    assert sorted(reloaded.peft_config["default"].target_modules) == config["target_modules"]


# --- end to end: a tiny project, as a user runs it ----------------------------------------------------------------

def shell(root, script, extra_env=None):
    """`script` run by bash the way a user types it in a new shell: the virtual environment is not on PATH."""
    environment = {k: v for k, v in os.environ.items() if k != "VIRTUAL_ENV"}
    # PYTHONPATH keeps the project's copied package in place of the installed (editable) one, as in tests/pipeline.py
    environment.update(PATH=SYSTEM_PATH, PYTHONPATH=str(root), TOKENIZERS_PARALLELISM="false", DVC_NO_ANALYTICS="1",
                       **(extra_env or {}))
    # Files, not pipes: the queue workers `dvc queue start` leaves running hold its stdout and stderr open until they
    # shut down, which can be long after the experiments end; a pipe would keep this call waiting for them.
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        done = subprocess.run(["bash", "-c", script], cwd=root, env=environment, stdout=out, stderr=err, text=True,
                              timeout=QUEUE_TIMEOUT_S)
        out.seek(0)
        err.seek(0)
        return subprocess.CompletedProcess(done.args, done.returncode, out.read(), err.read())


def queue_statuses(root):
    """{experiment name: status} from `dvc queue status`."""
    lines = dvc(root, "queue", "status").stdout.splitlines()
    rows = [line.split() for line in lines[1:] if line.strip() and not line.startswith("Worker status")]
    return {row[1]: row[-1] for row in rows if len(row) >= 4}


def running_workers(root):
    """Process ids of the queue workers still running (a worker's returncode is written when it ends)."""
    workers = [json.loads(info.read_text()) for info in (Path(root) / WORKERS).glob("dvc-exp-worker-*.json")]
    return [w["pid"] for w in workers if w["returncode"] is None and "queue-worker" in command_line(w["pid"])]


def command_line(pid):
    try:
        return Path(f"/proc/{pid}/cmdline").read_text()
    except FileNotFoundError:
        return ""


def wait_for_queue(root, names):
    deadline = time.monotonic() + QUEUE_TIMEOUT_S
    while time.monotonic() < deadline:
        statuses = queue_statuses(root)
        if all(statuses.get(name) in ("Success", "Failed") for name in names):
            return statuses
        time.sleep(5)
    logs = {name: dvc(root, "queue", "logs", name, check=False).stdout[-2000:] for name in names}
    logs.update({out.name: out.read_text()[-2000:] for out in (Path(root) / WORKERS).glob("*.out")})
    raise AssertionError(f"queue not done after {QUEUE_TIMEOUT_S} s: {dvc(root, 'queue', 'status').stdout}\n{logs}")


def lock_outs(root):
    """{output path: md5} of every stage output in dvc.lock."""
    lock = yaml.safe_load((Path(root) / "dvc.lock").read_text())
    return {out["path"]: out["md5"] for stage in lock["stages"].values() for out in stage.get("outs", [])}


def experiment_data(root):
    """{experiment name: (rev, data)} from `dvc exp show --json`."""
    found = {}
    for baseline in json.loads(dvc(root, "exp", "show", "--json").stdout):
        for exp in baseline.get("experiments") or []:
            found[exp["name"]] = (exp["revs"][0]["rev"], exp["revs"][0]["data"])
    return found


def metric(data, path):
    return data["metrics"][path]["data"]


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A committed tiny project whose data comes through a relative NLI_DATA_MIRROR, with a `.venv` to activate
    (its activate script puts this interpreter's environment first on PATH) and a local-directory DVC remote."""
    base = tmp_path_factory.mktemp("experiments")
    write_nli_dir(base / "mirror" / "tiny-nli")
    root = make_project(base / "project", overrides={"data.source": "made-up/tiny-nli", "train.num_threads": 0})
    (root / ".venv" / "bin").mkdir(parents=True)
    (root / ".venv" / "bin" / "activate").symlink_to(Path(sys.prefix) / "bin" / "activate")
    dvc(root, "remote", "add", "-d", "storage", str(base / "storage"))
    run([sys.executable, "-m", "dvc", "repro"], root, extra_env={"NLI_DATA_MIRROR": "../mirror"})
    run(["git", "add", "-A"], root)
    run([*GIT, "commit", "-qm", "committed run"], root)
    yield root
    # nothing may keep running after the tests: running experiments and the queue workers stop here
    dvc(root, "queue", "stop", "--kill", check=False)
    deadline = time.monotonic() + 120
    while running_workers(root) and time.monotonic() < deadline:
        time.sleep(3)
    for pid in running_workers(root):  # one that missed its shutdown message, with what it runs (its process group)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(os.getpgid(pid), signal.SIGKILL)


@pytest.mark.slow
def test_documented_commands_work_as_typed_after_activation(project):
    without = shell(project, "dvc exp run -S report.n_examples=3")
    assert without.returncode == 127 and "dvc: command not found" in without.stderr
    typed = shell(project, ". .venv/bin/activate\ndvc exp run -S report.n_examples=3")
    assert typed.returncode == 0, typed.stderr[-3000:]
    assert "failure_cases" in stages_run(typed.stdout)  # the stage that reads report.* ran, with the venv's python
    run(["git", "reset", "-q", "--hard"], project)  # back to the committed run for the tests below


@pytest.fixture(scope="module")
def queued(project):
    """Two experiments with different training sets, queued and run by two parallel workers, as docs/experiments.md
    prints it: the relative mirror is resolved in each temporary copy, and each worker's torch runs one thread."""
    typed = shell(project, ". .venv/bin/activate\n"
                           "export NLI_DATA_MIRROR=../mirror\n"
                           "dvc exp run --queue -n small -S data.n_train=12\n"
                           "dvc exp run --queue -n large -S data.n_train=18\n"
                           "OMP_NUM_THREADS=1 dvc queue start -j 2\n")
    assert typed.returncode == 0, typed.stderr[-3000:]
    statuses = wait_for_queue(project, ["small", "large"])
    logs = {name: dvc(project, "queue", "logs", name, check=False).stdout[-3000:] for name in statuses}
    assert statuses == {"small": "Success", "large": "Success"}, f"{statuses}\n{logs}"
    return project


@pytest.mark.slow
def test_queue_runs_two_experiments_in_parallel(queued):
    found = experiment_data(queued)
    assert {"small", "large"} <= set(found)
    small, large = found["small"][1], found["large"][1]
    assert metric(small, "metrics/train.json")["train_examples"] == 12
    assert metric(large, "metrics/train.json")["train_examples"] == 18
    assert metric(small, "dvclive/metrics.json") != metric(large, "dvclive/metrics.json")  # they trained differently
    for name in ("small", "large"):
        rev, data = found[name]
        assert metric(data, "metrics/train.json")["device"].endswith(" 1 torch threads")  # OMP_NUM_THREADS=1 reached it
        manifest = json.loads(run(["git", "show", f"{rev}:data/manifest.json"], queued).stdout)
        assert manifest["read_from"] == "mirror:$NLI_DATA_MIRROR/tiny-nli"
        assert "accuracy" in metric(data, "metrics/finetuned.json")


@pytest.mark.slow
def test_sweep_table_of_the_queued_experiments(queued, tmp_path):
    printed = run([sys.executable, str(REPO / "benchmarks" / "sweep_table.py"), "--out", str(tmp_path)], queued).stdout
    table = {row["experiment"]: row for row in json.loads((tmp_path / "sweep.json").read_text())}
    assert {"small", "large"} <= set(table) and "data.n_train" in table["small"]["params"]
    assert (table["small"]["params"]["data.n_train"], table["large"]["params"]["data.n_train"]) == (12, 18)
    picks = [row for row in table.values() if row["pick"]]
    assert len(picks) == 1 and picks[0]["final_val_accuracy"] == max(r["final_val_accuracy"] for r in table.values())
    assert isinstance(picks[0]["test_accuracy"], float)
    assert all(row["test_accuracy"] == "not looked at" for row in table.values() if not row["pick"])
    assert all(len(row["val_accuracy_per_epoch"]) == 2 and row["train_seconds"] > 0 for row in table.values())
    with open(tmp_path / "val_accuracy.csv") as f:
        points = list(csv.DictReader(f))
    assert [p["epoch"] for p in points if p["experiment"] == "small"] == ["1", "2"]
    assert printed == (tmp_path / "sweep.md").read_text() and "(pick)" in printed
    assert (tmp_path / "val_accuracy.svg").read_text().count("<polyline") == len(table)


def test_sweep_table_leaves_out_unfinished_experiments_and_a_baseline_an_experiment_repeats():
    from benchmarks.sweep_table import experiments

    def data(lr, accuracy):
        return {"params": {"params.yaml": {"data": {"train": {"learning_rate": lr}}}},
                "metrics": {"metrics/train.json": {"data": {"epochs": 1, "val_accuracy_per_epoch": [accuracy]}}}}

    def exp(name, rev, lr, state):
        return {"name": name, "executor": {"state": state} if state else None,
                "revs": [{"rev": rev, "data": data(lr, 0.5)}]}

    exp_show = [{"rev": "workspace", "data": data(1e-3, 0.1)},
                {"rev": "base", "name": "main", "data": data(1e-3, 0.6), "experiments": [
                    exp("same-as-main", "r1", 1e-3, "success"), exp("other", "r2", 3e-4, None),
                    exp("running", "workspace", 3e-3, "running"), exp("waiting", "r4", 3e-3, "queued")]},
                {"rev": "older", "name": "v1", "data": data(5e-4, 0.4), "experiments": None}]
    assert [name for name, _, _ in experiments(exp_show)] == ["same-as-main", "other", "v1"]


def test_sweep_chart_draws_each_experiment_at_its_accuracies():
    from xml.etree import ElementTree

    from benchmarks.sweep_table import svg_curves

    table = [{"experiment": "a", "params": {"train.learning_rate": 0.001}, "val_accuracy_per_epoch": [0.25, 0.5, 1.0],
              "pick": True},
             {"experiment": "b<c", "params": {"train.learning_rate": 0.003}, "val_accuracy_per_epoch": [0.0, 0.75],
              "pick": False}]
    svg = ElementTree.fromstring(svg_curves(table, width=500, height=260))  # well-formed, names escaped
    lines = svg.findall("{http://www.w3.org/2000/svg}polyline")
    points = [[tuple(map(float, p.split(","))) for p in line.get("points").split()] for line in lines]
    # plot area: x from 50 (epoch 1) to 500 - 330 (epoch 3), y from 20 (accuracy 1) to 260 - 40 (accuracy 0)
    assert points == [[(50, 170), (110, 120), (170, 20)], [(50, 220), (110, 70)]]
    assert [float(line.get("stroke-width")) for line in lines] == [3, 1.5]  # the pick stands out
    legend = [t.text for t in svg.findall("{http://www.w3.org/2000/svg}text") if t.text and "learning_rate" in t.text]
    assert legend == ["a learning_rate=0.001", "b<c learning_rate=0.003"]


@pytest.mark.slow
def test_experiment_travels_by_exp_push_and_pull(queued, tmp_path):
    remote = tmp_path / "remote.git"
    run(["git", "init", "-q", "--bare", str(remote)], tmp_path)
    run(["git", "remote", "add", "origin", str(remote)], queued)
    run(["git", "push", "-q", "origin", "HEAD:refs/heads/main"], queued)
    dvc(queued, "exp", "push", "origin", "small")  # the Git refs of the experiment, and its outputs to storage
    clone = tmp_path / "clone"
    run(["git", "clone", "-q", "-b", "main", str(remote), str(clone)], tmp_path)
    dvc(clone, "exp", "pull", "origin", "small")
    assert "small" in experiment_data(clone)
    dvc(clone, "exp", "apply", "small")
    assert lock_outs(clone) == lock_outs_of_rev(queued, experiment_data(queued)["small"][0])
    assert "up to date" in dvc(clone, "status").stdout  # every output is there, as the experiment left it


def lock_outs_of_rev(root, rev):
    lock = yaml.safe_load(run(["git", "show", f"{rev}:dvc.lock"], root).stdout)
    return {out["path"]: out["md5"] for stage in lock["stages"].values() for out in stage.get("outs", [])}


@pytest.mark.slow
def test_remote_storage_gives_a_clean_clone_everything(project, tmp_path):
    dvc(project, "push")
    clone = tmp_path / "clone"
    run(["git", "clone", "-q", str(project), str(clone)], tmp_path)
    dvc(clone, "pull")
    outs = lock_outs(clone)
    assert {"models/adapter", "checkpoints", "predictions/finetuned.jsonl", "data/train.jsonl"} <= set(outs)
    assert all((clone / path).exists() for path in outs)
    assert "up to date" in dvc(clone, "status").stdout
    assert stages_run(dvc(clone, "repro").stdout) == set()


# --- the same params and data, the same hashes ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def finetuned_twice(tmp_path_factory):
    """dvc.lock's output hashes after `finetune` from scratch, twice, in processes with different hash seeds
    (a set's order follows the seed), and the second run's checkpoints beside a copy of the first's."""
    root = make_project(tmp_path_factory.mktemp("hashes") / "project")
    run([sys.executable, "-m", "dvc", "repro", "finetune"], root, extra_env={"PYTHONHASHSEED": "1"})
    first = lock_outs(root)
    shutil.copytree(root / "checkpoints", root.parent / "first-checkpoints")
    shutil.rmtree(root / "checkpoints")  # persist: true keeps them, and the rerun would resume instead of training
    run([sys.executable, "-m", "dvc", "repro", "-f", "-s", "finetune"], root, extra_env={"PYTHONHASHSEED": "2"})
    return root, first, lock_outs(root)


@pytest.mark.slow
def test_finetune_twice_gives_the_same_adapter_hashes(finetuned_twice):
    root, first, second = finetuned_twice
    assert first["models/adapter"] == second["models/adapter"]
    for adapter in sorted((root / "checkpoints").glob("epoch-*")):
        for name in ("adapter_config.json", "adapter_model.safetensors", "README.md"):
            assert (adapter / name).read_bytes() == (root.parent / "first-checkpoints" / adapter.name / name).read_bytes()


@pytest.mark.slow
def test_finetune_twice_gives_the_same_checkpoints_but_for_their_run_record(finetuned_twice):
    """Every checkpoint file has the same bytes but record.json, which holds the run's measured times and resources
    (so that a later run resuming the finished training can report them): the hash of checkpoints/ differs."""
    root, first, second = finetuned_twice
    first_copy = root.parent / "first-checkpoints"
    for checkpoint in sorted((root / "checkpoints").glob("epoch-*")):
        names = {p.name for p in checkpoint.iterdir()}
        assert names == {p.name for p in (first_copy / checkpoint.name).iterdir()} and "record.json" in names
        for name in names - {"record.json"}:
            assert (checkpoint / name).read_bytes() == (first_copy / checkpoint.name / name).read_bytes(), name
    assert first["checkpoints"] != second["checkpoints"]
