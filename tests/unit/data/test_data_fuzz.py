"""Fuzz the loader with malformed split files: it returns clean rows or exits with one line, never a traceback."""
import csv
import io
import json
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from qlora_nli.data.sources import load_splits
from qlora_nli.runtime.errors import DataError

FUZZ = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
GOOD_ROW = {"premise": "A made-up premise.", "hypothesis": "A made-up claim.", "label": 1}

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=8,
)
labels = st.sampled_from([0, 1, 2, -1, 3, -2, "entailment", "Neutral", "contradiction", "-", "", "yes", True, 1.0])
texts = st.text(max_size=20)  # includes blank strings
# Lone surrogates reach the loader through JSON escapes ("\ud800") and could not be written back as UTF-8.
json_texts = st.one_of(texts, texts, texts, texts, st.sampled_from(["\ud800", "a\udfff", " ", "\t\n", "\x00"]))


def field(good):
    return st.one_of(good, good, json_values)


rows = st.fixed_dictionaries({}, optional={"premise": field(json_texts), "hypothesis": field(json_texts),
                                           "label": field(labels), "extra": json_values})
garbage = st.binary(max_size=30)
valid_rows = st.fixed_dictionaries({"premise": texts, "hypothesis": texts,
                                    "label": st.sampled_from([0, 1, 2, -1, "neutral"])})
any_line = st.one_of(
    rows.map(json.dumps),                       # escapes surrogates, as a JSON writer would
    rows.map(lambda r: json.dumps(r, ensure_ascii=False).encode("utf-8", "surrogatepass").decode("utf-8", "replace")),
    json_values.map(json.dumps),
    st.text(max_size=30),
).map(str.encode) | garbage


def mostly(valid, bad):
    """Valid items with up to two bad ones shuffled in, so that both outcomes (rows, DataError) are common."""
    return st.tuples(st.lists(valid, max_size=6), st.lists(bad, max_size=2)).map(lambda t: t[0] + t[1]).flatmap(st.permutations)


json_lines = mostly(valid_rows.map(json.dumps).map(str.encode), any_line)


def check(directory):
    """The whole contract: valid rows and consistent counts, or DataError with one non-empty line."""
    try:
        splits, info = load_splits(str(directory))
    except DataError as e:
        message = str(e)
        assert message.strip() and "\n" not in message, repr(message)
        event("exit: " + message.split(": ")[1].split(" ")[0] if ": " in message else "exit")
        return
    event("loaded")
    for split, split_rows in splits.items():
        counts = info["counts"][split]
        assert split_rows and len(split_rows) == counts["raw"] - counts["unlabeled_dropped"] - counts["skipped_empty"]
        ids = [r["id"] for r in split_rows]
        assert ids == sorted(set(ids)) and all(type(i) is int for i in ids)
        for r in split_rows:
            assert set(r) == {"id", "premise", "hypothesis", "label"} and r["label"] in (0, 1, 2)
            assert isinstance(r["premise"], str) and r["premise"].strip()
            assert isinstance(r["hypothesis"], str) and r["hypothesis"].strip()
            json.dumps(r, ensure_ascii=False).encode("utf-8")  # prepare can write it


def good_dir(root, ext):
    for split in ("validation", "test"):
        (root / f"{split}.jsonl").write_text(json.dumps(GOOD_ROW) + "\n")
    return root / f"train.{ext}"


@FUZZ
@given(json_lines, st.booleans())
def test_fuzz_jsonl(lines, keep_one_good):
    with tempfile.TemporaryDirectory() as d:
        train = good_dir(Path(d), "jsonl")
        train.write_bytes(b"\n".join(lines + ([json.dumps(GOOD_ROW).encode()] if keep_one_good else [])))
        check(d)


@FUZZ
@given(st.one_of(mostly(valid_rows, rows | json_values).map(json.dumps),
                 st.dictionaries(st.sampled_from(["data", "rows"]), st.lists(rows, max_size=4)).map(json.dumps),
                 json_values.map(json.dumps), st.text(max_size=40)))
def test_fuzz_json(text):
    with tempfile.TemporaryDirectory() as d:
        good_dir(Path(d), "json").write_text(text, errors="surrogatepass")
        check(d)


cells = st.one_of(texts, labels.map(str), st.sampled_from(["0", "1", "2", "", '"', "a,b", "x\ny", "\r"]))


@FUZZ
@given(st.one_of(*[st.just(["premise", "hypothesis", "label"])] * 3,
                 st.lists(st.sampled_from(["premise", "hypothesis", "label", ""]))),
       mostly(st.tuples(texts, texts, st.sampled_from(["0", "1", "2", "-1", "neutral"])), st.lists(cells, max_size=5)),
       st.one_of(st.just(b""), st.just(b""), garbage))
def test_fuzz_csv(header, body, tail):
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(header)
    writer.writerows(body)
    with tempfile.TemporaryDirectory() as d:
        good_dir(Path(d), "csv").write_bytes(out.getvalue().encode("utf-8", "surrogatepass") + tail)
        check(d)


@FUZZ
@given(st.lists(st.fixed_dictionaries({"premise": texts | st.none(), "hypothesis": texts | st.none(),
                                       "label": st.sampled_from([0, 1, 2, -1, 7])}), max_size=5),
       st.integers(0, 20_000), garbage)
def test_fuzz_parquet(table_rows, cut, noise):
    buffer = io.BytesIO()
    table = pa.table({k: [r[k] for r in table_rows] for k in ("premise", "hypothesis", "label")},
                     schema=pa.schema([("premise", pa.string()), ("hypothesis", pa.string()), ("label", pa.int64())]))
    pq.write_table(table, buffer)
    data = buffer.getvalue()
    data = data if cut > len(data) else data[:cut] + noise  # sometimes truncated or corrupted
    with tempfile.TemporaryDirectory() as d:
        good_dir(Path(d), "parquet").write_bytes(data)
        check(d)
