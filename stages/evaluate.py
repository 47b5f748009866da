"""Stage evaluate@<name>: predict the test split with the pretrained model (baseline) or base + adapter (finetuned).

Writes predictions/<name>.jsonl (every pair with its label scores or raw generation), metrics/<name>.json and
plots/<name>/confusion.csv (actual vs predicted, for `dvc plots`). With QLORA_NLI_TORCHRUN set
(qlora_nli/distributed.py) each process predicts a share of the batches; rank 0 writes them all, in the data's order.
"""
import csv
import io
import logging
import sys
import time

import torch

from qlora_nli import distributed, modeling
from qlora_nli.errors import ParamsError, RunError, run_stage
from qlora_nli.artifacts import check_adapter_dir, data_row_problem, read_rows
from qlora_nli.io import write_json, write_jsonl, write_text
from qlora_nli.params import load_params
from qlora_nli.prompts import LABELS, format_prompt
from qlora_nli.scoring import generate_answers, parse_label, score_labels
from qlora_nli.stats import classification_metrics

log = logging.getLogger("evaluate")
ADAPTERS = {"baseline": None, "finetuned": "models/adapter"}


def main(name):
    if name not in ADAPTERS:
        raise ParamsError(f"evaluate: unknown model '{name}'; use one of {', '.join(ADAPTERS)}")
    params = load_params()
    p = params["evaluate"]
    device = modeling.pick_device(params["model"]["device"])
    ranks = distributed.start(device)
    distributed.set_cpu_threads(params["train"]["num_threads"], ranks)
    rows = read_rows("data/test.jsonl", data_row_problem)
    if ADAPTERS[name]:
        check_adapter_dir(ADAPTERS[name])  # before the base model loads
    modeling.check_model_params({"model": params["model"]}, device)
    prompts = [format_prompt(params["prompt"]["template"], r) for r in rows]

    log.info("evaluating %s (%s) on %d test pairs by %s", name, params["model"]["name"], len(rows), p["method"])
    tokenizer = modeling.load_tokenizer(params["model"]["name"], params["model"]["trust_remote_code"])
    model = modeling.load_for_inference(params["model"], device, ADAPTERS[name])

    start = time.perf_counter()
    try:
        if p["method"] == "score":
            scores = score_labels(model, tokenizer, prompts, p["batch_size"], ranks=ranks).tolist()
            preds, generations = [max(range(len(LABELS)), key=s.__getitem__) for s in scores], [None] * len(rows)
        else:
            generations = generate_answers(model, tokenizer, prompts, p["batch_size"], p["max_new_tokens"],
                                           ranks=ranks)
            preds, scores = [parse_label(g) for g in generations], [None] * len(rows)
    except torch.OutOfMemoryError:
        raise RunError(f"evaluate: GPU out of memory; lower params.yaml evaluate.batch_size (now {p['batch_size']})")
    seconds = time.perf_counter() - start
    if not ranks.is_main:
        return

    predictions = [
        {"id": r["id"], "premise": r["premise"], "hypothesis": r["hypothesis"], "label": r["label"],
         "pred": pred, "scores": [round(x, 5) for x in s] if s else None, "correct": pred == r["label"],
         "generation": g}
        for r, pred, s, g in zip(rows, preds, scores, generations)
    ]
    write_jsonl(f"predictions/{name}.jsonl", predictions)
    metrics = classification_metrics([r["label"] for r in rows], preds)
    metrics.update({"model": params["model"]["name"], "method": p["method"], "adapter": ADAPTERS[name],
                    "eval_seconds": round(seconds, 2), "pairs_per_second": round(len(rows) / seconds, 2)})
    write_json(f"metrics/{name}.json", metrics)
    table = io.StringIO()
    writer = csv.writer(table, lineterminator="\n")
    writer.writerow(["actual", "predicted"])
    writer.writerows([LABELS[r["label"]], LABELS[x] if x is not None else "invalid"] for r, x in zip(rows, preds))
    write_text(f"plots/{name}/confusion.csv", table.getvalue())
    log.info("%s accuracy %.3f on %d pairs (%.1f pairs/s)", name, metrics["accuracy"], len(rows), len(rows) / seconds)


if __name__ == "__main__":
    run_stage(main, sys.argv[1] if len(sys.argv) > 1 else "")
