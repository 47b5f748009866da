"""Bad input between stages, values that look valid, and outputs around a failed `dvc repro`.

Every case ends in one line naming the file or param, what is wrong and the fix, with exit status 1, never a
traceback. The DVC cases run in a temporary git + DVC project and compare the git-tracked files byte for byte.
"""
import json
import shutil
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
import yaml
from helpers.artifacts import write
from helpers.predict import make_predict_project
from helpers.stages import (
    exit_message,
    prepare_project,
    run_failure_cases,
    run_prepare,
    stage_module,
)
from pipeline import REPO, dvc, kill_after_epoch, make_project, run, set_param, stages_run
from tiny import made_up_pairs, make_tiny_model

from qlora_nli.config import load_params
from qlora_nli.data.sources import load_splits
from qlora_nli.model import adapters, loading
from qlora_nli.runtime import errors, hub
from qlora_nli.runtime.errors import DataError, ModelLoadError, ParamsError


def one_line(error_type, call):
    with pytest.raises(error_type) as e:
        call()
    message = str(e.value)
    assert message and "\n" not in message
    return message


# --- a stage's input artifacts: missing, truncated, malformed ------------------------------------------------------

def truncate(path, line):
    """Cut `path` in the middle of line `line` (1-based), as a killed writer without atomic writes would."""
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[: line - 1]) + lines[line - 1][: len(lines[line - 1]) // 2])


def edit_rows(path, line, change):
    rows = [json.loads(text) for text in path.read_text().splitlines()]
    change(rows[line - 1])
    write(path, rows)


def edit_params(key, value):
    def apply(root):
        params = yaml.safe_load((root / "params.yaml").read_text())
        group, name = key.split(".")
        params[group][name] = value
        (root / "params.yaml").write_text(yaml.safe_dump(params))
    return apply


STAGE_INPUT_CASES = {
    # id: (stage and args, how to break the input, what the one line must say)
    "evaluate without data/test.jsonl": (
        ("evaluate", "baseline"), lambda d: (d / "data/test.jsonl").unlink(),
        "data/test.jsonl: missing; rerun `dvc repro prepare`"),
    "evaluate with data/test.jsonl truncated on line 5": (
        ("evaluate", "baseline"), lambda d: truncate(d / "data/test.jsonl", 5),
        "data/test.jsonl line 5: not valid JSON"),
    "evaluate with a test row without label": (
        ("evaluate", "baseline"), lambda d: edit_rows(d / "data/test.jsonl", 3, lambda r: r.pop("label")),
        "data/test.jsonl line 3: missing key 'label'; rerun `dvc repro prepare`"),
    "evaluate finetuned without models/adapter": (
        ("evaluate", "finetuned"), lambda d: shutil.rmtree(d / "models/adapter"),
        "models/adapter: missing; rerun `dvc repro finetune`"),
    "evaluate finetuned with a broken adapter_config.json": (
        ("evaluate", "finetuned"), lambda d: (d / "models/adapter/adapter_config.json").write_text('{"peft_type": "LO'),
        "models/adapter/adapter_config.json line 1: not valid JSON"),
    "evaluate finetuned with an adapter without weights": (
        ("evaluate", "finetuned"), lambda d: (d / "models/adapter/adapter_model.safetensors").unlink(),
        "models/adapter: no adapter weights"),
    "finetune without data/train.jsonl": (
        ("finetune",), lambda d: (d / "data/train.jsonl").unlink(),
        "data/train.jsonl: missing; rerun `dvc repro prepare`"),
    "finetune with a validation label outside the labels": (
        ("finetune",), lambda d: edit_rows(d / "data/validation.jsonl", 2, lambda r: r.update(label=3)),
        "data/validation.jsonl line 2: label = 3 is not a label id"),
    "evaluate with a template conversion {premise!x}": (
        ("evaluate", "baseline"), edit_params("prompt.template", "P: {premise!x} H: {hypothesis}"),
        "prompt.template = 'P: {premise!x} H: {hypothesis}' is out of range"),
    "evaluate with a template format spec {premise:d}": (
        ("evaluate", "baseline"), edit_params("prompt.template", "P: {premise:d} H: {hypothesis}"),
        "prompt.template = 'P: {premise:d} H: {hypothesis}' is out of range"),
    "finetune with a nested template field {premise[0]}": (
        ("finetune",), edit_params("prompt.template", "P: {premise[0]} H: {hypothesis}"),
        "prompt.template = 'P: {premise[0]} H: {hypothesis}' is out of range"),
    "finetune with train.seed 2**32": (
        ("finetune",), edit_params("train.seed", 2**32),
        "train.seed = 4294967296 is out of range; allowed: an integer from 0 to 4294967295"),
}


@pytest.mark.parametrize("case", STAGE_INPUT_CASES)
def test_stage_input_is_one_line(stage_dir, case):
    stage_and_args, breaks, expected = STAGE_INPUT_CASES[case]
    breaks(stage_dir)
    assert expected in exit_message(*stage_and_args)


def test_stage_inputs_that_are_fine_get_to_the_model(stage_dir):
    """The unbroken fixture passes every input check: the stage stops only at the (missing) model."""
    for stage_and_args in (("evaluate", "baseline"), ("evaluate", "finetuned"), ("finetune",)):
        message = exit_message(*stage_and_args)
        assert "model.name" in message and "does not exist" in message, message


def edit_document(path, change):
    document = json.loads(path.read_text())
    change(document)
    path.write_text(json.dumps(document, indent=2))


ARTIFACT_CASES = {
    "report with a truncated metrics file": (
        "report", lambda d: (d / "metrics/baseline.json").write_text('{\n  "n": 12,\n  "accuracy": 0.'),
        "metrics/baseline.json line 3: not valid JSON"),
    "report with a missing key": (
        "report", lambda d: edit_document(d / "metrics/train.json", lambda m: m.pop("time")),
        "metrics/train.json: missing key 'time'; the file is from another version or damaged: rerun `dvc repro finetune`"),
    "report with a nested key missing": (
        "report", lambda d: edit_document(d / "metrics/finetuned.json", lambda m: m["per_class"]["neutral"].pop("f1")),
        "metrics/finetuned.json: missing key 'per_class.neutral.f1'"),
    "report with a wrong type": (
        "report", lambda d: edit_document(d / "metrics/comparison.json", lambda m: m.update(difference_ci95="wide")),
        "metrics/comparison.json: 'difference_ci95' = 'wide' is not a pair of numbers; rerun `dvc repro failure_cases`"),
    "report with a wrong type in a list": (
        "report", lambda d: edit_document(d / "reports/failure_cases.json", lambda m: m["slices"][1].update(n="9")),
        "reports/failure_cases.json: 'slices[1].n' = '9' is not a integer"),
    "failure_cases with a truncated predictions line": (
        "failure_cases", lambda d: truncate(d / "predictions/finetuned.jsonl", 12),
        "predictions/finetuned.jsonl line 12: not valid JSON"),
    "failure_cases with a prediction outside the labels": (
        "failure_cases", lambda d: edit_rows(d / "predictions/baseline.jsonl", 4, lambda r: r.update(pred=7)),
        "predictions/baseline.jsonl line 4: pred = 7 is not a label id"),
    "failure_cases without the scores field": (
        "failure_cases", lambda d: edit_rows(d / "predictions/finetuned.jsonl", 2, lambda r: r.pop("scores")),
        "predictions/finetuned.jsonl line 2: missing key 'scores'; rerun `dvc repro evaluate@finetuned`"),
    "failure_cases with scores that are not numbers": (
        "failure_cases", lambda d: edit_rows(d / "predictions/baseline.jsonl", 1, lambda r: r.update(scores=[1, "x", 2])),
        "predictions/baseline.jsonl line 1: scores = [1, 'x', 2] is not a list of 3 numbers"),
}


@pytest.mark.parametrize("case", ARTIFACT_CASES)
def test_artifact_is_one_line(workdir, monkeypatch, case):
    stage, breaks, expected = ARTIFACT_CASES[case]
    monkeypatch.chdir(workdir)
    run_failure_cases()
    breaks(workdir)
    assert expected in exit_message(stage)


def test_report_runs_on_the_unbroken_artifacts(workdir, monkeypatch):
    monkeypatch.chdir(workdir)
    run_failure_cases()
    stage_module("report")["main"]()
    assert (workdir / "reports/report.md").is_file()


@pytest.mark.slow
def test_missing_adapter_as_a_script_fails_fast(stage_dir):
    """As DVC runs it (`python -m stages.evaluate finetuned`): a subprocess, exit status 1, the one line on stderr,
    no model load and no Hub retries."""
    shutil.rmtree(stage_dir / "models/adapter")
    start = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "stages.evaluate", "finetuned"], cwd=stage_dir,
                            capture_output=True, text=True, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == ("models/adapter: missing; rerun `dvc repro finetune`, or "
                                                      "`dvc checkout models/adapter` for the one dvc.lock names")
    assert "Traceback" not in result.stderr and time.monotonic() - start < 30


# --- values that pass the schema but not the model or the machine -------------------------------------------------

def test_n_test_in_the_wrong_case(tmp_path):
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["data"]["n_test"] = "ALL"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    message = one_line(ParamsError, lambda: load_params(tmp_path / "params.yaml"))
    assert "data.n_test = 'ALL' has the wrong case" in message and "wrong type" not in message


@pytest.mark.parametrize("template", ["P: {premise!r} H: {hypothesis}", "P: {premise:>30} H: {hypothesis}",
                                      "P: {premise} H: {hypothesis!s}"])
def test_template_that_formats_but_changes_the_text(tmp_path, template):
    """A valid conversion or format spec formats without error, yet quotes or pads every premise: refused too."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["prompt"]["template"] = template
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    message = one_line(ParamsError, lambda: load_params(tmp_path / "params.yaml"))
    assert "prompt.template" in message and "no !conversion, :format spec" in message


@pytest.fixture(scope="module")
def config_only_model(tmp_path_factory):
    """A tiny model directory holding its config.json and nothing else: the checks must not need any weights."""
    full = make_tiny_model("llama", tmp_path_factory.mktemp("tiny-full"))
    bare = tmp_path_factory.mktemp("tiny-config-only")
    (bare / "config.json").write_bytes((full / "config.json").read_bytes())
    return str(bare)


def lora_params(model, **lora):
    return {"model": {"name": model, "compute_dtype": "auto", "trust_remote_code": False},
            "lora": {"target_modules": "all-linear", "layers": 1, **lora}}


@pytest.mark.parametrize("lora", [
    {"target_modules": "all-linear", "layers": "all"},
    {"target_modules": ["q_proj", "v_proj"], "layers": 2},
    {"target_modules": ["self_attn.o_proj", "down_proj"], "layers": 1},
])
def test_lora_params_that_fit_the_model(config_only_model, lora):
    loading.check_model_params(lora_params(config_only_model, **lora), "cpu")


@pytest.mark.parametrize("lora, fragment", [
    ({"target_modules": ["lm_head"]}, "entry 'lm_head' names lm_head, outside the transformer blocks"),
    ({"target_modules": ["q_proj", "embed_tokens"]}, "entry 'embed_tokens' names model.embed_tokens, outside"),
    ({"target_modules": ["k_projection"]}, "entry 'k_projection' matches no module of the model"),
    ({"target_modules": ["mlp"]}, "entry 'mlp' is not a linear layer (LlamaMLP)"),
    ({"layers": 3}, "lora.layers = 3 is more than the model's 2 blocks; allowed: an integer from 1 to 2"),
])
def test_lora_params_checked_against_the_config(config_only_model, lora, fragment):
    message = one_line(ParamsError, lambda: loading.check_model_params(lora_params(config_only_model, **lora), "cpu"))
    assert fragment in message
    if "target_modules" in lora:
        assert message.endswith("down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj")


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_on_cpu_is_refused(config_only_model, dtype):
    params = lora_params(config_only_model)
    params["model"]["compute_dtype"] = dtype
    message = one_line(ParamsError, lambda: loading.check_model_params(params, "cpu"))
    assert f"model.compute_dtype = {dtype} on CPU" in message and "auto or float32" in message
    loading.check_model_params(params, "cuda")  # on a GPU it is the right choice


def test_unreachable_hub_model_fails_fast(monkeypatch):
    import huggingface_hub

    def no_network(*args, **kwargs):
        raise ConnectionError("[Errno -2] Name or service not known")

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", no_network)
    monkeypatch.setattr(loading, "_HUB_LOCATED", {})
    start = time.monotonic()
    message = one_line(ModelLoadError, lambda: loading.load_tokenizer("made-up-owner/no-such-model"))
    assert time.monotonic() - start < 5
    assert message.startswith("params.yaml model.name: cannot reach the Hugging Face Hub for "
                              "'made-up-owner/no-such-model' and it is not in the local Hugging Face cache")


def test_hub_probe_tells_not_found_from_unreachable(monkeypatch):
    import huggingface_hub
    from huggingface_hub.errors import RepositoryNotFoundError

    def not_found(*args, **kwargs):
        error = RepositoryNotFoundError.__new__(RepositoryNotFoundError)  # without the HTTP response it wants
        Exception.__init__(error, "404 Repository Not Found")
        raise error

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", not_found)
    assert hub.probe("owner/name", "model") == hub.NOT_FOUND
    monkeypatch.setattr(loading, "_HUB_LOCATED", {})
    message = one_line(ModelLoadError, lambda: loading.load_tokenizer("owner/name"))
    assert "'owner/name' is neither a local directory nor a model on the Hugging Face Hub" in message


@pytest.mark.parametrize("name, error, fragment", [
    ("/no/such/dir/model", ModelLoadError, "the local directory '/no/such/dir/model' does not exist; fix the path"),
    ("./models/base", ModelLoadError, "the local directory './models/base' does not exist"),
    ("embedded:gpt-5", ParamsError, "unknown embedded model 'embedded:gpt-5'; allowed: embedded:smollm2-135m-instruct"),
])
def test_model_name_that_is_no_hub_id(name, error, fragment):
    message = one_line(error, lambda: loading.load_tokenizer(name))
    assert fragment in message and "Repo id" not in message


def test_test_split_that_is_a_directory(tmp_path):
    for split in ("train", "validation"):
        write(tmp_path / f"{split}.jsonl", made_up_pairs(6, 1))
    (tmp_path / "test.jsonl").mkdir()
    message = one_line(DataError, lambda: load_splits(str(tmp_path)))
    assert f"{tmp_path / 'test.jsonl'} is a directory, not a file" in message


def test_prepare_writes_all_outputs_or_none(tmp_path, monkeypatch):
    """A write failure after the first file (full disk, say) leaves every old output of prepare as it was."""
    project = prepare_project(tmp_path)
    before = run_prepare(project, monkeypatch)
    set_in = yaml.safe_load((project / "params.yaml").read_text())
    set_in["data"]["n_train"] = 5
    (project / "params.yaml").write_text(yaml.safe_dump(set_in))
    stage = stage_module("prepare")
    real_write_json = stage["write_json"]

    def disk_full(path, obj):
        raise OSError(28, "No space left on device")

    stage["main"].__globals__["write_json"] = disk_full  # the manifest is the last file written
    with pytest.raises(errors.OutputError, match="No space left"):  # one line, not a traceback
        stage["main"]()
    after = {str(p.relative_to(project / "data")): p.read_bytes() for p in sorted((project / "data").rglob("*"))
             if p.is_file() and not p.name.startswith(".")}
    assert after == before
    assert not [p for p in (project / "data").iterdir() if p.name.startswith(".")]  # no staging leftovers
    stage["main"].__globals__["write_json"] = real_write_json
    stage["main"]()
    assert json.loads((project / "data/manifest.json").read_text())["counts"]["train"]["sampled"] == 5


# --- dvc repro: a bad param deletes nothing, a good one reruns only its stages, a kill is repaired ----------------

def tracked_files(root):
    listed = run(["git", "ls-files", "-z"], root).stdout.split("\0")
    return {name: (root / name).read_bytes() for name in listed if name and (root / name).is_file()}


@pytest.fixture(scope="module")
def committed_project(tmp_path_factory):
    root = make_project(tmp_path_factory.mktemp("bad-input") / "project")
    dvc(root, "repro")
    run(["git", "add", "-A"], root)
    run(["git", "-c", "user.name=test", "-c", "user.email=test@example.com", "commit", "-qm", "repro"], root)
    return root


@pytest.mark.slow
@pytest.mark.parametrize("key, value, fragment", [
    ("train.epochs", 0, "train.epochs = 0 is out of range"),
    ("lora.target_modules", ["lm_head"], "entry 'lm_head' names lm_head, outside the transformer blocks"),
    ("prompt.template", "{premise!x} {hypothesis}", "prompt.template"),
    ("data.n_train", 1000, "data.n_train = 1000 is larger than the split (24 labeled pairs)"),
    ("evaluate.batch_size", "16", "evaluate.batch_size = '16' has the wrong type"),
])
def test_bad_param_under_dvc_repro_changes_no_tracked_file(committed_project, key, value, fragment):
    root = committed_project
    before = tracked_files(root)
    set_param(root, key, value)
    try:
        result = dvc(root, "repro", check=False)
        assert result.returncode != 0
        assert fragment in result.stdout + result.stderr
        after = tracked_files(root)
        assert after.pop("params.yaml") != before.pop("params.yaml")
        assert after == before
        for output in ("data/train.jsonl", "models/adapter/adapter_config.json", "predictions/finetuned.jsonl"):
            assert (root / output).is_file(), output  # DVC-cached outputs too
        assert stages_run(result.stdout) == {"check_params"}
    finally:
        run(["git", "checkout", "params.yaml"], root)
    assert "up to date" in dvc(root, "status").stdout


@pytest.mark.slow
def test_killed_finetune_then_repro_restores_a_consistent_set(committed_project):
    """train.epochs changes: only the stages that declare `train` (and those after them) rerun. A kill in the
    middle of finetune leaves what docs/errors.md says, and the next `dvc repro` resumes and completes the set."""
    root = committed_project
    set_param(root, "train.epochs", 3)
    killed = run([sys.executable, "-m", "dvc", "repro"], root, check=False,
                 extra_env=kill_after_epoch(root, 2))
    assert killed.returncode != 0
    assert stages_run(killed.stdout) == {"check_params", "finetune"}
    # What a kill leaves (docs/errors.md): DVC deleted finetune's outputs before the run, and finetune writes them
    # together only once training is done, so none of them is there; the checkpoints of finished epochs stay.
    assert not (root / "metrics/train.json").exists() and not (root / "dvclive/metrics.json").exists()
    assert not (root / "dvclive/plots").exists() and not (root / "models/adapter").exists()
    assert sorted(p.name for p in (root / "checkpoints").iterdir()) == ["epoch-1", "epoch-2"]

    ran = stages_run(dvc(root, "repro").stdout)
    assert "finetune" in ran and not ran & {"prepare", "evaluate@baseline"}
    train = json.loads((root / "metrics/train.json").read_text())
    assert train["epochs"] == 3 and train["resumed_from_epoch"] == 2
    assert len((root / "dvclive/plots/metrics/epoch/val_loss.tsv").read_text().splitlines()) == 1 + 3
    assert json.loads((root / "dvclive/metrics.json").read_text())["epoch"]["val_loss"] == train["val_loss_per_epoch"][-1]
    assert "up to date" in dvc(root, "status").stdout


# --- text the prompts cannot take: control characters, lone surrogates, over-long text, pairs longer than the
# model's context ---------------------------------------------------------------------------------------------------
NOT_UNICODE = ("which is not valid Unicode (a lone surrogate, from a JSON escape like \\ud800 or bytes that are not "
               "UTF-8)")


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """A tiny random llama whose context is 256 tokens (tests/tiny.py), with its tokenizer."""
    return make_tiny_model("llama", tmp_path_factory.mktemp("tiny-context"))


def use_model(root, model):
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["model"]["name"] = str(model)
    params["compute"]["device"] = "cpu"
    params["lora"]["layers"] = "all"  # the tiny model has 2 blocks
    (root / "params.yaml").write_text(yaml.safe_dump(params))


@pytest.mark.parametrize("stage", [("evaluate", "baseline"), ("finetune",)])
@pytest.mark.parametrize("text, problem", [
    ("A dog\x00runs.", "holds the control character U+0000 at character 6"),
    ("A dog\x1b[2Jruns.", "holds the control character U+001B at character 6"),
    ("x" * 32_769, "is 32,769 characters long, more than the 32,768 a pair's text may have"),
    ("A dog\ud800runs.", f"holds U+D800 at character 6, {NOT_UNICODE}"),
    (" \t ", "is empty"),  # prepare skips such pairs; a hand-edited data file is refused
])
def test_data_text_a_stage_refuses(stage_dir, stage, text, problem):
    split = "test" if stage[0] == "evaluate" else "train"
    edit_rows(stage_dir / f"data/{split}.jsonl", 2, lambda r: r.update(premise=text))
    assert exit_message(*stage) == f"data/{split}.jsonl line 2: premise {problem}; rerun `dvc repro prepare`"


def token_count(model, text):
    return len(loading.load_tokenizer(str(model))(text).input_ids)


@pytest.mark.parametrize("stage, split, row", [(("evaluate", "baseline"), "test", 3),
                                               (("evaluate", "baseline"), "validation", 2),
                                               (("finetune",), "train", 4), (("finetune",), "validation", 5)])
def test_a_pair_longer_than_the_context_stops_the_stage_before_the_weights_load(stage_dir, tiny_model, monkeypatch,
                                                                                stage, split, row):
    from tiny import TEMPLATE
    from qlora_nli.prompts import format_prompt

    use_model(stage_dir, tiny_model)
    long = "A cook stirs a pot of soup. " * 40  # about 1,100 characters: within the text bound, beyond 256 tokens
    edit_rows(stage_dir / f"data/{split}.jsonl", row, lambda r: r.update(premise=long))
    pair = json.loads((stage_dir / f"data/{split}.jsonl").read_text().splitlines()[row - 1])
    tokens = token_count(tiny_model, format_prompt(TEMPLATE, pair))
    answer = max(token_count(tiny_model, " " + w) for w in ("entailment", "neutral", "contradiction"))
    assert tokens > 256
    monkeypatch.setattr(adapters, "load_for_inference", lambda *a, **k: pytest.fail("the weights were loaded"))
    monkeypatch.setattr("qlora_nli.train.loop.build_training", lambda *a, **k: pytest.fail("the weights were loaded"))
    fix = ("remove the pair from data.source and rerun `dvc repro prepare`, or use a model with a longer context"
           + (" (model.name)" if stage[0] == "evaluate" else ""))
    assert exit_message(*stage) == (f"data/{split}.jsonl row {row}: its prompt is {tokens:,} tokens, "
                                    f"{tokens + answer:,} with the answer, more than the model's context of 256 "
                                    f"tokens; {fix}")


def test_a_probe_longer_than_the_context_is_named(stage_dir, tiny_model):
    # premise_as_hypothesis doubles the premise: a test pair that fits can make a probe pair that does not
    from tiny import TEMPLATE
    from qlora_nli.prompts import format_prompt

    use_model(stage_dir, tiny_model)
    params = yaml.safe_load((stage_dir / "params.yaml").read_text())
    params["evaluate"]["probes"] = ["premise_as_hypothesis"]
    (stage_dir / "params.yaml").write_text(yaml.safe_dump(params))
    answer = max(token_count(tiny_model, " " + w) for w in ("entailment", "neutral", "contradiction"))
    for k in range(1, 40):  # the longest premise whose own pair still fits
        premise = "A cook stirs a pot of soup. " * k
        pair, probe = ({"premise": premise, "hypothesis": "Someone cooks."}, {"premise": premise, "hypothesis": premise})
        if token_count(tiny_model, format_prompt(TEMPLATE, pair)) + answer <= 256 < \
                token_count(tiny_model, format_prompt(TEMPLATE, probe)) + answer:
            break
    else:
        pytest.fail("no premise length splits the pair from its probe")
    edit_rows(stage_dir / "data/test.jsonl", 2, lambda r: r.update(premise=premise, hypothesis="Someone cooks."))
    tokens = token_count(tiny_model, format_prompt(TEMPLATE, probe))
    assert exit_message("evaluate", "baseline") == (
        f"the premise_as_hypothesis probe of data/test.jsonl row 2: its prompt is {tokens:,} tokens, "
        f"{tokens + answer:,} with the answer, more than the model's context of 256 tokens; remove the pair from "
        f"data.source and rerun `dvc repro prepare`, or use a model with a longer context (model.name)")


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A tiny model, an adapter for it and params.yaml naming the model (helpers/predict.py)."""
    return make_predict_project(tmp_path_factory.mktemp("predict"))


def run_nli_predict(project, *args):
    from qlora_nli import cli

    with pytest.raises(SystemExit) as e:
        cli.predict(["--params", str(project.params), *map(str, args)])
    assert isinstance(e.value.code, str) and "\n" not in e.value.code
    return e.value.code


@pytest.mark.parametrize("pair, expected", [
    ({"premise": "A dog\x00runs.", "hypothesis": "An animal moves."},
     "line 2: premise holds the control character U+0000 at character 6; fix or remove the line"),
    ({"premise": "A dog runs.", "hypothesis": "An animal\x85moves."},
     "line 2: hypothesis holds the control character U+0085 at character 10; fix or remove the line"),
    ({"premise": "A dog runs.", "hypothesis": "An animal\ud800moves."},  # json.dumps writes it as the escape \ud800
     f"line 2: hypothesis holds U+D800 at character 10, {NOT_UNICODE}; fix or remove the line"),
    ({"premise": "word " * 20_000, "hypothesis": "h"},
     "line 2: premise is 100,000 characters long, more than the 32,768 a pair's text may have; fix or remove the "
     "line"),
])
def test_nli_predict_refuses_text_the_prompt_cannot_take(project, tmp_path, monkeypatch, pair, expected):
    (tmp_path / "in.jsonl").write_text(json.dumps({"premise": "a", "hypothesis": "b"}) + "\n" + json.dumps(pair) + "\n")
    monkeypatch.setattr(adapters, "load_for_inference", lambda *a, **k: pytest.fail("the model was loaded"))
    assert run_nli_predict(project, "--input", tmp_path / "in.jsonl") == f"{tmp_path / 'in.jsonl'} {expected}"


def test_nli_predict_refuses_control_characters_and_lone_surrogates_given_as_options(project):
    assert run_nli_predict(project, "--premise", "A dog\x1bruns.", "--hypothesis", "h") == (
        "--premise holds the control character U+001B at character 6; give the text without it")
    # bytes that are not UTF-8 on a command line reach Python as lone surrogates (surrogateescape): b"\xff" -> U+DCFF
    assert run_nli_predict(project, "--premise", "p", "--hypothesis", b"A \xffdog".decode("utf-8", "surrogateescape")) \
        == f"--hypothesis holds U+DCFF at character 3, {NOT_UNICODE}; give the text without it"
    template = "\udcff{premise} {hypothesis}"
    assert run_nli_predict(project, "--premise", "p", "--hypothesis", "h", "--template", template) == (
        f"{project.params} with command-line options: prompt.template holds U+DCFF at character 1, {NOT_UNICODE}; "
        f"write it as UTF-8 text")


def test_nli_predict_refuses_a_pair_longer_than_the_context(project, tmp_path):
    from tiny import TEMPLATE
    from qlora_nli.prompts import format_prompt

    long = {"premise": "A cook stirs a pot of soup. " * 40, "hypothesis": "Someone cooks."}
    (tmp_path / "in.jsonl").write_text(json.dumps({"premise": "a", "hypothesis": "b"}) + "\n\n" + json.dumps(long)
                                       + "\n")
    tokens = token_count(project.model, format_prompt(TEMPLATE, long))
    answer = max(token_count(project.model, " " + w) for w in ("entailment", "neutral", "contradiction"))
    assert run_nli_predict(project, "--input", tmp_path / "in.jsonl") == (
        f"{tmp_path / 'in.jsonl'} line 3: its prompt is {tokens:,} tokens, {tokens + answer:,} with the answer, more "
        f"than the model's context of 256 tokens; shorten the premise or hypothesis, or use a model with a longer "
        f"context (--model)")


def test_nli_predict_params_with_a_key_given_twice(project, tmp_path):
    text = project.params.read_text() + "model:\n  device: cpu\n"
    (tmp_path / "params.yaml").write_text(text)
    line = text.count("\n") - 1
    first = text.splitlines().index("model:") + 1
    message = run_nli_predict(SimpleNamespace(params=tmp_path / "params.yaml"), "--premise", "p", "--hypothesis", "h")
    assert message == (f"{tmp_path / 'params.yaml'} line {line}: model is given a second time (first at line "
                       f"{first}); YAML would silently keep only the last, so delete one of them or merge the two")


@pytest.mark.slow
def test_dvc_repro_with_a_bad_extra_split_stops_before_prepare_deletes_anything(tmp_path):
    root = make_project(tmp_path / "project", overrides={"train.epochs": 1})
    nli = tmp_path / "project-nli"  # make_project's data
    set_param(root, "data.extra_sets", {"more": {"source": str(nli), "split": "validation", "n": 3}})
    dvc(root, "repro", "prepare")
    data_files = sorted(p for p in (root / "data").rglob("*") if p.is_file())
    before = {p: p.read_bytes() for p in data_files}
    assert (root / "data/sets/more.jsonl") in before and (root / "data/manifest.json") in before
    set_param(root, "data.extra_sets", {"more": {"source": str(nli), "split": "validation_matched", "n": 3}})
    result = dvc(root, "repro", "prepare", check=False)
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert f"data.extra_sets.more.source: {nli} has no validation_matched split" in output
    assert "Running stage 'prepare'" not in output
    assert {p: p.read_bytes() for p in sorted(p for p in (root / "data").rglob("*") if p.is_file())} == before
