"""Read what an earlier stage wrote, and check it before any work starts.

Every problem (missing, truncated, malformed, a value of the wrong type) is an ArtifactError with one line that
names the file (and line), what is wrong, and the `dvc repro <stage>` that writes the file again. Raw data has the
same treatment in data.py; these are the files between stages.
"""
import json
from pathlib import Path

from qlora_nli.prompts import LABELS, pair_text_problem
from qlora_nli.runtime.errors import ArtifactError, show

# Which stage writes each artifact: the fix named in every message.
PRODUCERS = {
    "data/": "prepare",
    "models/adapter": "finetune",
    "metrics/train.json": "finetune",
    "predictions/baseline.jsonl": "evaluate@baseline",
    "metrics/baseline.json": "evaluate@baseline",
    "predictions/finetuned.jsonl": "evaluate@finetuned",
    "metrics/finetuned.json": "evaluate@finetuned",
    "metrics/comparison.json": "failure_cases",
    "reports/failure_cases.json": "failure_cases",
}


def _rerun(path):
    path = Path(path).as_posix()
    stage = next((s for prefix, s in PRODUCERS.items() if path == prefix or path.startswith(prefix)), None)
    return f"rerun `dvc repro {stage}`" if stage else "rerun `dvc repro`"


def _existing_file(path):
    path = Path(path)
    if not path.exists():
        raise ArtifactError(f"{path}: missing; {_rerun(path)}")
    if not path.is_file():
        raise ArtifactError(f"{path}: is a directory, not a file; remove it and {_rerun(path)}")
    return path


def _text(path):
    try:
        return _existing_file(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ArtifactError(f"{path}: not valid UTF-8 at byte {e.start}; the file is damaged: {_rerun(path)}")
    except OSError as e:
        raise ArtifactError(f"{path}: cannot read it ({e.strerror or type(e).__name__}); fix its permissions or "
                            f"{_rerun(path)}")


# --- JSON lines: one row per line ---------------------------------------------------------------------------------

def _int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def _number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _label(value):
    return _int(value) and 0 <= value < len(LABELS)


def data_row_problem(row):
    """What is wrong with a row of data/{train,validation,test}.jsonl, or None."""
    for key in ("id", "premise", "hypothesis", "label"):
        if key not in row:
            return f"missing key '{key}'"
    if not _int(row["id"]):
        return f"id = {show(row['id'])} is not an integer"
    for key in ("premise", "hypothesis"):
        if not isinstance(row[key], str):
            return f"{key} = {show(row[key])} is not a string"
        problem = pair_text_problem(row[key])
        if problem:
            return f"{key} {problem}"
    if not _label(row["label"]):
        return f"label = {show(row['label'])} is not a label id (0, 1 or 2)"
    return None


def prediction_row_problem(row):
    """What is wrong with a row of predictions/<model>.jsonl, or None. `pred` is None for an invalid generation."""
    problem = data_row_problem(row)
    if problem:
        return problem
    for key in ("pred", "scores"):
        if key not in row:
            return f"missing key '{key}'"
    if row["pred"] is not None and not _label(row["pred"]):
        return f"pred = {show(row['pred'])} is not a label id (0, 1, 2, or null for an invalid output)"
    scores = row["scores"]
    if scores is not None and not (isinstance(scores, list) and len(scores) == len(LABELS)
                                   and all(_number(s) for s in scores)):
        return f"scores = {show(scores)} is not a list of {len(LABELS)} numbers (or null)"
    return None


def _parse_json(path, text, line=None):
    """`json.loads(text)`, a failure as one line naming the file and the line (`line`: the text's line in the file)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ArtifactError(f"{path} line {line or e.lineno}: not valid JSON ({e.msg} at column {e.colno}), the file "
                            f"is truncated or damaged; {_rerun(path)}")
    except (ValueError, RecursionError) as e:
        where = f"{path} line {line}" if line else str(path)
        raise ArtifactError(f"{where}: not valid JSON ({type(e).__name__}); {_rerun(path)}")


def read_rows(path, row_problem, allow_empty=False):
    """The rows of a JSON-lines artifact; `row_problem(row)` says what is wrong with a row, or None. Empty is an
    error unless `allow_empty` (an artifact that may rightly hold no rows, e.g. the probes when none are asked for)."""
    rows = []
    for n, line in enumerate(_text(path).split("\n"), 1):
        if not line.strip():
            continue
        row = _parse_json(path, line, n)
        problem = f"expected an object, found {type(row).__name__}" if not isinstance(row, dict) else row_problem(row)
        if problem:
            raise ArtifactError(f"{path} line {n}: {problem}; {_rerun(path)}")
        rows.append(row)
    if not rows and not allow_empty:
        raise ArtifactError(f"{path}: empty, no rows; {_rerun(path)}")
    return rows


# --- JSON documents checked against a shape -----------------------------------------------------------------------

# A shape maps a dotted key path to a kind; `*` in a path stands for every element of a list or value of a mapping.
KINDS = {
    "integer": _int,
    "number": _number,
    "string": lambda v: isinstance(v, str),
    "boolean": lambda v: isinstance(v, bool),
    "list": lambda v: isinstance(v, list),
    "mapping": lambda v: isinstance(v, dict),
    "pair of numbers": lambda v: isinstance(v, list) and len(v) == 2 and all(_number(x) for x in v),
    "number or null": lambda v: v is None or _number(v),
    "string or null": lambda v: v is None or isinstance(v, str),
    "mapping or null": lambda v: v is None or isinstance(v, dict),
}


def _walk(value, parts, where=""):
    """(dotted path, value) for every value the path reaches; a missing step is yielded as (path, KeyError)."""
    if not parts:
        yield where, value
        return
    head, rest = parts[0], parts[1:]
    if head == "*":
        items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else []
        for key, child in items:
            yield from _walk(child, rest, f"{where}[{key!r}]" if isinstance(value, dict) else f"{where}[{key}]")
        return
    step = f"{where}.{head}" if where else head
    if not isinstance(value, dict) or head not in value:
        yield step, KeyError
        return
    yield from _walk(value[head], rest, step)


def check_shape(path, document, shape):
    if not isinstance(document, dict):
        raise ArtifactError(f"{path}: expected a JSON object, found {type(document).__name__}; {_rerun(path)}")
    for dotted, kind in shape.items():
        for where, value in _walk(document, dotted.split(".")):
            if value is KeyError:
                raise ArtifactError(f"{path}: missing key '{where}'; the file is from another version or damaged: "
                                    f"{_rerun(path)}")
            if not KINDS[kind](value):
                raise ArtifactError(f"{path}: '{where}' = {show(value)} is not a {kind}; {_rerun(path)}")
    return document


def read_document(path, shape):
    """A JSON artifact, checked against `shape` (see KINDS)."""
    return check_shape(path, _parse_json(path, _text(path)), shape)


_PER_CLASS = {f"per_class.{label}.{key}": "number" for label in LABELS
              for key in ("precision", "recall", "f1", "support")}
EVAL_METRICS = {
    "n": "integer", "accuracy": "number", "accuracy_ci95": "pair of numbers", "macro_f1": "number",
    "invalid_rate": "number", **_PER_CLASS, "confusion_matrix": "list", "predicted_distribution": "mapping",
    "predicted_distribution.*": "integer", "method": "string", "model": "string", "eval_seconds": "number",
    "pairs_per_second": "number", "calibration": "mapping or null", "probes": "mapping",
    "probes.*.n": "integer", "probes.*.accuracy": "number or null",
}
SET_METRICS = {"set": "string", "n": "integer", "accuracy": "number", "accuracy_ci95": "pair of numbers"}
TRAIN_METRICS = {
    "model": "string", "device": "string", "compute_dtype": "string", "load_in_4bit": "boolean",
    "epochs": "integer", "train_examples": "integer", "time.total_seconds": "number",
    "time.per_epoch_seconds": "list", "time.per_epoch_seconds.*": "number or null",
    **{f"{key}_per_epoch": "list" for key in ("train_loss", "val_loss", "val_accuracy")},
    **{f"{key}_per_epoch.*": "number" for key in ("train_loss", "val_loss", "val_accuracy")},
    **{f"parameters.{key}": "integer" for key in ("total", "trainable", "numel_as_stored")},
    "parameters.trainable_percent": "number", "adapter_bytes": "integer", "throughput": "mapping",
    "resources.samples": "integer",
    **{f"resources.{key}": "number" for key in ("wall_seconds", "process_rss_peak_mb", "process_rss_mean_mb",
                                               "disk_outputs_mb")},
    **{f"resources.{key}": "number or null" for key in ("cpu_percent_mean", "cpu_percent_peak")},
    "resources.gpu_name": "string or null", "resources.gpu_unavailable_reason": "string or null",
}
COMPARISON = {
    "n": "integer", "baseline_accuracy": "number", "finetuned_accuracy": "number", "difference": "number",
    "difference_ci95": "pair of numbers", "mcnemar_p": "number",
    **{key: "integer" for key in ("corrected", "regressed", "both_right", "both_wrong")},
}
FAILURE_CASES = {
    "n": "integer",
    **{f"counts.{key}": "integer" for key in ("corrected", "not_corrected", "regressed", "both_right")},
    "slices": "list", "slices.*.slice": "string", "slices.*.n": "integer",
    "slices.*.baseline_error": "number", "slices.*.finetuned_error": "number",
    "slices.*.baseline_errors": "integer", "slices.*.finetuned_errors": "integer",
    "confusion_pairs.baseline": "mapping", "confusion_pairs.finetuned": "mapping",
    "confusion_pairs.finetuned.*": "integer",
    "evidence.claims": "list", "evidence.claims.*": "string",
}
MANIFEST = {"counts": "mapping", "counts.*": "mapping"}
