"""Training benchmark on CPU: our QLoRA pipeline ("ours") against the usual notebook recipe ("naive"), side by side.
(Scoring speed against another git revision: bench_eval.py; shared pieces: common.py.)

Same model (params.yaml model.*, 4-bit NF4 base + the same LoRA config), same training sample, same machine, same
torch thread count, one run. Reads data/train.jsonl and data/test.jsonl: run `dvc repro prepare` first.

    python benchmarks/bench_train.py [--epochs 1] [--n-train 1000] [--n-test 100] [--max-batches N]
                                     [--sides ours,naive] [--threads N] [--set train.micro_batch_tokens=384 ...]
                                     [--naive-eval-batch-size N] [--no-cross-eval] [--no-dvc]
                                     [--out benchmarks/results/train.json]
Levers (ours only, each a params.yaml key): --set train.micro_batch_tokens=384, --set train.gradient_checkpointing=true,
--set lora.dropout=0, --set 'lora.target_modules=[q_proj,v_proj]', --set 'prompt.template=...',
--set compute.num_threads=1 (--threads N sets both sides). Develop with e.g. --n-train 32 --n-test 8 --max-batches 2.

Sides (each runs in its own subprocess, so its peak RSS is its own):
  ours   the `finetune` and `evaluate` code paths of the package (params.yaml lora/train/evaluate values, plus any
         `--set group.key=value`), evaluation by label log-likelihood: benchmarks/train_ours.py
  naive  the assignment-notebook recipe (transformers.Trainer, fixed-length padding, loss over all tokens,
         evaluation by greedy `model.generate` + parsing; params.yaml values only): benchmarks/train_naive.py
Neither side validates or saves checkpoints inside the timed training loop (the pipeline's per-epoch validation
and checkpoints are left out, Trainer runs with save_strategy="no").

Measured per side:
  train examples/s      examples trained / wall seconds of the training loop (model loading excluded)
  train real tokens/s   real tokens / same seconds; real tokens of an example = len(prompt ids) + len(answer ids)
                        with the package's tokenization (identical definition both sides; the naive side's
                        tokenization of the joined text is checked to give the same count, see `tokenization`)
  peak RSS (MB)         ru_maxrss of the child process after its main evaluation (load + train + eval); the
                        psutil-sampled peak (qlora_nli.runtime.resources.ResourceMonitor) is reported beside it
  eval pairs/s          test pairs / wall seconds of prediction (score_labels, resp. generate + parse)
  test accuracy         after the same number of epochs (--epochs, default 1); with --cross-eval (default) each
                        trained model is also evaluated the other side's way, so that an accuracy gap can be put
                        down to the training recipe or to the evaluation method
  train FLOP/s          against a matmul peak measured in the same run: best of several fp32 torch.mm of
                        2048x2048 (2*n^3 FLOPs each) at the same thread count, before and after the sides
                        (the FLOP estimate and its three totals, useful / model / executed: benchmarks/flops.py)

Also: `dvc repro` with nothing changed, timed in the repository root (3 runs, median), only when `dvc status`
says everything is up to date (otherwise null with the reason).

Targets (pass/fail in the JSON): train examples/s ours/naive >= 2 with ours' accuracy >= naive's; eval pairs/s
ours/naive >= 10; ours' peak RSS <= 2048 MB; dvc repro no-op <= 5 s.
"""
import argparse
import json
import logging
import os
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/common.py, when run from anywhere

from common import (  # noqa: E402
    MATMUL_SIZE,
    REPO,
    child_matmul,
    enter_repo,
    fmt,
    machine_info,
    matmul_peak,
    parse_value,
    run_child,
    target_lines,
    time_dvc_noop,
)
from flops import FLOPS_FORMULA, flops  # noqa: E402
from train_naive import child_naive  # noqa: E402  (the sides import torch only when their child runs)
from train_ours import child_ours  # noqa: E402

from qlora_nli.config import check_params
from qlora_nli.runtime.errors import ArgumentParser, NLIError
from qlora_nli.runtime.files import write_json

log = logging.getLogger("bench_train")

SIDES = ("ours", "naive")
TARGETS = {"train_speedup": 2.0, "eval_speedup": 10.0, "ours_peak_rss_mb": 2048.0, "dvc_repro_noop_seconds": 5.0}


# ------------------------------------------------------------------------------------------------------------------
# Parent: settings, children, dvc timing, FLOP/s, table and JSON
# ------------------------------------------------------------------------------------------------------------------

def parse_args(argv=None):
    ap = ArgumentParser(description=__doc__.split("\n\n")[0],
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=1, help="training epochs, both sides (default 1)")
    ap.add_argument("--n-train", type=int, default=1000, help="first N pairs of data/train.jsonl")
    ap.add_argument("--n-test", type=int, default=100, help="first N pairs of data/test.jsonl")
    ap.add_argument("--max-batches", type=int, default=None, help="debug: at most N optimizer steps per epoch")
    ap.add_argument("--sides", default="ours,naive", help="comma-separated subset of ours,naive")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads for both sides and the matmul peak (default params compute.num_threads; "
                         "0 = torch's default)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="GROUP.KEY=VALUE",
                    help="override a params.yaml value for the ours side only (YAML value), repeatable, "
                         "e.g. --set train.micro_batch_tokens=384 --set 'lora.target_modules=[q_proj,v_proj]'")
    ap.add_argument("--naive-eval-batch-size", type=int, default=None,
                    help="batch size of the naive side's generation (default params evaluate.batch_size, its "
                         "fairest; 1 = the one-prompt-at-a-time loop of many notebooks)")
    ap.add_argument("--no-cross-eval", dest="cross_eval", action="store_false",
                    help="skip evaluating each trained model the other side's way")
    ap.add_argument("--no-dvc", dest="dvc", action="store_false", help="skip the dvc repro no-op timing")
    ap.add_argument("--out", default="benchmarks/results/train.json", help="JSON results (written atomically)")
    # internal: how the parent starts a child
    ap.add_argument("--child", choices=SIDES + ("matmul",), help=argparse.SUPPRESS)
    ap.add_argument("--spec", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.sides = [s.strip() for s in args.sides.split(",") if s.strip()]
    if not args.sides or any(s not in SIDES for s in args.sides):
        ap.error(f"--sides takes a comma-separated subset of {','.join(SIDES)}")
    for name in ("epochs", "n_train", "n_test", "max_batches", "naive_eval_batch_size"):
        value = getattr(args, name)
        if value is not None and value < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1")
    return args


def build_params(overrides, epochs, threads):
    """(naive params, ours params): params.yaml with --epochs/--threads on both, --set on ours only, both checked
    by qlora_nli.config.check_params (same messages as the pipeline for a bad key or value)."""
    base = yaml.safe_load((REPO / "params.yaml").read_text())
    base["train"]["epochs"] = epochs
    if threads is not None:
        base["compute"]["num_threads"] = threads
    ours = json.loads(json.dumps(base))
    for item in overrides:
        key, sep, text = item.partition("=")
        group, dot, name = key.strip().partition(".")
        if not sep or not dot:
            raise SystemExit(f"--set {item!r}: expected GROUP.KEY=VALUE, e.g. train.micro_batch_tokens=384")
        if key.strip() == "train.epochs":
            raise SystemExit("--set train.epochs: use --epochs, which applies to both sides")
        ours.setdefault(group, {})[name] = parse_value(text)
    return check_params(base, "params.yaml"), check_params(ours, "params.yaml + --set")

def ratio(a, b, digits=2):
    return round(a / b, digits) if a is not None and b else None


def evaluate_targets(sides, ratios, dvc):
    ours, naive = sides.get("ours", {}), sides.get("naive", {})
    both = bool(ours and naive)  # only sides without an error are passed in
    acc_ok = both and ours["accuracy"] >= naive["accuracy"]
    speedup = ratios.get("train_examples_per_second")

    def target(name, value, limit, ok, note=None):
        return {"name": name, "value": value, "target": limit, "pass": ok if value is not None else None,
                **({"note": note} if note else {})}

    return [
        target("train examples/s ours/naive, no accuracy loss", speedup, f">= {TARGETS['train_speedup']}",
               bool(speedup is not None and speedup >= TARGETS["train_speedup"] and acc_ok),
               f"accuracy ours {ours.get('accuracy')} vs naive {naive.get('accuracy')}" if both else None),
        target("eval pairs/s ours/naive", ratios.get("eval_pairs_per_second"), f">= {TARGETS['eval_speedup']}",
               bool(ratios.get("eval_pairs_per_second") is not None
                    and ratios["eval_pairs_per_second"] >= TARGETS["eval_speedup"])),
        target("ours peak RSS (MB)", ours.get("peak_rss_mb"), f"<= {TARGETS['ours_peak_rss_mb']}",
               bool(ours.get("peak_rss_mb") is not None and ours["peak_rss_mb"] <= TARGETS["ours_peak_rss_mb"])),
        target("dvc repro no-op (s)", dvc.get("seconds") if dvc else None, f"<= {TARGETS['dvc_repro_noop_seconds']}",
               bool(dvc and dvc.get("seconds") is not None and dvc["seconds"] <= TARGETS["dvc_repro_noop_seconds"]),
               dvc.get("reason") if dvc else "skipped (--no-dvc)"),
    ]


def print_table(report):
    sides, ratios = report["sides"], report["ratios"]
    ours, naive = sides.get("ours", {}), sides.get("naive", {})

    def get(side, *path):
        value = side
        for key in path:
            value = value.get(key) if isinstance(value, dict) else None
        return value

    rows = [
        ("train examples/s", ("train_examples_per_second",), 2, "train_examples_per_second"),
        ("train real tokens/s", ("train_real_tokens_per_second",), 1, "train_real_tokens_per_second"),
        ("train seconds", ("train_seconds",), 1, None),
        ("padding overhead (executed/real pos.)", ("padding_factor",), 2, None),
        ("peak RSS MB", ("peak_rss_mb",), 0, "peak_rss_mb"),
        ("eval pairs/s", ("eval_pairs_per_second",), 2, "eval_pairs_per_second"),
        ("test accuracy", ("accuracy",), 3, None),
        ("  cross-eval accuracy (other method)", ("cross_eval", "accuracy"), 3, None),
        ("useful GFLOP/s", ("flops", "useful", "flops_per_second"), 2, "useful_flops_per_second"),
        ("  % of matmul peak", ("flops", "useful", "percent_of_peak"), 1, None),
        ("model GFLOP/s", ("flops", "model", "flops_per_second"), 2, None),
        ("executed GFLOP/s", ("flops", "executed", "flops_per_second"), 2, None),
        ("  % of matmul peak", ("flops", "executed", "percent_of_peak"), 1, None),
    ]
    lines = [f"{'':40s} {'ours':>12s} {'naive':>12s} {'ours/naive':>11s}"]
    for label, path, digits, ratio_key in rows:
        a, b = get(ours, *path), get(naive, *path)
        if "GFLOP" in label:
            a, b = (x / 1e9 if x is not None else None for x in (a, b))
        r = ratios.get(ratio_key) if ratio_key else None
        lines.append(f"{label:40s} {fmt(a, digits):>12s} {fmt(b, digits):>12s} {fmt(r, 2):>11s}")
    peak = report["matmul_peak"]
    peaks = [f"{v['torch_threads']} threads: {v['peak_flops_per_second'] / 1e9:.1f} GFLOP/s" for v in peak.values()]
    lines.append("matmul peak (fp32 torch.mm): " + ("; ".join(peaks) or "-"))
    dvc = report["dvc_repro_noop"]
    if dvc is None:
        lines.append("dvc repro no-op: skipped (--no-dvc)")
    elif dvc["seconds"] is None:
        lines.append(f"dvc repro no-op: {dvc['reason']}")
    else:
        lines.append(f"dvc repro no-op: {dvc['seconds']:.2f} s (median of {dvc['runs_seconds']})")
    lines += target_lines(report["targets"], 2)
    for name, side in sides.items():
        if "error" in side:
            lines.append(f"{name}: ERROR {side['error']}")
    print("\n".join(lines), flush=True)


def main(args):
    enter_repo("data/train.jsonl", "data/test.jsonl")
    naive_params, ours_params = build_params(args.overrides, args.epochs, args.threads)
    if args.naive_eval_batch_size:
        naive_params["evaluate"]["batch_size"] = args.naive_eval_batch_size
    params = {"ours": ours_params, "naive": naive_params}
    threads = sorted({params[s]["compute"]["num_threads"] for s in args.sides})
    report = {
        "benchmark": "bench_train",
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "settings": {
            "epochs": args.epochs, "n_train": args.n_train, "n_test": args.n_test, "max_batches": args.max_batches,
            "sides": args.sides, "overrides_ours": args.overrides, "threads_requested": args.threads,
            "cross_eval": args.cross_eval,
            "params": {s: {g: params[s][g] for g in ("model", "prompt", "lora", "train", "evaluate")}
                       for s in args.sides},
        },
        "flops_formula": FLOPS_FORMULA,
    }
    if args.max_batches:
        log.warning("--max-batches %d: a debug run, the numbers are not the benchmark's", args.max_batches)

    with tempfile.TemporaryDirectory(prefix="bench_train.") as workdir:
        # Peak before and after the sides: a drop between the two says the machine was busy with something else.
        log.info("measuring the fp32 matmul peak (%dx%d, threads: %s)", MATMUL_SIZE, MATMUL_SIZE, threads)
        peak_before = run_child(__file__, "matmul", {"threads": threads}, workdir)
        sides = {}
        for side in args.sides:
            log.info("running side %s in a subprocess", side)
            spec = {"params": params[side], "n_train": args.n_train, "n_test": args.n_test,
                    "max_batches": args.max_batches, "cross_eval": args.cross_eval}
            sides[side] = run_child(__file__, side, spec, workdir)
        peak_after = run_child(__file__, "matmul", {"threads": threads}, workdir)

    peaks = matmul_peak((peak_before, peak_after), threads)
    for side, result in sides.items():
        if "error" not in result:
            peak = peaks.get(str(params[side]["compute"]["num_threads"]), {}).get("peak_flops_per_second")
            result["flops"] = flops(result, peak)
    report["matmul_peak"] = peaks
    report["machine"]["torch_threads"] = {s: r.get("torch_threads") for s, r in sides.items()}
    report["sides"] = sides

    ok = {s: r for s, r in sides.items() if "error" not in r}
    ours, naive = ok.get("ours"), ok.get("naive")
    ratios = {}
    if ours and naive:
        for key in ("train_examples_per_second", "train_real_tokens_per_second", "eval_pairs_per_second",
                    "peak_rss_mb"):
            ratios[key] = ratio(ours[key], naive[key])
        ratios["useful_flops_per_second"] = ratio(ours["flops"]["useful"]["flops_per_second"],
                                                  naive["flops"]["useful"]["flops_per_second"])
        ratios["accuracy_difference"] = round(ours["accuracy"] - naive["accuracy"], 4)
    report["ratios"] = ratios

    report["dvc_repro_noop"] = None
    if args.dvc:
        log.info("timing `dvc repro` with nothing changed")
        report["dvc_repro_noop"] = time_dvc_noop()
    report["targets"] = evaluate_targets(ok, ratios, report["dvc_repro_noop"])

    write_json(args.out, report)
    print_table(report)
    log.info("wrote %s", args.out)
    return 1 if len(ok) < len(sides) else 0


def child_main(args):
    """A child process: the matmul peak (common.py) or one side (train_ours.py, train_naive.py)."""
    os.chdir(REPO)
    spec = json.loads(Path(args.spec).read_text())
    run = {"matmul": child_matmul, "ours": child_ours, "naive": child_naive}[args.child]
    result = run(spec)
    write_json(args.result, result)


if __name__ == "__main__":
    cli = parse_args()
    role = cli.child or "parent"
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s [{role}] %(name)s: %(message)s")
    try:
        if cli.child:
            child_main(cli)
        else:
            sys.exit(main(cli))
    except NLIError as e:
        sys.exit(str(e))
