"""lm-evaluation-harness, the standard evaluator, agrees with the pipeline on an exported model: the task files that
`nli-export` writes make `lm_eval --model hf` compute our label scores and so our accuracy (tiny model, made-up
pairs). Slow: lm-eval runs as a command, as docs/predict.md prints it."""
import glob
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny import (
    base_plus_adapter,
    made_up_pairs,
    make_adapter,
    make_tiny_model,
    model_params,
)

from qlora_nli.infer.export import export_merged
from qlora_nli.infer.scoring import score_labels
from tiny import TEMPLATE
from qlora_nli.prompts import format_prompt

pytestmark = pytest.mark.slow


def test_lm_eval_reproduces_our_scores_and_accuracy(tmp_path):
    model_dir = make_tiny_model("llama", tmp_path / "model")
    adapter = make_adapter(model_dir, tmp_path / "adapter")
    pairs = made_up_pairs(15, 21)
    data = tmp_path / "data"
    (data / "sets").mkdir(parents=True)
    (data / "test.jsonl").write_text("".join(json.dumps({"id": i, **r}) + "\n" for i, r in enumerate(pairs)))
    out = export_merged(model_params(model_dir, load_in_4bit=True), adapter, tmp_path / "exported",
                        task_sets={"test": data / "test.jsonl"}, template=TEMPLATE)

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_CACHE": str(tmp_path / "datasets"),
           "TOKENIZERS_PARALLELISM": "false"}
    command = [Path(sys.executable).parent / "lm_eval", "--model", "hf", "--model_args",
               f"pretrained={out},dtype=float32", "--tasks", "qlora_nli_test", "--include_path", str(out / "lm_eval"),
               "--device", "cpu", "--batch_size", "4", "--log_samples", "--output_path", str(tmp_path / "lm")]
    result = subprocess.run([str(c) for c in command], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads(Path(glob.glob(str(tmp_path / "lm/**/results_*.json"), recursive=True)[0]).read_text())
    samples = [json.loads(line) for line in
               Path(glob.glob(str(tmp_path / "lm/**/samples_qlora_nli_test_*.jsonl"), recursive=True)[0]).open()]

    model, tokenizer = base_plus_adapter(model_dir, adapter, load_in_4bit=True)  # what evaluate scores
    ours = score_labels(model, tokenizer, [format_prompt(TEMPLATE, r) for r in pairs], 4)
    # the samples file writes each (log-likelihood, is_greedy) as strings
    theirs = torch.tensor([[float(choice[0]) for choice in s["filtered_resps"]] for s in
                           sorted(samples, key=lambda s: s["doc_id"])])
    # Both sum float32 log-probabilities of the same answer tokens after the same prompt tokens; the batching and
    # padding differ, so the sums agree to float32 rounding, far below the label scores' gaps.
    assert torch.allclose(theirs, ours.to(theirs.dtype), atol=1e-3), (theirs - ours).abs().max()
    our_accuracy = sum(int(s.argmax()) == r["label"] for s, r in zip(ours, pairs)) / len(pairs)
    assert results["results"]["qlora_nli_test"]["acc,none"] == pytest.approx(our_accuracy, abs=1e-9)
