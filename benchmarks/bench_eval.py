"""Scoring speed of this checkout's code against a git revision's, same model, data, machine and thread count.

    python benchmarks/bench_eval.py --against REV [--pairs test|evaluate] [--n 100] [--repeats 3] [--threads N]
                                    [--out benchmarks/results/eval.json]

Scores, by label log-likelihood (scoring.score_labels, each side at its own params.yaml evaluate.batch_size), either
the first N pairs of data/test.jsonl (--pairs test, the default) or every prompt the `evaluate` stage scores (--pairs
evaluate: test, validation, the probes of evaluate.probes and the extra sets of data/sets/, built by this checkout's
analysis.evaluation.build_jobs from the prepared data; N is then not used), with the model of params.yaml model.*:
"baseline" (no adapter) and "finetuned" (models/adapter, when present). The revision's code comes from a `git worktree
add --detach` of REV in a temporary folder (removed afterwards). Each side runs in its own subprocess with its tree
first on sys.path, in the repository root (same params, data and adapter), sides alternating (this, REV, this, REV,
...) for --repeats rounds. A side loads the model with its own tree's `modeling.load_for_inference(model, "cpu",
adapter)` if it has one, else `load_base_model` (+ `load_adapter`) + `.eval()` (older revisions). Model loading is not
timed; the prompts' tokenization is (it is part of scoring).

Measured per side and model: pairs/s (median over the rounds; best beside it), the ratio this / REV, and useful
evaluation FLOP/s as % of the fp32 matmul peak (best of the peaks measured before and after, same threads):
  useful eval FLOPs = sum over pairs of
      2 * N * (P + sum over the 3 labels of (len(answer) - 1))   the blocks, on every real token the scores need:
                                                                  the prompt's P tokens and each answer's tokens
                                                                  but the last (the last one is only predicted)
    + 2 * V * H * (sum over the 3 labels of len(answer))          vocabulary projection, only where a log-probability
                                                                  is read: last prompt position and answer tokens
  N = dense weights of the base model's non-embedding linear layers (logical in*out, LoRA's own layers not
  counted), V * H = the vocabulary projection; attention scores, norms and padding are not counted. Token counts use
  this checkout's tokenization, so both sides are charged the same work.
Both sides' scores are compared (max abs difference per model): a speed-up must not change the numbers.
While a side is timed, the long experiment sweep sharing this CPU (if any) is paused, 90 s at most at a time
(common.PausedSweep).
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

from common import (  # noqa: E402
    REPO,
    PausedSweep,
    child_matmul,
    fmt,
    machine_info,
    matmul_peak,
    run_child,
    set_threads,
)

log = logging.getLogger("bench_eval")
SIDES = ("this", "rev")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--against", help="git revision whose code is compared with this checkout's (e.g. HEAD~1)")
    ap.add_argument("--pairs", choices=("test", "evaluate"), default="test",
                    help="test: the first N test pairs; evaluate: every prompt of the evaluate stage")
    ap.add_argument("--n", type=int, default=100, help="first N pairs of data/test.jsonl (default 100)")
    ap.add_argument("--repeats", type=int, default=3, help="rounds of this, REV (default 3)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads, both sides (default params compute.num_threads; 0 = torch's default)")
    ap.add_argument("--out", default="benchmarks/results/eval.json", help="JSON results")
    # internal: how the parent starts a child
    ap.add_argument("--child", choices=("side", "matmul", "prompts"), help=argparse.SUPPRESS)
    ap.add_argument("--spec", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if not args.child and not args.against:
        ap.error("--against REV is required")
    for name in ("n", "repeats"):
        if getattr(args, name) < 1:
            ap.error(f"--{name} must be >= 1")
    return args


# ------------------------------------------------------------------------------------------------------------------
# Parent
# ------------------------------------------------------------------------------------------------------------------

def git(*args):
    return subprocess.run(["git", *args], cwd=REPO, check=True, capture_output=True, text=True).stdout.strip()


def useful_flops(counts, dims):
    """The docstring's useful evaluation FLOPs for the scored pairs."""
    return 2 * dims["n_body_linear"] * counts["block_tokens"] + 2 * dims["lm_head"] * counts["projected_positions"]


def summarize(runs, counts, dims, peak, n):
    """Per model: pairs/s over the rounds, useful GFLOP/s and % of peak at the median."""
    out = {}
    for model in runs[0]["models"]:
        rates = [n / r["models"][model]["seconds"] for r in runs]
        median = statistics.median(rates)
        flops = useful_flops(counts, dims) * median / n
        out[model] = {"pairs_per_second_median": round(median, 3), "pairs_per_second_best": round(max(rates), 3),
                      "pairs_per_second_runs": [round(x, 3) for x in rates],
                      "useful_flops_per_second": round(flops),
                      "percent_of_peak": round(100 * flops / peak, 2) if peak else None}
    return out


def max_abs_difference(a, b):
    return max((abs(x - y) for row_a, row_b in zip(a, b) for x, y in zip(row_a, row_b)), default=0.0)


def print_table(report):
    lines = [f"{'':28s} {'this':>10s} {report['against']['short']:>10s} {'this/rev':>9s}"]
    for model, ratio in report["ratios"].items():
        this, rev = report["sides"]["this"]["summary"][model], report["sides"]["rev"]["summary"][model]
        lines.append(f"{model + ' pairs/s':28s} {fmt(this['pairs_per_second_median'], 2):>10s} "
                     f"{fmt(rev['pairs_per_second_median'], 2):>10s} {fmt(ratio, 2):>9s}")
        lines.append(f"{'  useful GFLOP/s':28s} {fmt(this['useful_flops_per_second'] / 1e9, 2):>10s} "
                     f"{fmt(rev['useful_flops_per_second'] / 1e9, 2):>10s}")
        lines.append(f"{'  % of matmul peak':28s} {fmt(this['percent_of_peak'], 1):>10s} "
                     f"{fmt(rev['percent_of_peak'], 1):>10s}")
        lines.append(f"{'  max |score difference|':28s} {report['max_abs_score_difference'][model]:>10.2e}")
    peak = report["matmul_peak"]
    lines.append("matmul peak (fp32 torch.mm): " + ("; ".join(
        f"{v['torch_threads']} threads: {v['peak_flops_per_second'] / 1e9:.1f} GFLOP/s" for v in peak.values()) or "-"))
    if report["sweep_pause_expired"]:
        lines.append("note: a timed section outlived the 90 s sweep pause; it ran beside the sweep")
    print("\n".join(lines), flush=True)


def main(args):
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    test_file, adapter = REPO / "data/test.jsonl", REPO / "models/adapter"
    if not test_file.exists():
        raise SystemExit(f"{test_file} is missing: run `dvc repro prepare` first")
    threads = params["compute"]["num_threads"] if args.threads is None else args.threads
    models = {"baseline": None}
    if adapter.exists():
        models["finetuned"] = str(adapter)
    else:
        log.warning("%s is missing: timing the baseline only (run `dvc repro finetune` for the finetuned model)",
                    adapter)
    commit = git("rev-parse", "--verify", f"{args.against}^{{commit}}")
    report = {
        "benchmark": "bench_eval",
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "this": {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))},
        "against": {"rev": args.against, "commit": commit, "short": commit[:8]},
        "settings": {"pairs": args.pairs, "n": args.n, "repeats": args.repeats, "threads_requested": threads,
                     "model": params["model"], "models": models},
    }
    with tempfile.TemporaryDirectory(prefix="bench_eval.") as workdir:
        rev_tree = Path(workdir) / "rev"
        git("worktree", "add", "--detach", str(rev_tree), commit)
        try:
            trees = {"this": str(REPO), "rev": str(rev_tree)}
            # each side at its own evaluate.batch_size: the default is part of what a revision's scoring is
            batch_sizes = {side: yaml.safe_load((Path(tree) / "params.yaml").read_text())["evaluate"]["batch_size"]
                           for side, tree in trees.items()}
            report["settings"]["batch_size"] = batch_sizes
            peaks = [run_child(__file__, "matmul", {"threads": [threads]}, workdir)]
            built = run_child(__file__, "prompts", {"pairs": args.pairs, "n": args.n, "params": params}, workdir)
            if "error" in built:
                raise SystemExit(f"building the prompts failed: {built['error']}")
            prompts = built["prompts"]
            report["settings"]["prompts_per_part"] = built["parts"]
            runs = {side: [] for side in SIDES}
            for round_ in range(args.repeats):
                for side in SIDES:
                    log.info("round %d/%d: %s side (%s)", round_ + 1, args.repeats, side, trees[side])
                    spec = {"tree": trees[side], "model": params["model"], "models": models, "prompts": prompts,
                            "threads": threads, "batch_size": batch_sizes[side],
                            "keep_scores": round_ == 0}
                    result = run_child(__file__, f"side-{side}-{round_}", spec, workdir, role_arg="side")
                    if "error" in result:
                        raise SystemExit(f"the {side} side failed in round {round_ + 1}: {result['error']}")
                    runs[side].append(result)
            peaks.append(run_child(__file__, "matmul", {"threads": [threads]}, workdir))
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(rev_tree)], cwd=REPO)

    report["matmul_peak"] = matmul_peak(peaks, [threads])
    peak = report["matmul_peak"].get(str(threads), {}).get("peak_flops_per_second")
    counts, dims = runs["this"][0]["counts"], runs["this"][0]["dims"]
    report["useful_eval_flops"] = {"counts": counts, "dims": dims, "total": useful_flops(counts, dims)}
    report["sides"] = {side: {"qlora_nli_from": runs[side][0]["qlora_nli_from"],
                              "loader": runs[side][0]["loader"], "torch_threads": runs[side][0]["torch_threads"],
                              "summary": summarize(runs[side], counts, dims, peak, len(prompts))} for side in SIDES}
    report["ratios"] = {m: round(report["sides"]["this"]["summary"][m]["pairs_per_second_median"]
                                 / report["sides"]["rev"]["summary"][m]["pairs_per_second_median"], 3)
                        for m in models}
    report["max_abs_score_difference"] = {m: max_abs_difference(runs["this"][0]["models"][m]["scores"],
                                                                runs["rev"][0]["models"][m]["scores"])
                                          for m in models}
    report["sweep_pause_expired"] = any(r["sweep_pause_expired"] for side in SIDES for r in runs[side])
    out = REPO / args.out if not Path(args.out).is_absolute() else Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print_table(report)
    log.info("wrote %s", out)
    return 0


# ------------------------------------------------------------------------------------------------------------------
# Child: one side, its tree's qlora_nli first on sys.path (imported only here)
# ------------------------------------------------------------------------------------------------------------------

def _load(modeling, model_params, adapter):
    """`modeling`: the tree's model-loading namespace (qlora_nli.modeling in flat trees, a namespace of
    qlora_nli.model.loading and qlora_nli.model.adapters in packaged ones)."""
    if hasattr(modeling, "load_for_inference"):
        model, loader = modeling.load_for_inference(model_params, "cpu", adapter), "load_for_inference"
    else:
        model = modeling.load_base_model(model_params, "cpu")
        if adapter is not None:
            model = modeling.load_adapter(model, adapter)
        model, loader = model.eval(), "load_base_model + load_adapter + eval"
    # Trees from before modeling.keep_4bit_weights_as_loaded let bitsandbytes switch 4-bit layers to a bfloat16 kernel
    # on AVX512-BF16 CPUs: turned off here too, so that both sides compute what the stages compute, in fp32.
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    return model, loader


def _counts(tokenizer, prompts):
    """Token counts of the useful-FLOP definition, with this tree's tokenization."""
    try:
        from qlora_nli.prompts import encode_answers, encode_prompts
    except ImportError:  # a flat tree
        from qlora_nli.scoring import encode_answers, encode_prompts

    answers = encode_answers(tokenizer)
    prompt_tokens = sum(len(p) for p in encode_prompts(tokenizer, prompts))
    per_pair_answer = sum(len(a) for a in answers)
    return {"pairs": len(prompts), "prompt_tokens": prompt_tokens,
            "block_tokens": prompt_tokens + len(prompts) * (per_pair_answer - len(answers)),
            "projected_positions": len(prompts) * per_pair_answer}


def _dims(model):
    import torch

    head = model.get_output_embeddings()
    return {"n_body_linear": sum(m.in_features * m.out_features for name, m in model.named_modules()
                                 if isinstance(m, torch.nn.Linear) and m is not head and "lora_" not in name),
            "lm_head": head.in_features * head.out_features}


def child_prompts(spec):
    """The prompts both sides score, built once by this checkout's code: {"prompts": [...], "parts": {part: n}}."""
    sys.path.insert(0, str(REPO))  # stages/ is not part of the installed package
    from qlora_nli.analysis.evaluation import build_jobs
    from qlora_nli.config import check_params
    from qlora_nli.data.artifacts import data_row_problem, read_rows
    from qlora_nli.prompts import format_prompt
    from stages.evaluate import SETS_DIR

    params = check_params(spec["params"], warn=False)  # hypothesis_only_template: auto, resolved as evaluate does
    test = read_rows("data/test.jsonl", data_row_problem)
    if spec["pairs"] == "test":
        if spec["n"] > len(test):
            raise SystemExit(f"--n {spec['n']}: data/test.jsonl has only {len(test)} pairs")
        jobs = [("test", None, [format_prompt(params["prompt"]["template"], r) for r in test[: spec["n"]]], None)]
    else:
        sets = {path.stem: read_rows(path, data_row_problem) for path in sorted(SETS_DIR.glob("*.jsonl"))}
        jobs = build_jobs(test, read_rows("data/validation.jsonl", data_row_problem), sets,
                          params["evaluate"]["probes"], params["prompt"]["template"],
                          params["evaluate"]["hypothesis_only_template"])
    return {"prompts": [p for _, _, prompts, _ in jobs for p in prompts],
            "parts": {group: len(prompts) for group, _, prompts, _ in jobs}}


def child_side(spec):
    sys.path.insert(0, spec["tree"])
    import torch

    import qlora_nli
    try:  # a tree with the packaged layout, else a flat one (qlora_nli/modeling.py, qlora_nli/scoring.py)
        from types import SimpleNamespace

        from qlora_nli.infer.scoring import score_labels
        from qlora_nli.model import adapters, loading
        modeling = SimpleNamespace(**{**vars(loading), **vars(adapters)})
    except ImportError:
        from qlora_nli.scoring import score_labels

        from qlora_nli import modeling

    prompts = spec["prompts"]
    result = {"qlora_nli_from": str(Path(qlora_nli.__file__).parent), "torch_threads": set_threads(spec["threads"]),
              "models": {}, "sweep_pause_expired": False}
    tokenizer = modeling.load_tokenizer(spec["model"]["name"], spec["model"]["trust_remote_code"])
    result["counts"] = _counts(tokenizer, prompts)
    for name, adapter in spec["models"].items():
        model, result["loader"] = _load(modeling, spec["model"], adapter)
        result.setdefault("dims", _dims(model))
        score_labels(model, tokenizer, prompts[:2], spec["batch_size"])  # warm-up: thread pool, allocator
        with torch.no_grad(), PausedSweep() as pause:
            start = time.perf_counter()
            scores = score_labels(model, tokenizer, prompts, spec["batch_size"])
            seconds = time.perf_counter() - start
        result["sweep_pause_expired"] |= pause.expired
        result["models"][name] = {"seconds": seconds,
                                  "scores": scores.tolist() if spec["keep_scores"] else None}
        log.info("%s: %d pairs in %.2f s", name, len(prompts), seconds)
        del model
    return result


if __name__ == "__main__":
    cli = parse_args()
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s [{cli.child or 'parent'}] %(name)s: %(message)s")
    if cli.child:
        spec = json.loads(Path(cli.spec).read_text())
        result = {"side": child_side, "matmul": child_matmul, "prompts": child_prompts}[cli.child](spec)
        Path(cli.result).write_text(json.dumps(result))
    else:
        sys.exit(main(cli))
