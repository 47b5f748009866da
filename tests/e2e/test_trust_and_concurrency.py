"""Trust boundaries (nothing read back runs code) and concurrent runs (shared cache, temporaries, two projects)."""
import errno
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from pipeline import REPO, env, kill_after_epoch, make_project, run

import qlora_nli.runtime.io
from qlora_nli.model import loading
from qlora_nli.runtime.errors import CheckpointError, ModelLoadError, OutputError
from qlora_nli.runtime.files import write_text
from qlora_nli.runtime.io import atomic_path
from qlora_nli.train.checkpoints import (
    Checkpoints,
    _numpy_rng_from_plain,
    _numpy_rng_to_plain,
)

ALIAS = "embedded:smollm2-135m-instruct"


def one_line(error):
    message = str(error)
    assert message and "\n" not in message and message == message.strip()
    return message


def child_env():
    return {**os.environ, "PYTHONPATH": str(REPO)}


class CreatesFile:
    """Unpickling this calls open(marker, "w"): the side effect of code run by a crafted checkpoint."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def write_checkpoint(root, fingerprint, state):
    directory = root / "epoch-1"
    directory.mkdir(parents=True)
    (directory / "run.json").write_text(json.dumps({"fingerprint": fingerprint, "epoch": 1}))
    torch.save(state, directory / "state.pt")
    return directory / "state.pt"


def test_the_crafted_payload_runs_when_unpickled_unsafely(tmp_path):
    """The control for the test below: the same payload does create its marker under a plain unpickling."""
    marker = tmp_path / "ran"
    state_file = write_checkpoint(tmp_path / "checkpoints", "run-a", {"fingerprint": "run-a",
                                                                       "x": CreatesFile(marker)})
    torch.load(state_file, weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize("kind", ["crafted", "older format", "truncated", "empty"])
def test_unsafe_or_broken_state_pt_is_refused_and_runs_nothing(tmp_path, kind):
    marker = tmp_path / "ran"
    root = tmp_path / "checkpoints"
    if kind == "crafted":
        state = {"fingerprint": "run-a", "epoch": 1, "x": CreatesFile(marker)}
    else:  # before run.json: NumPy's RNG state stored as NumPy objects, which a weights-only load refuses
        state = {"fingerprint": "run-a", "epoch": 1, "rng": {"numpy": np.random.get_state()}}
    state_file = write_checkpoint(root, "run-a", state)
    if kind == "truncated":
        state_file.write_bytes(state_file.read_bytes()[:200])
    elif kind == "empty":
        state_file.write_bytes(b"")
    with pytest.raises(CheckpointError) as e:
        Checkpoints(root, "run-a").latest()
    message = one_line(e.value)
    assert str(state_file) in message and f"delete {root}/ to start fresh" in message
    assert not marker.exists()
    assert state_file.exists()  # refused, not silently deleted: the user decides


def test_checkpoint_of_another_run_is_dropped_without_being_unpickled(tmp_path):
    marker = tmp_path / "ran"
    root = tmp_path / "checkpoints"
    write_checkpoint(root, "run-b", {"fingerprint": "run-b", "x": CreatesFile(marker)})
    assert Checkpoints(root, "run-a").latest() is None
    assert not root.exists() and not marker.exists()


def test_numpy_rng_state_survives_a_weights_only_round_trip(tmp_path):
    np.random.seed(7)
    np.random.standard_normal()  # leaves a cached Gaussian in the state
    torch.save({"numpy": _numpy_rng_to_plain(np.random.get_state())}, tmp_path / "state.pt")
    expected = np.random.standard_normal(5)
    np.random.seed(0)
    np.random.set_state(_numpy_rng_from_plain(torch.load(tmp_path / "state.pt", weights_only=True)["numpy"]))
    assert np.array_equal(np.random.standard_normal(5), expected)


@pytest.mark.slow
def test_finetune_refuses_a_crafted_checkpoint_in_one_line(tmp_path):
    root = make_project(tmp_path / "project")
    run(["python", "-m", "stages.prepare"], root)
    killed = run(["python", "-m", "stages.finetune"], root, check=False, extra_env=kill_after_epoch(root, 1))
    assert killed.returncode == -signal.SIGKILL
    marker = tmp_path / "ran"
    state_file = root / "checkpoints/epoch-1/state.pt"
    torch.save({"x": CreatesFile(marker)}, state_file)  # run.json stays valid: the attacker can forge it
    result = run(["python", "-m", "stages.finetune"], root, check=False)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert "checkpoints/epoch-1/state.pt" in last and "delete checkpoints/ to start fresh" in last
    assert not marker.exists() and not (root / "models/adapter").exists()


# --- model loading: remote code only when asked -------------------------------------------------------------


def test_trust_remote_code_reaches_from_pretrained(tiny_model_dir, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    calls = []

    def record(name, **kwargs):
        calls.append(kwargs)
        raise OSError("recorded")

    for auto_class in (AutoTokenizer, AutoModelForCausalLM):
        monkeypatch.setattr(auto_class, "from_pretrained", record)
    name = str(tiny_model_dir)  # a real model directory: any check before from_pretrained passes
    base = {"name": name, "load_in_4bit": False, "compute_dtype": "auto"}
    for load in (lambda: loading.load_tokenizer(name),
                 lambda: loading.load_tokenizer(name, False),
                 lambda: loading.load_base_model(base, "cpu"),
                 lambda: loading.load_base_model({**base, "trust_remote_code": False}, "cpu"),
                 lambda: loading.load_tokenizer(name, True),
                 lambda: loading.load_base_model({**base, "trust_remote_code": True}, "cpu")):
        with pytest.raises(ModelLoadError):
            load()
    assert [c["trust_remote_code"] for c in calls] == [False, False, False, False, True, True]
    assert calls[2]["weights_only"] is True  # a pickled .bin fallback is read without running code


def test_model_shipping_code_is_refused_and_its_code_never_runs(tiny_model_dir, tmp_path):
    """A model directory whose config points at its own Python file: with trust_remote_code false that file is not
    imported (its import would create the marker) and loading stops with one line."""
    import shutil

    model_dir = tmp_path / "model-with-code"
    shutil.copytree(tiny_model_dir, model_dir)
    marker = tmp_path / "ran"
    (model_dir / "custom_model.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    config = json.loads((model_dir / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "custom_model.Config", "AutoModelForCausalLM": "custom_model.Model"}
    del config["model_type"]  # as for a model whose architecture transformers does not ship
    (model_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError) as e:
        loading.load_base_model({"name": str(model_dir), "load_in_4bit": False, "compute_dtype": "auto",
                                  "trust_remote_code": False}, "cpu")
    assert str(model_dir) in one_line(e.value)
    assert not marker.exists()


# --- the shared model cache: converted once, by one process, never seen half-written -------------------------

FILES = {"config.json": "{}\n", "weights.bin": "w" * 4096, "tokenizer.json": "t" * 1024, "SOURCE.json": "s\n"}

CONVERTER = """
import os, sys, time
from pathlib import Path
from qlora_nli.model import embedded

go, log, files = Path(sys.argv[1]), Path(sys.argv[2]), {files!r}

def slow_conversion(alias, out_dir):
    with open(log, "a") as f:
        f.write(f"{{os.getpid()}}\\n")
    out_dir.mkdir()
    for name, text in files.items():  # config.json first: a reader checking it alone would accept a partial copy
        (out_dir / name).write_text(text[: len(text) // 2])
        time.sleep(0.05)
        (out_dir / name).write_text(text)

embedded.export_embedded_model = slow_conversion
while not go.exists():
    time.sleep(0.005)
path = Path(embedded.resolve_model_path({alias!r}))
assert {{p.name: p.read_text() for p in path.iterdir()}} == files, "incomplete directory returned"
print(path)
"""

WATCHER = """
import sys, time
from pathlib import Path

target, stop, files = Path(sys.argv[1]), Path(sys.argv[2]), {files!r}
seen = bad = 0
while not stop.exists():
    if target.exists():
        try:
            found = {{p.name: p.read_text() for p in target.iterdir()}}
        except FileNotFoundError:
            found = None
        seen += 1
        bad += found != files
print(seen, bad)
"""


def test_four_processes_convert_into_an_empty_cache_once(tmp_path):
    cache = tmp_path / "cache"
    go, log, stop = tmp_path / "go", tmp_path / "conversions.log", tmp_path / "stop"
    target = cache / "qlora-nli/models/smollm2-135m-instruct"
    environment = {**child_env(), "XDG_CACHE_HOME": str(cache)}
    watcher = subprocess.Popen([sys.executable, "-c", WATCHER.format(files=FILES), str(target), str(stop)],
                               env=environment, stdout=subprocess.PIPE, text=True)
    converters = [subprocess.Popen([sys.executable, "-c", CONVERTER.format(files=FILES, alias=ALIAS), str(go),
                                    str(log)], env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   text=True) for _ in range(4)]
    time.sleep(3)  # all four import and wait at the start line
    go.touch()
    results = [p.communicate(timeout=120) for p in converters]
    time.sleep(0.5)  # let the watcher look at the finished directory too
    stop.touch()
    seen, bad = map(int, watcher.communicate(timeout=60)[0].split())
    assert [p.returncode for p in converters] == [0] * 4, [r[1][-2000:] for r in results]
    assert {out.strip() for out, _ in results} == {str(target)}
    assert len(log.read_text().split()) == 1  # converted by one process; the others waited and reused it
    assert sorted(p.name for p in target.parent.iterdir()) == [".smollm2-135m-instruct.lock", target.name]
    assert seen > 0 and bad == 0  # looked while it appeared, and never saw a partial directory


# --- atomic_path: other processes' temporaries, write failures, wrong kind ------------------------------------

HOLDER = """
import sys, time
from pathlib import Path
from qlora_nli.runtime.io import atomic_path

dest, ready, release = map(Path, sys.argv[1:4])
with atomic_path(dest) as tmp:
    tmp.write_text("from the holder")
    ready.touch()
    while not release.exists():
        time.sleep(0.01)
"""


def temporaries(dest):
    return sorted(p for p in dest.parent.iterdir() if p.name.startswith(f".{dest.name}."))


def start_holder(tmp_path, dest, name):
    ready, release = tmp_path / f"{name}.ready", tmp_path / f"{name}.release"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(dest), str(ready), str(release)], env=child_env())
    deadline = time.time() + 120
    while not ready.exists():
        assert holder.poll() is None and time.time() < deadline
        time.sleep(0.02)
    return holder, release


def test_a_live_writers_temporary_is_kept_and_a_dead_ones_removed(tmp_path):
    dest = tmp_path / "out" / "result.txt"
    live, release = start_holder(tmp_path, dest, "live")
    (held,) = temporaries(dest)
    write_text(dest, "second writer")
    assert held.exists() and dest.read_text() == "second writer"
    release.touch()
    assert live.wait(timeout=60) == 0
    assert dest.read_text() == "from the holder" and temporaries(dest) == []

    dead, _ = start_holder(tmp_path, dest, "dead")
    dead.kill()
    dead.wait()
    (left,) = temporaries(dest)
    # names that prove nothing: another host (a shared file system), and a name without pid and host
    foreign = dest.parent / f".{dest.name}.tmp-{dead.pid}@other-host-abcd1234"
    legacy = dest.parent / f".{dest.name}.k2j4h5g6"
    foreign.mkdir()
    legacy.mkdir()
    write_text(dest, "third writer")
    assert not left.exists() and dest.read_text() == "third writer"
    assert temporaries(dest) == sorted([foreign, legacy])


def test_directory_replace_that_fails_puts_the_old_directory_back(tmp_path, monkeypatch):
    dest = tmp_path / "adapter"
    dest.mkdir()
    (dest / "weights").write_text("old")
    with atomic_path(dest) as tmp:
        tmp.mkdir()
        (tmp / "weights").write_text("new")
    assert (dest / "weights").read_text() == "new" and temporaries(dest) == []

    def full_disk(src, dst):
        raise OSError(errno.ENOSPC, "No space left on device", str(dst))

    monkeypatch.setattr(qlora_nli.runtime.io, "exchange_paths", lambda a, b: False)  # the two-rename fallback
    monkeypatch.setattr(os, "replace", full_disk)
    with pytest.raises(OutputError) as e:
        with atomic_path(dest) as tmp:
            tmp.mkdir()
            (tmp / "weights").write_text("newer")
    assert str(dest) in one_line(e.value) and "No space left" in str(e.value)
    assert (dest / "weights").read_text() == "new" and temporaries(dest) == []


def test_directory_replace_swaps_in_one_step_where_the_system_can(tmp_path, monkeypatch):
    """With renameat2's exchange the old directory is never moved away from its path: no rename of it happens."""
    dest = tmp_path / "adapter"
    dest.mkdir()
    (dest / "weights").write_text("old")
    real_rename = os.rename

    def no_move_away(src, dst):
        assert os.fspath(src) != os.fspath(dest), "the old directory was moved away: the path was missing"
        return real_rename(src, dst)

    monkeypatch.setattr(os, "rename", no_move_away)
    with atomic_path(dest) as tmp:
        tmp.mkdir()
        (tmp / "weights").write_text("new")
    assert (dest / "weights").read_text() == "new" and temporaries(dest) == []


def test_a_write_beyond_the_file_size_limit_is_one_line_and_changes_nothing(tmp_path):
    """A real failing write (the kernel refuses past RLIMIT_FSIZE, like a full disk): one line, old file kept."""
    dest = tmp_path / "metrics" / "train.json"
    dest.parent.mkdir()
    dest.write_text("old\n")
    script = ("import resource, signal, sys\n"
              "from qlora_nli.runtime.errors import run_stage\n"
              "from qlora_nli.runtime.files import write_text\n"
              "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
              "resource.setrlimit(resource.RLIMIT_FSIZE, (1000, resource.RLIM_INFINITY))\n"
              "run_stage(write_text, sys.argv[1], 'x' * 100000)\n")
    result = subprocess.run([sys.executable, "-c", script, str(dest)], env=child_env(), capture_output=True, text=True)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    message = one_line(result.stderr.rstrip("\n"))
    assert message.startswith(f"{dest}: cannot write it (File too large); nothing was changed there; free disk space")
    assert dest.read_text() == "old\n" and temporaries(dest) == []


@pytest.mark.parametrize("error, fix", [
    (PermissionError(errno.EACCES, "Permission denied"), "writable by this user"),
    (OSError(errno.ENOSPC, "No space left on device"), "free disk space"),
])
def test_write_errors_name_the_path_cause_and_fix(tmp_path, error, fix):
    dest = tmp_path / "predictions.jsonl"
    with pytest.raises(OutputError) as e:
        with atomic_path(dest):
            raise error
    message = one_line(e.value)
    assert message.startswith(f"{dest}: cannot write it ({error.strerror}") and fix in message
    assert not dest.exists() and temporaries(dest) == []


def test_an_output_under_a_file_is_one_line(tmp_path):
    (tmp_path / "metrics").write_text("a file where a folder should be")
    with pytest.raises(OutputError) as e:
        write_text(tmp_path / "metrics" / "train.json", "{}")
    assert str(tmp_path / "metrics" / "train.json") in one_line(e.value)
    assert (tmp_path / "metrics").read_text() == "a file where a folder should be"


def test_destination_of_the_other_kind_is_refused_and_untouched(tmp_path):
    as_dir = tmp_path / "report.md"
    as_dir.mkdir()
    (as_dir / "notes.txt").write_text("unrelated")
    with pytest.raises(OutputError) as e:
        write_text(as_dir, "# report\n")
    assert one_line(e.value).startswith(f"{as_dir}: exists as a directory, but this output is a file")
    assert (as_dir / "notes.txt").read_text() == "unrelated" and temporaries(as_dir) == []

    as_file = tmp_path / "adapter"
    as_file.write_text("unrelated")
    with pytest.raises(OutputError) as e:
        with atomic_path(as_file) as tmp:
            tmp.mkdir()
            (tmp / "adapter_config.json").write_text("{}")
    assert one_line(e.value).startswith(f"{as_file}: exists as a file, but this output is a directory")
    assert as_file.read_text() == "unrelated" and temporaries(as_file) == []


# --- two experiments on one machine -------------------------------------------------------------------------


def snapshot(root, skip):
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")
            if p.is_file() and not any(p.is_relative_to(s) for s in skip)}


@pytest.mark.slow
def test_two_finetune_runs_of_different_projects_do_not_touch_each_others_files(tmp_path):
    a = make_project(tmp_path / "a", overrides={"train.epochs": 2})
    b = make_project(tmp_path / "b", overrides={"train.epochs": 1, "train.learning_rate": 0.002})
    for root in (a, b):
        run(["python", "-m", "stages.prepare"], root)
    shared_tmp = tmp_path / "shared-tmp"
    shared_tmp.mkdir()
    before = snapshot(tmp_path, skip=[a, b])
    runs = [subprocess.Popen([sys.executable, "-m", "stages.finetune"], cwd=root, env={**env(root), "TMPDIR": str(shared_tmp)},
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for root in (a, b)]
    errors = [p.communicate(timeout=600)[1] for p in runs]
    assert [p.returncode for p in runs] == [0, 0], [e[-2000:] for e in errors]
    assert snapshot(tmp_path, skip=[a, b]) == before  # nothing written outside the two projects
    assert list(shared_tmp.iterdir()) == []
    for root, epochs in ((a, 2), (b, 1)):
        assert json.loads((root / "metrics/train.json").read_text())["epochs"] == epochs
        assert sorted(p.name for p in (root / "checkpoints").iterdir()) == [f"epoch-{e}" for e in range(1, epochs + 1)]
    fingerprints = {json.loads((r / "checkpoints/epoch-1/run.json").read_text())["fingerprint"] for r in (a, b)}
    assert len(fingerprints) == 2
