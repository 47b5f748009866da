"""The finetune stage on a tiny model: resume after a hard kill, parameter accounting, one-line errors."""
import importlib.util
import json
import signal
import subprocess
import sys
import time

import pytest
from pipeline import env, kill_after_epoch, make_project, run, set_param

from qlora_nli.runtime.errors import RunError

pytestmark = pytest.mark.slow  # every test here runs stages end to end (subprocesses, dvc, kills)

STAGE_ORDER = [["-m", "stages.prepare"], ["-m", "stages.finetune"]]  # as dvc.yaml runs them


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    root = make_project(tmp_path_factory.mktemp("full") / "project", overrides={"train.epochs": 3})
    for module in STAGE_ORDER:
        run(["python", *module], root)
    return root


def test_resume_after_kill_matches_uninterrupted_run(uninterrupted, tmp_path):
    root = make_project(tmp_path / "project", overrides={"train.epochs": 3})
    run(["python", "-m", "stages.prepare"], root)
    killed = run(["python", "-m", "stages.finetune"], root, check=False, extra_env=kill_after_epoch(root, 1))
    assert killed.returncode == -signal.SIGKILL
    assert sorted(p.name for p in (root / "checkpoints").iterdir()) == ["epoch-1"]
    assert not (root / "models/adapter").exists()

    resumed = run(["python", "-m", "stages.finetune"], root)
    assert "resuming after epoch 1" in resumed.stderr
    adapter = "models/adapter/adapter_model.safetensors"
    assert (root / adapter).read_bytes() == (uninterrupted / adapter).read_bytes()
    a, b = (json.loads((r / "metrics/train.json").read_text()) for r in (root, uninterrupted))
    for key in ["train_loss_per_epoch", "val_loss_per_epoch", "val_accuracy_per_epoch", "parameters"]:
        assert a[key] == b[key], key
    assert a["resumed_from_epoch"] == 1 and b["resumed_from_epoch"] is None
    steps = (root / "dvclive/plots/metrics/train/step_loss.tsv").read_text()
    assert steps == (uninterrupted / "dvclive/plots/metrics/train/step_loss.tsv").read_text()


def test_resume_with_lora_dropout_matches_uninterrupted_run(tmp_path):
    """With lora.dropout > 0 every step draws dropout masks from the torch RNG: the resumed run continues the saved
    RNG state, so its adapter has the uninterrupted run's bytes (without the restore the masks differ)."""
    overrides = {"train.epochs": 2, "lora.dropout": 0.1}
    full = make_project(tmp_path / "full", overrides=overrides)
    root = make_project(tmp_path / "killed", overrides=overrides)
    for project in (full, root):
        run(["python", "-m", "stages.prepare"], project)
    run(["python", "-m", "stages.finetune"], full)
    killed = run(["python", "-m", "stages.finetune"], root, check=False, extra_env=kill_after_epoch(root, 1))
    assert killed.returncode == -signal.SIGKILL
    resumed = run(["python", "-m", "stages.finetune"], root)
    assert "resuming after epoch 1" in resumed.stderr
    adapter = "models/adapter/adapter_model.safetensors"
    assert (root / adapter).read_bytes() == (full / adapter).read_bytes()


def test_changed_params_start_fresh(uninterrupted, tmp_path):
    root = make_project(tmp_path / "project", overrides={"train.epochs": 3})
    run(["python", "-m", "stages.prepare"], root)
    run(["python", "-m", "stages.finetune"], root, check=False, extra_env=kill_after_epoch(root, 1))
    set_param(root, "train.learning_rate", 0.002)
    result = run(["python", "-m", "stages.finetune"], root)
    assert "resuming" not in result.stderr and "starting fresh" in result.stderr
    assert json.loads((root / "metrics/train.json").read_text())["resumed_from_epoch"] is None


@pytest.mark.parametrize("module", ["qlora_nli/prompts.py", "qlora_nli/runtime/distributed.py"])
def test_changed_code_in_the_import_closure_starts_fresh(tmp_path, module):
    """A module the stage imports only indirectly, or that the old four-file fingerprint left out: a changed comment
    makes the next run train from epoch 1 instead of resuming epochs the old code trained."""
    root = make_project(tmp_path / "project", overrides={"train.epochs": 2})
    run(["python", "-m", "stages.prepare"], root)
    killed = run(["python", "-m", "stages.finetune"], root, check=False, extra_env=kill_after_epoch(root, 1))
    assert killed.returncode == -signal.SIGKILL
    assert sorted(p.name for p in (root / "checkpoints").iterdir()) == ["epoch-1"]
    assert (root / module).is_file()  # appending to a file that is not there would create one the stage never reads
    with open(root / module, "a") as f:
        f.write("# a comment changes the bytes, not what runs\n")
    result = run(["python", "-m", "stages.finetune"], root)
    assert "resuming" not in result.stderr and "starting fresh" in result.stderr
    train = json.loads((root / "metrics/train.json").read_text())
    assert train["resumed_from_epoch"] is None and train["epochs"] == 2
    assert all(s is not None for s in train["time"]["per_epoch_seconds"])  # both epochs trained by this run


def test_parameter_counts_are_dense_counts(uninterrupted):
    train = json.loads((uninterrupted / "metrics/train.json").read_text())
    p = train["parameters"]
    # 4-bit packing stores two weights per byte, so numel() of the quantized layers is half their real size
    assert p["numel_as_stored"] < p["total"]
    assert p["trainable_percent"] == pytest.approx(100 * p["trainable"] / p["total"], abs=1e-3)
    assert train["adapter_bytes"] > 0 and train["optimizer"] == "adamw" and train["compute_dtype"] == "float32"
    # the thread choice of compute.num_threads: 1 (tests/pipeline.py), recorded in the device line
    assert train["device"].endswith(", 1 torch threads (compute.num_threads; OpenMP default waiting (spin, then sleep))")


def test_unknown_target_module_is_one_line(tmp_path):
    root = make_project(tmp_path / "project", overrides={"lora.target_modules": ["no_such_proj"]})
    run(["python", "-m", "stages.prepare"], root)
    result = run(["python", "-m", "stages.finetune"], root, check=False)
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert "lora.target_modules" in last and "no_such_proj" in last and "Traceback" not in result.stderr


def test_kill_at_any_moment_leaves_only_complete_outputs(tmp_path):
    """SIGKILL at several points of a run: every checkpoint and output present is complete, nothing half-written
    (atomic writes), and the next run finishes from there."""
    root = make_project(tmp_path / "project", overrides={"train.epochs": 3})
    run(["python", "-m", "stages.prepare"], root)
    for delay in (0.5, 2.0, 4.0, 6.0):
        proc = subprocess.Popen([sys.executable, "-m", "stages.finetune"], cwd=root, env=env(root),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(delay)
        proc.kill()
        proc.wait()
        # a kill mid-write leaves at most a hidden temporary sibling, never a partial file under the real name
        for checkpoint in (root / "checkpoints").glob("epoch-*"):
            assert {"state.pt", "adapter_model.safetensors", "adapter_config.json"} <= {p.name for p in checkpoint.iterdir()}
        if (root / "metrics/train.json").exists():
            json.loads((root / "metrics/train.json").read_text())  # complete JSON, never truncated
    run(["python", "-m", "stages.finetune"], root)
    assert json.loads((root / "metrics/train.json").read_text())["epochs"] == 3
    # the next write of the same output removes what a killed write left behind
    assert not [p for d in ("checkpoints", "metrics", "models") for p in (root / d).glob(".*")]


def _load_stage(root):
    spec = importlib.util.spec_from_file_location("finetune_stage", root / "stages/finetune.py")
    stage = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(stage)
    return stage


@pytest.mark.parametrize("error, expected", [
    (lambda: __import__("torch").OutOfMemoryError("CUDA out of memory"), RunError),
    (KeyboardInterrupt, KeyboardInterrupt),
])
def test_oom_names_the_param_and_ctrl_c_keeps_the_last_checkpoint(tmp_path, monkeypatch, error, expected):
    root = make_project(tmp_path / "project", overrides={"train.epochs": 3})
    run(["python", "-m", "stages.prepare"], root)
    monkeypatch.chdir(root)
    stage = _load_stage(root)
    from qlora_nli.train import loop
    real_epoch, calls = loop.train_one_epoch, []

    def fails_in_epoch_2(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise error()
        return real_epoch(*args, **kwargs)

    monkeypatch.setattr(loop, "train_one_epoch", fails_in_epoch_2)
    with pytest.raises(expected) as e:
        stage.main()
    if expected is RunError:
        assert "train.micro_batch_tokens" in str(e.value) and "gradient_checkpointing" in str(e.value)
    assert sorted(p.name for p in (root / "checkpoints").iterdir()) == ["epoch-1"]
    assert {"state.pt", "adapter_model.safetensors"} <= {p.name for p in (root / "checkpoints/epoch-1").iterdir()}


def test_finetune_refuses_a_checkpoint_without_weights_in_one_line(tmp_path):
    root = make_project(tmp_path / "project")
    run(["python", "-m", "stages.prepare"], root)
    killed = run(["python", "-m", "stages.finetune"], root, check=False, extra_env=kill_after_epoch(root, 1))
    assert killed.returncode == -signal.SIGKILL
    (root / "checkpoints/epoch-1/adapter_model.safetensors").unlink()
    result = run(["python", "-m", "stages.finetune"], root, check=False)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("checkpoints/epoch-1: no adapter_model.safetensors") and "delete checkpoints/" in last
    assert not (root / "models/adapter").exists()
