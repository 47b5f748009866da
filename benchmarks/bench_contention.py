"""Training and scoring speed on a CPU that other processes share: this code's thread choice (qlora_nli/runtime/threads.py)
against a fixed 2 threads that spin (the default before it) and against the naive HF Trainer side, one run.

    python benchmarks/bench_contention.py [--n-train 96] [--max-batches 6] [--n-test 24] [--busy 0,1,2]
                                          [--train-seconds 40] [--sides ours,fixed,naive] [--idle-pairs 3]
                                          [--out benchmarks/results/contention.json]

Reads data/train.jsonl and data/test.jsonl: run `dvc repro prepare` first. For each number of competing processes in
--busy (each `python -c 'while True: pass'`, started by this script before the sides and killed after them), every
side runs in its own child process (benchmarks/common.run_child), the competitors running from its start (model
loading included) to its end:
  ours    params.yaml as it is (compute.num_threads: 0, auto threads: chosen from the free cores, adapted while
          running): the package's training step (train.loop.build_training, train_one_epoch per batch) and scoring
          (scoring.score_labels by label log-likelihood on the trained model)
  fixed   the same code with compute.num_threads: 2 (a fixed count, never adapted; the OpenMP runtime's default
          waiting), what the default was before the auto choice
  naive   benchmarks/train_naive.py: transformers.Trainer with fixed-length padding, evaluation by generate + parse;
          torch's default threads (2 here), nothing adapted
Measured per side and number of competitors:
  train examples/s   examples of the optimizer steps timed / their seconds. The steps are the first batches of epoch 1
                     (--max-batches of them; a run stops after the step that passes --train-seconds, at least two),
                     and a side's rates are all taken over the steps that every one of its runs finished, the first
                     left out (it warms the process up), so they compare the same batches. Model loading and ours'
                     one-off frozen-block pass are not in it (the pass's seconds are in the JSON).
                     On the idle machine ours and fixed run --idle-repeats times (before and after the busy runs)
                     and the faster run counts, for each measure: other work on the machine only slows a run.
  scoring pairs/s    the first --n-test test pairs / seconds of one scoring call (ours, fixed: score_labels after a
                     2-pair warm-up; naive: generate + parse)
  threads            the torch threads the side used (ours: the record of qlora_nli.runtime.threads.describe)
  idle pairs         first of all, --idle-pairs pairs of ours and fixed on the idle machine, back to back, the order
                     alternating (fixed first, then ours first, ...), each run timing all --max-batches steps (no
                     --train-seconds limit). A pair's ratio is ours / fixed over the same steps (the first left out);
                     the idle target takes the median of the pairs' ratios, so a slow spell of the machine that hits
                     one run moves one ratio, not the verdict.
Targets (pass/fail in the JSON, ratios within this run): ours with one competitor >= 50% of ours on the idle machine,
for training and for scoring; ours idle >= 95% of fixed idle (the median pair), for training and for scoring.
"""
import argparse
import json
import logging
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/common.py, when run from anywhere

from common import REPO, enter_repo, fmt, machine_info, run_child, target_lines  # noqa: E402

from qlora_nli.config import check_params
from qlora_nli.runtime.errors import ArgumentParser, NLIError
from qlora_nli.runtime.files import write_json

log = logging.getLogger("bench_contention")

SIDES = {"ours": "ours (auto threads)", "fixed": "2 threads, fixed", "naive": "naive HF Trainer"}
FIXED_THREADS = 2
TARGETS = {"busy_1_of_idle": 0.5, "idle_of_fixed": 0.95}
COMPETITOR = "while True: pass"
SETTLE_SECONDS = 1.0  # competitors running at full speed before a side starts


def parse_args(argv=None):
    ap = ArgumentParser(description=__doc__.split("\n\n")[0],
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-train", type=int, default=96, help="first N pairs of data/train.jsonl (default 96)")
    ap.add_argument("--max-batches", type=int, default=6, help="optimizer steps timed at most (default 6)")
    ap.add_argument("--n-test", type=int, default=24, help="first N pairs of data/test.jsonl scored (default 24)")
    ap.add_argument("--busy", default="0,1,2", help="numbers of competing busy processes (default 0,1,2)")
    ap.add_argument("--train-seconds", type=float, default=40.0,
                    help="a side stops training after the step that passes this many seconds (default 40)")
    ap.add_argument("--sides", default=",".join(SIDES), help=f"comma-separated subset of {','.join(SIDES)}")
    ap.add_argument("--idle-repeats", type=int, default=2,
                    help="runs of ours and fixed on the idle machine, the first before and the others after the "
                         "busy ones; the faster counts (default 2)")
    ap.add_argument("--idle-pairs", type=int, default=3,
                    help="back-to-back pairs of ours and fixed on the idle machine for the idle target; 0 leaves "
                         "the target to the faster idle runs (default 3)")
    ap.add_argument("--out", default="benchmarks/results/contention.json", help="JSON results")
    # internal: how the parent starts a child
    ap.add_argument("--child", choices=("pipeline", "naive"), help=argparse.SUPPRESS)
    ap.add_argument("--spec", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.sides = [s.strip() for s in args.sides.split(",") if s.strip()]
    if not args.sides or any(s not in SIDES for s in args.sides):
        ap.error(f"--sides takes a comma-separated subset of {','.join(SIDES)}")
    try:
        args.busy = [int(b) for b in args.busy.split(",")]
    except ValueError:
        ap.error("--busy takes comma-separated integers, e.g. 0,1,2")
    if args.idle_pairs < 0:
        ap.error("--idle-pairs must be >= 0")
    if any(b < 0 for b in args.busy) or 0 not in args.busy:
        ap.error("--busy needs 0 (the idle machine, the reference) and numbers >= 0")
    for name in ("n_train", "max_batches", "n_test", "idle_repeats"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1")
    return args


# ------------------------------------------------------------------------------------------------------------------
# Parent: competitors, children, rates over the same steps, table and JSON
# ------------------------------------------------------------------------------------------------------------------

class Competitors:
    """`with Competitors(n):` n busy Python processes, killed on the way out (errors included)."""

    def __init__(self, n):
        self.n, self.procs = n, []

    def __enter__(self):
        self.procs = [subprocess.Popen([sys.executable, "-c", COMPETITOR]) for _ in range(self.n)]
        if self.n:
            time.sleep(SETTLE_SECONDS)
        return self

    def __exit__(self, *exc):
        for proc in self.procs:
            proc.kill()
        for proc in self.procs:
            proc.wait()
        return False


def side_params(side):
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["train"]["epochs"] = 1
    if side == "fixed":
        params["compute"]["num_threads"] = FIXED_THREADS
    return check_params(params, "params.yaml" + (f" + compute.num_threads={FIXED_THREADS}" if side == "fixed" else ""))


def rate(examples, seconds, first, k):
    return round(sum(examples[first:k]) / sum(seconds[first:k]), 3) if k > first and sum(seconds[first:k]) else None


def summarize(runs):
    """{busy: row} of one side from {busy: [results]}: train examples/s over the steps that every run finished, the
    first step left out (it warms the process up) where there are two or more; scoring pairs/s; threads. Where a
    number of competitors was run more than once (the idle machine, --idle-repeats), the faster run of each
    measure counts: another process can only slow a run down."""
    ok = {b: [r for r in results if "error" not in r] for b, results in runs.items()}
    k = min((len(r["step_seconds"]) for results in ok.values() for r in results), default=0)
    first = 1 if k >= 2 else 0
    out = {}
    for busy, results in ok.items():
        if not results:
            out[busy] = {"error": runs[busy][0]["error"]}
            continue
        trains = [rate(r["step_examples"], r["step_seconds"], first, k) for r in results]
        out[busy] = {"train_examples_per_second": max(trains), "train_examples_per_second_runs": trains,
                     "steps_compared": f"{first + 1}-{k}", "steps_done": [len(r["step_seconds"]) for r in results],
                     "scoring_pairs_per_second": max(r["eval_pairs_per_second"] for r in results),
                     "scoring_pairs_per_second_runs": [r["eval_pairs_per_second"] for r in results],
                     "threads": results[0]["threads"],
                     "threads_used": sorted({n for r in results for n in r["threads_used"]})}
    return out


def summarize_pairs(pairs):
    """{key: {"ratios": [...], "median": m}} of ours / fixed for each back-to-back idle pair, training over the steps
    that both runs of the pair finished (the first left out), scoring over one call each."""
    out = {"train_examples_per_second": [], "scoring_pairs_per_second": []}
    for pair in pairs:
        ours, fixed = pair["ours"], pair["fixed"]
        if "error" in ours or "error" in fixed:
            continue
        k = min(len(ours["step_seconds"]), len(fixed["step_seconds"]))
        first = 1 if k >= 2 else 0
        a = rate(ours["step_examples"], ours["step_seconds"], first, k)
        b = rate(fixed["step_examples"], fixed["step_seconds"], first, k)
        out["train_examples_per_second"].append(round(a / b, 3) if a and b else None)
        out["scoring_pairs_per_second"].append(round(ours["eval_pairs_per_second"] / fixed["eval_pairs_per_second"], 3))
    return {key: {"ratios": ratios, "median": _median([r for r in ratios if r is not None])}
            for key, ratios in out.items()}


def _median(values):
    return round(statistics.median(values), 3) if values else None


def share(summary, key, busy, of_side_summary=None, reference=0):
    a = summary.get(busy, {}).get(key)
    b = (of_side_summary or summary).get(reference, {}).get(key)
    return round(a / b, 3) if a is not None and b else None


def evaluate_targets(summaries, pairs=None):
    """The targets; the idle one from the median back-to-back pair where `pairs` (summarize_pairs) has any, else
    from the faster idle runs of each side."""
    ours, fixed = summaries.get("ours", {}), summaries.get("fixed", {})
    targets = []
    for key, what in (("train_examples_per_second", "training"), ("scoring_pairs_per_second", "scoring")):
        value = share(ours, key, 1) if 1 in ours else None
        targets.append({"name": f"ours {what}, 1 busy process / idle", "value": value,
                        "target": f">= {TARGETS['busy_1_of_idle']}",
                        "pass": None if value is None else value >= TARGETS["busy_1_of_idle"]})
        paired = (pairs or {}).get(key, {}).get("median")
        value = paired if paired is not None else share(ours, key, 0, fixed) if fixed else None
        how = " (median pair)" if paired is not None else ""
        targets.append({"name": f"ours {what} idle / fixed 2 threads idle{how}", "value": value,
                        "target": f">= {TARGETS['idle_of_fixed']}",
                        "pass": None if value is None else value >= TARGETS["idle_of_fixed"]})
    return targets


def print_table(report):
    busy = report["settings"]["busy"]
    head = "".join(f"{f'{b} busy':>16s}" if b else f"{'idle':>10s}" for b in busy)
    lines = [f"{'':36s}{head}   torch threads used"]
    for side, summary in report["summary"].items():
        for key, label in (("train_examples_per_second", "train examples/s"),
                           ("scoring_pairs_per_second", "scoring pairs/s")):
            cells = ""
            for b in busy:
                row = summary.get(b, {})
                value = row.get(key)
                if b == 0:
                    cells += f"{fmt(value, 2):>10s}"
                else:
                    pct = share(summary, key, b)
                    cells += f"{fmt(value, 2):>9s} ({fmt(None if pct is None else 100 * pct, 0):>3s}%)"
            used = " / ".join("-".join(map(str, summary.get(b, {}).get("threads_used", []))) or "-" for b in busy)
            lines.append(f"{SIDES[side] + ', ' + label:36s}{cells}" + (f"   {used}" if key.startswith("train")
                                                                        else ""))
    for key, label in (("train_examples_per_second", "training"), ("scoring_pairs_per_second", "scoring")):
        ratios = report.get("idle_pairs_summary", {}).get(key, {}).get("ratios")
        if ratios:
            lines.append(f"idle pairs, ours / fixed, {label}: " + ", ".join(fmt(r, 3) for r in ratios))
    lines += target_lines(report["targets"], 3)
    for side, runs in report["runs"].items():
        for b, results in runs.items():
            for r in results:
                if "error" in r:
                    lines.append(f"{side}, {b} busy: ERROR {r['error']}")
    print("\n".join(lines), flush=True)


def main(args):
    enter_repo("data/train.jsonl", "data/test.jsonl")
    params = {side: side_params(side) for side in args.sides}
    report = {
        "benchmark": "bench_contention",
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "settings": {"n_train": args.n_train, "max_batches": args.max_batches, "n_test": args.n_test,
                     "busy": args.busy, "train_seconds_limit": args.train_seconds, "sides": args.sides,
                     "idle_repeats": args.idle_repeats, "idle_pairs": args.idle_pairs,
                     "competitor": f"{Path(sys.executable).name} -c '{COMPETITOR}'",
                     "params": {s: {g: params[s][g] for g in ("model", "lora", "train", "evaluate")}
                                for s in args.sides}},
    }
    runs = {side: {busy: [] for busy in args.busy} for side in args.sides}
    pairs = []
    pair_sides = ["fixed", "ours"] if {"ours", "fixed"} <= set(args.sides) else []
    # the idle pairs first, then the idle machine, then the busy ones, then ours and fixed idle again (--idle-repeats)
    plan = [(busy, args.sides) for busy in args.busy]
    plan += [(0, [s for s in args.sides if s != "naive"])] * (args.idle_repeats - 1)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench_contention.") as workdir:
        for i in range(args.idle_pairs if pair_sides else 0):
            pair = {}
            for side in pair_sides[::-1] if i % 2 else pair_sides:
                log.info("idle pair %d: side %s", i + 1, side)
                spec = {"params": params[side], "n_train": args.n_train, "n_test": args.n_test,
                        "max_batches": args.max_batches, "train_seconds_limit": 1e9, "cross_eval": False}
                pair[side] = run_child(__file__, f"pair{i}-{side}", spec, workdir, role_arg="pipeline")
            pairs.append(pair)
        for busy, sides in plan:
            with Competitors(busy):
                for side in sides:
                    log.info("%d busy process(es): side %s", busy, side)
                    spec = {"params": params[side], "n_train": args.n_train, "n_test": args.n_test,
                            "max_batches": args.max_batches, "train_seconds_limit": args.train_seconds,
                            "cross_eval": False}
                    child = "naive" if side == "naive" else "pipeline"
                    role = f"{side}-{busy}-{len(runs[side][busy])}"
                    runs[side][busy].append(run_child(__file__, role, spec, workdir, role_arg=child))
    report["seconds"] = round(time.perf_counter() - started, 1)
    report["runs"] = runs
    report["summary"] = {side: summarize(r) for side, r in runs.items()}
    report["idle_pairs"] = pairs
    report["idle_pairs_summary"] = summarize_pairs(pairs)
    report["targets"] = evaluate_targets(report["summary"], report["idle_pairs_summary"])
    write_json(args.out, report)
    print_table(report)
    log.info("wrote %s (%.0f s)", args.out, report["seconds"])
    failed = any("error" in r for side in runs.values() for results in side.values() for r in results)
    return 1 if failed or any("error" in r for pair in pairs for r in pair.values()) else 0


# ------------------------------------------------------------------------------------------------------------------
# Children
# ------------------------------------------------------------------------------------------------------------------

def child_pipeline(spec):
    """ours / fixed: the package's training step per batch and its scoring, threads by qlora_nli.threads."""
    from train_shared import predict, start_side

    from qlora_nli.model import loading
    from qlora_nli.runtime import threads
    from qlora_nli.train.batches import epoch_batches
    from qlora_nli.train.examples import Examples
    from qlora_nli.train.loop import build_training, train_one_epoch

    params, t = spec["params"], spec["params"]["train"]
    result, tokenizer, _, (_, prompt_ids, answer_ids, lengths), test_rows, test_prompts = start_side(spec)
    choice = threads.configure(params["compute"]["num_threads"])
    dtype = loading.pick_compute_dtype("cpu", params["model"]["compute_dtype"])
    examples = Examples(prompt_ids, answer_ids, tokenizer.pad_token_id)
    setup = build_training(params, "cpu", dtype, examples)
    result["frozen_pass_seconds"] = round(setup.frozen.seconds, 3) if setup.frozen is not None else None

    steps, begun = [], time.perf_counter()
    for batch in epoch_batches(lengths, t, 1)[: spec["max_batches"]]:
        start = time.perf_counter()
        train_one_epoch(setup, examples, [batch], t, dtype)
        steps.append((len(batch), time.perf_counter() - start))
        log.info("step %d: %d examples, %.2f s, %d threads", len(steps), len(batch), steps[-1][1], choice.threads)
        if len(steps) >= 2 and time.perf_counter() - begun > spec["train_seconds_limit"]:
            break
    result["step_examples"] = [n for n, _ in steps]
    result["step_seconds"] = [round(s, 3) for _, s in steps]

    predict("score", setup.model, tokenizer, test_prompts[:2], params["evaluate"])  # warm-up
    _, seconds, _, _ = predict("score", setup.model, tokenizer, test_prompts, params["evaluate"])
    result["eval_pairs_per_second"] = round(len(test_prompts) / seconds, 3)
    result["threads"] = threads.describe()
    result["threads_used"] = sorted(choice.used)
    return result


def child_naive(spec):
    from train_naive import child_naive as naive

    result = naive(spec)
    result["threads"] = f"{result['torch_threads']} torch threads (torch default)"
    result["threads_used"] = [result["torch_threads"]]
    return result


if __name__ == "__main__":
    cli = parse_args()
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s [{cli.child or 'parent'}] %(name)s: %(message)s")
    try:
        if cli.child:
            spec = json.loads(Path(cli.spec).read_text())
            write_json(cli.result, {"pipeline": child_pipeline, "naive": child_naive}[cli.child](spec))
        else:
            sys.exit(main(cli))
    except NLIError as e:
        sys.exit(str(e))
