"""Label scoring of related prompts: token trees, every token that related prompts share computed once (the default
path of scoring.score_labels, "grouped" in the output) against the plain path (`score_labels_plain`: length-sorted
batches, only the prefix common to a whole batch computed once), on the embedded model (params.yaml model.*,
evaluate.batch_size).

    python benchmarks/bench_prefix_sharing.py [--data data/test.jsonl] [--n-pairs 100] [--slice-pairs 10]
                                              [--gap 5] [--threads N] [--no-pause]
                                              [--out benchmarks/results/prefix_sharing.json]

Two prompt sets built from the first --n-pairs test pairs (params.yaml prompt.template):
  variants   per pair the original prompt, a tautology ("H and true is true"), a negation ("H and false is not
             true"), the premise as its own hypothesis, plus the plain original again: 5 prompts per pair
  originals  the plain originals only: unrelated prompts, each a tree of its own
Both paths run in this one process with the same torch thread count. On this shared 2-core CPU a whole set takes
minutes, so each set is scored in slices of --slice-pairs pairs, one score_labels call per slice and path, the paths
alternating (plain, grouped, then grouped, plain, ...) so that both see the same machine. Each timed call is bracketed
by common.PausedSweep (BENCH_PAUSE_SCRIPT STOP ... CONT, CONT always and after 90 s at the latest), so that other
jobs sharing the CPU are paused while it runs; --no-pause leaves them alone.
Measured per path and set:
  pairs/s                     test pairs / summed wall seconds of the slices' score_labels calls (tokenization
                              included)
  tokens computed per pair    token positions the transformer body ran (padding and prefix passes included; the
                              plain path's answers' pass too), counted by a pre-hook on the body
Checks (in the JSON): the grouped scores equal the plain ones to atol 1e-4 with identical argmax, and scoring the last
slice again (untimed) gives identical grouped scores.
"""
import contextlib
import logging
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import PausedSweep, machine_info  # noqa: E402

from qlora_nli.config import load_params
from qlora_nli.prompts import format_prompt
from qlora_nli.runtime.errors import ArgumentParser
from qlora_nli.runtime.files import write_json
from common import read_jsonl

log = logging.getLogger("bench_prefix_sharing")
PATHS = {"plain": False, "grouped": True}


def parse_args(argv=None):
    ap = ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default=str(REPO / "data/test.jsonl"), help="test pairs (dvc repro prepare writes them)")
    ap.add_argument("--n-pairs", type=int, default=100)
    ap.add_argument("--slice-pairs", type=int, default=10, help="pairs per timed score_labels call")
    ap.add_argument("--gap", type=float, default=5.0, help="seconds between timed calls (the sweep runs)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = params.yaml compute.num_threads)")
    ap.add_argument("--no-pause", action="store_true", help="do not pause the experiment sweep while timing")
    ap.add_argument("--out", default=str(REPO / "benchmarks/results/prefix_sharing.json"))
    return ap.parse_args(argv)


def variant_prompts(template, rows):
    variants = []
    for r in rows:
        p, h = r["premise"].strip(), r["hypothesis"].strip().rstrip(".")
        for hypothesis in (r["hypothesis"], f"{h} and true is true", f"{h} and false is not true", p):
            variants.append(format_prompt(template, {"premise": p, "hypothesis": hypothesis}))
    return variants + original_prompts(template, rows)


def original_prompts(template, rows):
    return [format_prompt(template, r) for r in rows]


def timed_run(model, tokenizer, prompts, batch_size, group_prefixes, pause, counter):
    """score_labels timed, other jobs on the CPU paused if asked (common.PausedSweep)."""
    from qlora_nli.infer.scoring import score_labels, score_labels_plain

    counter[0] = 0
    with PausedSweep() if pause else contextlib.nullcontext():
        start = time.perf_counter()
        scores = (score_labels if group_prefixes else score_labels_plain)(model, tokenizer, prompts, batch_size)
        seconds = time.perf_counter() - start
    return scores, seconds, counter[0]


def main(argv=None):
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse_args(argv)
    import torch

    from qlora_nli.forward import body_and_head
    from qlora_nli.infer.scoring import score_labels
    from qlora_nli.model.adapters import load_for_inference
    from qlora_nli.model.loading import load_tokenizer

    params = load_params(REPO / "params.yaml")
    threads = args.threads or params["compute"]["num_threads"]
    if threads:
        torch.set_num_threads(threads)
    rows = read_jsonl(args.data)[: args.n_pairs]
    template = params["prompt"]["template"]
    sets = {"variants": lambda part: variant_prompts(template, part),
            "originals": lambda part: original_prompts(template, part)}
    model = load_for_inference(params["model"], "cpu", adapter_dir=None)
    tokenizer = load_tokenizer(params["model"]["name"], params["model"]["trust_remote_code"])
    counter = [0]
    body, _ = body_and_head(model)
    body.register_forward_pre_hook(
        lambda module, a, kw: counter.__setitem__(0, counter[0] + kw["input_ids"].numel()), with_kwargs=True)
    batch_size = params["evaluate"]["batch_size"]

    results = {}
    for name, prompts_of in sets.items():
        runs = {path: [] for path in PATHS}
        scores = {path: [] for path in PATHS}
        for first in range(0, len(rows), args.slice_pairs):
            prompts = prompts_of(rows[first : first + args.slice_pairs])
            order = list(PATHS) if (first // args.slice_pairs) % 2 == 0 else list(PATHS)[::-1]  # A B, B A, ...
            for path in order:
                s, seconds, tokens = timed_run(model, tokenizer, prompts, batch_size, PATHS[path],
                                               not args.no_pause, counter)
                runs[path].append({"seconds": round(seconds, 3), "tokens": tokens})
                scores[path].append(s)
                log.info(f"{name:9s} pairs {first}+ {path:7s} {seconds:7.2f} s  {tokens} tokens")
                time.sleep(args.gap)  # the paused sweep runs again between timed windows
        again = score_labels(model, tokenizer, prompts, batch_size)  # the last slice, untimed
        n = len(rows)
        side = {path: {"seconds": round(sum(r["seconds"] for r in runs[path]), 2),
                       "pairs_per_second": round(n / sum(r["seconds"] for r in runs[path]), 3),
                       "tokens_per_pair": round(sum(r["tokens"] for r in runs[path]) / n, 1), "runs": runs[path]}
                for path in PATHS}
        plain, grouped = torch.cat(scores["plain"]), torch.cat(scores["grouped"])
        results[name] = {
            "prompts": len(plain), "pairs": n, **side,
            "ratio_pairs_per_second": round(side["grouped"]["pairs_per_second"] / side["plain"]["pairs_per_second"], 3),
            "ratio_tokens_per_pair": round(side["plain"]["tokens_per_pair"] / side["grouped"]["tokens_per_pair"], 3),
            "max_abs_difference": float((plain - grouped).abs().max()),
            "allclose_atol_1e-4": bool(torch.allclose(plain, grouped, atol=1e-4)),
            "same_argmax": bool(torch.equal(plain.argmax(1), grouped.argmax(1))),
            "grouped_reproducible": bool(torch.equal(again, scores["grouped"][-1])),
        }

    print(f"\n{'set':10s} {'path':8s} {'pairs/s':>8s} {'tokens/pair':>12s}")
    for name, r in results.items():
        for path in PATHS:
            print(f"{name:10s} {path:8s} {r[path]['pairs_per_second']:8.2f} {r[path]['tokens_per_pair']:12.1f}")
        print(f"{name:10s} {'ratio':8s} {r['ratio_pairs_per_second']:8.2f} {r['ratio_tokens_per_pair']:12.2f}"
              f"   (max |diff| {r['max_abs_difference']:.2e}, same argmax {r['same_argmax']})")
    write_json(args.out, {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": machine_info(),
        "torch_threads": torch.get_num_threads(), "model": params["model"]["name"], "batch_size": batch_size,
        "sweep_paused_while_timing": not args.no_pause, "sets": results,
    })


if __name__ == "__main__":
    main()
