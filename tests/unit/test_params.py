import math

import pytest
import torch
import yaml
from pipeline import REPO

from qlora_nli.config import SCHEMA, load_params
from qlora_nli.data.sources import check_split_size
from qlora_nli.model.loading import check_target_modules
from qlora_nli.runtime.errors import ParamsError

COMMITTED = REPO / "params.yaml"


def committed():
    return yaml.safe_load(COMMITTED.read_text())


def one_line_error(call):
    with pytest.raises(ParamsError) as e:
        call()
    message = str(e.value)
    assert "\n" not in message and message.strip() == message and message
    return message


def error_lines(call):
    """The lines of the ParamsError that `call` raises: one per problem, each a whole message."""
    with pytest.raises(ParamsError) as e:
        call()
    lines = str(e.value).split("\n")
    assert all(line and line.strip() == line for line in lines), lines
    return lines


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
    ("compute", "num_threads", 0, 0),
    ("train", "resume", False, False),
    ("failure_cases", "n_examples", 0, 0),
    ("model", "trust_remote_code", True, True),
    ("prompt", "template", "{hypothesis}\n{premise}", "{hypothesis}\n{premise}"),
    ("prompt", "template", "P: {premise} {{literal}}\nH: {hypothesis}", "P: {premise} {{literal}}\nH: {hypothesis}"),
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
    ("train", "learning_rate", math.inf, "train.learning_rate = inf is not a finite number (YAML .nan or .inf); allowed: a number > 0"),
    ("train", "learning_rate", False, "train.learning_rate = False has the wrong type"),
    ("train", "weight_decay", -0.1, "train.weight_decay = -0.1 is out of range"),
    ("train", "warmup_ratio", 1.0, "train.warmup_ratio = 1.0 is out of range"),
    ("train", "max_grad_norm", 0.0, "train.max_grad_norm = 0.0 is out of range"),
    ("train", "gradient_checkpointing", "no", "train.gradient_checkpointing = 'no' has the wrong type"),
    ("compute", "num_threads", -1, "compute.num_threads = -1 is out of range"),
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
    ("compute", "device", "tpu", "compute.device = 'tpu' is out of range; allowed: one of auto, cpu, cuda"),
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
    ("lora", "target_modules", ["q_proj", 3], "lora.target_modules[1] = 3 is int, not a module name (a string)"),
    ("lora", "target_modules", ["q_proj", " "], "lora.target_modules = ['q_proj', ' '] is out of range"),
    ("lora", "layers", 0, "lora.layers = 0 is out of range"),
    ("lora", "layers", "last", "lora.layers = 'last' has the wrong type"),
    ("lora", "layers", True, "lora.layers = True has the wrong type"),
    ("failure_cases", "n_examples", -1, "failure_cases.n_examples = -1 is out of range"),
    ("data", "splits", {"train": "train", "test": "test"}, "data.splits is missing the key validation; allowed: a mapping of train, validation and test"),
    ("data", "splits", {"train": "train", "validation": "", "test": "test"}, "data.splits"),
    ("data", "extra_sets", [], "data.extra_sets = [] has the wrong type"),
    ("data", "extra_sets", {"a b": {"source": "x", "split": "y", "n": 3}}, "data.extra_sets"),
    ("data", "extra_sets", {"m": {"source": "x", "split": "y"}}, "data.extra_sets"),
    ("data", "extra_sets", {"m": {"source": "x", "split": "y", "n": 0}}, "data.extra_sets"),
    ("data", "extra_sets", {"m": {"source": "x", "split": "y", "n": "ALL"}}, "data.extra_sets"),
    ("evaluate", "probes", ["tautology", "tautology"], "evaluate.probes[1] = 'tautology' is listed twice"),
    ("evaluate", "probes", ["typo"], "evaluate.probes[0] = 'typo' is no probe; allowed: a list of distinct probe names"),
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


def test_every_bad_value_is_reported_at_once_one_line_each(tmp_path):
    params = committed()
    params["model"]["compute_dtype"] = "fp16"
    params["train"]["epochs"] = 0
    params["train"]["epoch"] = 3
    params["compute"]["device"] = "tpu"
    path = write(tmp_path, params)
    lines = error_lines(lambda: load_params(path))
    assert len(lines) == 4 and all(line.startswith(f"{path}: ") for line in lines), lines
    for fragment in ("model.compute_dtype = 'fp16' is out of range", "train.epochs = 0 is out of range",
                     "unknown key train.epoch;", "compute.device = 'tpu' is out of range"):
        assert sum(fragment in line for line in lines) == 1, (fragment, lines)


def test_unknown_and_missing_groups(tmp_path):
    params = committed()
    params["trian"] = params.pop("train")
    path = write(tmp_path, params)
    unknown, missing = error_lines(lambda: load_params(path))  # a renamed group: two problems, one line each
    assert unknown == (f"{path}: unknown group 'trian'; allowed groups: data, model, prompt, evaluate, lora, train, "
                       f"compute, failure_cases")
    prefix = f"{path}: group train is missing; it needs the keys "
    assert missing.startswith(prefix) and missing[len(prefix):].split(", ") == list(committed()["train"])
    params = committed()
    del params["failure_cases"]
    assert "group failure_cases is missing" in one_line_error(lambda: load_params(write(tmp_path, params)))
    params = committed()
    params["failure_cases"] = 5
    assert "group failure_cases = 5 is not a mapping" in one_line_error(lambda: load_params(write(tmp_path, params)))


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


# --- hostile or mistaken YAML: alias bombs, keys given twice, values no message should echo in full ---------------

# Nine lists of nine aliases: a few hundred bytes standing for 9**9 (about 3.9e8) strings once expanded.
ALIAS_BOMB = ('a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]\n'
              + "".join(f"{c}: &{c} [{', '.join(['*' + p] * 9)}]\n" for p, c in zip("abcdefgh", "bcdefghi")))


def run_with_timeout(code, seconds=60):
    """Run `code` in a fresh interpreter; a hang fails the test (TimeoutExpired) instead of stalling the suite: a
    repr of a huge list runs in C, where no signal can interrupt it."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=seconds,
                          cwd=REPO)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_alias_bomb_is_refused_before_it_is_built(tmp_path):
    text = ALIAS_BOMB + COMMITTED.read_text().replace("target_modules: all-linear", "target_modules: *i")
    assert len(text.encode()) < COMMITTED.stat().st_size + 600
    (tmp_path / "params.yaml").write_text(text)
    out = run_with_timeout(f"""
from qlora_nli.runtime.errors import ParamsError
from qlora_nli.config import load_params
try:
    load_params({str(tmp_path / 'params.yaml')!r})
except ParamsError as e:
    print(e)
""")
    assert out == (f"{tmp_path / 'params.yaml'}: its YAML aliases (*name) expand it to more than 10,000 values (the "
                   f"pipeline's params are about 100); write the values out instead of repeating aliases")


def test_a_message_about_an_alias_bomb_value_is_short_and_quick():
    # Past the size bound (checking a value built in Python): the message quotes the value without expanding it.
    out = run_with_timeout(f"""
import yaml
from qlora_nli.config import check_params
raw = yaml.safe_load(open("params.yaml").read())
raw["lora"]["target_modules"] = yaml.safe_load({ALIAS_BOMB!r})["i"]
try:
    check_params(raw)
except Exception as e:
    print(type(e).__name__, e)
""")
    assert out == ("ParamsError params.yaml: lora.target_modules[0] = [[[[...], [...], [...], [...], [...], [...], "
                   "...], [[...]... is list, not a module name (a string); allowed: \"all-linear\" or a non-empty "
                   "list of module names")


def test_a_value_that_refers_to_itself_is_refused(tmp_path):
    (tmp_path / "params.yaml").write_text(COMMITTED.read_text().replace("n_examples: 5", "n_examples: &s [*s]"))
    assert one_line_error(lambda: load_params(tmp_path / "params.yaml")) == (
        f"{tmp_path / 'params.yaml'}: a YAML alias (*name) refers to the value that holds it, which expands "
        f"forever; write the value out instead of the alias")


def test_aliases_and_merges_within_the_bound_are_read(tmp_path):
    text = COMMITTED.read_text().replace("target_modules: all-linear", "target_modules: &m [q_proj, v_proj]")
    assert "failure_cases:\n  n_examples: 5" in text
    text = text.replace("failure_cases:\n  n_examples: 5", "failure_cases:\n  <<: {n_examples: 3}\n  n_examples: 7")
    (tmp_path / "params.yaml").write_text(text)
    params = load_params(tmp_path / "params.yaml")
    assert params["lora"]["target_modules"] == ["q_proj", "v_proj"] and params["failure_cases"]["n_examples"] == 7


@pytest.mark.parametrize("edit, expected", [
    # a second train: group after the first (the last would win, and train.epochs be "missing")
    (lambda t: t + "train:\n  seed: 1\n", "line 71: train is given a second time (first at line 48)"),
    # a second extra_sets: mapping inside data
    (lambda t: t.replace("  extra_sets:  ", "  extra_sets: {}\n  extra_sets:  "),
     "line 14: data.extra_sets is given a second time (first at line 13)"),
    # a key twice in one flow mapping, on one line
    (lambda t: t.replace("failure_cases:\n  n_examples: 5", "failure_cases: {n_examples: 5, n_examples: 6}"),
     "line 63: failure_cases.n_examples is given a second time (first at line 63)"),
    (lambda t: t.replace("  epochs: 5\n", "  epochs: 5\n  epochs: 6\n"),
     "line 51: train.epochs is given a second time (first at line 50)"),
])
def test_a_key_given_twice_is_refused(tmp_path, edit, expected):
    assert edit(COMMITTED.read_text()) != COMMITTED.read_text(), "the edit should find its text in params.yaml"
    (tmp_path / "params.yaml").write_text(edit(COMMITTED.read_text()))
    assert one_line_error(lambda: load_params(tmp_path / "params.yaml")) == (
        f"{tmp_path / 'params.yaml'} {expected}; YAML would silently keep only the last, so delete one of them or "
        f"merge the two")


@pytest.mark.parametrize("edit, expected", [
    (lambda t: t.replace("n_examples: 5", "n_examples: " + "[" * 5000 + "]" * 5000),
     "nested too deeply to read (lists or mappings inside each other); params.yaml needs two levels, groups and "
     "their keys"),
    (lambda t: t.replace("n_examples: 5", "n_examples: " + "1" * 5000),
     "a value cannot be converted (Exceeds the limit (4300 digits) for integer string conversion: value has "
     "5000...); write it as a plain number or string"),
    (lambda t: t.replace("seed: 42", "seed: 2026-13-45"),
     "a value cannot be converted (month must be in 1..12); write it as a plain number or string"),
])
def test_yaml_that_cannot_be_built_is_one_line(tmp_path, edit, expected):
    (tmp_path / "params.yaml").write_text(edit(COMMITTED.read_text()))
    assert one_line_error(lambda: load_params(tmp_path / "params.yaml")) == f"{tmp_path / 'params.yaml'}: {expected}"


EXTRA_SETS_ALLOWED = ('a mapping of set names (letters, digits, _ or -) to {source, split, n} (n an integer >= 1 or '
                      '"all"), e.g. {mnli_matched: {source: nyu-mll/multi_nli, split: validation_matched, n: 300}}, '
                      'or {} for none')
NOT_UNICODE = ("which is not valid Unicode (a lone surrogate, from a JSON escape like \\ud800 or bytes that are not "
               "UTF-8)")
SPLITS_ALLOWED = ("a mapping of train, validation and test to the source's split names, e.g. {train: train, "
                  "validation: validation_matched, test: validation_mismatched}")


@pytest.mark.parametrize("group, key, value, expected", [
    ("train", "learning_rate", math.nan, "train.learning_rate = nan is not a finite number (YAML .nan or .inf); "
                                         "allowed: a number > 0"),
    ("train", "learning_rate", "1e999", "train.learning_rate = inf is not a finite number (YAML .nan or .inf); "
                                        "allowed: a number > 0"),
    ("train", "epochs", math.inf, "train.epochs = inf is not a finite number (YAML .nan or .inf); allowed: an "
                                  "integer >= 1"),
    ("train", "resume", -math.inf, "train.resume = -inf is not a finite number (YAML .nan or .inf); allowed: true "
                                   "or false"),
    ("data", "extra_sets", {"m": {"source": "x", "split": "y", "n": 0}},
     f"data.extra_sets.m.n = 0 is out of range (a set needs at least one pair); allowed: {EXTRA_SETS_ALLOWED}"),
    ("data", "extra_sets", {"m": {"source": "x", "split": "y", "n": math.nan}},
     f"data.extra_sets.m.n = nan is not a finite number (YAML .nan or .inf); allowed: {EXTRA_SETS_ALLOWED}"),
    ("data", "extra_sets", {"m": {"source": "x", "split": "y", "n": "ALL"}},
     f"data.extra_sets.m.n = 'ALL' has the wrong case (write all in lower case, without spaces); allowed: "
     f"{EXTRA_SETS_ALLOWED}"),
    ("data", "extra_sets", {"../x": {"source": "x", "split": "y", "n": 3}},
     "data.extra_sets names a set '../x', which cannot be a file name (data/sets/<name>.jsonl): a set name starts "
     f"with a letter or digit and holds only letters, digits, _ and -; allowed: {EXTRA_SETS_ALLOWED}"),
    ("data", "extra_sets", {"m": {"source": "x", "split": "y"}},
     f"data.extra_sets.m is missing the key n; allowed: {EXTRA_SETS_ALLOWED}"),
    ("data", "extra_sets", {"m": {"source": "x", "split": "y", "n": 3, "seed": 1}},
     f"data.extra_sets.m has an unknown key 'seed'; its keys are source, split, n; allowed: {EXTRA_SETS_ALLOWED}"),
    ("data", "extra_sets", {"m": {"source": " ", "split": "y", "n": 3}},
     f"data.extra_sets.m.source = ' ' is empty; allowed: {EXTRA_SETS_ALLOWED}"),
    ("data", "extra_sets", {"m": "nyu-mll/multi_nli"},
     f"data.extra_sets.m = 'nyu-mll/multi_nli' is str, not a mapping of source, split and n; allowed: "
     f"{EXTRA_SETS_ALLOWED}"),
    ("data", "splits", {"train": "train", "validation": "validation", "test": "test", "dev": "dev"},
     f"data.splits has an unknown key 'dev'; its keys are train, validation, test; allowed: {SPLITS_ALLOWED}"),
    ("data", "splits", {"train": "train", "validation": 3, "test": "test"},
     f"data.splits.validation = 3 is int, not a name (a string); allowed: {SPLITS_ALLOWED}"),
    # a lone surrogate (YAML "\ud800") anywhere in a value, however deep: no check below it can use the string
    ("prompt", "template", "Premise: {premise}\ud800 Hypothesis: {hypothesis}",
     f"prompt.template holds U+D800 at character 19, {NOT_UNICODE}; write it as UTF-8 text"),
    ("data", "extra_sets", {"m": {"source": "x\udcff", "split": "y", "n": 3}},
     f"data.extra_sets.m.source holds U+DCFF at character 2, {NOT_UNICODE}; write it as UTF-8 text"),
    ("lora", "target_modules", ["q_proj", "\udfff"],
     f"lora.target_modules[1] holds U+DFFF at character 1, {NOT_UNICODE}; write it as UTF-8 text"),
    ("evaluate", "probes", ["tautology", 7], "evaluate.probes[1] = 7 is int, not a probe name (a string); allowed: "
                                            "a list of distinct probe names from hypothesis_only, swap_contradiction, "
                                            "premise_as_hypothesis, tautology, negation_tautology ([] for none)"),
])
def test_a_message_names_what_is_wrong_with_the_value(tmp_path, group, key, value, expected):
    params = committed()
    params[group][key] = value
    assert one_line_error(lambda: load_params(write(tmp_path, params))) == f"{tmp_path / 'params.yaml'}: {expected}"


def test_the_hypothesis_only_template_auto_follows_prompt_template(tmp_path):
    params = committed()
    assert params["evaluate"]["hypothesis_only_template"] == "auto"
    assert load_params(write(tmp_path, params))["evaluate"]["hypothesis_only_template"] == (
        "Classify the relation of the hypothesis to the premise as entailment, neutral or contradiction.\n"
        "Hypothesis: {hypothesis}\nRelation:")
    params["prompt"]["template"] = "Premise: {premise}\nHypothesis: {hypothesis}\nLabel:"  # as -S would change it
    assert load_params(write(tmp_path, params))["evaluate"]["hypothesis_only_template"] == (
        "Hypothesis: {hypothesis}\nLabel:")
    params["evaluate"]["hypothesis_only_template"] = "Only: {hypothesis}\nLabel:"  # written out: used as given
    assert load_params(write(tmp_path, params))["evaluate"]["hypothesis_only_template"] == "Only: {hypothesis}\nLabel:"


def test_the_hypothesis_only_template_auto_needs_a_premise_line(tmp_path):
    params = committed()
    params["prompt"]["template"] = "{premise} => {hypothesis}:"
    assert one_line_error(lambda: load_params(write(tmp_path, params))) == (
        f"{tmp_path / 'params.yaml'}: evaluate.hypothesis_only_template = 'auto' needs prompt.template to give "
        f"{{premise}} a line of its own, to leave out; it shares one with {{hypothesis}}: write the hypothesis-only "
        f"template out (the prompt with {{hypothesis}} and without {{premise}}), or drop hypothesis_only from "
        f"evaluate.probes")
    params["evaluate"]["probes"] = ["tautology"]  # no hypothesis-only probe: the template is never used
    assert load_params(write(tmp_path, params))["prompt"]["template"] == "{premise} => {hypothesis}:"


def test_every_message_is_bounded_in_length(tmp_path):
    params = committed()
    params["train"]["epoch" + "s" * 5000] = 3  # a key, not a value: quoted in the message too
    message = one_line_error(lambda: load_params(write(tmp_path, params)))
    assert message.startswith(f"{tmp_path / 'params.yaml'}: unknown key train.epochsssss") and len(message) < 400
    params = committed()
    params["model"]["name"] = ["x" * 10**7]
    message = one_line_error(lambda: load_params(write(tmp_path, params)))
    assert message == (f"{tmp_path / 'params.yaml'}: model.name = ['" + "x" * 55
                       + "... has the wrong type (list); allowed: a non-empty string")


def test_far_off_values_warn_and_are_used(tmp_path, caplog):
    params = committed()
    params["train"]["micro_batch_tokens"] = 1
    params["train"]["learning_rate"] = 5.0
    with caplog.at_level("WARNING", logger="qlora_nli.config"):
        loaded = load_params(write(tmp_path, params))
    assert loaded["train"]["micro_batch_tokens"] == 1 and loaded["train"]["learning_rate"] == 5.0
    assert [r.getMessage() for r in caplog.records] == [
        f"{tmp_path / 'params.yaml'}: train.micro_batch_tokens = 1 is far outside its typical range (64 to 65536): "
        f"below it each pass holds a sliver of a batch and steps run many times slower; above it the activation "
        f"memory of one pass grows with it; it is used as given, set it within the range unless that is meant",
        f"{tmp_path / 'params.yaml'}: train.learning_rate = 5.0 is far outside its typical range (1e-06 to 0.1): "
        f"below it the adapter barely changes; above it the loss diverges; it is used as given, set it within the "
        f"range unless that is meant",
    ]


def test_committed_params_are_within_their_typical_ranges(caplog):
    with caplog.at_level("WARNING", logger="qlora_nli.config"):
        load_params(COMMITTED)
    assert caplog.records == []


def test_every_bad_value_is_reported_at_once_one_line_each(tmp_path):
    """Three problems in three groups: one error, a line for each, in schema order; nothing is dropped."""
    params = committed()
    params["train"]["epochs"] = 0
    params["lora"]["dropout"] = 1.5
    params["compute"]["device"] = "tpu"
    path = write(tmp_path, params)
    with pytest.raises(ParamsError) as e:
        load_params(path)
    assert str(e.value).split("\n") == [
        f"{path}: lora.dropout = 1.5 is out of range; allowed: a number with 0 <= x < 1",
        f"{path}: train.epochs = 0 is out of range; allowed: an integer >= 1",
        f"{path}: compute.device = 'tpu' is out of range; allowed: one of auto, cpu, cuda",
    ]


def test_a_flood_of_problems_is_cut_to_a_readable_list(tmp_path):
    params = committed()
    params["data"].update({f"extra_key_{i}": i for i in range(40)})
    lines = error_lines_of(lambda: load_params(write(tmp_path, params)))
    assert len(lines) == 20 and lines[-1] == "... and 21 more problems of the same kind"
    assert lines[0].endswith("unknown key data.extra_key_0; allowed keys in data: source, n_train, n_val, n_test, "
                             "splits, extra_sets")


def error_lines_of(call):
    with pytest.raises(ParamsError) as e:
        call()
    return str(e.value).split("\n")
