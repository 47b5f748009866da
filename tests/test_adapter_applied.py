"""evaluate@finetuned scores with the trained adapter: its scores differ from the baseline's on the same pairs and
equal those of the base model with the adapter loaded by hand (peft directly), scored with qlora_nli.scoring."""
import json

import pytest
import torch
import yaml

from pipeline import make_project, run
from qlora_nli import modeling
from qlora_nli.prompts import format_prompt
from qlora_nli.scoring import score_labels


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.slow
def test_finetuned_evaluation_applies_the_adapter(tmp_path):
    from peft import PeftModel

    # a larger step than the default, so that one short epoch moves the scores well beyond their rounding
    root = make_project(tmp_path / "project", overrides={"train.epochs": 1, "train.learning_rate": 0.01})
    for script in (["stages/prepare.py"], ["stages/finetune.py"], ["stages/evaluate.py", "baseline"],
                   ["stages/evaluate.py", "finetuned"]):
        run(["python", *script], root)
    baseline, finetuned = (read_jsonl(root / f"predictions/{name}.jsonl") for name in ("baseline", "finetuned"))
    assert [(r["id"], r["premise"], r["hypothesis"]) for r in baseline] == [
        (r["id"], r["premise"], r["hypothesis"]) for r in finetuned]
    base_scores, tuned_scores = (torch.tensor([r["scores"] for r in rows]) for rows in (baseline, finetuned))
    assert (tuned_scores - base_scores).abs().max() > 1e-2, "fine-tuned scores equal the baseline's"

    params = yaml.safe_load((root / "params.yaml").read_text())
    tokenizer = modeling.load_tokenizer(params["model"]["name"])
    prompts = [format_prompt(params["prompt"]["template"], r) for r in read_jsonl(root / "data/test.jsonl")]
    model = modeling.load_base_model(params["model"], "cpu")
    plain = score_labels(model, tokenizer, prompts, params["evaluate"]["batch_size"])
    adapted = PeftModel.from_pretrained(model, root / "models/adapter").eval()
    by_hand = score_labels(adapted, tokenizer, prompts, params["evaluate"]["batch_size"])
    # the predictions file keeps 5 decimals
    assert torch.allclose(by_hand, tuned_scores, atol=1e-4), (by_hand - tuned_scores).abs().max()
    assert torch.allclose(plain, base_scores, atol=1e-4), (plain - base_scores).abs().max()
