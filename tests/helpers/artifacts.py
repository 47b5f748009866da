"""Made-up artifacts of the stages before failure_cases and report (predictions, metrics, probes, the adapter, the
data manifest) in a work directory, and those two stages run as DVC runs them: `python -m stages.<name>` in it."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import yaml
from tiny import TINY_SAFETENSORS

from qlora_nli.analysis.stats import classification_metrics

REPO = Path(__file__).resolve().parents[2]

# (id, premise, hypothesis, gold, baseline pred, baseline margin, fine-tuned pred, fine-tuned margin); made up, not SNLI
PAIRS = [
    (1, "A chef slices onions in a kitchen.", "A chef is not cooking.", 2, 0, 1.0, 2, 3.0),          # corrected
    (2, "Two dogs run on a beach.", "Two dogs run.", 0, 1, 2.0, 0, 0.5),                             # corrected
    (3, "A boy paints a fence.", "The boy is painting for money.", 1, 2, 0.2, 1, 2.5),               # corrected
    (4, "A woman jogs in a park.", "Nobody is jogging.", 2, 0, 1.5, 1, 2.0),                         # not corrected
    (5, "A man plays a violin.", "A man plays a violin for his wife at a wedding.", 1, 0, 1.0, 0, 3.5),  # not corrected
    (6, "Kids swim in a lake.", "Kids swim in a lake.", 0, 0, 2.0, 2, 1.0),                          # regressed
    (7, "A cat sleeps on a sofa.", "An animal rests.", 0, 0, 1.0, 0, 2.0),                           # both right
    (8, "A girl climbs a tree.", "A girl never climbs.", 2, 2, 0.5, 2, 3.0),                         # both right
    (9, "A band plays music outside.", "A band plays a concert for charity tonight.", 1, 1, 0.3, 1, 1.0),
    (10, "An old man feeds pigeons.", "A man feeds birds.", 0, 0, 1.2, 0, 2.2),
    (11, "A baker holds bread.", "The baker isn't holding anything.", 2, 2, 0.8, 2, 2.8),
    (12, "People wait for a bus.", "People wait.", 0, 0, 0.9, 0, 1.9),
]


ADAPTER_BYTES = TINY_SAFETENSORS  # readable weights (the stage checks them); the card names their sha256
ADAPTER_SHA256 = "044fd17f1dff82758f4db33405b2e8f049095a199eb0891ce476e009302d045f"  # sha256sum of ADAPTER_BYTES


def scores_for(pred, margin):
    scores = [-4.0, -4.0, -4.0]
    scores[pred] += margin
    return scores


def softmax(scores):
    exp = [math.exp(s) for s in scores]
    return [e / sum(exp) for e in exp]


def prediction_rows(which):
    rows = []
    for i, premise, hypothesis, gold, bp, bm, tp, tm in PAIRS:
        pred, margin = (bp, bm) if which == "baseline" else (tp, tm)
        rows.append({"id": i, "premise": premise, "hypothesis": hypothesis, "label": gold, "pred": pred,
                     "scores": scores_for(pred, margin), "correct": pred == gold, "generation": None})
    return rows


# Made-up probe answers (pair id -> predicted label id). Hypothesis only, fine-tuned: right on corrected pairs 1 and 3
# (gold 2 and 1), wrong on 2; 0 elsewhere. The baseline answers 0 from every hypothesis. Tautology: both models answer
# as on the original pair, except that the fine-tuned model flips pair 7 (right, entailment) to neutral.
HYPOTHESIS_ONLY = {"baseline": {i: 0 for i in range(1, 13)},
                   "finetuned": {**{i: 0 for i in range(1, 13)}, 1: 2, 2: 1, 3: 1}}
CALIBRATION = {"n": 12, "n_bins": 10, "ece": 0.2345, "ece_ci95": [0.1234, 0.4567], "mean_confidence": 0.7,
               "mean_confidence_right": 0.75, "mean_confidence_wrong": 0.6, "temperature": 1.8765, "n_val": 6,
               "ece_after_temperature": 0.0789, "ece_after_temperature_ci95": [0.0456, 0.3012]}


def probe_rows(which):
    rows = []
    for index, (i, premise, hypothesis, gold, bp, _, tp, _) in enumerate(PAIRS):
        full = bp if which == "baseline" else tp
        base = {"test_index": index, "id": i, "premise": premise, "label": gold, "scores": None, "generation": None}
        alone = HYPOTHESIS_ONLY[which][i]
        rows.append({"probe": "hypothesis_only", **base, "hypothesis": hypothesis, "pred": alone,
                     "correct": alone == gold})
        taut = 1 if which == "finetuned" and i == 7 else full
        rows.append({"probe": "tautology", **base, "hypothesis": hypothesis + " and true is true", "pred": taut,
                     "correct": taut == gold})
    return rows


def train_metrics(gpu=False):
    resources = {"wall_seconds": 130.2, "samples": 260, "process_rss_peak_mb": 2345.6, "process_rss_mean_mb": 2100.4,
                 "cpu_percent_mean": 71.3, "cpu_percent_peak": 98.8, "gpu_name": None,
                 "gpu_memory_used_peak_mb": None, "gpu_memory_used_mean_mb": None, "gpu_process_memory_peak_mb": None,
                 "torch_max_memory_allocated_mb": None, "gpu_utilization_mean_percent": None,
                 "gpu_utilization_peak_percent": None,
                 "gpu_unavailable_reason": "no CUDA GPU visible to torch (CPU run)",
                 "disk_outputs_mb": 18.7}
    if gpu:
        resources.update({"gpu_name": "Made-up GPU 80GB", "gpu_memory_used_peak_mb": 5123.4,
                          "gpu_memory_used_mean_mb": 4000.2, "torch_max_memory_allocated_mb": 3456.7,
                          "gpu_utilization_mean_percent": 55.5, "gpu_utilization_peak_percent": 97.0,
                          "gpu_unavailable_reason": None})
    return {"model": "made-up/tiny-model", "device": "cpu", "compute_dtype": "float32", "load_in_4bit": True,
            "epochs": 2, "train_examples": 1000,
            "time": {"total_seconds": 125.44, "per_epoch_seconds": [60.12, 62.87]},
            "train_loss_per_epoch": [0.9123, 0.5012], "val_loss_per_epoch": [0.8123, 0.6543],
            "val_accuracy_per_epoch": [0.55, 0.71],
            "parameters": {"total": 134515008, "trainable": 4884480, "trainable_percent": 3.6312,
                           "numel_as_stored": 106137600},
            "adapter_bytes": 19580000, "throughput": {"examples_per_second": 15.9, "tokens_per_second": 1020.5},
            "resources": resources}


def write(path, obj):
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in obj))
    else:
        path.write_text(json.dumps(obj, indent=2))


def make_workdir(tmp_path):
    """`tmp_path` holding every input of failure_cases and report, made up from PAIRS; returned."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["failure_cases"]["n_examples"] = 2
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    for which in ("baseline", "finetuned"):
        rows = prediction_rows(which)
        # the fine-tuned file in another order: the stage must join by id, not by line
        write(tmp_path / f"predictions/{which}.jsonl", rows if which == "baseline" else rows[::-1])
        metrics = classification_metrics([r["label"] for r in rows], [r["pred"] for r in rows])
        metrics.update({"model": "made-up/tiny-model", "method": "score",
                        "adapter": None if which == "baseline" else "models/adapter",
                        "eval_seconds": 12.3 if which == "baseline" else 14.6, "pairs_per_second": 0.98})
        metrics["calibration"] = CALIBRATION if which == "finetuned" else {**CALIBRATION, "ece": 0.3456}
        probes = probe_rows(which)
        metrics["probes"] = {}
        for name in ("hypothesis_only", "tautology"):
            mine = [(r, row) for r, row in zip([r for r in probes if r["probe"] == name], rows)]
            metrics["probes"][name] = {
                "n": 12, "accuracy": round(sum(r["correct"] for r, _ in mine) / 12, 4),
                "original_right": sum(row["correct"] for _, row in mine),
                "flipped_when_original_right": sum(row["correct"] and not r["correct"] for r, row in mine)}
        write(tmp_path / f"metrics/{which}.json", metrics)
        write(tmp_path / f"evidence/{which}/probes.jsonl", probes)
        write(tmp_path / f"metrics/sets/{which}/ood.json",
              {"set": "ood", "n": 30, "accuracy": 0.4 if which == "baseline" else 0.5667,
               "accuracy_ci95": [0.2459, 0.5768] if which == "baseline" else [0.3920, 0.7262]})
    write(tmp_path / "metrics/train.json", train_metrics())
    write(tmp_path / "models/adapter/adapter_config.json", {"peft_type": "LORA"})
    (tmp_path / "models/adapter/adapter_model.safetensors").write_bytes(ADAPTER_BYTES)
    write(tmp_path / "data/manifest.json", {
        "source": "made-up/snli-like", "read_from": "/made/up/mirror",
        "raw_sha256": {"train": "a" * 64, "validation": "b" * 64, "test": "c" * 64},
        "counts": {"train": {"raw": 5000, "unlabeled_dropped": 7, "sampled": 1000},
                   "validation": {"raw": 900, "unlabeled_dropped": 2, "sampled": 100},
                   "test": {"raw": 900, "unlabeled_dropped": 3, "sampled": 12}},
        "extra_sets": {"ood": {"source": "made-up/ood", "split": "dev_matched"}},
        "sampling": "evenly spaced"})
    return tmp_path


def run_stage(name, cwd):
    """The stage as dvc.yaml runs it, `python -m stages.<name>`, in `cwd`, with this checkout's code."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", f"stages.{name}"], cwd=cwd, env=env, capture_output=True, text=True)


def run_ok(name, cwd):
    proc = run_stage(name, cwd)
    assert proc.returncode == 0, proc.stderr
    return proc


def read(path):
    return json.loads(Path(path).read_text())


