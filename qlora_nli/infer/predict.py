"""Classify premise/hypothesis pairs with the base model or base + adapter, outside the pipeline.

The prediction is the one `evaluate` makes with method "score": the label whose answer (" entailment", ...) has
the highest log-likelihood after the prompt, computed by `infer.scoring.score_labels`. The probabilities are the softmax
of the three label log-likelihoods: the model's choice among the three answers, not among all possible texts.
"""
from pathlib import Path

import torch

from qlora_nli.data.readers import json_lines
from qlora_nli.infer.scoring import score_labels
from qlora_nli.model import adapters, loading
from qlora_nli.model.adapters import check_adapter_dir
from qlora_nli.prompts import (
    LABELS,
    check_prompt_lengths,
    encode_answers,
    format_prompt,
    pair_text_problem,
    text_problem,
)
from qlora_nli.runtime.errors import DataError
from qlora_nli.runtime.files import file_on_the_way

PAIR_KEYS = ("premise", "hypothesis")
WITHOUT_ADAPTER = " (without --adapter the base model predicts, not fine-tuned)"  # ends a missing --adapter's line


def load_model(model_params, adapter_dir, device):
    """(model, tokenizer): the base as `model_params` say (4-bit or not), with the adapter if one is given (on the
    CPU merged into the dequantized weights: modeling.load_for_inference)."""
    if adapter_dir is not None:
        check_adapter_dir(adapter_dir, "--adapter", WITHOUT_ADAPTER)
        adapter_dir = str(adapter_dir)
    tokenizer = loading.load_tokenizer(model_params["name"])
    model = adapters.load_for_inference(model_params, device, adapter_dir,
                                        adapter_fix=f"it was not trained on '{model_params['name']}': give that base "
                                                    f"model with --model or model.name")
    return model, tokenizer


def read_pairs(path, data=None):
    """(records, where) of a JSONL file (or of `data`, the bytes read from stdin, named by `path`): each record an
    object with string premise and hypothesis (other keys are kept and copied to the output), `where` the file and
    line of each, for messages."""
    if data is None:
        path = Path(path)
        if not path.is_file():
            state = "is a directory" if path.is_dir() else "is not a regular file" if path.exists() else "no such file"
            raise DataError(f"--input {path}: {state}; give a JSONL file with one "
                            f'{{"premise": ..., "hypothesis": ...}} object per line, or - to read stdin')
        data = path.read_bytes()
    rows, where = [], []
    for n, record in json_lines(path, data):
        if not isinstance(record, dict):
            raise DataError(f"{path} line {n}: expected an object with keys premise and hypothesis, found "
                            f"{type(record).__name__}; fix or remove the line")
        for key in PAIR_KEYS:
            if key not in record:
                raise DataError(f"{path} line {n}: missing key '{key}'; every line needs premise and hypothesis")
            if not isinstance(record[key], str):
                raise DataError(f"{path} line {n}: {key} is {type(record[key]).__name__}, not a string; "
                                f"fix or remove the line")
            problem = pair_text_problem(record[key])
            if problem:
                raise DataError(f"{path} line {n}: {key} {problem}; fix or remove the line")
        rows.append(record)
        where.append(f"{path} line {n}")
    if not rows:
        raise DataError(f"{path}: no pairs in it; give one JSON object with premise and hypothesis per line")
    return rows, where


def check_output(path):
    """--output where the predictions can be written, known before the model loads: not a directory, not below a
    file."""
    above = file_on_the_way(path)
    if Path(path).is_dir() or above is not None:
        where = "is a directory" if above is None else f"{above} is a file, not a directory"
        raise DataError(f"--output {path}: {where}; give the path of a file, below a directory")


def check_given_pair(premise, hypothesis):
    """--premise and --hypothesis, held to the rules of a file's pairs (prompts.pair_text_problem)."""
    for option, text in (("--premise", premise), ("--hypothesis", hypothesis)):
        if not text.strip():
            raise DataError(f"{option} is empty; give the {option[2:]}'s text")
        problem = text_problem(text)
        if problem:
            raise DataError(f"{option} {problem}; give the text without it")
    return [{"premise": premise, "hypothesis": hypothesis}]


def classify(model, tokenizer, prompts, batch_size):
    """(scores, predictions, probabilities) of each prompt: the (n, 3) label log-likelihoods of `score_labels`,
    the predicted label ids (argmax; the first label on a tie, as `max` picks), and the softmax of the scores."""
    scores = score_labels(model, tokenizer, prompts, batch_size)
    return scores, scores.argmax(-1).tolist(), torch.softmax(scores, dim=-1)


def predict_rows(model, tokenizer, template, rows, batch_size, where=None):
    """Each input record with "prediction" (the label word) and "probabilities" ({label word: p}) added. `where`
    names each row in messages (read_pairs); a pair longer than the model's context is refused before any is scored."""
    prompts = [format_prompt(template, r) for r in rows]
    check_prompt_lengths(tokenizer, prompts, loading.config_context(model.config),
                         lambda i: where[i] if where else f"pair {i + 1}",
                         "shorten the premise or hypothesis, or use a model with a longer context (--model)",
                         max(map(len, encode_answers(tokenizer))))
    _, predictions, probabilities = classify(model, tokenizer, prompts, batch_size)
    return [{**r, "prediction": LABELS[k], "probabilities": dict(zip(LABELS, (round(p, 6) for p in probs)))}
            for r, k, probs in zip(rows, predictions, probabilities.tolist())]
