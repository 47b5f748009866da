"""nli-predict and nli-export on tiny models: evaluate's scores, every input form, one-line errors, and a merged
export that plain transformers loads and that predicts like base + adapter. As a command on stdin:
tests/e2e/test_predict_command.py."""
import importlib
import io
import json
import subprocess
import sys
import tomllib

import pytest
import torch
import yaml
from helpers.predict import BATCH, make_predict_project
from pipeline import REPO, env
from tiny import base_plus_adapter, made_up_pairs, make_adapter, make_tiny_model
from tiny import model_params as _model_params

from qlora_nli import cli
from qlora_nli.infer.export import export_merged
from qlora_nli.infer.scoring import score_labels
from qlora_nli.model import adapters, loading
from tiny import TEMPLATE
from qlora_nli.prompts import LABELS, format_prompt


def _prompts(pairs):
    return [format_prompt(TEMPLATE, r) for r in pairs]


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A tiny model, an adapter for it, params.yaml pointing at the model, and a JSONL file of pairs."""
    return make_predict_project(tmp_path_factory.mktemp("predict"))


def run_predict(capsys, project, *args):
    cli.predict(["--params", str(project.params), *map(str, args)])
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()]


def test_adapter_is_not_a_no_op(project):
    prompts = _prompts(project.pairs)
    tokenizer = loading.load_tokenizer(str(project.model))
    base = loading.load_base_model(_model_params(project.model, True), "cpu")
    adapted, _ = base_plus_adapter(project.model, project.adapter, True)
    differ = score_labels(base, tokenizer, prompts, BATCH) - score_labels(adapted, tokenizer, prompts, BATCH)
    assert differ.abs().max() > 0.1


def test_cpu_inference_merges_the_adapter_into_the_dequantized_weights(project):
    """What evaluate and nli-predict load on the CPU: plain Linear layers only (no LoRA layer, no 4-bit one), scoring
    as the 4-bit base with the adapter attached does, up to the rounding of W x + B A x."""
    import bitsandbytes as bnb
    from peft.tuners.lora import LoraLayer

    merged = adapters.load_for_inference(_model_params(project.model, True), "cpu", str(project.adapter))
    assert not any(isinstance(m, (LoraLayer, bnb.nn.Linear4bit)) for m in merged.modules())
    adapted, tokenizer = base_plus_adapter(project.model, project.adapter, load_in_4bit=True)
    prompts = _prompts(project.pairs)
    fast, reference = score_labels(merged, tokenizer, prompts, BATCH), score_labels(adapted, tokenizer, prompts, BATCH)
    assert torch.allclose(fast, reference, atol=1e-4), (fast - reference).abs().max()
    assert torch.equal(fast.argmax(1), reference.argmax(1))


def test_predict_probabilities_are_softmax_of_score_labels(project, capsys):
    out = run_predict(capsys, project, "--input", project.root / "pairs.jsonl", "--adapter", project.adapter)
    model, tokenizer = base_plus_adapter(project.model, project.adapter, load_in_4bit=True)  # as params.yaml says
    scores = score_labels(model, tokenizer, _prompts(project.pairs), BATCH)
    assert [{k: r[k] for k in project.pairs[0]} for r in out] == project.pairs  # input keys kept, in order
    assert [r["prediction"] for r in out] == [LABELS[k] for k in scores.argmax(-1).tolist()]
    got = torch.tensor([[r["probabilities"][label] for label in LABELS] for r in out])
    assert torch.allclose(got, torch.softmax(scores, -1), atol=1e-6)  # printed with 6 decimals


def test_three_input_forms_agree(project, capsys, monkeypatch):
    pair = project.pairs[0]
    from_file = run_predict(capsys, project, "--input", project.root / "pairs.jsonl", "--adapter", project.adapter)
    from_args = run_predict(capsys, project, "--premise", pair["premise"], "--hypothesis", pair["hypothesis"],
                            "--adapter", project.adapter)
    stdin = lambda: io.TextIOWrapper(io.BytesIO((project.root / "pairs.jsonl").read_bytes()))  # noqa: E731
    monkeypatch.setattr(sys, "stdin", stdin())
    from_stdin = run_predict(capsys, project, "--adapter", project.adapter)
    assert from_stdin == from_file
    assert from_args == [{k: v for k, v in from_file[0].items() if k not in ("id", "label")}]
    output = project.root / "out.jsonl"
    monkeypatch.setattr(sys, "stdin", stdin())
    assert run_predict(capsys, project, "--input", "-", "--adapter", project.adapter, "--output", output) == []
    assert [json.loads(line) for line in output.read_text().splitlines()] == from_file


ERRORS = {
    # case: (command line after the command, JSONL to write to in.jsonl or None, what the one line must name)
    "missing adapter": (["predict", "--adapter", "no-such-dir", "--input", "in.jsonl"], "{}",
                        "--adapter no-such-dir: no such directory"),
    "adapter without config": (["predict", "--adapter", ".", "--input", "in.jsonl"], "{}",
                               "--adapter .: no adapter_config.json"),
    "missing input file": (["predict", "--input", "nothing.jsonl"], None, "--input nothing.jsonl: no such file"),
    "input is a directory": (["predict", "--input", "."], None, "--input .: is a directory"),
    "bad JSON line": (["predict", "--input", "in.jsonl"], '{"premise": "a", "hypothesis": "b"}\n\n{"premise": "a",\n',
                      "in.jsonl line 3: not valid JSON"),
    "missing key": (["predict", "--input", "in.jsonl"], '{"premise": "a", "hypothesis": "b"}\n{"premise": "a"}\n',
                    "in.jsonl line 2: missing key 'hypothesis'"),
    "not an object": (["predict", "--input", "in.jsonl"], '["a", "b"]\n', "in.jsonl line 1: expected an object"),
    "input not a regular file": (["predict", "--input", "/dev/null"], None, "--input /dev/null: is not a regular file"),
    "empty text in a file": (["predict", "--input", "in.jsonl"], '{"premise": "a", "hypothesis": "b"}\n'
                             '{"premise": " \\t", "hypothesis": "b"}\n',
                             "in.jsonl line 2: premise is empty; fix or remove the line"),
    "empty --hypothesis": (["predict", "--premise", "a", "--hypothesis", ""], None,
                           "--hypothesis is empty; give the hypothesis's text"),
    "export of a missing adapter": (["export", "--adapter", "no-such-dir", "--out", "merged"], None,
                                    "--adapter no-such-dir: no such directory; train one with `dvc repro finetune` (it "
                                    "writes models/adapter) or restore the committed one with `dvc checkout "
                                    "models/adapter` (without --adapter, nli-export exports the base model as "
                                    "evaluate@baseline scores it, not fine-tuned)"),
    "export over a directory": (["export", "--adapter", "no-such-dir", "--out", "."], None, "--out .: already exists"),
}


def _write_input(directory, jsonl):
    if jsonl is not None:
        (directory / "in.jsonl").write_text(jsonl)


@pytest.mark.parametrize("case", ERRORS)
def test_errors_are_one_line(project, tmp_path, monkeypatch, case):
    """In this process: `run_stage` ends with sys.exit(message), which prints it and exits with status 1."""
    args, jsonl, expected = ERRORS[case]
    _write_input(tmp_path, jsonl)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        getattr(cli, args[0])([*args[1:], "--params", str(project.params)])
    message = e.value.code
    assert isinstance(message, str) and "\n" not in message and expected in message, message


@pytest.mark.parametrize("case", ["bad JSON line", "export of a missing adapter"])
def test_error_exits_with_status_1_and_one_stderr_line(project, tmp_path, case):
    """The same as a process: only the message on stderr (no traceback, no log line), and exit status 1."""
    args, jsonl, expected = ERRORS[case]
    _write_input(tmp_path, jsonl)
    result = subprocess.run([sys.executable, "-m", "qlora_nli.cli", *args, "--params", str(project.params)],
                            cwd=tmp_path, env=env(REPO), capture_output=True, text=True)
    assert result.returncode == 1, result.stderr[-2000:]
    assert result.stderr.splitlines() == [result.stderr.strip()] and expected in result.stderr, result.stderr


GOOD_ROW = json.dumps({"id": 0, "premise": "A dog runs.", "hypothesis": "An animal moves.", "label": 0}) + "\n"
# case: (files to write {path: bytes}, options after --adapter, the one line); cwd = tmp_path
EXPORT_FILES = {
    "card is a directory": ({}, ["--card", "."],
                            "--card .: is a directory, not a file; run `dvc repro report` (it writes the model card), "
                            "or pass --no-card"),
    "card not UTF-8": ({"card.md": b"\xff card"}, ["--card", "card.md"],
                       "--card card.md: not UTF-8 text at byte 0; re-save it as UTF-8, or pass --no-card"),
    "data missing": ({}, ["--no-card", "--data", "nodata"],
                     "lm-eval tasks: nodata/test.jsonl: missing; rerun `dvc repro` (or pass --no-lm-eval)"),
    "data row without id": ({"d/test.jsonl": b'{"premise": "a"}\n'}, ["--no-card", "--data", "d"],
                            "lm-eval tasks: d/test.jsonl line 1: missing key 'id'; rerun `dvc repro` (or pass "
                            "--no-lm-eval)"),
    "extra set row with a bad label": ({"d/test.jsonl": GOOD_ROW.encode(),
                                        "d/sets/m.jsonl": GOOD_ROW.replace('"label": 0', '"label": 7').encode()},
                                       ["--no-card", "--data", "d"],
                                       "lm-eval tasks: d/sets/m.jsonl line 1: label = 7 is not a label id (0, 1 or "
                                       "2); rerun `dvc repro` (or pass --no-lm-eval)"),
    "out below a file": ({"afile": b"x"}, ["--no-card", "--no-lm-eval", "--out", "afile/e"],
                         "--out afile/e: {tmp}/afile is a file, not a directory; choose a directory below a directory"),
}


@pytest.mark.parametrize("case", EXPORT_FILES)
def test_export_refuses_an_unusable_given_file_before_the_merge(project, tmp_path, monkeypatch, case):
    files, options, expected = EXPORT_FILES[case]
    for name, data in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(data)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("qlora_nli.infer.export.merged_model", lambda *a, **k: pytest.fail("the merge ran"))
    out = [] if "--out" in options else ["--out", "e"]
    with pytest.raises(SystemExit) as e:
        cli.export(["--params", str(project.params), "--adapter", str(project.adapter), *out, *options])
    assert e.value.code == expected.format(tmp=tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted({name.split("/")[0] for name in files})


@pytest.mark.parametrize("options, expected", [
    (["--card", "card.md"], "--card: a model card describes an adapter; give --adapter too, or leave --card out"),
    (["--data", "d", "--no-lm-eval"], "--data is read by the lm-eval tasks, which --no-lm-eval leaves out; give one "
                                      "of the two"),
    (["--card", "card.md", "--no-card"], "argument --no-card: not allowed with argument --card"),
])
def test_export_options_that_contradict_each_other(tmp_path, monkeypatch, capsys, options, expected):
    monkeypatch.chdir(tmp_path)  # were the check gone, nothing would be exported into the checkout
    monkeypatch.setattr("qlora_nli.infer.export.merged_model", lambda *a, **k: pytest.fail("the merge ran"))
    with pytest.raises(SystemExit) as e:
        cli.export(["--out", "e", *options])
    assert e.value.code == 2
    assert list(tmp_path.iterdir()) == []
    assert capsys.readouterr().err.splitlines()[-1] == f"nli-export: {expected}; see nli-export --help"


@pytest.mark.parametrize("options, expected", [
    (["--output", "."], "--output .: is a directory; give the path of a file, below a directory"),
    (["--output", "afile/out.jsonl"], "--output afile/out.jsonl: {tmp}/afile is a file, not a directory; give the "
                                      "path of a file, below a directory"),
    # a param's message names where the command took it from: the option given, else the --params file
    (["--model", "./no-model"], "--model: the local directory './no-model' does not exist; fix the path, or use a Hub "
                                "id (owner/name), a local model directory, or one of embedded:smollm2-135m-instruct"),
    (["--params", "no-model.yaml"], "no-model.yaml model.name: the local directory './no-model' does not exist; fix "
                                    "the path, or use a Hub id (owner/name), a local model directory, or one of "
                                    "embedded:smollm2-135m-instruct"),
    (["--params", "."], ".: is a directory, not a file; give the params YAML file (params.yaml)"),
])
def test_predict_refuses_an_unusable_option_before_the_model_loads(project, tmp_path, monkeypatch, options, expected):
    (tmp_path / "afile").write_text("x")
    params = yaml.safe_load(project.params.read_text())
    params["model"]["name"] = "./no-model"
    (tmp_path / "no-model.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(adapters, "load_for_inference", lambda *a, **k: pytest.fail("the model was loaded"))
    with pytest.raises(SystemExit) as e:
        cli.predict(["--params", str(project.params), "--premise", "a", "--hypothesis", "b", *options])
    assert e.value.code == expected.format(tmp=tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "no-model.yaml"]


def test_adapter_of_another_architecture_is_one_line(project, tmp_path):
    """The Phi model shares the Llama adapter's attention layer names and shapes, so peft would attach those and
    skip the MLP ones without complaint."""
    other = make_tiny_model("phi", tmp_path / "phi")
    with pytest.raises(SystemExit) as e:
        cli.predict(["--params", str(project.params), "--model", str(other), "--adapter", str(project.adapter),
                     "--premise", "a dog runs.", "--hypothesis", "a dog."])
    message = e.value.code
    assert "\n" not in message and "does not fit the base model" in message and "match no layer" in message, message


# Run in a fresh interpreter: the merged model must load with transformers alone, peft never imported.
LOAD_WITHOUT_PEFT = """
import json, sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from qlora_nli.infer.scoring import score_labels
model, tokenizer = AutoModelForCausalLM.from_pretrained(sys.argv[1]), AutoTokenizer.from_pretrained(sys.argv[1])
scores = score_labels(model.eval(), tokenizer, json.loads(sys.argv[2]), int(sys.argv[3]))
assert "peft" not in sys.modules, "loading the export imported peft"
print(json.dumps({"dtype": str(model.dtype), "scores": scores.tolist()}))
"""


def test_export_loads_without_peft_and_predicts_like_evaluate(tiny_model_dir, tmp_path):
    """The default export is the model `evaluate` measures: the adapter on the 4-bit NF4 base (kept 4-bit here, as on
    a GPU, and unmerged), scored after plain transformers loads the export in a fresh interpreter."""
    adapter = make_adapter(tiny_model_dir, tmp_path / "adapter")
    out = export_merged(_model_params(tiny_model_dir, load_in_4bit=True), adapter, tmp_path / "merged", "float32")
    prompts = _prompts(made_up_pairs(9, 12))
    result = subprocess.run([sys.executable, "-c", LOAD_WITHOUT_PEFT, str(out), json.dumps(prompts), str(BATCH)],
                            env=env(REPO), capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    exported = json.loads(result.stdout.splitlines()[-1])
    assert exported["dtype"] == "torch.float32"
    merged = torch.tensor(exported["scores"])

    model, tokenizer = base_plus_adapter(tiny_model_dir, adapter, load_in_4bit=True)
    reference = score_labels(model, tokenizer, prompts, BATCH)
    # Same float32 numbers in another order: x @ (Wq + s B A)^T against x @ Wq^T + s (x @ A^T) @ B^T, with Wq the
    # dequantized NF4 weight; the differences are float32 rounding, far below the label log-likelihoods' gaps.
    assert torch.allclose(merged, reference, atol=1e-4), (merged - reference).abs().max()
    assert merged.argmax(-1).tolist() == reference.argmax(-1).tolist()
    assert json.loads((out / "EXPORT.json").read_text())["merge_into"] == "trained"


def test_export_into_the_original_weights_is_another_model(project, tmp_path):
    """--merge-into original adds the adapter to the unquantized base: it equals base (not quantized) + adapter and
    differs from what evaluate measured by far more than rounding (the reason it is not the default)."""
    from transformers import AutoModelForCausalLM

    params = _model_params(project.model, load_in_4bit=True)
    out = export_merged(params, project.adapter, tmp_path / "original", "float32", merge_into="original")
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    prompts = _prompts(made_up_pairs(9, 12))
    model, tokenizer = base_plus_adapter(project.model, project.adapter, load_in_4bit=False)
    got, unquantized = score_labels(merged, tokenizer, prompts, BATCH), score_labels(model, tokenizer, prompts, BATCH)
    assert torch.allclose(got, unquantized, atol=1e-4), (got - unquantized).abs().max()
    model, tokenizer = base_plus_adapter(project.model, project.adapter, load_in_4bit=True)
    trained = score_labels(model, tokenizer, prompts, BATCH)
    assert (got - trained).abs().max() > 1e-2
    assert "not the weights the adapter was trained against" in json.loads((out / "EXPORT.json").read_text())[
        "merged_into"]


# Rounding every weight to float16 (relative step 2**-11) or bfloat16 (2**-8, 8x coarser) moves the label
# log-likelihoods (sums over several answer tokens) by a small multiple of the step; the tolerances leave several
# times the deviation seen on the tiny models (docs/predict.md) and stay far below their top-two label gaps.
@pytest.mark.parametrize("dtype, atol", [("float16", 5e-3), ("bfloat16", 5e-2)])
def test_export_in_half_precision(project, tmp_path, dtype, atol):
    """The saved weights are in `dtype`; the scores move by the rounding of the weights only (computed here in
    float32, so that the check isolates the export from half-precision arithmetic on the CPU)."""
    from transformers import AutoModelForCausalLM

    out = export_merged(_model_params(project.model, load_in_4bit=True), project.adapter, tmp_path / dtype, dtype)
    assert AutoModelForCausalLM.from_pretrained(out).dtype == getattr(torch, dtype)
    assert json.loads((out / "EXPORT.json").read_text())["dtype"] == dtype
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    model, tokenizer = base_plus_adapter(project.model, project.adapter, load_in_4bit=True)
    prompts = _prompts(made_up_pairs(9, 12))
    got, reference = score_labels(merged, tokenizer, prompts, BATCH), score_labels(model, tokenizer, prompts, BATCH)
    assert torch.allclose(got, reference, atol=atol), (got - reference).abs().max()
    top2 = reference.topk(2, dim=-1).values
    clear = (top2[:, 0] - top2[:, 1]) > 2 * atol  # a label can only flip where the reference's margin is smaller
    assert clear.any() and (got.argmax(-1) == reference.argmax(-1))[clear].all()


def test_gguf_export_read_back_by_transformers_predicts_like_evaluate(project, tmp_path):
    """The GGUF file, read by transformers' own GGUF loader (model and tokenizer from the file alone), scores like
    the 4-bit base + adapter: same tokens, same labels, F32 tensors so only float32 rounding differs."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = export_merged(_model_params(project.model, load_in_4bit=True), project.adapter, tmp_path / "g", "float32",
                        gguf=True)
    folder, name = (out / "gguf/model.gguf").parent, "model.gguf"
    gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    gguf_tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model, tokenizer = base_plus_adapter(project.model, project.adapter, load_in_4bit=True)
    prompts = _prompts(made_up_pairs(12, 13))
    assert [gguf_tokenizer(p).input_ids for p in prompts] == [tokenizer(p).input_ids for p in prompts]
    assert gguf_tokenizer.eos_token == tokenizer.eos_token and gguf_tokenizer.pad_token == tokenizer.pad_token
    got, reference = score_labels(gguf_model, gguf_tokenizer, prompts, BATCH), score_labels(model, tokenizer, prompts,
                                                                                              BATCH)
    assert torch.allclose(got, reference, atol=1e-4), (got - reference).abs().max()
    assert got.argmax(-1).tolist() == reference.argmax(-1).tolist()
    assert json.loads((out / "EXPORT.json").read_text())["gguf"]["tensor_types"] == {"F32": 21}  # 2 blocks x 9 + 3


def test_export_without_adapter_is_the_base_evaluate_scores(project, tmp_path):
    """No --adapter: the base as evaluate@baseline scores it (NF4, dequantized), for the harness's baseline."""
    from transformers import AutoModelForCausalLM

    out = export_merged(_model_params(project.model, load_in_4bit=True), None, tmp_path / "base", "float32")
    got = score_labels(AutoModelForCausalLM.from_pretrained(out).eval(), loading.load_tokenizer(str(out)),
                       _prompts(made_up_pairs(6, 14)), BATCH)
    base = loading.load_base_model(_model_params(project.model, load_in_4bit=True), "cpu")  # 4-bit layers kept
    reference = score_labels(base, loading.load_tokenizer(str(project.model)), _prompts(made_up_pairs(6, 14)), BATCH)
    assert torch.allclose(got, reference, atol=1e-4), (got - reference).abs().max()
    assert json.loads((out / "EXPORT.json").read_text())["adapter"] is None and not (out / "README.md").exists()


def test_gguf_half_precision_keeps_norms_in_f32(project, tmp_path):
    import gguf

    out = export_merged(_model_params(project.model, load_in_4bit=True), project.adapter, tmp_path / "g", "float16",
                        gguf=True)
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(out / "gguf/model.gguf").tensors}
    assert {n for n, k in types.items() if k == "F32"} == {"blk.0.attn_norm.weight", "blk.0.ffn_norm.weight",
                                                           "blk.1.attn_norm.weight", "blk.1.ffn_norm.weight",
                                                           "output_norm.weight"}
    assert types["blk.0.attn_q.weight"] == "F16" and types["token_embd.weight"] == "F16"


def test_gguf_export_of_another_architecture_is_one_line_before_merging(tmp_path):
    from qlora_nli.runtime.errors import ArtifactError

    phi = make_tiny_model("phi", tmp_path / "phi")
    adapter = make_adapter(phi, tmp_path / "adapter")
    with pytest.raises(ArtifactError, match=r"--gguf: the base model is 'phi'.*convert_hf_to_gguf") as e:
        export_merged(_model_params(phi, load_in_4bit=True), adapter, tmp_path / "out", "float32", gguf=True)
    assert "\n" not in str(e.value) and not (tmp_path / "out").exists()


def test_export_carries_the_model_card_of_its_adapter_only(project, tmp_path):
    import hashlib

    from qlora_nli.runtime.errors import ArtifactError

    sha = hashlib.sha256((project.adapter / "adapter_model.safetensors").read_bytes()).hexdigest()
    card = tmp_path / "card.md"
    card.write_text(f"---\nlibrary_name: peft\nadapter_sha256: {sha}\n---\n# made-up card\n")
    out = export_merged(_model_params(project.model, load_in_4bit=True), project.adapter, tmp_path / "e", card=card)
    assert (out / "README.md").read_text() == card.read_text()
    card.write_text(f"---\nadapter_sha256: {'0' * 64}\n---\n")
    with pytest.raises(ArtifactError, match="describes another adapter"):
        export_merged(_model_params(project.model, load_in_4bit=True), project.adapter, tmp_path / "e2", card=card)
    assert not (tmp_path / "e2").exists()


def test_lm_eval_task_renders_our_prompt(tmp_path):
    """The Jinja template lm-eval renders gives format_prompt's text, braces and all, for the default template and a
    template with literal braces; the task names our three answers after a space."""
    import jinja2

    from qlora_nli.infer import lm_eval_tasks

    row = {"premise": "  A dog {runs}. ", "hypothesis": "A dog moves.\n"}
    for template in (TEMPLATE, "{{literal}} P: {premise} | H: {hypothesis} {{x}}"):
        rendered = jinja2.Template(lm_eval_tasks.jinja_template(template)).render(**row)
        assert rendered == format_prompt(template, row)
    data = tmp_path / "test.jsonl"
    data.write_text('{"premise": "a", "hypothesis": "b", "label": 0}\n')
    names = lm_eval_tasks.write_tasks(tmp_path / "tasks", {"test": data}, TEMPLATE)
    spec = yaml.safe_load((tmp_path / "tasks/qlora_nli_test.yaml").read_text())
    assert names == ["qlora_nli_test"] and spec["doc_to_choice"] == ["entailment", "neutral", "contradiction"]
    assert spec["target_delimiter"] == " " and spec["output_type"] == "multiple_choice"
    assert spec["dataset_kwargs"]["data_files"]["test"] == str(data.resolve())


def test_console_scripts_resolve_to_the_cli():
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert set(scripts) == {"nli-predict", "nli-export"}
    for target in scripts.values():
        module, name = target.split(":")
        entry = getattr(importlib.import_module(module), name)
        with pytest.raises(SystemExit) as e:
            entry(["--help"])
        assert e.value.code == 0
