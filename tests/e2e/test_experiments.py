"""Many experiments: the documented commands in a new shell, the DVC queue with parallel workers, the sweep table,
remote storage and `dvc exp push/pull`, and outputs that hash the same on every run (docs/experiments.md)."""
import contextlib
import csv
import hashlib
import json
import os
import re
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
from tiny import make_tiny_model, write_nli_dir

from qlora_nli.data.sources import resolve_source
from qlora_nli.model import adapters, embedded, loading
from qlora_nli.runtime.errors import DataError

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
    converted = embedded.cache_dir() / alias.split(":", 1)[1]
    make_tiny_model("llama", converted)  # stands in for the converted GGUF: resolve_model_path finds it, no export
    model = loading.load_base_model({"name": alias, "load_in_4bit": False, "compute_dtype": "auto"}, "cpu")
    model = adapters.attach_lora(model, {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": "all-linear",
                                         "layers": 1})
    adapters.save_adapter(model, tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert len(config["target_modules"]) == 7 and config["target_modules"] == sorted(config["target_modules"])
    assert config["base_model_name_or_path"] == alias
    assert str(tmp_path) not in (tmp_path / "adapter" / "README.md").read_text()
    reloaded = adapters.load_adapter(loading.load_base_model(
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


def make_venv_to_activate(root):
    """What `make setup` leaves for `. .venv/bin/activate`: this interpreter's environment (ignored by Git)."""
    (root / ".venv" / "bin").mkdir(parents=True)
    (root / ".venv" / "bin" / "activate").symlink_to(Path(sys.prefix) / "bin" / "activate")


# --- the README's Experiments section, as printed --------------------------------------------------------------------

README_SECTION = "## Experiments"
PER_SHELL = (". .venv/bin/activate", "export ")  # the section's once-per-shell lines: the prelude of every step
# Two experiments in place of the README's grid (tiny(): the test's documented substitution), chosen so that their
# validation accuracies cannot tie, whatever the tiny random model predicts: on the mirror's 9 validation pairs
# (labels 0, 1, 2 in turn) n_val 2 takes the pairs of labels 0 and 1, so its accuracy is 0, 1/2 or 1; n_val 9 takes all
# nine, so its accuracy is k/9, which is never 1/2, and 0 or 1 only for a model wrong (or right) on every pair, which
# no constant-answer model is. So the order of `dvc exp show`'s rows tells a descending sort from an ascending one.
TINY_GRID = "-S 'data.n_val=2,9'"
TINY_N_VAL = (2, 9)


def readme_commands():
    """The command lines of the README's Experiments section, in order, without their comments."""
    text = (REPO / "README.md").read_text()
    section = text[text.index(f"\n{README_SECTION}\n"):]
    section = section[:section.index("\n## ", len(README_SECTION) + 2)]
    blocks = re.findall(r"```bash\n(.*?)```", section, flags=re.S)
    lines = [re.sub(r"\s+#\s.*$", "", line).strip() for block in blocks for line in block.splitlines()]
    return [line for line in lines if line and not line.startswith("#")]


def tiny(command, substitutions):
    """A README command for the tiny project: the grid replaced by TINY_GRID, placeholders and real-model paths by
    the test's."""
    if command.startswith("dvc exp run --queue"):
        command = re.sub(r"(-S '[^']*'\s*)+", TINY_GRID + " ", command).strip()
    for printed, value in substitutions.items():
        command = command.replace(printed, value)
    return command


def clean(root):
    status = run(["git", "status", "--porcelain"], root).stdout
    assert status == "", f"{root}: the working tree is not clean:\n{status}"


def tree_hash(directory):
    files = sorted(p for p in Path(directory).rglob("*") if p.is_file())
    return hashlib.sha256(b"".join(p.relative_to(directory).as_posix().encode() + p.read_bytes()
                                   for p in files)).hexdigest()


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A committed tiny project whose data comes through a relative NLI_DATA_MIRROR, with a `.venv` to activate
    (its activate script puts this interpreter's environment first on PATH); no DVC remote, as in a fresh clone."""
    base = tmp_path_factory.mktemp("experiments")
    write_nli_dir(base / "mirror" / "tiny-nli")
    root = make_project(base / "project", overrides={"data.source": "made-up/tiny-nli", "compute.num_threads": 0})
    make_venv_to_activate(root)
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
    without = shell(project, "dvc exp run -S failure_cases.n_examples=3")
    assert without.returncode == 127 and "dvc: command not found" in without.stderr
    typed = shell(project, ". .venv/bin/activate\ndvc exp run -S failure_cases.n_examples=3")
    assert typed.returncode == 0, typed.stderr[-3000:]
    assert "failure_cases" in stages_run(typed.stdout)  # the stage that reads report.* ran, with the venv's python
    run(["git", "reset", "-q", "--hard"], project)  # back to the committed run for the tests below


class Readme:
    """The README's Experiments commands run one by one in the tiny project, each in a new shell that first runs the
    section's once-per-shell lines; `cwd` moves to the other clone at the README's `git clone ... && cd ...`."""

    def __init__(self, root):
        self.commands = readme_commands()
        self.prelude = [c for c in self.commands if c.startswith(PER_SHELL)]
        self.steps = [c for c in self.commands if not c.startswith(PER_SHELL)]
        self.substitutions = {"../shared/data": "../mirror",
                              "benchmarks/sweep_table.py": str(REPO / "benchmarks" / "sweep_table.py")}
        self.cwd = root
        self.done = 0
        self.names = []  # the queued experiments, once the queue ran

    def next(self, starts_with):
        """Run the next README step, which must start with `starts_with` (so a changed README fails here, by name)."""
        command = self.steps[self.done]
        assert command.startswith(starts_with), f"README step {self.done + 1} is {command!r}, not {starts_with}..."
        self.done += 1
        command = tiny(command, self.substitutions)
        clone = re.fullmatch(r"git clone (\S+) (\S+) && cd \2", command)
        if clone:  # `cd` does not outlive the step's shell: the following steps run in the clone
            run(["git", "clone", "-q", clone[1], clone[2]], self.cwd.parent)
            self.cwd = self.cwd.parent / clone[2]
            make_venv_to_activate(self.cwd)  # the README's `make setup` there
            return None
        typed = shell(self.cwd, "\n".join([*(tiny(c, self.substitutions) for c in self.prelude), command]),
                      extra_env={"GIT_AUTHOR_NAME": "test", "GIT_AUTHOR_EMAIL": "test@example.com",
                                 "GIT_COMMITTER_NAME": "test", "GIT_COMMITTER_EMAIL": "test@example.com"})
        assert typed.returncode == 0, f"{command}:\n{typed.stdout[-2000:]}\n{typed.stderr[-3000:]}"
        return typed


@pytest.fixture(scope="module")
def queued(project):
    """The README's queue commands as printed, with two experiments (TINY_GRID) in place of its grid,
    run by two parallel workers: the relative mirror is resolved in each temporary copy, and each worker
    chooses its own threads. The working tree stays clean throughout."""
    readme = Readme(project)
    readme.next("dvc exp run --queue")
    clean(project)
    readme.next("dvc queue start -j 2")
    readme.next("dvc queue status")  # "until every experiment shows Success": polled here
    readme.names = sorted(queue_statuses(project))
    statuses = wait_for_queue(project, readme.names)
    logs = {name: dvc(project, "queue", "logs", name, check=False).stdout[-3000:] for name in statuses}
    assert len(statuses) == 2 and set(statuses.values()) == {"Success"}, f"{statuses}\n{logs}"
    clean(project)
    return readme


def by_val_size(root):
    """{data.n_val: (name, rev, data)} of the queued experiments."""
    return {data["params"]["params.yaml"]["data"]["data"]["n_val"]: (name, rev, data)
            for name, (rev, data) in experiment_data(root).items()}


@pytest.mark.slow
def test_queue_runs_two_experiments_in_parallel(queued):
    found = by_val_size(queued.cwd)
    assert set(found) >= set(TINY_N_VAL)  # the README's grid, with the tiny values
    small, large = (found[n][2] for n in TINY_N_VAL)
    assert metric(small, "dvclive/metrics.json") != metric(large, "dvclive/metrics.json")  # validated differently
    for _, rev, data in (found[n] for n in TINY_N_VAL):
        assert "torch threads at start (auto: " in metric(data, "metrics/train.json")["device"]  # no prefix needed
        manifest = json.loads(run(["git", "show", f"{rev}:data/manifest.json"], queued.cwd).stdout)
        assert manifest["read_from"] == "mirror:$NLI_DATA_MIRROR/tiny-nli"
        assert "accuracy" in metric(data, "metrics/finetuned.json")


@pytest.mark.slow
def test_sweep_table_of_the_queued_experiments(queued, tmp_path):
    root = queued.cwd
    small, large = (by_val_size(root)[n][0] for n in TINY_N_VAL)
    printed = run([sys.executable, str(REPO / "benchmarks" / "sweep_table.py"), "--out", str(tmp_path)], root).stdout
    table = {row["experiment"]: row for row in json.loads((tmp_path / "sweep.json").read_text())}
    assert {small, large} <= set(table) and "data.n_val" in table[small]["params"]
    assert (table[small]["params"]["data.n_val"], table[large]["params"]["data.n_val"]) == TINY_N_VAL
    picks = [row for row in table.values() if row["pick"]]
    assert len(picks) == 1 and picks[0]["final_val_accuracy"] == max(r["final_val_accuracy"] for r in table.values())
    assert isinstance(picks[0]["test_accuracy"], float)
    assert all(row["test_accuracy"] == "not looked at" for row in table.values() if not row["pick"])
    assert all(len(row["val_accuracy_per_epoch"]) == 2 and row["train_seconds"] > 0 for row in table.values())
    with open(tmp_path / "val_accuracy.csv") as f:
        points = list(csv.DictReader(f))
    assert [p["epoch"] for p in points if p["experiment"] == small] == ["1", "2"]
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


def test_what_documented_commands_write_is_ignored_by_git(tmp_path):
    """README: `nli-export --out exported/` and `dvc plots diff` (dvc_plots/), before a `git add -A` of a promotion."""
    run(["git", "init", "-q"], tmp_path)
    shutil.copy(REPO / ".gitignore", tmp_path / ".gitignore")
    written = ["exported/model.safetensors", "dvc_plots/index.html"]
    for path in written:
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text("x")
    assert run(["git", "status", "--porcelain", "--untracked-files=all"], tmp_path).stdout == "?? .gitignore\n"


def test_sweep_table_writes_files_only_where_out_says(tmp_path):
    """The committed sweep's files (benchmarks/results/sweep/) are rewritten only when asked: by default the table is
    printed and nothing is written, not even relative to the directory the script runs in."""
    def trained(name, rev, accuracy):
        return {"name": name, "revs": [{"rev": rev, "data": {
            "params": {"params.yaml": {"data": {"train": {"learning_rate": accuracy / 1000}}}},
            "metrics": {"metrics/train.json": {"data": {"epochs": 1, "val_accuracy_per_epoch": [accuracy]}}}}}]}

    exp_show = [{"rev": "base", "name": "main", "data": {"params": {}, "metrics": {}},
                 "experiments": [trained("low", "r1", 0.25), trained("high", "r2", 0.5)]}]
    (tmp_path / "exp_show.json").write_text(json.dumps(exp_show))
    script = [sys.executable, str(REPO / "benchmarks" / "sweep_table.py"), "--input", "exp_show.json"]
    printed = subprocess.run(script, cwd=tmp_path, capture_output=True, text=True, check=True).stdout
    assert "| **high** (pick) | 0.0005 | 0.50 |" in printed and "| low | 0.00025 | 0.25 |" in printed
    assert [p.name for p in tmp_path.rglob("*")] == ["exp_show.json"]
    subprocess.run([*script, "--out", "out"], cwd=tmp_path, capture_output=True, text=True, check=True)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["sweep.json", "sweep.md", "val_accuracy.csv",
                                                                     "val_accuracy.svg"]
    assert (tmp_path / "out" / "sweep.md").read_text() == printed


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
def test_readme_experiments_and_sharing_commands_as_printed(queued, tmp_path):
    """After the queue (fixture `queued`): the README's comparison, sharing through a local-directory DVC remote and
    a bare Git remote to a second clone, and promotion, each command as printed. The remote is added after the
    experiments were made, the order that used to send no outputs."""
    first = queued.cwd
    branch = run(["git", "branch", "--show-current"], first).stdout.strip()
    run(["git", "init", "-q", "--bare", f"--initial-branch={branch}", str(tmp_path / "origin.git")], tmp_path)
    run(["git", "remote", "add", "origin", str(tmp_path / "origin.git")], first)  # the clone's origin, as usual
    run(["git", "push", "-q", "origin", branch], first)
    queued.substitutions.update({"s3://my-bucket/qlora-nli": str(tmp_path / "storage"),
                                 "<repo>": str(tmp_path / "origin.git")})
    accuracy = {name: metric(data, "dvclive/metrics.json")["epoch"]["val_accuracy"]
                for name, (_, data) in experiment_data(first).items() if name in queued.names}
    best_first = sorted(accuracy, key=accuracy.get, reverse=True)

    assert len(set(accuracy.values())) == len(accuracy) == 2, accuracy  # TINY_GRID: they cannot tie

    def rows_of(shown):
        return [name for line in shown.splitlines() for name in re.findall(r"\[([\w-]+)\]", line) if name in accuracy]

    show = queued.steps[queued.done]
    shown = queued.next("dvc exp show").stdout
    assert rows_of(shown) == best_first, f"{accuracy}\n{shown}"  # best first
    # the control: the same command sorting the other way lists the other experiment first
    assert " --sort-order desc" in show
    ascending = shell(first, "\n".join(tiny(c, queued.substitutions) for c in [
        *queued.prelude, show.replace(" --sort-order desc", " --sort-order asc")]))
    assert ascending.returncode == 0 and rows_of(ascending.stdout) == best_first[::-1], ascending.stdout
    clean(first)
    queued.substitutions.update({"<exp1>": best_first[0], "<exp2>": best_first[1], "<exp>": best_first[0]})
    queued.next("dvc plots diff")
    assert (first / "dvc_plots" / "index.html").is_file()
    clean(first)
    printed = queued.next("python benchmarks/sweep_table.py").stdout
    assert all(name in printed for name in best_first) and "(pick)" in printed, printed
    clean(first)  # nothing written into the repository

    queued.next("dvc remote add --local -d storage")
    clean(first)
    queued.next("dvc push")
    clean(first)
    pushed = queued.next("dvc exp push -r storage origin")
    assert "uploaded" in pushed.stdout, pushed.stdout  # the experiment's outputs went to the DVC remote
    clean(first)

    queued.next("git clone")
    second = queued.cwd
    assert second != first
    queued.next("dvc remote add --local -d storage")
    clean(second)
    queued.next("dvc exp pull -r storage origin")
    clean(second)
    applied = queued.next("dvc exp apply")
    assert "Data and pipelines are up to date." in applied.stdout, applied.stdout
    assert "storage" in dvc(second, "remote", "list").stdout  # the clone's remote survived the apply
    experiment_rev = experiment_data(first)[best_first[0]][0]
    assert lock_outs(second) == lock_outs_of_rev(first, experiment_rev)

    queued.cwd = first  # promotion, in the first clone
    queued.next("dvc exp apply")
    clean(first)  # committed
    assert queued.done == len(queued.steps)  # every README step ran
    assert tree_hash(second / "models" / "adapter") == tree_hash(first / "models" / "adapter")
    assert lock_outs(first)["models/adapter"] == lock_outs(second)["models/adapter"]


def lock_outs_of_rev(root, rev):
    lock = yaml.safe_load(run(["git", "show", f"{rev}:dvc.lock"], root).stdout)
    return {out["path"]: out["md5"] for stage in lock["stages"].values() for out in stage.get("outs", [])}


@pytest.mark.slow
def test_remote_storage_gives_a_clean_clone_everything(project, tmp_path):
    dvc(project, "remote", "add", "--local", "-f", "-d", "storage", str(tmp_path / "storage"))
    dvc(project, "push")
    clone = tmp_path / "clone"
    run(["git", "clone", "-q", str(project), str(clone)], tmp_path)
    dvc(clone, "remote", "add", "--local", "-d", "storage", str(tmp_path / "storage"))
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
