"""The loader on tiny made-up data sets in every accepted layout, its errors, mirror/Hub resolution, and prepare."""
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers.nli_files import SPLITS, write_hf_dir, write_split
from helpers.stages import prepare_project, run_prepare
from pipeline import REPO

from qlora_nli.data import sources
from qlora_nli.data.sources import evenly_spaced, load_splits, resolve_source
from qlora_nli.runtime.errors import NLIError

# Made-up pairs (never SNLI text). The -1 row is unlabeled, the blank hypothesis is skipped as empty.
RAW = [
    {"premise": "A cook stirs a pot.", "hypothesis": "Someone is cooking.", "label": 0},
    {"premise": "A cook stirs a pot.", "hypothesis": "The soup is for a party.", "label": 1},
    {"premise": "Two dogs nap.", "hypothesis": "No pet is asleep.", "label": -1},
    {"premise": "Two dogs nap.", "hypothesis": "The dogs are running.", "label": 2},
    {"premise": "A girl reads.", "hypothesis": "  ", "label": 0},
    {"premise": "A girl reads.", "hypothesis": "A girl holds a book.", "label": 0},
]
KEPT = [{"id": i, **r} for i, r in enumerate(RAW) if r["label"] != -1 and r["hypothesis"].strip()]
COUNTS = {"raw": 6, "unlabeled_dropped": 1, "skipped_empty": 1}


def hf_dir(root, fmt="jsonl", rows=RAW):
    return write_hf_dir(root, fmt, rows)


def snli1_dir(root, rows=RAW):
    root.mkdir(parents=True, exist_ok=True)
    words = {-1: "-", 0: "entailment", 1: "neutral", 2: "contradiction"}
    lines = [{"annotator_labels": ["x"], "captionID": "c", "gold_label": words[r["label"]], "pairID": str(i),
              "sentence1": r["premise"], "sentence1_parse": "(ROOT)", "sentence2": r["hypothesis"]}
             for i, r in enumerate(rows)]
    for name in ("snli_1.0_train.jsonl", "snli_1.0_dev.jsonl", "snli_1.0_test.jsonl"):
        (root / name).write_text("".join(json.dumps(line) + "\n" for line in lines))
    return root


def one_line_error(call):
    with pytest.raises(NLIError) as e:
        call()
    message = str(e.value)
    assert message and "\n" not in message, message
    return message


# --- evenly_spaced ------------------------------------------------------------------------------------------------

def test_evenly_spaced_indices():
    assert evenly_spaced(list(range(10)), 3) == [0, 3, 6]
    assert evenly_spaced(list(range(10)), 4) == [0, 2, 5, 7]
    assert evenly_spaced(list(range(10)), 1) == [0]
    picked = evenly_spaced(range(550_152), 1000)
    assert len(picked) == 1000 and picked[:3] == [0, 550, 1100] and picked[-1] == 999 * 550_152 // 1000


def test_evenly_spaced_all_and_too_many():
    rows = list("abcde")
    assert evenly_spaced(rows, 5) == rows
    message = one_line_error(lambda: evenly_spaced(rows, 6, key="data.n_train"))
    assert "data.n_train = 6 is larger than the split (5 labeled pairs)" in message


# --- layouts ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["jsonl", "json", "json-lines", "csv", "parquet"])
def test_hugging_face_file_layouts(tmp_path, fmt):
    root = hf_dir(tmp_path / "nli", fmt)
    splits, info = load_splits(str(root))
    for split in SPLITS:
        assert splits[split] == KEPT
        assert info["counts"][split] == COUNTS
    assert info["read_from"] == f"local:{root}"
    ext = "json" if fmt == "json-lines" else fmt
    assert info["raw_sha256"]["test"] == hashlib.sha256((root / f"test.{ext}").read_bytes()).hexdigest()


def test_save_to_disk_layout(tmp_path):
    import datasets

    root = tmp_path / "saved"
    datasets.DatasetDict({s: datasets.Dataset.from_list(RAW) for s in SPLITS}).save_to_disk(str(root))
    splits, info = load_splits(str(root))
    assert all(splits[s] == KEPT and info["counts"][s] == COUNTS for s in SPLITS)
    assert len(info["raw_sha256"]["train"]) == 64


def test_snli_1_0_layout(tmp_path):
    splits, info = load_splits(str(snli1_dir(tmp_path / "snli_1.0")))
    assert all(splits[s] == KEPT and info["counts"][s] == COUNTS for s in SPLITS)


def test_label_words_in_hugging_face_layout(tmp_path):
    words = ["entailment", "Neutral", " contradiction ", "-1", "2"]
    rows = [{"premise": "p", "hypothesis": f"h{i}", "label": w} for i, w in enumerate(words)]
    splits, info = load_splits(str(hf_dir(tmp_path / "nli", "jsonl", rows)))
    assert [r["label"] for r in splits["train"]] == [0, 1, 2, 2]
    assert [r["id"] for r in splits["train"]] == [0, 1, 2, 4]
    assert info["counts"]["train"]["unlabeled_dropped"] == 1


def test_null_text_is_skipped_as_empty(tmp_path):
    rows = RAW + [{"premise": None, "hypothesis": "h", "label": 1}]
    splits, info = load_splits(str(hf_dir(tmp_path / "nli", "jsonl", rows)))
    assert splits["train"] == KEPT and info["counts"]["train"]["skipped_empty"] == 2


def test_blank_lines_and_bom_are_ignored(tmp_path):
    root = hf_dir(tmp_path / "nli")
    (root / "train.jsonl").write_text("\ufeff" + "\n".join(json.dumps(r) for r in RAW[:2]) + "\n\n  \n")
    splits, info = load_splits(str(root))
    assert splits["train"] == KEPT[:2] and info["counts"]["train"]["raw"] == 2


# --- errors -------------------------------------------------------------------------------------------------------

def broken_train(tmp_path, text, name="train.jsonl"):
    root = hf_dir(tmp_path / "nli")
    (root / "train.jsonl").unlink()
    (root / name).write_bytes(text if isinstance(text, bytes) else text.encode())
    return str(root)


def lines(*rows):
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows)


GOOD = RAW[0]


@pytest.mark.parametrize("text, fragment", [
    (lines(GOOD, GOOD, '{"premise": "p", "hypo'), "train.jsonl line 3: not valid JSON"),
    (lines(GOOD, "[1, 2]"), "train.jsonl line 2: expected an object"),
    (lines(GOOD, {"premise": "p", "label": 1}), "train.jsonl line 2: missing key 'hypothesis'"),
    (lines(GOOD, {**GOOD, "label": 5}), "train.jsonl line 2: label = 5 is not a known label; allowed: 0, 1, 2"),
    (lines(GOOD, {**GOOD, "label": True}), "line 2: label = True is not a known label"),
    (lines(GOOD, {**GOOD, "label": 1.0}), "line 2: label = 1.0 is not a known label"),
    (lines(GOOD, {**GOOD, "label": "maybe"}), "line 2: label = 'maybe' is not a known label"),
    (lines(GOOD, {**GOOD, "label": None}), "line 2: label = None is not a known label"),
    (lines(GOOD, {**GOOD, "premise": 42}), "line 2: premise = 42 is not a string"),
    (lines(GOOD, {**GOOD, "hypothesis": ["a"]}), "line 2: hypothesis = ['a'] is not a string"),
    (lines(GOOD, '{"premise": "\\ud800", "hypothesis": "h", "label": 0}'),
     "line 2: premise holds U+D800 at character 1, which is not valid Unicode"),
    (lines(GOOD) + "1" * 5000 + "\n", "line 2: not valid JSON"),
    (lines(GOOD) + "[" * 100_000 + "\n", "line 2: not valid JSON"),
    (lines(GOOD).encode() + b'{"premise": "\xff"}\n', "train.jsonl line 2: not valid UTF-8"),
    (lines({**GOOD, "label": -1}, {**GOOD, "hypothesis": ""}),
     "train.jsonl: no labeled pairs (2 rows, 1 unlabeled, 1 with empty text)"),
    ("", "train.jsonl: no labeled pairs (0 rows"),
])
def test_malformed_jsonl(tmp_path, text, fragment):
    assert fragment in one_line_error(lambda: load_splits(broken_train(tmp_path, text)))


@pytest.mark.parametrize("name, text, fragment", [
    ("train.csv", "premise,label\np,0\n", "train.csv: missing column 'hypothesis' (found: premise, label)"),
    ("train.csv", "premise,hypothesis,label\np,h,7\n", "train.csv line 2: label = '7' is not a known label"),
    ("train.csv", "", "train.csv: missing column 'premise' (found: none)"),
    ("train.csv", b"premise,hypothesis,label\n\xff,h,0\n", "train.csv: not valid UTF-8 at byte"),
    ("train.parquet", "not parquet at all", "train.parquet: cannot read it as Parquet"),
    ("train.json", "[1, 2]", "train.json item 1: expected an object"),
    ("train.json", '{"data": [{"premise": "p", "hypothesis": "h"}]}', "train.json item 1: missing key 'label'"),
])
def test_malformed_other_formats(tmp_path, name, text, fragment):
    assert fragment in one_line_error(lambda: load_splits(broken_train(tmp_path, text, name)))


def test_missing_and_ambiguous_splits(tmp_path):
    root = hf_dir(tmp_path / "nli")
    (root / "validation.jsonl").unlink()
    message = one_line_error(lambda: load_splits(str(root)))
    assert "has no validation split; expected one of validation.jsonl" in message
    write_split(root / "validation.jsonl", RAW, "jsonl")
    write_split(root / "validation.csv", RAW, "csv")
    assert "several validation files" in one_line_error(lambda: load_splits(str(root)))
    root = snli1_dir(tmp_path / "snli")
    (root / "snli_1.0_dev.jsonl").unlink()
    assert "snli_1.0_dev.jsonl is missing" in one_line_error(lambda: load_splits(str(root)))


def test_snli_1_0_unknown_gold_label(tmp_path):
    root = snli1_dir(tmp_path / "snli")
    (root / "snli_1.0_test.jsonl").write_text(lines({"sentence1": "p", "sentence2": "h", "gold_label": "yes"}))
    message = one_line_error(lambda: load_splits(str(root)))
    assert "snli_1.0_test.jsonl line 1: gold_label = 'yes' is not a known label" in message


def test_save_to_disk_errors(tmp_path):
    import datasets

    single = tmp_path / "single"
    datasets.Dataset.from_list(RAW).save_to_disk(str(single))
    (single / "dataset_dict.json").write_text("{}")  # looks like a DatasetDict folder, but is not one
    assert "holds a single Dataset" in one_line_error(lambda: load_splits(str(single)))
    damaged = tmp_path / "damaged"
    datasets.DatasetDict({s: datasets.Dataset.from_list(RAW) for s in SPLITS}).save_to_disk(str(damaged))
    (damaged / "dataset_dict.json").write_text("not json")
    assert "cannot read" in one_line_error(lambda: load_splits(str(damaged)))
    no_test = tmp_path / "no_test"
    datasets.DatasetDict({s: datasets.Dataset.from_list(RAW) for s in SPLITS[:2]}).save_to_disk(str(no_test))
    assert "has no 'test' split (found: train, validation)" in one_line_error(lambda: load_splits(str(no_test)))
    renamed = tmp_path / "renamed"
    rows = [{"sentence1": r["premise"], "sentence2": r["hypothesis"], "label": r["label"]} for r in RAW]
    datasets.DatasetDict({s: datasets.Dataset.from_list(rows) for s in SPLITS}).save_to_disk(str(renamed))
    assert "missing column 'premise'" in one_line_error(lambda: load_splits(str(renamed)))


# --- where the data comes from: local, mirror, Hub -----------------------------------------------------------------

def test_local_directory_wins(tmp_path, monkeypatch):
    monkeypatch.setenv("NLI_DATA_MIRROR", str(tmp_path / "nowhere"))
    root = hf_dir(tmp_path / "nli")
    assert resolve_source(str(root)) == ("local", str(root))


@pytest.mark.parametrize("layout", ["owner/name", "name"])
def test_mirror(tmp_path, monkeypatch, layout):
    hf_dir(tmp_path / "mirror" / layout.replace("owner", "stanfordnlp").replace("name", "snli"))
    monkeypatch.setenv("NLI_DATA_MIRROR", str(tmp_path / "mirror"))
    splits, info = load_splits("stanfordnlp/snli")
    expected = "stanfordnlp/snli" if layout == "owner/name" else "snli"
    # no absolute path: the manifest (a DVC output) must be the same on every machine
    assert info["read_from"] == f"mirror:$NLI_DATA_MIRROR/{expected}"
    assert splits["test"] == KEPT


def test_mirror_finds_a_conventional_short_name(tmp_path, monkeypatch):
    (tmp_path / "mirror" / "mnli").mkdir(parents=True)
    write_split(tmp_path / "mirror" / "mnli" / "validation_matched.jsonl", RAW, "jsonl")
    monkeypatch.setenv("NLI_DATA_MIRROR", str(tmp_path / "mirror"))
    source = sources.Source("nyu-mll/multi_nli", "data.extra_sets.m.source", ["validation_matched"])
    rows, counts, _ = source.read("validation_matched")
    assert source.read_from == "mirror:$NLI_DATA_MIRROR/mnli" and rows == KEPT and counts == COUNTS


def test_split_names_other_than_train_validation_test(tmp_path):
    root = tmp_path / "mnli"
    root.mkdir()
    for name in ("train", "validation_matched", "validation_mismatched"):
        write_split(root / f"{name}.jsonl", RAW, "jsonl")
    splits, info = load_splits(str(root), {"train": "train", "validation": "validation_matched",
                                           "test": "validation_mismatched"})
    assert splits["validation"] == KEPT and set(info["raw_sha256"]) == set(SPLITS)
    message = one_line_error(lambda: load_splits(str(root)))  # the default names are not there
    assert message.startswith("data.source: ") and "has no validation split" in message
    snli1 = snli1_dir(tmp_path / "snli_1.0")
    message = one_line_error(lambda: sources.Source(str(snli1), "data.extra_sets.x.source").read("validation_matched"))
    assert message.startswith("data.extra_sets.x.source: ") and "SNLI 1.0 layout" in message


def test_mirror_without_the_dataset(tmp_path, monkeypatch):
    monkeypatch.setenv("NLI_DATA_MIRROR", str(tmp_path))
    message = one_line_error(lambda: resolve_source("stanfordnlp/snli"))
    assert f"{tmp_path}/stanfordnlp/snli or {tmp_path}/snli" in message and "NLI_DATA_MIRROR" in message


def test_source_that_is_neither_a_directory_nor_a_hub_id(tmp_path):
    message = one_line_error(lambda: resolve_source(str(tmp_path / "missing")))
    assert "is neither an existing directory nor a Hugging Face dataset id" in message


HUB_DOWN = ("data.source: cannot reach the Hugging Face Hub for 'stanfordnlp/snli' and NLI_DATA_MIRROR is not set; "
            "connect to the Hub, or set NLI_DATA_MIRROR to a directory holding snli/{train,validation,test}.jsonl")


def test_no_mirror_and_no_hub(monkeypatch):
    import huggingface_hub

    def no_network(*args, **kwargs):
        raise ConnectionError("[Errno -2] Name or service not known")

    monkeypatch.delenv("NLI_DATA_MIRROR", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.HfApi, "dataset_info", no_network)
    start = time.monotonic()
    assert one_line_error(lambda: load_splits("stanfordnlp/snli")) == HUB_DOWN
    assert time.monotonic() - start < 5


def test_hub_offline_mode_without_cache(monkeypatch):
    import datasets
    import huggingface_hub

    def no_cache(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'stanfordnlp/snli' on the Hub (OfflineModeIsEnabled)")

    monkeypatch.delenv("NLI_DATA_MIRROR", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets, "load_dataset", no_cache)
    assert one_line_error(lambda: load_splits("stanfordnlp/snli")) == HUB_DOWN


def test_hub_dataset(monkeypatch):
    import datasets
    import huggingface_hub

    hub = datasets.DatasetDict({s: datasets.Dataset.from_list(RAW) for s in SPLITS})
    monkeypatch.delenv("NLI_DATA_MIRROR", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.HfApi, "dataset_info", lambda *a, **k: None)
    monkeypatch.setattr(datasets, "load_dataset", lambda source: hub)
    splits, info = load_splits("owner/made-up-nli")
    assert info["read_from"] == "hub:owner/made-up-nli"
    assert all(splits[s] == KEPT and info["counts"][s] == COUNTS for s in SPLITS)
    canonical = "".join(json.dumps(r, sort_keys=True, separators=(",", ":")) + "\n" for r in RAW)
    assert info["raw_sha256"]["train"] == hashlib.sha256(canonical.encode()).hexdigest()


# --- the prepare stage ---------------------------------------------------------------------------------------------

def test_prepare_end_to_end_is_reproducible(tmp_path, monkeypatch):
    project = prepare_project(tmp_path)
    first = run_prepare(project, monkeypatch)
    # no extra sets: data/sets holds only its README (Git keeps no empty directory, and DVC needs the output)
    assert sorted(first) == ["manifest.json", "sets/README.txt", "test.jsonl", "train.jsonl", "validation.jsonl"]
    assert run_prepare(project, monkeypatch) == first

    train = [json.loads(line) for line in first["train.jsonl"].decode().splitlines()]
    labeled_ids = [i for i in range(40) if i != 7]
    assert [r["id"] for r in train] == [labeled_ids[i * 39 // 10] for i in range(10)]
    assert set(train[0]) == {"id", "premise", "hypothesis", "label"}
    manifest = json.loads(first["manifest.json"])
    assert manifest["read_from"] == f"local:{tmp_path / 'nli'}"
    assert manifest["counts"]["train"] == {"raw": 40, "unlabeled_dropped": 1, "skipped_empty": 0, "sampled": 10}
    assert manifest["counts"]["test"]["sampled"] == 39
    assert manifest["sampling"] == "evenly spaced: index floor(i*N/n)"
    assert set(manifest["raw_sha256"]) == set(SPLITS)


def test_prepare_writes_extra_sets_with_their_own_split_names(tmp_path, monkeypatch):
    other = tmp_path / "other"
    other.mkdir()
    write_split(other / "dev_matched.csv", [{"premise": f"P {i}.", "hypothesis": f"H {i}.", "label": i % 3}
                                            for i in range(10)], "csv")
    project = prepare_project(tmp_path, extra_sets={"ood": {"source": str(other), "split": "dev_matched", "n": 4}})
    files = run_prepare(project, monkeypatch)
    rows = [json.loads(line) for line in files["sets/ood.jsonl"].decode().splitlines()]
    assert [r["id"] for r in rows] == [0, 2, 5, 7] and rows[1]["premise"] == "P 2."
    manifest = json.loads(files["manifest.json"])
    assert manifest["extra_sets"]["ood"]["split"] == "dev_matched"
    assert manifest["extra_sets"]["ood"]["counts"]["sampled"] == 4 and manifest["extra_sets"]["ood"]["counts"]["raw"] == 10
    project = prepare_project(tmp_path / "again", extra_sets={"ood": {"source": str(other), "split": "dev_matched", "n": 11}})
    message = one_line_error(lambda: run_prepare(project, monkeypatch))
    assert "data.extra_sets.ood.n = 11 is larger than the split (10 labeled pairs)" in message
    assert not (project / "data").exists()  # nothing half-written


def test_prepare_as_a_script(tmp_path):
    """As dvc.yaml runs it: `python -m stages.prepare` in the project, a process of its own."""
    project = prepare_project(tmp_path)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    subprocess.run([sys.executable, "-m", "stages.prepare"], cwd=project, env=env, check=True)
    assert (project / "data" / "manifest.json").is_file()


def test_prepare_too_large_sample_writes_nothing(tmp_path, monkeypatch):
    project = prepare_project(tmp_path, n_val=40)
    message = one_line_error(lambda: run_prepare(project, monkeypatch))
    assert "data.n_val = 40 is larger than the split (39 labeled pairs)" in message
    assert not (project / "data").exists()


# --- text the prompts cannot take, CSV read strictly, keys given twice, a mirror that is a file --------------------

@pytest.mark.parametrize("fmt", ["jsonl", "csv", "parquet"])
@pytest.mark.parametrize("char", ["\x00", "\x1b", "\x7f", "\x85"])
def test_a_control_character_in_the_text_is_refused(tmp_path, fmt, char):
    rows = [dict(r) for r in RAW]
    rows[3]["hypothesis"] = "The dogs" + char + " are running."
    root = tmp_path / "nli"
    root.mkdir()
    for split in SPLITS:
        write_split(root / f"{split}.{fmt}", rows, fmt)
    unit = {"jsonl": "line 4", "csv": "line 5", "parquet": "row 4"}[fmt]
    assert one_line_error(lambda: load_splits(str(root))) == (
        f"{root / f'train.{fmt}'} {unit}: hypothesis holds the control character U+{ord(char):04X} at character 9; "
        f"fix or remove the row")


def test_whitespace_and_format_characters_are_text(tmp_path):
    # Tab, line break, no-break space and soft hyphen (MultiNLI holds the last two) are kept as they are.
    rows = [dict(r) for r in RAW]
    rows[0]["premise"] = "A cook\tstirs a\npot, a soup\u00adpot,\u00a0slowly."
    splits, _ = load_splits(str(hf_dir(tmp_path / "nli", "csv", rows)))
    assert splits["train"][0]["premise"] == "A cook\tstirs a\npot, a soup\u00adpot,\u00a0slowly."


def test_a_text_longer_than_the_bound_is_refused_unread(tmp_path):
    rows = [dict(r) for r in RAW]
    rows[1]["premise"] = "word " * 4_000_000  # 20 MB
    assert one_line_error(lambda: load_splits(str(hf_dir(tmp_path / "nli", "jsonl", rows)))) == (
        f"{tmp_path / 'nli/train.jsonl'} line 2: premise is 20,000,000 characters long, more than the 32,768 a "
        f"pair's text may have; fix or remove the row")
    rows[1]["premise"] = "w" * 32_768  # at the bound: kept
    assert load_splits(str(hf_dir(tmp_path / "nli2", "jsonl", rows)))[0]["train"][1]["premise"] == "w" * 32_768


@pytest.mark.parametrize("text, expected", [
    # an unclosed quote: named at the row where it opens, not as a missing label further down
    ('premise,hypothesis,label\np,h,0\n"p,h,0\np,h,1\n',
     'line 3: a quote opened in this row is never closed (the field runs to the end of the file); close it, or '
     'write a quote inside a field as ""'),
    ("premise,hypothesis,label\np,h,0\np,h\n",
     "line 3: 2 fields, but the header has 3 (premise, hypothesis, label); add the missing fields, or quote a field "
     "that holds a comma"),
    ("premise,hypothesis,label\np,h,0,extra\n",
     "line 2: 4 fields, but the header has 3 (premise, hypothesis, label); remove the extra fields, or quote a field "
     "that holds a comma"),
    ('premise,hypothesis,label\n"p"x,h,0\n',
     "line 2: not valid CSV (',' expected after '\"'); fix the quoting (a quote inside a field is written \"\", and "
     "the field itself quoted)"),
    ("premise,hypothesis,label,label\np,h,0,1\n", "line 1: the header names the column 'label' twice; keep one"),
    ('premise,hypothesis,label\n"' + "x" * 200_000 + '",h,0\n',
     "line 2: a field is longer than 131,072 characters (a premise or hypothesis may have 32,768); shorten it, or "
     "check for a quote that is never closed"),
])
def test_csv_is_read_strictly(tmp_path, text, expected):
    root = broken_train(tmp_path, text, "train.csv")
    assert one_line_error(lambda: load_splits(root)) == f"{Path(root) / 'train.csv'} {expected}"


def test_csv_quoted_line_breaks_and_blank_lines(tmp_path):
    text = 'premise,hypothesis,label\n\n"A cook,\nstirring.",Someone cooks.,0\nTwo dogs.,"No ""pet"".",2\n'
    root = broken_train(tmp_path, text, "train.csv")
    assert load_splits(root)[0]["train"] == [
        {"id": 0, "premise": "A cook,\nstirring.", "hypothesis": "Someone cooks.", "label": 0},
        {"id": 1, "premise": "Two dogs.", "hypothesis": 'No "pet".', "label": 2}]


@pytest.mark.parametrize("name, text, expected", [
    ("train.jsonl", lines(GOOD, '{"premise": "a", "hypothesis": "b", "label": 0, "premise": "c"}'),
     "line 2: not valid JSON (the key 'premise' is given twice in one object); fix or remove the line"),
    ("train.json", '[{"premise": "a", "hypothesis": "b", "label": 0, "label": 1}]',
     ": not valid JSON (the key 'label' is given twice in one object); keep one of them"),
])
def test_a_key_given_twice_in_a_row_is_refused(tmp_path, name, text, expected):
    root = broken_train(tmp_path, text, name)
    separator = "" if expected.startswith(":") else " "
    assert one_line_error(lambda: load_splits(root)) == f"{Path(root) / name}{separator}{expected}"


def test_a_mirror_that_is_a_file(tmp_path, monkeypatch):
    (tmp_path / "mirror.tar").write_text("not a directory")
    monkeypatch.setenv("NLI_DATA_MIRROR", str(tmp_path / "mirror.tar"))
    assert one_line_error(lambda: resolve_source("stanfordnlp/snli")) == (
        f"data.source: NLI_DATA_MIRROR={tmp_path / 'mirror.tar'} is a file, not a directory; set it to the directory "
        f"that holds one folder per dataset (snli/, mnli/ ...), or unset it to use the Hub")


def test_a_column_name_with_a_line_break_is_quoted_in_the_one_line(tmp_path):
    """A CSV header cell holding a newline (quoted) is shown escaped: the message stays one line."""
    source = broken_train(tmp_path, '"pre\nmise",hypothesis,label\np,h,0\n', name="train.csv")
    message = one_line_error(lambda: load_splits(source))
    assert "missing column 'premise' (found: 'pre\\nmise', hypothesis, label)" in message


def test_a_split_name_with_a_line_break_is_quoted_in_the_one_line(tmp_path):
    """The same for the split names a folder holds: a saved dataset's split called 'va\\nl' stays on one line."""
    from qlora_nli.data.sources import _no_split

    message = str(_no_split("data.source", "d", "validation", ["train", "va\nl"]))
    assert "\n" not in message and "(found: train, 'va\\nl')" in message
