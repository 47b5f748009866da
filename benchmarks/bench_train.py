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
--set train.num_threads=1 (--threads N sets both sides). Develop with e.g. --n-train 32 --n-test 8 --max-batches 2.

Sides (each runs in its own subprocess, so its peak RSS is its own):
  ours   the `finetune` and `evaluate` code paths of the package, the run built and trained by the stage's own
         functions (training.build_training: model, LoRA, optimizer, schedule, kept frozen-block states;
         training.train_remaining_epochs: each epoch's batches by training.epoch_batches): length-grouped batches
         with dynamic padding, split into micro-batches by a token budget (training.micro_batches, train_one_epoch), the prompts' shared prefix computed once per pass (scoring.forward_body), loss on
         the answer tokens only with logits computed only there (scoring.answer_loss), evaluation by label
         log-likelihood with the KV-cache trick (scoring.score_labels). params.yaml lora/train/evaluate
         values, plus any `--set group.key=value`.
  naive  the assignment-notebook recipe: transformers.Trainer + DataCollatorForLanguageModeling(mlm=False) on the
         full "prompt + answer" text padded to one fixed length (the longest tokenized example of the sample, its
         fairest value), loss over ALL tokens, evaluation by greedy `model.generate` (max_new_tokens =
         evaluate.max_new_tokens, length-sorted batches of evaluate.batch_size) + scoring.parse_label (an
         unparseable answer counts as wrong). params.yaml values only (`--set` does not touch it).
Neither side validates or saves checkpoints inside the timed training loop (the pipeline's per-epoch validation
and checkpoints are left out, Trainer runs with save_strategy="no").

Measured per side:
  train examples/s      examples trained / wall seconds of the training loop (model loading excluded)
  train real tokens/s   real tokens / same seconds; real tokens of an example = len(prompt ids) + len(answer ids)
                        with the package's tokenization (identical definition both sides; the naive side's
                        tokenization of the joined text is checked to give the same count, see `tokenization`)
  peak RSS (MB)         ru_maxrss of the child process after its main evaluation (load + train + eval); the
                        psutil-sampled peak (qlora_nli.resources.ResourceMonitor) is reported beside it
  eval pairs/s          test pairs / wall seconds of prediction (score_labels, resp. generate + parse)
  test accuracy         after the same number of epochs (--epochs, default 1); with --cross-eval (default) each
                        trained model is also evaluated the other side's way, so that an accuracy gap can be put
                        down to the training recipe or to the evaluation method
  train FLOP/s          against a matmul peak measured in the same run: best of several fp32 torch.mm of
                        2048x2048 (2*n^3 FLOPs each) at the same thread count, before and after the sides

FLOP estimate (forward + backward of a frozen base with LoRA adapters; elementwise work, norms, softmax and the
4-bit dequantization are not counted):
  N      = dense weights of the non-embedding linear layers (q, k, v, o, gate, up, down of every block;
           logical in*out of each Linear4bit, counted on the loaded model)
  N_lora = trainable LoRA weights = sum over adapted layers of r * (in + out)
  B      = fraction of the blocks that backward runs through: from the lowest adapted block up (lora.layers),
           all of them under gradient checkpointing
  per token through the blocks:   2N (forward) + 2N * B (backward, input gradients only: the base is frozen)
                                  + 6 N_lora (forward, input gradients and weight gradients of the adapters)
  attention scores, per sequence: 4 * (1 + 2B) * layers * (heads * head_dim) * pairs, pairs = L(L+1)/2 causal
                                  pairs of the L real tokens (for "executed": W*W of the padded width W, a mask is
                                  passed)
  vocabulary projection:          4 * vocab * hidden per position where logits are computed (forward + input grad)
  Three totals, each divided by the training seconds:
    useful   the task's work, same definition both sides: blocks + attention on real tokens, vocabulary projection
             at the answer tokens only (so useful FLOP/s ratio = real tokens/s ratio, and % of peak says how far
             from the hardware the task is done)
    model    each recipe's own objective on real tokens: ours = useful; naive projects every real position but
             the last (L - 1 per example), as its loss over all tokens requires
    executed what actually ran, padding included: ours the prompts' shared prefix once per micro-batch plus each
             row's own tokens padded to the micro-batch's longest, logits at the answer tokens only (so ours'
             executed can be below useful: the useful count charges the template's fixed prefix to every
             example); naive every position of the fixed length; with gradient checkpointing the blocks'
             forward again (2N + 2N_lora per position). Ours keeps the states entering the first adapted block
             (training.FrozenBlockStates, timed as part of training): the frozen blocks' forward is counted once
             per position of that pass, not per epoch (their attention there is not counted)

Also: `dvc repro` with nothing changed, timed in the repository root (3 runs, median), only when `dvc status`
says everything is up to date (otherwise null with the reason).

Targets (pass/fail in the JSON): train examples/s ours/naive >= 2 with ours' accuracy >= naive's; eval pairs/s
ours/naive >= 10; ours' peak RSS <= 2048 MB; dvc repro no-op <= 5 s.
"""
import argparse
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/common.py, when run from anywhere

from common import (MATMUL_REPS, MATMUL_SIZE, REPO, child_matmul, fmt, machine_info, matmul_peak,  # noqa: E402
                    parse_value, rss_peak_mb, run_child, set_threads, time_dvc_noop)
from qlora_nli.io import read_jsonl, write_json  # noqa: E402  (light imports: the parent never loads torch)
from qlora_nli.errors import NLIError  # noqa: E402
from qlora_nli.params import check_params  # noqa: E402

log = logging.getLogger("bench_train")

SIDES = ("ours", "naive")
TARGETS = {"train_speedup": 2.0, "eval_speedup": 10.0, "ours_peak_rss_mb": 2048.0, "dvc_repro_noop_seconds": 5.0}
FLOPS_FORMULA = {
    "N": "dense weights of the non-embedding linear layers (logical in*out, q/k/v/o/gate/up/down of every block)",
    "N_lora": "trainable LoRA weights, sum of r*(in+out) over adapted layers",
    "B": "fraction of the blocks backward runs through (lowest adapted block up; all under gradient checkpointing)",
    "per_token_blocks": "2N forward + 2N*B backward (input grads only, frozen base) + 6 N_lora",
    "attention_per_sequence": "4 * (1 + 2B) * layers * heads * head_dim * pairs; pairs = L(L+1)/2 (real, causal) "
                              "or W*W (executed, padded width W with a mask)",
    "vocab_projection_per_position": "4 * vocab * hidden (forward + input grad of the frozen tied lm_head)",
    "useful": "blocks + attention on real tokens + projection at answer tokens only (same both sides)",
    "model": "blocks + attention on real tokens + projection where the side's own loss needs it "
             "(ours: answer tokens; naive: L-1 positions per example)",
    "executed": "blocks + attention + projection on every position computed, padding included "
                "(+ 2N + 2N_lora per position recomputed under gradient checkpointing; attention recompute not "
                "counted); ours' frozen blocks (below the first adapted one) counted once per position of the "
                "pass that keeps their states, not per epoch (their attention there not counted)",
    "peak": f"best of {MATMUL_REPS} fp32 torch.mm {MATMUL_SIZE}x{MATMUL_SIZE}, 2*n^3 FLOPs each, same threads",
}


# ------------------------------------------------------------------------------------------------------------------
# Parent: settings, children, dvc timing, FLOP arithmetic, table and JSON
# ------------------------------------------------------------------------------------------------------------------

def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=1, help="training epochs, both sides (default 1)")
    ap.add_argument("--n-train", type=int, default=1000, help="first N pairs of data/train.jsonl")
    ap.add_argument("--n-test", type=int, default=100, help="first N pairs of data/test.jsonl")
    ap.add_argument("--max-batches", type=int, default=None, help="debug: at most N optimizer steps per epoch")
    ap.add_argument("--sides", default="ours,naive", help="comma-separated subset of ours,naive")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads for both sides and the matmul peak (default params train.num_threads; "
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
    by qlora_nli.params.check_params (same messages as the pipeline for a bad key or value)."""
    base = yaml.safe_load((REPO / "params.yaml").read_text())
    base["train"]["epochs"] = epochs
    if threads is not None:
        base["train"]["num_threads"] = threads
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


def flops(side, peak_flops):
    """The three FLOP totals of the module docstring, as FLOP/s and % of the matmul peak."""
    d, c = side["model_dims"], side["counts"]
    backward = d["n_backward_layers"] / d["n_layers"]
    blocks = (2 + 2 * backward) * d["n_body_linear"] + 6 * d["n_lora"]
    attention = 4 * (1 + 2 * backward) * d["n_layers"] * d["d_attn"]
    # Ours with training.FrozenBlockStates: the frozen blocks' forward ran once per example, not in every epoch.
    kept = side.get("frozen_blocks") or {"blocks": 0, "positions": 0}
    kept_forward = 2 * d["n_body_linear"] * kept["blocks"] / d["n_layers"]
    kept_attention = 4 * kept["blocks"] * d["d_attn"]
    vocab = 4 * d["lm_head"]
    # Gradient checkpointing runs the blocks' forward twice: work that executes but is not useful.
    recompute = (2 * d["n_body_linear"] + 2 * d["n_lora"]) if side["gradient_checkpointing"] else 0
    totals = {
        "useful": blocks * c["real_tokens"] + attention * c["attn_pairs_real"] + vocab * c["answer_tokens"],
        "model": blocks * c["real_tokens"] + attention * c["attn_pairs_real"] + vocab * c["lm_head_positions_model"],
        "executed": ((blocks + recompute - kept_forward) * c["executed_positions"] + kept_forward * kept["positions"]
                     + (attention - kept_attention) * c["attn_pairs_executed"]
                     + vocab * c["lm_head_positions_executed"]),
    }
    out = {"backward_fraction": backward, "per_real_token_blocks": blocks, "per_logit_position": vocab, "attention_per_pair": attention}
    for name, total in totals.items():
        rate = total / side["train_seconds"]
        out[name] = {"total_flops": total, "flops_per_second": round(rate),
                     "percent_of_peak": round(100 * rate / peak_flops, 2) if peak_flops else None}
    return out


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
    lines.append("targets:")
    for t in report["targets"]:
        verdict = {True: "PASS", False: "FAIL", None: "n/a"}[t["pass"]]
        lines.append(f"  [{verdict:4s}] {t['name']}: {fmt(t['value'], 2)} (target {t['target']})")
    for name, side in sides.items():
        if "error" in side:
            lines.append(f"{name}: ERROR {side['error']}")
    print("\n".join(lines), flush=True)


def main(args):
    os.chdir(REPO)
    for path in ("data/train.jsonl", "data/test.jsonl"):
        if not Path(path).exists():
            raise SystemExit(f"{path} is missing: run `dvc repro prepare` first")
    naive_params, ours_params = build_params(args.overrides, args.epochs, args.threads)
    if args.naive_eval_batch_size:
        naive_params["evaluate"]["batch_size"] = args.naive_eval_batch_size
    params = {"ours": ours_params, "naive": naive_params}
    threads = sorted({params[s]["train"]["num_threads"] for s in args.sides})
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
            peak = peaks.get(str(params[side]["train"]["num_threads"]), {}).get("peak_flops_per_second")
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


# ------------------------------------------------------------------------------------------------------------------
# Children: each imports torch itself, so the parent stays small and ru_maxrss is the side's own
# ------------------------------------------------------------------------------------------------------------------

def _load_rows(spec):
    train, test = read_jsonl("data/train.jsonl"), read_jsonl("data/test.jsonl")
    for name, rows, n in (("train", train, spec["n_train"]), ("test", test, spec["n_test"])):
        if n > len(rows):
            raise SystemExit(f"--n-{name} {n}: data/{name}.jsonl has only {len(rows)} pairs")
    return train[: spec["n_train"]], test[: spec["n_test"]]


def _encode(tokenizer, template, rows):
    """Prompt ids, answer ids and real lengths with the package's tokenization (the definition of a real token)."""
    from qlora_nli.prompts import format_prompt
    from qlora_nli.scoring import encode_answers, encode_prompts

    prompts = [format_prompt(template, r) for r in rows]
    answers = encode_answers(tokenizer)
    prompt_ids = encode_prompts(tokenizer, prompts)
    answer_ids = [answers[r["label"]] for r in rows]
    return prompts, prompt_ids, answer_ids, [len(p) + len(a) for p, a in zip(prompt_ids, answer_ids)]


def _start_side(spec):
    """What both sides start from: threads set, the rows, the tokenizer and the package's tokenization of them.
    Returns (result dict, tokenizer, train rows, _encode(train rows), test rows, test prompts)."""
    from qlora_nli import modeling

    params = spec["params"]
    result = {"torch_threads": set_threads(params["train"]["num_threads"]), "rss_mb_after_imports": rss_peak_mb()}
    train_rows, test_rows = _load_rows(spec)
    tokenizer = modeling.load_tokenizer(params["model"]["name"], params["model"]["trust_remote_code"])
    template = params["prompt"]["template"]
    return (result, tokenizer, train_rows, _encode(tokenizer, template, train_rows), test_rows,
            _encode(tokenizer, template, test_rows)[0])


def _load_model(params):
    """The naive side's model: 4-bit base + LoRA with the same seed, config and loaders as the pipeline's."""
    from qlora_nli import modeling
    from qlora_nli.training import set_seed

    set_seed(params["train"]["seed"])  # LoRA init is random: same seed, same start on both sides
    model = modeling.load_base_model(params["model"], "cpu")
    total = modeling.count_parameters(model)["total"]
    model = modeling.attach_lora(model, params["lora"], params["train"]["gradient_checkpointing"])
    return model, _model_dims(model, total, modeling.count_parameters(model)["trainable"], params)


def _model_dims(model, parameters_total, n_lora, params):
    """The sizes the FLOP estimate needs, from the model with its adapters attached."""
    import torch

    from qlora_nli.training import first_trainable_block

    head = model.get_output_embeddings()
    cfg = model.config
    # Linear4bit keeps the logical in/out features; lm_head (tied to the embeddings) is counted apart and the
    # adapters' own Linear layers (lora_A, lora_B) are LoRA weights, not the base's
    base_linear = [m for name, m in model.named_modules()
                   if isinstance(m, torch.nn.Linear) and m is not head and "lora_" not in name]
    # Backward runs from the top down to the lowest adapted block (to the embeddings under gradient checkpointing,
    # where peft makes the embeddings' output require gradients).
    lowest = 0 if params["train"]["gradient_checkpointing"] else first_trainable_block(model)
    return {
        "n_body_linear": sum(m.in_features * m.out_features for m in base_linear),
        "lm_head": head.in_features * head.out_features,
        "n_layers": cfg.num_hidden_layers,
        "d_attn": cfg.num_attention_heads * getattr(cfg, "head_dim", cfg.hidden_size // cfg.num_attention_heads),
        "parameters_total": parameters_total,
        "n_lora": n_lora,
        "lora_target_modules": sorted(getattr(model.peft_config["default"], "target_modules", None) or []),
        "n_backward_layers": cfg.num_hidden_layers - lowest,
    }


def _accuracy(preds, rows):
    return round(sum(p == r["label"] for p, r in zip(preds, rows)) / len(rows), 4)


def _predict(method, model, tokenizer, prompts, evaluate_params):
    """(predictions, seconds, invalid count, a few raw generations) by label scoring or by generation + parsing."""
    from qlora_nli.scoring import generate_answers, parse_label, score_labels

    model.eval()  # dropout off
    start = time.perf_counter()
    if method == "score":
        preds = score_labels(model, tokenizer, prompts, evaluate_params["batch_size"]).argmax(1).tolist()
        invalid, texts = 0, []
    else:
        texts = generate_answers(model, tokenizer, prompts, evaluate_params["batch_size"],
                                 evaluate_params["max_new_tokens"])
        preds = [parse_label(t) for t in texts]
        invalid = sum(p is None for p in preds)
    return preds, time.perf_counter() - start, invalid, texts[:5]


def _finish(result, model, tokenizer, prompts, rows, params, method, other_method, cross_eval, monitor):
    """Main evaluation (timed, counts for the targets), peak RSS, then the optional cross-evaluation."""
    preds, seconds, invalid, texts = _predict(method, model, tokenizer, prompts, params["evaluate"])
    result.update({
        "eval_method": method, "eval_batch_size": params["evaluate"]["batch_size"], "eval_pairs": len(rows),
        "eval_seconds": round(seconds, 3),
        "eval_pairs_per_second": round(len(rows) / seconds, 3), "accuracy": _accuracy(preds, rows),
        "invalid_answers": invalid, "generation_examples": texts,
        "peak_rss_mb": rss_peak_mb(),  # before cross-eval: this side's own pipeline only
    })
    log.info("%s: accuracy %.3f, %.2f pairs/s, peak RSS %.0f MB", method, result["accuracy"],
             result["eval_pairs_per_second"], result["peak_rss_mb"])
    result["sampled_rss_peak_mb"] = round(max(monitor.rss) / 2**20, 1) if monitor.rss else None
    # mean share of the whole machine used by this process; well under 100 means the cores were shared or idle
    result["cpu_percent_mean"] = round(statistics.mean(monitor.cpu), 1) if monitor.cpu else None
    if cross_eval:
        preds, seconds, invalid, texts = _predict(other_method, model, tokenizer, prompts, params["evaluate"])
        result["cross_eval"] = {"method": other_method, "accuracy": _accuracy(preds, rows),
                                "pairs_per_second": round(len(rows) / seconds, 3), "invalid_answers": invalid,
                                "generation_examples": texts}
        log.info("cross-eval by %s: accuracy %.3f", other_method, result["cross_eval"]["accuracy"])
    return result


def child_ours(spec):
    """The finetune + evaluate code paths of the pipeline, timed: the run is built and trained by the stage's own
    functions (training.build_training, train_remaining_epochs), without checkpoints or per-epoch validation."""
    from qlora_nli import modeling
    from qlora_nli.resources import ResourceMonitor
    from qlora_nli.scoring import shared_prefix_length
    from qlora_nli.training import build_training, epoch_batches, micro_batches, train_remaining_epochs

    params, t = spec["params"], spec["params"]["train"]
    result, tokenizer, train_rows, (_, prompt_ids, answer_ids, lengths), test_rows, test_prompts = _start_side(spec)

    with ResourceMonitor() as monitor:
        dtype = modeling.pick_compute_dtype("cpu", params["model"]["compute_dtype"])
        # Keeping the frozen blocks' states is part of training (it replaces their forward in every epoch): timed.
        setup = build_training(params, "cpu", dtype, prompt_ids, answer_ids, tokenizer.pad_token_id)
        result["model_dims"] = _model_dims(setup.model, setup.base_parameters["total"],
                                           setup.n_parameters["trainable"], params)
        result["optimizer"] = setup.optimizer_name
        result["rss_mb_after_load"] = rss_peak_mb()
        if setup.frozen is not None:
            result["frozen_blocks"] = {"blocks": setup.frozen.start, "positions": setup.frozen.positions}
        losses = []
        log.info("ours: training %d epoch(s)", t["epochs"])
        seconds = train_remaining_epochs(setup, t, dtype, prompt_ids, answer_ids, tokenizer.pad_token_id,
                                         on_step=lambda loss, lr: None,
                                         after_epoch=lambda epoch, loss, s: losses.append(loss),
                                         max_batches=spec["max_batches"])
        train_seconds = sum(seconds.values()) + (setup.frozen.seconds if setup.frozen is not None else 0.0)
        result["rss_mb_peak_after_train"] = rss_peak_mb()
        epochs = [epoch_batches(lengths, t, e)[: spec["max_batches"]] for e in sorted(seconds)]

        # What ran, for the FLOP estimate (training.micro_batches + scoring.answer_loss): per micro-batch, the
        # prompts' shared prefix once, then each row's own tokens left-padded to the longest; vocabulary
        # projection at the answer tokens only.
        counts = dict.fromkeys(("examples", "real_tokens", "answer_tokens", "attn_pairs_real", "executed_positions",
                                "lm_head_positions_executed", "attn_pairs_executed"), 0)
        for batches in epochs:
            for batch in batches:
                prefix = shared_prefix_length([prompt_ids[i] for i in batch])
                for part in micro_batches(batch, lengths, prefix, t["micro_batch_tokens"]):
                    shared = shared_prefix_length([prompt_ids[i] for i in part])
                    width = max(lengths[i] for i in part)
                    counts["examples"] += len(part)
                    counts["real_tokens"] += sum(lengths[i] for i in part)
                    counts["answer_tokens"] += sum(len(answer_ids[i]) for i in part)
                    counts["attn_pairs_real"] += sum(lengths[i] * (lengths[i] + 1) // 2 for i in part)
                    counts["executed_positions"] += shared + len(part) * (width - shared)
                    counts["lm_head_positions_executed"] += sum(len(answer_ids[i]) for i in part)
                    counts["attn_pairs_executed"] += shared * shared + len(part) * (width - shared) * width
        counts["lm_head_positions_model"] = counts["answer_tokens"]
        result.update(_train_summary(counts, train_seconds, losses, "mean cross-entropy over answer tokens",
                                     t["gradient_checkpointing"]))
        _finish(result, setup.model, tokenizer, test_prompts, test_rows, params, "score", "generate", spec["cross_eval"],
                monitor)
    return result


def _train_summary(counts, seconds, losses, loss_definition, gradient_checkpointing):
    return {
        "gradient_checkpointing": gradient_checkpointing,
        "counts": counts,
        "train_seconds": round(seconds, 3),
        "train_examples_per_second": round(counts["examples"] / seconds, 3),
        "train_real_tokens_per_second": round(counts["real_tokens"] / seconds, 1),
        "padding_factor": round(counts["executed_positions"] / counts["real_tokens"], 3),
        "train_loss_per_epoch": [round(x, 5) for x in losses],
        "train_loss_definition": loss_definition,
    }


def child_naive(spec):
    """The notebook recipe: HF Trainer, fixed-length padding, loss over all tokens, generate + parse."""
    import torch
    from transformers import DataCollatorForLanguageModeling, Trainer, TrainerCallback, TrainingArguments

    from qlora_nli.prompts import answer_text
    from qlora_nli.resources import ResourceMonitor

    params, t = spec["params"], spec["params"]["train"]
    result, tokenizer, train_rows, (prompts, prompt_ids, answer_ids, lengths), test_rows, test_prompts = \
        _start_side(spec)

    # The notebook way: tokenize "prompt + answer" as one text, pad everything to one length. Its fairest value is
    # the longest example of the sample (nothing truncated, no padding beyond what the sample needs).
    texts = [p + answer_text(r["label"]) for p, r in zip(prompts, train_rows)]
    joined = [tokenizer(x).input_ids for x in texts]
    fixed_length = max(len(ids) for ids in joined)
    encoded = tokenizer(texts, padding="max_length", max_length=fixed_length, truncation=True)
    result["tokenization"] = {
        "fixed_length": fixed_length, "padding_side": tokenizer.padding_side,
        # 0 means the joined text tokenizes exactly as prompt ids + answer ids: the real-token counts agree
        "examples_tokenized_differently": sum(j != p + a for j, p, a in zip(joined, prompt_ids, answer_ids)),
    }
    dataset = [{"input_ids": ids, "attention_mask": mask, "n_real": n, "n_answer": len(a)}
               for ids, mask, n, a in zip(encoded["input_ids"], encoded["attention_mask"], lengths, answer_ids)]

    class CountingCollator:
        """DataCollatorForLanguageModeling(mlm=False) (labels = input ids, padding -> -100); remembers which
        examples went into each batch, for the token counts."""

        def __init__(self):
            self.inner = DataCollatorForLanguageModeling(tokenizer, mlm=False)
            self.batches = []

        def __call__(self, features):
            self.batches.append([(f["n_real"], f["n_answer"]) for f in features])
            return self.inner([{"input_ids": f["input_ids"], "attention_mask": f["attention_mask"]} for f in features])

    class LossLog(TrainerCallback):
        def __init__(self):
            self.losses = []

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                self.losses.append(logs["loss"])

    accumulation = 1  # the whole batch in one pass: the notebooks' way, and its fastest on CPU
    with ResourceMonitor() as monitor, tempfile.TemporaryDirectory(prefix="bench_naive.") as output_dir:
        model, result["model_dims"] = _load_model(params)  # same 4-bit base, LoRA config and seed as ours
        result["rss_mb_after_load"] = rss_peak_mb()
        collator, loss_log = CountingCollator(), LossLog()
        args = TrainingArguments(
            output_dir=output_dir,
            per_device_train_batch_size=t["batch_size"],
            gradient_accumulation_steps=accumulation,
            num_train_epochs=t["epochs"],
            max_steps=spec["max_batches"] * t["epochs"] if spec["max_batches"] else -1,
            learning_rate=t["learning_rate"],
            warmup_steps=t["warmup_ratio"],  # transformers 5: a float < 1 is a ratio of the total steps
            lr_scheduler_type="linear",
            weight_decay=t["weight_decay"],
            max_grad_norm=t["max_grad_norm"],
            seed=t["seed"],
            data_seed=t["seed"],
            use_cpu=True,
            report_to=[],
            save_strategy="no",
            dataloader_num_workers=0,
            dataloader_pin_memory=False,  # no GPU to pin for
            remove_unused_columns=False,  # our examples carry n_real/n_answer for the counts; the collator drops them
            logging_steps=10,
            disable_tqdm=False,
        )
        trainer = Trainer(model=model, args=args, train_dataset=dataset, data_collator=collator,
                          callbacks=[loss_log])
        result["optimizer"] = getattr(args.optim, "value", str(args.optim))
        log.info("naive: training %d epoch(s) with transformers.Trainer, fixed length %d", t["epochs"], fixed_length)
        start = time.perf_counter()
        output = trainer.train()
        train_seconds = time.perf_counter() - start
        result["rss_mb_peak_after_train"] = rss_peak_mb()
        result["torch_threads_after_train"] = torch.get_num_threads()  # Trainer/accelerate must not change it

        # Batches that were trained on (with --max-batches the dataloader may have collated one more).
        trained = collator.batches[: trainer.state.global_step * accumulation] if spec["max_batches"] \
            else collator.batches
        examples = [e for batch in trained for e in batch]
        counts = {
            "examples": len(examples),
            "real_tokens": sum(n for n, _ in examples),
            "answer_tokens": sum(a for _, a in examples),
            "attn_pairs_real": sum(n * (n + 1) // 2 for n, _ in examples),
            "lm_head_positions_model": sum(n - 1 for n, _ in examples),  # every real token but the first is a target
            "executed_positions": len(examples) * fixed_length,
            "lm_head_positions_executed": len(examples) * fixed_length,
            "attn_pairs_executed": len(examples) * fixed_length * fixed_length,
        }
        # Trainer reports one mean over the run (per-epoch means would need a callback per epoch)
        result.update(_train_summary(counts, train_seconds, [output.training_loss],
                                     "mean cross-entropy over all non-padding tokens (not comparable with ours)",
                                     t["gradient_checkpointing"]))
        result["train_loss_logged_every_10_steps"] = [round(x, 5) for x in loss_log.losses]
        del trainer
        _finish(result, model, tokenizer, test_prompts, test_rows, params, "generate", "score", spec["cross_eval"],
                monitor)
    return result


def child_main(args):
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
