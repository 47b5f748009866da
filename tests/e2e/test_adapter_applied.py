"""evaluate@finetuned scores with the adapter, and finetune's validation figures belong to the adapter it saved.

Fast: evaluate@baseline/@finetuned and finetune run in this process on a tiny model; the expected scores come from
plain transformers with the LoRA weights merged by hand (W + B A alpha / r) and one unpadded sequence per label.
Slow: the whole chain through the stage scripts, against the adapter loaded by hand with peft."""
import json

import pytest
import torch
import yaml
from pipeline import REPO, make_project, run
from transformers import AutoTokenizer

from qlora_nli.infer.scoring import score_labels
from qlora_nli.model import loading
from qlora_nli.prompts import format_prompt


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.slow
def test_finetuned_evaluation_applies_the_adapter(tmp_path):
    from peft import PeftModel

    # a larger step than the default, so that one short epoch moves the scores well beyond their rounding
    root = make_project(tmp_path / "project", overrides={"train.epochs": 1, "train.learning_rate": 0.01})
    for script in (["-m", "stages.prepare"], ["-m", "stages.finetune"], ["-m", "stages.evaluate", "baseline"],
                   ["-m", "stages.evaluate", "finetuned"]):
        run(["python", *script], root)
    baseline, finetuned = (read_jsonl(root / f"predictions/{name}.jsonl") for name in ("baseline", "finetuned"))
    assert [(r["id"], r["premise"], r["hypothesis"]) for r in baseline] == [
        (r["id"], r["premise"], r["hypothesis"]) for r in finetuned]
    base_scores, tuned_scores = (torch.tensor([r["scores"] for r in rows]) for rows in (baseline, finetuned))
    assert (tuned_scores - base_scores).abs().max() > 1e-2, "fine-tuned scores equal the baseline's"

    params = yaml.safe_load((root / "params.yaml").read_text())
    tokenizer = loading.load_tokenizer(params["model"]["name"])
    prompts = [format_prompt(params["prompt"]["template"], r) for r in read_jsonl(root / "data/test.jsonl")]
    model = loading.load_base_model(params["model"], "cpu")
    plain = score_labels(model, tokenizer, prompts, params["evaluate"]["batch_size"])
    adapted = PeftModel.from_pretrained(model, root / "models/adapter").eval()
    by_hand = score_labels(adapted, tokenizer, prompts, params["evaluate"]["batch_size"])
    # the predictions file keeps 5 decimals
    assert torch.allclose(by_hand, tuned_scores, atol=1e-4), (by_hand - tuned_scores).abs().max()
    assert torch.allclose(plain, base_scores, atol=1e-4), (plain - base_scores).abs().max()


# ---- fast: the stages run in this process on a tiny model; the expected scores come from plain transformers ----

LABEL_WORDS = ("entailment", "neutral", "contradiction")  # written here: the reference does not import the project's
TEMPLATE = "Premise: {premise}\nHypothesis: {hypothesis}\nRelation:"  # short, so the test stays fast


def _write_rows(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _project(root, model_dir, **train):
    """params.yaml and data/ for running stages in `root`: the tiny model unquantized in float32 on the CPU."""
    from tiny import made_up_pairs

    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["data"]["extra_sets"] = {}
    params["model"].update(name=str(model_dir), load_in_4bit=False, compute_dtype="float32")
    params["compute"]["device"] = "cpu"
    params["prompt"]["template"] = TEMPLATE
    params["evaluate"].update(batch_size=4, probes=["hypothesis_only"])
    params["lora"]["layers"] = "all"
    params["train"].update(epochs=2, batch_size=8, micro_batch_tokens=256, **train)
    params["compute"]["num_threads"] = 1
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    splits = {"train": made_up_pairs(24, 1), "test": made_up_pairs(12, 3)}
    # validation: 15, 10 and 5 pairs of the three labels, so that models answering one label score by that label
    # (balanced labels would give any constant answer, argmax or argmin, the same 1/3)
    by_label = [[r for r in made_up_pairs(45, 2) if r["label"] == k] for k in range(3)]
    splits["validation"] = by_label[0][:15] + by_label[1][:10] + by_label[2][:5]
    for first_id, (name, rows) in zip((0, 100, 200), splits.items()):
        _write_rows(root / f"data/{name}.jsonl", [{"id": first_id + i, **r} for i, r in enumerate(rows)])
    return params


def _merged_by_hand(model_dir, adapter_dir):
    """The base model loaded by plain transformers with every LoRA pair merged by hand: W + B @ A * alpha / r."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    if adapter_dir is None:
        return model
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert not config.get("use_rslora") and not config.get("use_dora")  # else the scale below would be wrong
    scale = config["lora_alpha"] / config["r"]
    weights = load_file(adapter_dir / "adapter_model.safetensors")
    modules = dict(model.named_modules())
    merged = 0
    for key, a in weights.items():
        if ".lora_A." not in key:
            continue
        b = weights[key.replace(".lora_A.", ".lora_B.")]
        name = key.split(".lora_A.")[0].removeprefix("base_model.model.")
        with torch.no_grad():
            modules[name].weight += b.float() @ a.float() * scale
        merged += 1
    assert merged > 0
    return model


@torch.no_grad()
def _reference_scores(model, tokenizer, rows):
    """Sum of the log-probabilities of the label word's tokens after the prompt: one unpadded sequence per
    (pair, label), full logits, no shared prefixes."""
    out = []
    for r in rows:
        prompt = tokenizer(TEMPLATE.format(premise=r["premise"].strip(), hypothesis=r["hypothesis"].strip())).input_ids
        row = []
        for word in LABEL_WORDS:
            answer = tokenizer(" " + word, add_special_tokens=False).input_ids
            logprobs = torch.log_softmax(model(input_ids=torch.tensor([prompt + answer])).logits[0].float(), -1)
            row.append(sum(logprobs[len(prompt) - 1 + j, t].item() for j, t in enumerate(answer)))
        out.append(row)
    return torch.tensor(out)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    from tiny import make_tiny_model

    # initialised larger than usual, so that the label scores are far apart and argmax and argmin differ
    return make_tiny_model("llama", tmp_path_factory.mktemp("tiny-llama"), initializer_range=0.2)


def test_finetuned_evaluation_scores_as_the_base_with_the_adapter_merged_by_hand(llama_dir, tmp_path, monkeypatch):
    """evaluate@finetuned's scores equal the base model's with W + B A alpha / r merged by hand, and evaluate@baseline's
    the plain base model's; the two differ by far more than the rounding."""
    from tiny import make_adapter

    from stages import evaluate

    monkeypatch.chdir(tmp_path)
    _project(tmp_path, llama_dir)
    make_adapter(llama_dir, tmp_path / "models/adapter")  # random B: a known, nonzero change
    for name in ("baseline", "finetuned"):
        evaluate.main(name)
    tokenizer = AutoTokenizer.from_pretrained(llama_dir)
    test = read_jsonl(tmp_path / "data/test.jsonl")
    for name, adapter in (("baseline", None), ("finetuned", tmp_path / "models/adapter")):
        written = read_jsonl(tmp_path / f"predictions/{name}.jsonl")
        assert [r["id"] for r in written] == [r["id"] for r in test]
        expected = _reference_scores(_merged_by_hand(llama_dir, adapter), tokenizer, test)
        got = torch.tensor([r["scores"] for r in written])
        assert torch.allclose(got, expected, atol=1e-4), (name, (got - expected).abs().max())
    base, tuned = (torch.tensor([r["scores"] for r in read_jsonl(tmp_path / f"predictions/{n}.jsonl")])
                   for n in ("baseline", "finetuned"))
    assert (tuned - base).abs().max() > 0.1, "the adapter changed no score"


def test_finetune_validation_accuracy_and_loss_belong_to_each_epochs_adapter(llama_dir, tmp_path, monkeypatch):
    """metrics/train.json's and dvclive's per-epoch validation accuracy (argmax over the label log-likelihoods) and loss
    (mean NLL per answer token) equal those of that epoch's saved adapter, scored here with plain transformers."""
    from stages import finetune

    monkeypatch.chdir(tmp_path)
    _project(tmp_path, llama_dir, learning_rate=0.01, warmup_ratio=0.0)
    finetune.main()
    tokenizer = AutoTokenizer.from_pretrained(llama_dir)
    val = read_jsonl(tmp_path / "data/validation.jsonl")
    labels = torch.tensor([r["label"] for r in val])
    answer_tokens = torch.tensor([len(tokenizer(" " + LABEL_WORDS[k], add_special_tokens=False).input_ids)
                                  for k in labels.tolist()])
    metrics = json.loads((tmp_path / "metrics/train.json").read_text())
    live = json.loads((tmp_path / "dvclive/metrics.json").read_text())["epoch"]
    assert metrics["epochs"] == 2
    references = []
    for epoch in (1, 2):
        adapter = tmp_path / ("models/adapter" if epoch == 2 else f"checkpoints/epoch-{epoch}")
        scores = _reference_scores(_merged_by_hand(llama_dir, adapter), tokenizer, val)
        accuracy = (scores.argmax(1) == labels).float().mean().item()
        loss = (-scores[torch.arange(len(val)), labels].sum() / answer_tokens.sum()).item()
        # preconditions that make the checks below discriminate
        assert accuracy != (scores.argmin(1) == labels).float().mean().item(), "argmin would score the same"
        references.append((accuracy, loss))
        assert metrics["val_accuracy_per_epoch"][epoch - 1] == pytest.approx(accuracy, abs=1e-4), epoch
        assert metrics["val_loss_per_epoch"][epoch - 1] == pytest.approx(loss, abs=1e-4), epoch
    assert abs(references[0][1] - references[1][1]) > 1e-2, "the epochs' adapters should give different losses"
    assert (live["val_accuracy"], live["val_loss"]) == pytest.approx(references[1], abs=1e-4)  # the last epoch
    assert (tmp_path / "checkpoints/epoch-2/adapter_model.safetensors").read_bytes() == (
        tmp_path / "models/adapter/adapter_model.safetensors").read_bytes()
