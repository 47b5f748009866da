"""What `evaluate` computes: every prompt it scores (test, validation, probes, extra sets) in one fixed
order, their predictions as rows, and the metrics of each group."""
import csv
import io
import logging
from pathlib import Path

import torch

from qlora_nli.analysis.calibration import calibration_summary
from qlora_nli.analysis.probes import HYPOTHESIS_ONLY, perturb, probe_summary
from qlora_nli.analysis.stats import classification_metrics
from qlora_nli.infer.generate import generate_answers, parse_label
from qlora_nli.infer.scoring import score_labels
from qlora_nli.prompts import (
    LABELS,
    format_prompt,
)
from qlora_nli.runtime.errors import RunError

log = logging.getLogger("evaluate")


SETS_DIR = Path("data/sets")


def build_jobs(test_rows, val_rows, sets, probes, template, hypothesis_only_template):
    """[(group, rows, prompts, meta)]: everything this stage scores, in a fixed order. `meta` per row says where a
    probe pair came from (probe name, index of its test pair)."""
    jobs = [("test", test_rows, [format_prompt(template, r) for r in test_rows], None),
            ("validation", val_rows, [format_prompt(template, r) for r in val_rows], None)]
    probe_rows, probe_prompts, meta = [], [], []
    if HYPOTHESIS_ONLY in probes:
        for i, r in enumerate(test_rows):
            probe_rows.append(r)
            probe_prompts.append(format_prompt(hypothesis_only_template, r))
            meta.append((HYPOTHESIS_ONLY, i))
    for probe, i, row in perturb(test_rows, [p for p in probes if p != HYPOTHESIS_ONLY]):
        probe_rows.append(row)
        probe_prompts.append(format_prompt(template, row))
        meta.append((probe, i))
    jobs.append(("probes", probe_rows, probe_prompts, meta))
    for name, rows in sets.items():
        jobs.append((f"set:{name}", rows, [format_prompt(template, r) for r in rows], None))
    return jobs


def prompt_origin(jobs, i):
    """Where the i-th prompt of all the jobs comes from, for a message."""
    for group, rows, prompts, meta in jobs:
        if i < len(prompts):
            if group == "probes":
                return f"the {meta[i][0]} probe of data/test.jsonl row {meta[i][1] + 1}"
            file = f"{SETS_DIR / group[4:]}.jsonl" if group.startswith("set:") else f"data/{group}.jsonl"
            return f"{file} row {i + 1}"
        i -= len(prompts)
    raise IndexError(i)


def predict(model, tokenizer, prompts, p, ranks):
    """(predicted label ids, label scores or None, generations or None) for every prompt, by evaluate.method."""
    try:
        if p["method"] == "score":
            scores = score_labels(model, tokenizer, prompts, p["batch_size"], ranks=ranks).tolist()
            return [max(range(len(LABELS)), key=s.__getitem__) for s in scores], scores, [None] * len(prompts)
        generations = generate_answers(model, tokenizer, prompts, p["batch_size"], p["max_new_tokens"], ranks=ranks)
        return [parse_label(g) for g in generations], [None] * len(prompts), generations
    except torch.OutOfMemoryError:
        raise RunError(f"evaluate: GPU out of memory; lower params.yaml evaluate.batch_size (now {p['batch_size']})")


def prediction_rows(rows, preds, scores, generations, meta=None):
    out = []
    for i, (r, pred, s, g) in enumerate(zip(rows, preds, scores, generations)):
        row = {"id": r["id"], "premise": r["premise"], "hypothesis": r["hypothesis"], "label": r["label"],
               "pred": pred, "scores": [round(x, 5) for x in s] if s else None, "correct": pred == r["label"],
               "generation": g}
        if meta:
            row = {"probe": meta[i][0], "test_index": meta[i][1], **row}
        out.append(row)
    return out


def probe_metrics(test, probe_rows):
    """{probe: summary} against the same model's answers on the original test pairs."""
    summaries = {}
    for probe in dict.fromkeys(r["probe"] for r in probe_rows):
        mine = [r for r in probe_rows if r["probe"] == probe]
        summaries[probe] = probe_summary([r["pred"] for r in mine], [r["label"] for r in mine],
                                         [test[r["test_index"]]["pred"] for r in mine],
                                         [test[r["test_index"]]["label"] for r in mine])
    return summaries


def csv_text(header, rows):
    table = io.StringIO()
    writer = csv.writer(table, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return table.getvalue()


def split_by_job(jobs, preds, scores, generations):
    """{group: prediction rows} of `jobs` (build_jobs) from the predictions of all their prompts in order."""
    scored, at = {}, 0
    for group, rows, prompts, meta in jobs:
        part = slice(at, at + len(rows))
        scored[group] = prediction_rows(rows, preds[part], scores[part], generations[part], meta)
        at += len(rows)
    return scored


def _without_bins(summary):
    return {k: v for k, v in summary.items() if not k.startswith("bins")}


def evaluation_metrics(scored, set_names, method, run):
    """(the test metrics, then `run` (what ran, how long), calibration, validation accuracy and probes; {set: metrics};
    the test calibration summary with its bins, None for method generate) of `scored` (split_by_job)."""
    test, val = scored["test"], scored["validation"]
    metrics = {**classification_metrics([r["label"] for r in test], [r["pred"] for r in test]), **run}
    calibration = None
    if method == "score":
        calibration = calibration_summary([r["scores"] for r in test], [r["label"] for r in test],
                                          [r["scores"] for r in val], [r["label"] for r in val])
    metrics["calibration"] = _without_bins(calibration) if calibration else None
    metrics["validation_accuracy"] = classification_metrics([r["label"] for r in val], [r["pred"] for r in val])["accuracy"]
    metrics["probes"] = probe_metrics(test, scored["probes"])
    set_metrics = {}
    for set_name in set_names:
        rows = scored[f"set:{set_name}"]
        set_metrics[set_name] = {"set": set_name,
                                 **classification_metrics([r["label"] for r in rows], [r["pred"] for r in rows])}
        if method == "score":
            set_metrics[set_name]["calibration"] = _without_bins(calibration_summary(
                [r["scores"] for r in rows], [r["label"] for r in rows], [r["scores"] for r in val],
                [r["label"] for r in val]))
    return metrics, set_metrics, calibration
