"""The adapter's model card (README.md on the Hugging Face Hub), written from the run's own artifacts.

The YAML header is the Hub's model-card metadata (`base_model`, `library_name: peft`, `datasets`, `model-index` with
the measured accuracies), so the Hub shows the card's numbers as evaluation results; the body says what the model is,
how it was measured and where it fails. `adapter_sha256` names the adapter the card describes: `nli-export` copies
the card into an export only when it matches.
"""
from pathlib import Path

import yaml

from qlora_nli.analysis.probes import HYPOTHESIS_ONLY
from qlora_nli.model.embedded import EMBEDDED_MODELS
from qlora_nli.model.loading import looks_like_path
from qlora_nli.prompts import LABELS
from qlora_nli.report import markdown as md


def hub_base_model(name):
    """The Hub id of the base model, or None for a local directory (the Hub's `base_model` must be a Hub id)."""
    if name in EMBEDDED_MODELS:
        return EMBEDDED_MODELS[name][2]
    return None if looks_like_path(name) or Path(name).is_dir() else name


def _result(dataset_id, dataset_name, split, metrics, label):
    return {"task": {"type": "text-classification", "name": "Natural Language Inference"},
            "dataset": {"type": dataset_id, "name": dataset_name, "split": split},
            "metrics": [{"type": "accuracy", "value": metrics["accuracy"],
                         "name": f"{label} accuracy ({metrics['n']} pairs)"}]}


def metadata(art, params, adapter_sha256):
    manifest, tuned = art["manifest"], art["finetuned"]
    results = [_result(manifest["source"], "SNLI", manifest.get("splits", {}).get("test", "test"), tuned, "Test")]
    datasets = [manifest["source"]]
    for name, models in art["sets"].items():
        info = manifest.get("extra_sets", {}).get(name, {})
        results.append(_result(info.get("source", name), name, info.get("split", "?"), models["finetuned"],
                               "Out-of-domain"))
        datasets.append(info.get("source", name))
    meta = {"library_name": "peft", "pipeline_tag": "text-generation",
            "tags": ["lora", "qlora", "peft", "natural-language-inference", "snli"],
            "datasets": list(dict.fromkeys(datasets)), "metrics": ["accuracy"],
            "adapter_sha256": adapter_sha256,
            "model-index": [{"name": f"{params['model']['name'].split('/')[-1].split(':')[-1]}-qlora-nli",
                             "results": results}]}
    base = hub_base_model(params["model"]["name"])
    if base:
        meta["base_model"] = base
    return meta


def _accuracy_rows(art):
    rows = [("SNLI test", art["baseline"]["n"], f"{md.pct(art['baseline']['accuracy'])} "
             f"{md.ci(art['baseline']['accuracy_ci95'])}", f"{md.pct(art['finetuned']['accuracy'])} "
             f"{md.ci(art['finetuned']['accuracy_ci95'])}")]
    for name, m in art["sets"].items():
        rows.append((f"{name} (out of domain)", m["finetuned"]["n"],
                     f"{md.pct(m['baseline']['accuracy'])} {md.ci(m['baseline']['accuracy_ci95'])}",
                     f"{md.pct(m['finetuned']['accuracy'])} {md.ci(m['finetuned']['accuracy_ci95'])}"))
    return rows


def _limits(art):
    tuned, lines = art["finetuned"], []
    alone = tuned["probes"].get(HYPOTHESIS_ONLY)
    if alone and alone.get("accuracy") is not None:
        lines.append(f"- From the hypothesis alone (premise left out) it is right on {md.pct(alone['accuracy'])} of "
                     f"{alone['n']} test pairs, against {md.pct(tuned['accuracy'])} with the premise: part of what it "
                     "learned is the hypothesis' wording, not inference.")
    for probe, s in tuned["probes"].items():
        if probe != HYPOTHESIS_ONLY and s.get("original_right"):
            lines.append(f"- Probe `{probe}` (label kept by construction): {s['flipped_when_original_right']} of "
                         f"{s['original_right']} right answers flip.")
    return lines


def _training_table(params, train, manifest, adapter_sha256):
    """The card's table of how the adapter was trained: base model, data and its hashes, LoRA, optimisation, compute."""
    lora, tp, counts = params["lora"], params["train"], manifest["counts"]
    return md.table(["", ""], [
        ("base model", f"`{params['model']['name']}`, 4-bit NF4 with double quantization: "
                       f"{params['model']['load_in_4bit']}"),
        ("data", f"SNLI `{manifest['source']}`: " + ", ".join(
            f"{c.get('sampled', '?')} {split} pairs of {c.get('raw', '?')}" for split, c in counts.items())
         + f" ({manifest.get('sampling', 'evenly spaced')})"),
        ("data hashes (raw splits, sha256)",
         ", ".join(f"{k} `{v[:16]}`" for k, v in manifest.get("raw_sha256", {}).items())),
        ("LoRA", f"r={lora['r']}, alpha={lora['alpha']}, dropout={lora['dropout']}, "
                 f"targets {lora['target_modules']}, blocks {lora['layers']}"),
        ("optimisation", f"{train.get('optimizer', 'adamw')}, learning rate {tp['learning_rate']}, "
                         f"{tp['epochs']} epochs, batch {tp['batch_size']}, warmup {tp['warmup_ratio']}, "
                         f"weight decay {tp['weight_decay']}, gradient clipping {tp['max_grad_norm']}, "
                         f"seed {tp['seed']}"),
        ("compute", f"{train['device']}, {train['compute_dtype']}, {train.get('world_size', 1)} process(es), "
                    f"{train['time']['total_seconds']:.0f} s"),
        ("adapter weights sha256", f"`{adapter_sha256}`"),
    ])


def render(art, params, adapter_sha256):
    """The model card's Markdown text; `art` as stages.report loads it, `params` the run's params.yaml."""
    train, tuned, manifest, c = art["train"], art["finetuned"], art["manifest"], art["comparison"]
    calibration = tuned.get("calibration")
    lines = [
        "---", yaml.safe_dump(metadata(art, params, adapter_sha256), sort_keys=False).rstrip(), "---", "",
        f"# {params['model']['name']} + QLoRA adapter for natural-language inference (SNLI)", "",
        f"A LoRA adapter for `{params['model']['name']}` that labels a premise/hypothesis pair as "
        f"{', '.join(LABELS[:-1])} or {LABELS[-1]}. The label is the answer word with the highest log-likelihood "
        "after the prompt below (no generation, no parsing).", "",
        "## Results (measured by the pipeline that trained it)", "",
        md.table(["set", "pairs", "pretrained (zero-shot), 95% CI", "this adapter, 95% CI"], _accuracy_rows(art)),
        f"Paired difference on the test pairs: {md.pp(c['difference'])}, 95% CI {md.ci(c['difference_ci95'], md.pp)}; "
        f"exact McNemar p = {md.pvalue(c['mcnemar_p'])}. Macro-F1 {tuned['macro_f1']:.3f}.",
    ]
    if calibration:
        lines += ["", f"Calibration (softmax over the three label scores): ECE {md.pct(calibration['ece'])} on "
                      f"{calibration['n']} test pairs; {md.pct(calibration['ece_after_temperature'])} after dividing "
                      f"the scores by the temperature {calibration['temperature']:.3g} fitted on "
                      f"{calibration['n_val']} validation pairs."]
    lines += ["", "## Limits", "", *_limits(art),
              f"- Intervals are wide at these sizes ({tuned['n']} test pairs): only large differences are resolved.",
              "- Trained and tested on SNLI's image captions; other domains score lower (the out-of-domain rows).", "",
              "## Intended use", "",
              "Research and teaching: a small, measured NLI classifier and a reproducible QLoRA baseline. Not for "
              "decisions about people, and not beyond short English sentence pairs.", "",
              "## Prompt", "", "```", params["prompt"]["template"], "```", "",
              f"Answers scored: {', '.join(repr(' ' + label) for label in LABELS)}.", "",
              "## Training", "",
              _training_table(params, train, manifest, adapter_sha256),
              "## How it was made", "",
              "`dvc repro` of the qlora-nli pipeline (check_params, prepare, evaluate@baseline, finetune, "
              "evaluate@finetuned, failure_cases, report); the commit whose `dvc.lock` lists this adapter's hash "
              "reproduces it. The full report, with figures and failure cases, is `reports/report.md` there.", "",
              "## Use", "", "```bash",
              "nli-predict --adapter models/adapter --premise \"A man plays a guitar.\" --hypothesis \"A man performs.\"",
              "nli-export --adapter models/adapter --out exported/   # merged, loads with transformers alone",
              "```", ""]
    return "\n".join(lines)
