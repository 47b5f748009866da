"""Adapter and checkpoint files that exist but cannot be read (truncated, empty, a damaged header, a config that is
not JSON): one line naming the file and the fix, before any base model loads, in every reader (evaluate finetuned,
report, nli-predict, nli-export, finetune's resume: tests/e2e/test_finetune.py)."""
import json
import shutil

import pytest
import torch
import yaml
from helpers.stages import exit_message, run_failure_cases
from pipeline import REPO
from tiny import TINY_SAFETENSORS, make_adapter, make_tiny_model

from qlora_nli import cli
from qlora_nli.model.adapters import check_adapter_dir
from qlora_nli.runtime.errors import ArtifactError, CheckpointError
from qlora_nli.train.checkpoints import Checkpoints

WEIGHTS = "adapter_model.safetensors"


def one_line(error_type, call):
    with pytest.raises(error_type) as e:
        call()
    message = str(e.value)
    assert message and "\n" not in message and message == message.strip()
    return message


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    """A real adapter of a tiny model (as finetune saves it), copied fresh into each test that breaks it."""
    root = tmp_path_factory.mktemp("adapter")
    model_dir = make_tiny_model("llama", root / "model")
    return make_adapter(model_dir, root / "adapter"), model_dir


def halve(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def drop_last_byte(path):
    path.write_bytes(path.read_bytes()[:-1])


def empty(path):
    path.write_bytes(b"")


def damaged_header(path):  # the length prefix intact, the JSON header's first bytes overwritten
    data = bytearray(path.read_bytes())
    data[8:16] = b"{garbage"
    path.write_bytes(bytes(data))


BREAKS = {  # how a weights file is broken, and what the line then says
    "truncated to half": (halve, "truncated or damaged"),
    "one byte short": (drop_last_byte, "truncated or damaged"),
    "empty": (empty, "truncated or damaged"),
    "damaged header": (damaged_header, "truncated or damaged"),
}


@pytest.mark.parametrize("option", [None, "--adapter"])
@pytest.mark.parametrize("case", BREAKS)
def test_unreadable_adapter_weights_are_one_line(adapter, tmp_path, case, option):
    directory = shutil.copytree(adapter[0], tmp_path / "adapter")
    assert check_adapter_dir(directory, option) == directory  # the unbroken copy passes
    breaks, expected = BREAKS[case]
    breaks(directory / WEIGHTS)
    message = one_line(ArtifactError, lambda: check_adapter_dir(directory, option))
    assert message.startswith(f"{directory / WEIGHTS}: cannot be read") and expected in message
    assert "`dvc repro finetune`" in message and "`dvc checkout models/adapter`" in message


@pytest.mark.parametrize("config, expected", [
    ('{"peft_type": "LO', "adapter_config.json line 1: not valid JSON"),
    ("[1, 2]", "adapter_config.json: not a peft adapter config"),
    ('{"r": 4}', "adapter_config.json: not a peft adapter config"),
    (b"\xff\xfe{}", "adapter_config.json: cannot be read as JSON (UnicodeDecodeError)"),
])
def test_unreadable_adapter_config_is_one_line(adapter, tmp_path, config, expected):
    directory = shutil.copytree(adapter[0], tmp_path / "adapter")
    path = directory / "adapter_config.json"
    path.write_bytes(config if isinstance(config, bytes) else config.encode())
    message = one_line(ArtifactError, lambda: check_adapter_dir(directory))
    assert message.startswith(str(directory)) and expected in message and "`dvc repro finetune`" in message


def test_adapter_bin_weights_are_read_as_tensors_only(adapter, tmp_path):
    directory = shutil.copytree(adapter[0], tmp_path / "adapter")
    (directory / WEIGHTS).unlink()
    torch.save({"w": torch.zeros(2)}, directory / "adapter_model.bin")
    check_adapter_dir(directory)
    torch.save({"w": torch.zeros(2), "code": print}, directory / "adapter_model.bin")  # a weights-only load refuses
    assert "adapter_model.bin: cannot be read" in one_line(ArtifactError, lambda: check_adapter_dir(directory))


# --- the readers ----------------------------------------------------------------------------------------------------

def test_evaluate_refuses_a_truncated_adapter_in_one_line(stage_dir):
    halve(stage_dir / "models/adapter" / WEIGHTS)
    message = exit_message("evaluate", "finetuned")
    assert message.startswith("models/adapter/adapter_model.safetensors: cannot be read"), message


def test_report_refuses_a_truncated_adapter_in_one_line(workdir, monkeypatch):
    """The model card names the adapter's hash: not of weights that cannot be loaded."""
    monkeypatch.chdir(workdir)
    run_failure_cases()
    halve(workdir / "models/adapter" / WEIGHTS)
    message = exit_message("report")
    assert message.startswith("models/adapter/adapter_model.safetensors: cannot be read"), message
    assert not (workdir / "reports/report.md").exists()


@pytest.fixture
def cli_dir(adapter, tmp_path, monkeypatch):
    """params.yaml naming the tiny model, and a truncated copy of its adapter."""
    directory = shutil.copytree(adapter[0], tmp_path / "adapter")
    halve(directory / WEIGHTS)
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["model"]["name"] = str(adapter[1])
    params["compute"]["device"] = "cpu"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.parametrize("command", [
    lambda: cli.predict(["--adapter", "adapter", "--premise", "A man runs.", "--hypothesis", "A man moves."]),
    lambda: cli.export(["--adapter", "adapter", "--out", "merged", "--no-card"]),
], ids=["nli-predict", "nli-export"])
def test_commands_refuse_a_truncated_adapter_in_one_line(cli_dir, command, capsys):
    with pytest.raises(SystemExit) as e:
        command()
    assert isinstance(e.value.code, str) and "\n" not in e.value.code  # run_stage's one line, exit status 1
    assert e.value.code.startswith("adapter/adapter_model.safetensors: cannot be read")
    assert not (cli_dir / "merged").exists()


# --- checkpoints ----------------------------------------------------------------------------------------------------

def write_checkpoint(root, epoch, weights=TINY_SAFETENSORS):
    directory = root / f"epoch-{epoch}"
    directory.mkdir(parents=True)
    (directory / "run.json").write_text(json.dumps({"fingerprint": "run-a", "epoch": epoch}))
    torch.save({"fingerprint": "run-a", "epoch": epoch}, directory / "state.pt")
    if weights is not None:
        (directory / WEIGHTS).write_bytes(weights)
    return directory


@pytest.mark.parametrize("weights, expected", [
    (None, f"no {WEIGHTS}, the checkpoint is incomplete"),
    (TINY_SAFETENSORS[:-2], f"{WEIGHTS}: cannot be read"),
    (b"", f"{WEIGHTS}: cannot be read"),
])
def test_incomplete_checkpoint_is_refused_in_one_line(tmp_path, weights, expected):
    root = tmp_path / "checkpoints"
    write_checkpoint(root, 1)
    newest = write_checkpoint(root, 2, weights)
    message = one_line(CheckpointError, lambda: Checkpoints(root, "run-a").latest())
    assert message.startswith(str(newest)) and expected in message
    # the fix: the one before it, or a fresh start; nothing deleted (the user decides)
    assert f"delete {newest} to resume from epoch-1" in message and f"delete {root}/ to start fresh" in message
    assert sorted(p.name for p in root.iterdir()) == ["epoch-1", "epoch-2"]


def test_complete_checkpoint_is_found(tmp_path):
    root = tmp_path / "checkpoints"
    directory = write_checkpoint(root, 1)
    assert Checkpoints(root, "run-a").latest()[:2] == (1, directory)
