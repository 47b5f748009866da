"""Reading one split file (JSON lines, JSON, CSV, Parquet) or a saved dataset into clean rows; every problem is one
line naming the file and line."""
import csv
import hashlib
import io
import json
import logging

from qlora_nli.prompts import LABELS, MAX_TEXT_CHARS, text_problem
from qlora_nli.runtime.errors import DataError, shorten, show

log = logging.getLogger(__name__)


HF_EXTENSIONS = ("jsonl", "json", "csv", "parquet")
HF_COLUMNS = ("premise", "hypothesis", "label")
LABEL_IDS = {**{name: i for i, name in enumerate(LABELS)}, "0": 0, "1": 1, "2": 2}
ALLOWED_LABELS = "0, 1, 2 or entailment, neutral, contradiction (-1 or '-' = unlabeled, dropped)"


class _KeyTwice(ValueError):
    pass


def _unique_keys(pairs):
    """json.loads' object_pairs_hook: a key given twice in one object is an error (json keeps the last silently)."""
    result = {}
    for key, value in pairs:
        if key in result:
            raise _KeyTwice(f"the key {show(key)} is given twice in one object")
        result[key] = value
    return result


def json_lines(path, data):
    for n, line in enumerate(data.split(b"\n"), 1):
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError:
            raise DataError(f"{path} line {n}: not valid UTF-8; re-save the file as UTF-8")
        text = text.lstrip("\ufeff") if n == 1 else text
        if not text.strip():
            continue
        try:
            yield n, json.loads(text, object_pairs_hook=_unique_keys)
        except json.JSONDecodeError as e:
            raise DataError(f"{path} line {n}: not valid JSON ({e.msg} at column {e.colno}); fix or remove the line")
        except (ValueError, RecursionError) as e:  # e.g. an integer with too many digits, absurd nesting
            raise DataError(f"{path} line {n}: not valid JSON ({shorten(e, 80)}); fix or remove the line")


def _json_file(path, data):
    """A .json split is a JSON array, an object with a "data" array, or (like in `datasets`) JSON lines."""
    try:
        whole = json.loads(data.decode("utf-8-sig"), object_pairs_hook=_unique_keys)
    except _KeyTwice as e:
        raise DataError(f"{path}: not valid JSON ({e}); keep one of them")
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError too; json_lines reports the line
        whole = None
    if isinstance(whole, dict) and isinstance(whole.get("data"), list):
        whole = whole["data"]
    if isinstance(whole, list):
        return "item", enumerate(whole, 1)
    return "line", json_lines(path, data)


def _csv_rows(path, data, columns):
    """(line, {column: field}) per row, the line being where the row starts (a quoted field may span lines). Strict:
    a quote left open, a stray quote, or a row with more or fewer fields than the header is an error, never a
    missing or dropped value."""
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not valid UTF-8 at byte {e.start}; re-save the file as UTF-8")
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    start, header = 1, None
    try:
        for fields in reader:
            if not fields:  # a blank line
                start = reader.line_num + 1
                continue
            if header is None:
                header = fields
                twice = next((c for i, c in enumerate(header) if c in header[:i]), None)
                if twice is not None:
                    raise DataError(f"{path} line {start}: the header names the column {show(twice)} twice; keep one")
                _check_columns(path, header, columns)
            elif len(fields) != len(header):
                fewer = len(fields) < len(header)
                raise DataError(f"{path} line {start}: {len(fields)} fields, but the header has {len(header)} "
                                f"({', '.join(header)}); {'add the missing' if fewer else 'remove the extra'} "
                                f"fields, or quote a field that holds a comma")
            else:
                yield start, dict(zip(header, fields))
            start = reader.line_num + 1
        if header is None:
            _check_columns(path, [], columns)
    except csv.Error as e:
        problem = str(e)
        if "unexpected end of data" in problem:
            raise DataError(f"{path} line {start}: a quote opened in this row is never closed (the field runs to "
                            f"the end of the file); close it, or write a quote inside a field as \"\"")
        if "field larger than field limit" in problem:
            raise DataError(f"{path} line {start}: a field is longer than {csv.field_size_limit():,} characters (a "
                            f"premise or hypothesis may have {MAX_TEXT_CHARS:,}); shorten it, or check for a quote "
                            f"that is never closed")
        raise DataError(f"{path} line {start}: not valid CSV ({shorten(e)}); fix the quoting (a quote inside a "
                        f"field is written \"\", and the field itself quoted)")


def _parquet_rows(path, data, columns):
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(io.BytesIO(data))
    except (pa.ArrowException, OSError, ValueError) as e:
        raise DataError(f"{path}: cannot read it as Parquet ({shorten(e, 100)}); re-write the file")
    _check_columns(path, table.column_names, columns)
    return enumerate(table.select(list(columns)).to_pylist(), 1)


def found_names(names):
    """Names found in a file or folder, for a one-line message: a printable name as it is, any other quoted."""
    return ", ".join(n if isinstance(n, str) and n.isprintable() else show(n) for n in names) or "none"


def _check_columns(where, found, columns):
    for column in columns:
        if column not in found:
            raise DataError(f"{where}: missing column '{column}' (found: {found_names(found)}); "
                            f"the split needs {', '.join(columns)}")


def _read_file(path, columns):
    """(unit, numbered records, sha256 of the file bytes)."""
    data = path.read_bytes()
    sha = hashlib.sha256(data).hexdigest()
    if path.suffix == ".jsonl":
        return "line", json_lines(path, data), sha
    if path.suffix == ".json":
        unit, records = _json_file(path, data)
        return unit, records, sha
    if path.suffix == ".csv":
        return "line", _csv_rows(path, data, columns), sha
    return "row", _parquet_rows(path, data, columns), sha


def _dataset_records(dataset, digest):
    """Rows of a `datasets.Dataset`, hashed as canonical JSON lines (there is no single raw file to hash)."""
    for n, record in enumerate(dataset, 1):
        digest.update((json.dumps(record, sort_keys=True, separators=(",", ":"), default=str) + "\n").encode())
        yield n, record


def _load_from_disk(directory, key):
    import datasets

    try:
        dataset = datasets.load_from_disk(directory)
    except Exception as e:  # a damaged folder fails in many ways inside `datasets`; all mean the same to the user
        raise DataError(f"{key}: cannot read {directory} as a datasets.save_to_disk folder "
                        f"({type(e).__name__}: {shorten(e, 100)}); save it again with DatasetDict.save_to_disk")
    if not isinstance(dataset, datasets.DatasetDict):
        raise DataError(f"{key}: {directory} holds a single Dataset; save a DatasetDict with its splits")
    return dataset


# --- clean rows --------------------------------------------------------------------------------------------------

def _parse_label(value):
    """The label id, None for an unlabeled pair; ValueError for anything else."""
    if isinstance(value, int) and not isinstance(value, bool):
        if value in (0, 1, 2):
            return value
        if value == -1:
            return None
    elif isinstance(value, str):
        word = value.strip().lower()
        if word in ("-", "-1"):
            return None
        if word in LABEL_IDS:
            return LABEL_IDS[word]
    raise ValueError(value)


def _clean(name, unit, records, columns):
    """Rows in the common schema and the counts of what was dropped; SystemExit on anything malformed."""
    premise_key, hypothesis_key, label_key = columns
    rows, counts = [], {"raw": 0, "unlabeled_dropped": 0, "skipped_empty": 0}
    for index, (n, record) in enumerate(records):
        where = f"{name} {unit} {n}"
        counts["raw"] += 1
        if not isinstance(record, dict):
            raise DataError(f"{where}: expected an object with keys {', '.join(columns)}, found "
                            f"{type(record).__name__} {show(record)}; fix or remove the row")
        for key in columns:
            if key not in record:
                raise DataError(f"{where}: missing key '{key}'; every row needs {', '.join(columns)}")
        for key in (premise_key, hypothesis_key):
            text = record[key]
            if text is not None and not isinstance(text, str):
                raise DataError(f"{where}: {key} = {show(text)} is not a string; fix or remove the row")
            problem = text and text_problem(text)
            if problem:
                raise DataError(f"{where}: {key} {problem}; fix or remove the row")
        try:
            label = _parse_label(record[label_key])
        except ValueError:
            raise DataError(f"{where}: {label_key} = {show(record[label_key])} is not a known label; "
                            f"allowed: {ALLOWED_LABELS}")
        premise, hypothesis = record[premise_key], record[hypothesis_key]
        if label is None:
            counts["unlabeled_dropped"] += 1
        elif not (premise and premise.strip() and hypothesis and hypothesis.strip()):
            counts["skipped_empty"] += 1
        else:
            rows.append({"id": index, "premise": premise, "hypothesis": hypothesis, "label": label})
    if not rows:
        raise DataError(f"{name}: no labeled pairs ({counts['raw']} rows, {counts['unlabeled_dropped']} unlabeled, "
                        f"{counts['skipped_empty']} with empty text); the split needs at least one labeled pair")
    return rows, counts
