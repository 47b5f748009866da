"""A throwaway copy of the project wired to a tiny model and made-up data, for end-to-end tests."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml
from tiny import make_tiny_model, write_nli_dir

REPO = Path(__file__).resolve().parents[1]

FAULTS = Path(__file__).resolve().parent / "faults"  # its sitecustomize.py puts a fault in every process


def make_project(root, arch="phi", overrides=None):
    """Copy the pipeline into `root` (a git + DVC repo), with params for a tiny model and tiny data;
    `overrides` maps "group.key" to a value."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    for name in ["stages", "qlora_nli"]:
        shutil.copytree(REPO / name, root / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ["dvc.yaml", "params.yaml", ".gitignore"]:
        shutil.copy(REPO / name, root / name)
    model_dir = make_tiny_model(arch, root.parent / f"{root.name}-model")
    data_dir = write_nli_dir(root.parent / f"{root.name}-nli")
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["data"].update(source=str(data_dir), n_train=24, n_val=6, n_test=9, extra_sets={})
    params["model"]["name"] = str(model_dir)
    params["train"].update(epochs=2, batch_size=8, micro_batch_tokens=256)
    params["compute"]["num_threads"] = 1
    params["evaluate"]["batch_size"] = 4
    params["lora"]["layers"] = 1  # the tiny models have 2 blocks; adapting the last one mirrors the default
    for key, value in (overrides or {}).items():
        group, name = key.split(".")
        params[group][name] = value
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run(["git", "init", "-q"], root)
    run([sys.executable, "-m", "dvc", "init", "-q"], root)
    run(["git", "add", "-A"], root)  # dvclive needs a commit to exist
    run(["git", "-c", "user.name=test", "-c", "user.email=test@example.com", "commit", "-qm", "init"], root)
    return root


def env(root):
    # the copied package, not the installed one, so the test exercises what it copied
    # this interpreter's bin first: dvc.yaml runs `python -m stages...`, which must be the python running the tests
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    return {**os.environ, "PATH": path, "PYTHONPATH": str(root), "TOKENIZERS_PARALLELISM": "false",
            "DVC_NO_ANALYTICS": "1"}  # no background process trying to reach the network after each dvc call


def fault_env(root, fault):
    """The environment (for `run`'s extra_env) that gives every Python process of a command, the ranks of a torchrun
    stage too, the fault `fault` of tests/fault_runner.py (through tests/faults/sitecustomize.py)."""
    return {"NLI_FAULT": json.dumps(fault), "PYTHONPATH": f"{FAULTS}{os.pathsep}{root}"}


def kill_after_epoch(root, epoch):
    """`fault_env` for a finetune killed (SIGKILL) just after checkpoints/epoch-`epoch` is complete and in place."""
    return fault_env(root, {"at": "renamed", "path": f"checkpoints/epoch-{epoch}"})


def run(cmd, root, check=True, extra_env=None):
    result = subprocess.run(cmd, cwd=root, env={**env(root), **(extra_env or {})}, capture_output=True, text=True)
    if check and result.returncode != 0:
        raise AssertionError(f"{cmd} failed ({result.returncode}):\n{result.stdout}\n{result.stderr[-4000:]}")
    return result


def dvc(root, *args, check=True):
    return run([sys.executable, "-m", "dvc", *args], root, check=check)


def stages_run(output):
    """Names of the stages that `dvc repro` actually ran."""
    return {line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage")}


def set_param(root, key, value):
    path = Path(root) / "params.yaml"
    params = yaml.safe_load(path.read_text())
    group, name = key.split(".")
    params[group][name] = value
    path.write_text(yaml.safe_dump(params, sort_keys=False))
