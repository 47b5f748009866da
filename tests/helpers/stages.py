"""A stage's `main` run in this process, as `python -m stages.<name>` runs it (errors.run_stage), on inputs made up
in a directory: valid params, data and adapter (`make_stage_dir`), or a small data source for prepare
(`prepare_project`)."""
import json
import runpy
from pathlib import Path

import pytest
import yaml
from tiny import TINY_SAFETENSORS, made_up_pairs

from helpers.artifacts import write
from helpers.nli_files import write_hf_dir
from qlora_nli.runtime import errors

REPO = Path(__file__).resolve().parents[2]
MISSING_MODEL = "/nonexistent/qlora-nli-test-model"  # a stage that gets past its input checks stops here, at once


def stage_module(stage):
    """The globals of stages/<stage>.py, loaded as the module `stages.<stage>` (not as __main__: nothing runs)."""
    return runpy.run_module(f"stages.{stage}")


def exit_message(stage, *args):
    """Run a stage's main the way its module does (errors.run_stage); the message it exits with, checked to be one
    line with exit status 1 (SystemExit with a string)."""
    main = stage_module(stage)["main"]
    with pytest.raises(SystemExit) as e:
        errors.run_stage(main, *args)
    message = e.value.code
    assert isinstance(message, str), f"exit code {message!r}, expected a message (status 1)"
    assert message and "\n" not in message and message.strip() == message
    return message


def data_rows(n, seed):
    return [{"id": i, **row} for i, row in enumerate(made_up_pairs(n, seed))]


def make_stage_dir(root):
    """Valid params (the model path leads nowhere) and valid data/ and models/adapter in `root`, as the stages find
    them; returned."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["model"]["name"] = MISSING_MODEL
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    for split, n in (("train", 12), ("validation", 6), ("test", 6)):
        write(root / f"data/{split}.jsonl", data_rows(n, seed=n))
    adapter = root / "models/adapter"
    adapter.mkdir(parents=True)
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4}))
    (adapter / "adapter_model.safetensors").write_bytes(TINY_SAFETENSORS)
    return root


def run_failure_cases():
    """failure_cases in the working directory (on valid predictions: its outputs are report's inputs)."""
    stage_module("failure_cases")["main"]()


def prepare_project(tmp_path, **data_params):
    """A project directory in `tmp_path` whose params.yaml names a small made-up data source (40 pairs, one
    unlabeled); `data_params` override params.yaml's data group."""
    many = [{"premise": f"Made-up scene {i}.", "hypothesis": f"Claim {i}.", "label": i % 3} for i in range(40)]
    many[7]["label"] = -1
    write_hf_dir(tmp_path / "nli", "jsonl", many)
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["data"].update({"source": str(tmp_path / "nli"), "n_train": 10, "n_val": 4, "n_test": "all",
                           "extra_sets": {}, **data_params})
    project = tmp_path / "project"
    project.mkdir()
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    return project


def run_prepare(project, monkeypatch):
    """prepare in `project`; {path under data/: bytes} of what it wrote."""
    monkeypatch.chdir(project)
    stage_module("prepare")["main"]()
    return {str(p.relative_to(project / "data")): p.read_bytes() for p in sorted((project / "data").rglob("*"))
            if p.is_file()}
