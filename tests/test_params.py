import math
from pathlib import Path

import pytest
import torch
import yaml

from qlora_nli.errors import ParamsError
from qlora_nli.params import SCHEMA, check_split_size, check_target_modules, load_params

COMMITTED = Path(__file__).resolve().parents[1] / "params.yaml"


def committed():
    return yaml.safe_load(COMMITTED.read_text())


def one_line_error(call):
    with pytest.raises(ParamsError) as e:
        call()
    message = str(e.value)
    assert "\n" not in message and message.strip() == message and message
    return message


def write(tmp_path, params):
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


def test_committed_params_load_and_cover_the_schema():
    params = load_params(COMMITTED)
    assert set(params) == set(SCHEMA)
    assert all(set(params[g]) == set(SCHEMA[g]) for g in SCHEMA)
    assert isinstance(params["train"]["learning_rate"], float)


def test_default_path_is_params_yaml_in_cwd(tmp_path, monkeypatch):
    write(tmp_path, committed())
    monkeypatch.chdir(tmp_path)
    assert load_params()["data"]["source"] == committed()["data"]["source"]


@pytest.mark.parametrize("group, key, value, expected", [
    ("data", "n_test", "all", "all"),
    ("data", "n_test", 7, 7),
    ("lora", "alpha", 32, 32.0),                 # int accepted for a float field
    ("lora", "target_modules", ["q_proj", "v_proj"], ["q_proj", "v_proj"]),
    ("lora", "layers", "all", "all"),
    ("lora", "layers", 1, 1),
    ("train", "weight_decay", 0, 0.0),
    ("train", "seed", 0, 0),
    ("train", "seed", 2**32 - 1, 2**32 - 1),  # NumPy's seed range is 0..2**32-1
    ("train", "num_threads", 0, 0),
    ("train", "resume", False, False),
    ("report", "n_examples", 0, 0),
    ("model", "trust_remote_code", True, True),
    ("prompt", "template", "{hypothesis} | {premise}", "{hypothesis} | {premise}"),
    ("prompt", "template", "P: {premise} {{literal}} H: {hypothesis}", "P: {premise} {{literal}} H: {hypothesis}"),
])
def test_valid_values(tmp_path, group, key, value, expected):
    params = committed()
    params[group][key] = value
    assert load_params(write(tmp_path, params))[group][key] == expected


def test_exponent_without_dot_is_read_as_float(tmp_path):
    # PyYAML (YAML 1.1) reads `1e-3` as the string "1e-3": what `dvc exp run -S train.learning_rate=1e-3` writes.
    text = COMMITTED.read_text().replace("learning_rate: 0.001", "learning_rate: 1e-3")
    assert "1e-3" in text
    (tmp_path / "params.yaml").write_text(text)
    assert yaml.safe_load(text)["train"]["learning_rate"] == "1e-3"
    assert load_params(tmp_path / "params.yaml")["train"]["learning_rate"] == 0.001


@pytest.mark.parametrize("group, key, value, fragment", [
    ("train", "epochs", 0, "train.epochs = 0 is out of range; allowed: an integer >= 1"),
    ("train", "epochs", True, "train.epochs = True has the wrong type"),     # bool is not an int
    ("train", "epochs", 2.5, "train.epochs = 2.5 has the wrong type"),
    ("train", "epochs", "5", "train.epochs = '5' has the wrong type"),
    ("train", "learning_rate", 0, "train.learning_rate = 0 is out of range"),
    ("train", "learning_rate", "fast", "train.learning_rate = 'fast' has the wrong type"),
    ("train", "learning_rate", "nan", "train.learning_rate = 'nan' has the wrong type"),
    ("train", "learning_rate", math.inf, "train.learning_rate = inf has the wrong type"),
    ("train", "learning_rate", False, "train.learning_rate = False has the wrong type"),
    ("train", "weight_decay", -0.1, "train.weight_decay = -0.1 is out of range"),
    ("train", "warmup_ratio", 1.0, "train.warmup_ratio = 1.0 is out of range"),
    ("train", "max_grad_norm", 0.0, "train.max_grad_norm = 0.0 is out of range"),
    ("train", "gradient_checkpointing", "no", "train.gradient_checkpointing = 'no' has the wrong type"),
    ("train", "num_threads", -1, "train.num_threads = -1 is out of range"),
    ("train", "resume", "no", "train.resume = 'no' has the wrong type"),
    ("train", "seed", None, "train.seed = None has the wrong type"),
    ("train", "seed", -3, "train.seed = -3 is out of range; allowed: an integer from 0 to 4294967295"),
    ("train", "seed", 2**32, "train.seed = 4294967296 is out of range"),
    ("train", "micro_batch_tokens", 0, "train.micro_batch_tokens = 0 is out of range"),
    ("data", "source", "  ", "data.source = '  ' is out of range"),
    ("data", "source", 3, "data.source = 3 has the wrong type"),
    ("data", "n_train", 0, "data.n_train = 0 is out of range"),
    ("data", "n_val", "100", "data.n_val = '100' has the wrong type"),
    ("data", "n_test", "some", "data.n_test = 'some' has the wrong type"),
    ("data", "n_test", 0, "data.n_test = 0 is out of range"),
    ("model", "name", "", "model.name = '' is out of range"),
    ("model", "load_in_4bit", "yes", "model.load_in_4bit = 'yes' has the wrong type"),
    ("model", "compute_dtype", "fp16", "model.compute_dtype = 'fp16' is out of range; allowed: one of auto, float32"),
    ("model", "device", "tpu", "model.device = 'tpu' is out of range; allowed: one of auto, cpu, cuda"),
    ("model", "trust_remote_code", "yes", "model.trust_remote_code = 'yes' has the wrong type (str); allowed: true or false"),
    ("model", "trust_remote_code", 1, "model.trust_remote_code = 1 has the wrong type"),
    ("prompt", "template", "Premise: {premise}", "prompt.template = 'Premise: {premise}' is out of range"),
    ("prompt", "template", "{premise} {hypothesis} {label}", "prompt.template"),
    ("prompt", "template", "{premise} {hypothesis} {}", "prompt.template"),
    ("prompt", "template", "{premise} {hypothesis", "prompt.template"),
    ("prompt", "template", "{premise}\n{hypothesis} {x}\n", "prompt.template"),
    ("prompt", "template", ["{premise}"], "prompt.template = ['{premise}'] has the wrong type"),
    ("evaluate", "method", "sample", "evaluate.method = 'sample' is out of range; allowed: one of score, generate"),
    ("evaluate", "batch_size", 0, "evaluate.batch_size = 0 is out of range"),
    ("evaluate", "max_new_tokens", 1.0, "evaluate.max_new_tokens = 1.0 has the wrong type"),
    ("lora", "r", 0, "lora.r = 0 is out of range"),
    ("lora", "alpha", -1, "lora.alpha = -1 is out of range"),
    ("lora", "dropout", 1, "lora.dropout = 1 is out of range"),
    ("lora", "target_modules", [], "lora.target_modules = [] is out of range"),
    ("lora", "target_modules", "q_proj", "lora.target_modules = 'q_proj' has the wrong type"),
    ("lora", "target_modules", ["q_proj", 3], "lora.target_modules = ['q_proj', 3] has the wrong type"),
    ("lora", "target_modules", ["q_proj", " "], "lora.target_modules = ['q_proj', ' '] is out of range"),
    ("lora", "layers", 0, "lora.layers = 0 is out of range"),
    ("lora", "layers", "last", "lora.layers = 'last' has the wrong type"),
    ("lora", "layers", True, "lora.layers = True has the wrong type"),
    ("report", "n_examples", -1, "report.n_examples = -1 is out of range"),
    ("data", "splits", {"train": "train", "test": "test"}, "has the wrong type (dict); allowed: a mapping of train, validation and test"),
    ("data", "splits", {"train": "train", "validation": "", "test": "test"}, "data.splits"),
    ("data", "extra_sets", [], "data.extra_sets = [] has the wrong type"),
    ("data", "extra_sets", {"a b": {"source": "x", "split": "y", "n": 3}}, "data.extra_sets"),
    ("data", "extra_sets", {"m": {"source": "x", "split": "y"}}, "data.extra_sets"),
    ("data", "extra_sets", {"m": {"source": "x", "split": "y", "n": 0}}, "data.extra_sets"),
    ("data", "extra_sets", {"m": {"source": "x", "split": "y", "n": "ALL"}}, "data.extra_sets"),
    ("evaluate", "probes", ["tautology", "tautology"], "evaluate.probes = ['tautology', 'tautology'] is out of range"),
    ("evaluate", "probes", ["typo"], "evaluate.probes = ['typo'] is out of range; allowed: a list of distinct probe names"),
    ("evaluate", "probes", "tautology", "evaluate.probes = 'tautology' has the wrong type"),
    ("evaluate", "hypothesis_only_template", "P: {premise} H: {hypothesis}", "evaluate.hypothesis_only_template"),
    ("evaluate", "hypothesis_only_template", "Relation:", "evaluate.hypothesis_only_template = 'Relation:' is out of range"),
])
def test_bad_values(tmp_path, group, key, value, fragment):
    params = committed()
    params[group][key] = value
    message = one_line_error(lambda: load_params(write(tmp_path, params)))
    assert f"{group}.{key}" in message and "allowed" in message
    assert fragment in message


def test_missing_key(tmp_path):
    params = committed()
    del params["lora"]["dropout"]
    assert "lora.dropout is missing" in one_line_error(lambda: load_params(write(tmp_path, params)))


def test_unknown_key(tmp_path):
    params = committed()
    params["train"]["epoch"] = 3
    message = one_line_error(lambda: load_params(write(tmp_path, params)))
    assert "unknown key train.epoch" in message and "epochs" in message


def test_unknown_and_missing_groups(tmp_path):
    params = committed()
    params["trian"] = params.pop("train")
    assert "unknown group 'trian'" in one_line_error(lambda: load_params(write(tmp_path, params)))
    params = committed()
    del params["report"]
    assert "group report is missing" in one_line_error(lambda: load_params(write(tmp_path, params)))
    params = committed()
    params["report"] = 5
    assert "group report = 5 is not a mapping" in one_line_error(lambda: load_params(write(tmp_path, params)))


@pytest.mark.parametrize("text, fragment", [
    ("train: [1, 2\n", "not valid YAML"),
    ("- a\n- b\n", "expected a mapping"),
    ("", "expected a mapping"),
])
def test_bad_files(tmp_path, text, fragment):
    (tmp_path / "params.yaml").write_text(text)
    assert fragment in one_line_error(lambda: load_params(tmp_path / "params.yaml"))


def test_missing_file(tmp_path):
    assert "file not found" in one_line_error(lambda: load_params(tmp_path / "params.yaml"))


class Attention(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj, self.v_proj = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)
        self.norm = torch.nn.LayerNorm(4)


def test_check_target_modules():
    model = torch.nn.ModuleDict({"layers": torch.nn.ModuleList([Attention(), Attention()])})
    check_target_modules(model, "all-linear")
    check_target_modules(model, ["q_proj", "v_proj"])
    check_target_modules(model, ["0.q_proj"])  # peft matches name suffixes
    message = one_line_error(lambda: check_target_modules(model, ["q_proj", "k_proj"]))
    assert "lora.target_modules" in message and "'k_proj'" in message and message.endswith("q_proj, v_proj")
    assert "norm" not in message
    one_line_error(lambda: check_target_modules(model, ["proj"]))  # a suffix of a name part does not count


def test_check_split_size():
    check_split_size("data.n_train", 10, 10)
    message = one_line_error(lambda: check_split_size("data.n_train", 11, 10))
    assert "data.n_train = 11 is larger than the split (10 labeled pairs)" in message
    assert '"all"' in one_line_error(lambda: check_split_size("data.n_test", 11, 10))


def test_extra_sets_and_split_names_are_read(tmp_path):
    params = committed()
    params["data"]["splits"] = {"train": "train", "validation": "validation_matched", "test": "validation_mismatched"}
    params["data"]["extra_sets"] = {"mnli-m": {"source": "local/dir", "split": "dev", "n": "all"}}
    loaded = load_params(write(tmp_path, params))["data"]
    assert loaded["splits"]["test"] == "validation_mismatched"
    assert loaded["extra_sets"] == {"mnli-m": {"source": "local/dir", "split": "dev", "n": "all"}}
    params["data"]["extra_sets"] = None  # an emptied mapping in YAML reads as null: no extra sets
    assert load_params(write(tmp_path, params))["data"]["extra_sets"] == {}
