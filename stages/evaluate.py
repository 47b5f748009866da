"""Stage evaluate@<name>: predict with the pretrained model (baseline) or base + adapter (finetuned).

Scores, in one pass over one loaded model: the test split; the validation split (to fit the calibration temperature);
the probes of evaluate.probes, built from the test pairs (qlora_nli/analysis/probes.py: hypothesis-only prompts and
label-preserving perturbations); and every extra set of data.extra_sets (out of domain, written by prepare to
data/sets/). Writes
  predictions/<name>.jsonl           every test pair with its label scores (or raw generation)
  metrics/<name>.json                test metrics, calibration (qlora_nli/analysis/calibration.py) and per-probe accuracy
  metrics/sets/<name>/<set>.json     the metrics of each extra set (`dvc metrics diff`, `dvc exp show`)
  evidence/<name>/                   the scored validation pairs, probe pairs and extra-set pairs
  plots/<name>/{confusion,reliability,probes}.csv   for `dvc plots`
With NLI_TORCHRUN set (qlora_nli/runtime/launch.py) each process predicts a share of the batches; every process
gathers them all, and one process per machine (its local rank 0) writes them, in the data's order.
"""
import hashlib
import json
import logging
import time
from pathlib import Path

from qlora_nli.analysis.evaluation import (
    SETS_DIR,
    build_jobs,
    csv_text,
    evaluation_metrics,
    predict,
    prompt_origin,
    split_by_job,
)
from qlora_nli.config import load_params
from qlora_nli.data.artifacts import data_row_problem, read_rows
from qlora_nli.model import adapters, loading
from qlora_nli.model.adapters import check_adapter_dir
from qlora_nli.prompts import (
    LABELS,
    check_prompt_lengths,
    encode_answers,
)
from qlora_nli.runtime import distributed, launch, threads
from qlora_nli.runtime.code import code_sha256
from qlora_nli.runtime.errors import ParamsError, run_stage, stage_arguments
from qlora_nli.runtime.files import file_sha256, write_json, write_jsonl, write_text
from qlora_nli.runtime.io import all_or_none

log = logging.getLogger("evaluate")


ADAPTERS = {"baseline": None, "finetuned": "models/adapter"}
SETS_INDEX = "index.json"  # in metrics/sets/<model>/, beside one <set>.json per extra set


def inputs_fingerprint(params, paths):
    """Hash of what this stage reads: its params, the files under `paths` and its code."""
    digest = hashlib.sha256(json.dumps([params[k] for k in ("model", "prompt", "evaluate")], sort_keys=True).encode())
    files = sorted(f for p in map(Path, paths) for f in ([p] if p.is_file() else p.rglob("*")) if f.is_file())
    for path in files:
        digest.update(f"{path.as_posix()}\0{file_sha256(path)}\0".encode())
    digest.update(code_sha256(__file__).encode())
    return digest.hexdigest()


def main(name):
    if name not in ADAPTERS:
        raise ParamsError(f"evaluate: unknown model '{name}'; use one of {', '.join(ADAPTERS)}")
    params = load_params()
    p = params["evaluate"]
    device = loading.pick_device(params["compute"]["device"])
    ranks = launch.start(device, lambda: loading.weights_bytes(params["model"], device))
    threads.configure(params["compute"]["num_threads"], ranks.local_world_size)
    test_rows = read_rows("data/test.jsonl", data_row_problem)
    val_rows = read_rows("data/validation.jsonl", data_row_problem)
    sets = {path.stem: read_rows(path, data_row_problem) for path in sorted(SETS_DIR.glob("*.jsonl"))}
    if ADAPTERS[name]:
        check_adapter_dir(ADAPTERS[name])  # before the base model loads
    loading.check_model_params({"model": params["model"]}, device)
    jobs = build_jobs(test_rows, val_rows, sets, p["probes"], params["prompt"]["template"],
                      p["hypothesis_only_template"])
    if ranks.world_size > 1:  # every node's checkout must hold the same params, data, adapter and code
        inputs = ["data/test.jsonl", "data/validation.jsonl", SETS_DIR, *([ADAPTERS[name]] if ADAPTERS[name] else [])]
        distributed.check_same_inputs(ranks, inputs_fingerprint(params, inputs), f"evaluate@{name}")

    log.info("evaluating %s (%s) by %s: %s", name, params["model"]["name"], p["method"],
             ", ".join(f"{len(rows)} {group}" for group, rows, _, _ in jobs))
    tokenizer = loading.load_tokenizer(params["model"]["name"], params["model"]["trust_remote_code"])
    every_prompt = [q for _, _, prompts, _ in jobs for q in prompts]
    # Before the weights load: a pair longer than the model's context would run for minutes and mean nothing.
    after = max(map(len, encode_answers(tokenizer))) if p["method"] == "score" else p["max_new_tokens"]
    check_prompt_lengths(tokenizer, every_prompt, loading.context_length(params["model"]["name"],
                                                                          params["model"]["trust_remote_code"]),
                         lambda i: prompt_origin(jobs, i), "remove the pair from data.source and rerun `dvc repro "
                         "prepare`, or use a model with a longer context (model.name)", after)
    model = adapters.load_for_inference(params["model"], device, ADAPTERS[name])

    # One call for everything: batches then mix the sets, and prompts that share a prefix can share its computation.
    start = time.perf_counter()
    preds, scores, generations = predict(model, tokenizer, every_prompt, p, ranks)
    seconds = distributed.from_rank0(ranks, lambda: time.perf_counter() - start)  # the same figure on every node
    if not ranks.writes:
        return
    scored = split_by_job(jobs, preds, scores, generations)
    run = {"model": params["model"]["name"], "method": p["method"], "adapter": ADAPTERS[name],
           "eval_seconds": round(seconds, 2), "pairs_scored": len(preds), "pairs_per_second": round(len(preds) / seconds, 2)}
    metrics, set_metrics, calibration = evaluation_metrics(scored, list(sets), p["method"], run)
    write_outputs(name, scored, metrics, set_metrics, calibration)
    log.info("%s accuracy %.3f on %d test pairs; %d pairs scored in all (%.1f pairs/s)", name, metrics["accuracy"],
             len(scored["test"]), len(preds), len(preds) / seconds)


def write_outputs(name, scored, metrics, set_metrics, calibration):
    """Every output or none of them: a failed write leaves the previous run's files as they were."""
    test, val = scored["test"], scored["validation"]
    evidence, sets_metrics, plots = Path("evidence") / name, Path("metrics/sets") / name, Path("plots") / name
    outputs = [f"predictions/{name}.jsonl", f"metrics/{name}.json", evidence, sets_metrics,
               plots / "confusion.csv", plots / "reliability.csv", plots / "probes.csv"]
    with all_or_none(outputs) as staged:
        write_jsonl(staged[f"predictions/{name}.jsonl"], test)
        write_json(staged[f"metrics/{name}.json"], metrics)
        (staged[evidence] / "sets").mkdir(parents=True)
        write_jsonl(staged[evidence] / "validation.jsonl", val)
        write_jsonl(staged[evidence] / "probes.jsonl", scored["probes"])
        staged[sets_metrics].mkdir(parents=True)
        # Never an empty directory (Git keeps none, and this output is in Git): the number of sets, as a metric too.
        write_json(staged[sets_metrics] / SETS_INDEX, {"n_sets": len(set_metrics)})
        for set_name, document in set_metrics.items():
            write_jsonl(staged[evidence] / "sets" / f"{set_name}.jsonl", scored[f"set:{set_name}"])
            write_json(staged[sets_metrics] / f"{set_name}.json", document)
        write_text(staged[plots / "confusion.csv"], csv_text(
            ["actual", "predicted"],
            [[LABELS[r["label"]], LABELS[r["pred"]] if r["pred"] is not None else "invalid"] for r in test]))
        bins = [b for b in (calibration or {}).get("bins", []) if b["n"]]
        write_text(staged[plots / "reliability.csv"], csv_text(
            ["confidence", "accuracy", "n"], [[b["mean_confidence"], b["accuracy"], b["n"]] for b in bins]))
        write_text(staged[plots / "probes.csv"], csv_text(
            ["probe", "accuracy"],
            [["original test pairs", metrics["accuracy"]]]
            + [[probe, s["accuracy"]] for probe, s in metrics["probes"].items()]))


if __name__ == "__main__":
    run_stage(main, stage_arguments(__doc__, model=list(ADAPTERS)).model)
