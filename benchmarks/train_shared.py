"""What both training sides of bench_train.py share inside their child process (train_ours.py, train_naive.py):
the rows and the package's tokenization they start from, the timed main evaluation with peak RSS, the optional
cross-evaluation, and the training summary. Each child imports torch itself, so the parent stays small and
ru_maxrss is the side's own.
"""
import logging
import statistics
import time

from common import rss_peak_mb, set_threads

from common import read_jsonl

log = logging.getLogger("bench_train")


def load_rows(spec):
    train, test = read_jsonl("data/train.jsonl"), read_jsonl("data/test.jsonl")
    for name, rows, n in (("train", train, spec["n_train"]), ("test", test, spec["n_test"])):
        if n > len(rows):
            raise SystemExit(f"--n-{name} {n}: data/{name}.jsonl has only {len(rows)} pairs")
    return train[: spec["n_train"]], test[: spec["n_test"]]


def encode(tokenizer, template, rows):
    """Prompt ids, answer ids and real lengths with the package's tokenization (the definition of a real token)."""
    from qlora_nli.prompts import encode_answers, encode_prompts, format_prompt

    prompts = [format_prompt(template, r) for r in rows]
    answers = encode_answers(tokenizer)
    prompt_ids = encode_prompts(tokenizer, prompts)
    answer_ids = [answers[r["label"]] for r in rows]
    return prompts, prompt_ids, answer_ids, [len(p) + len(a) for p, a in zip(prompt_ids, answer_ids)]


def start_side(spec):
    """What both sides start from: threads set, the rows, the tokenizer and the package's tokenization of them.
    Returns (result dict, tokenizer, train rows, encode(train rows), test rows, test prompts)."""
    from qlora_nli.model import loading

    params = spec["params"]
    result = {"torch_threads": set_threads(params["compute"]["num_threads"]), "rss_mb_after_imports": rss_peak_mb()}
    train_rows, test_rows = load_rows(spec)
    tokenizer = loading.load_tokenizer(params["model"]["name"], params["model"]["trust_remote_code"])
    template = params["prompt"]["template"]
    return (result, tokenizer, train_rows, encode(tokenizer, template, train_rows), test_rows,
            encode(tokenizer, template, test_rows)[0])



def accuracy(preds, rows):
    return round(sum(p == r["label"] for p, r in zip(preds, rows)) / len(rows), 4)


def predict(method, model, tokenizer, prompts, evaluate_params):
    """(predictions, seconds, invalid count, a few raw generations) by label scoring or by generation + parsing."""
    from qlora_nli.infer.generate import generate_answers, parse_label
    from qlora_nli.infer.scoring import score_labels

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


def finish_side(result, model, tokenizer, prompts, rows, params, method, other_method, cross_eval, monitor):
    """Main evaluation (timed, counts for the targets), peak RSS, then the optional cross-evaluation."""
    preds, seconds, invalid, texts = predict(method, model, tokenizer, prompts, params["evaluate"])
    result.update({
        "eval_method": method, "eval_batch_size": params["evaluate"]["batch_size"], "eval_pairs": len(rows),
        "eval_seconds": round(seconds, 3),
        "eval_pairs_per_second": round(len(rows) / seconds, 3), "accuracy": accuracy(preds, rows),
        "invalid_answers": invalid, "generation_examples": texts,
        "peak_rss_mb": rss_peak_mb(),  # before cross-eval: this side's own pipeline only
    })
    log.info("%s: accuracy %.3f, %.2f pairs/s, peak RSS %.0f MB", method, result["accuracy"],
             result["eval_pairs_per_second"], result["peak_rss_mb"])
    result["sampled_rss_peak_mb"] = round(max(monitor.rss) / 2**20, 1) if monitor.rss else None
    # mean share of the whole machine used by this process; well under 100 means the cores were shared or idle
    result["cpu_percent_mean"] = round(statistics.mean(monitor.cpu), 1) if monitor.cpu else None
    if cross_eval:
        preds, seconds, invalid, texts = predict(other_method, model, tokenizer, prompts, params["evaluate"])
        result["cross_eval"] = {"method": other_method, "accuracy": accuracy(preds, rows),
                                "pairs_per_second": round(len(rows) / seconds, 3), "invalid_answers": invalid,
                                "generation_examples": texts}
        log.info("cross-eval by %s: accuracy %.3f", other_method, result["cross_eval"]["accuracy"])
    return result



def train_summary(counts, seconds, losses, loss_definition, gradient_checkpointing):
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
