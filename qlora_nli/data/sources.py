"""Read the three NLI splits from the Hub, a local mirror or a local directory into one clean schema.

Each row becomes {"id", "premise", "hypothesis", "label"}: id is the row's index in the raw split (0-based, counting
every record, also the dropped ones), label is 0 = entailment, 1 = neutral, 2 = contradiction.

Directory layouts:
  - Hugging Face: one file per split, {train,validation,test}.{jsonl,json,csv,parquet}, or a folder written by
    `DatasetDict.save_to_disk`; columns premise, hypothesis, label. The label is 0/1/2 or, as a convenience for
    hand-made files, the label word (entailment/neutral/contradiction); -1 (or "-") marks an unlabeled pair.
  - SNLI 1.0 as Stanford ships it: snli_1.0_{train,dev,test}.jsonl with sentence1, sentence2 and gold_label
    (a label word; "-" when the annotators did not agree).

Dropped and counted (reported in data/manifest.json): unlabeled pairs, and pairs whose premise or hypothesis is
empty, blank or null. Anything else that is off (bad JSON or UTF-8, a missing column, a key or column given twice, a
CSV row with more or fewer fields than the header, an unknown label, text that is not a string, holds a control
character or is longer than prompts.MAX_TEXT_CHARS) stops the run with one line naming the file and line: dropping it
silently would hide a broken file.
"""
import hashlib
import json
import logging
import os
import re
from pathlib import Path

from qlora_nli.data.readers import (
    HF_COLUMNS,
    HF_EXTENSIONS,
    _check_columns,
    _clean,
    _dataset_records,
    _load_from_disk,
    _read_file,
    found_names,
)
from qlora_nli.runtime import env
from qlora_nli.runtime.errors import DataError, ParamsError, shorten, show

log = logging.getLogger(__name__)


SPLITS = ("train", "validation", "test")  # the roles of a source's splits (data.splits maps them to its names)
SAMPLE_SIZES = {"train": "n_train", "validation": "n_val", "test": "n_test"}  # role -> the data.* param of its sample
SNLI1_FILES = {"train": "snli_1.0_train.jsonl", "validation": "snli_1.0_dev.jsonl", "test": "snli_1.0_test.jsonl"}
SNLI1_COLUMNS = ("sentence1", "sentence2", "gold_label")
# Conventional short names an offline mirror may use for a Hub dataset (tried after the full id and its last part).
MIRROR_ALIASES = {"nyu-mll/multi_nli": ("mnli", "multi_nli"), "stanfordnlp/snli": ("snli",)}
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def _braces(names):
    return names[0] if len(names) == 1 else "{" + ",".join(names) + "}"


# --- where the data comes from ---------------------------------------------------------------------------------

def mirror_directory():
    """NLI_DATA_MIRROR as an absolute path, None when unset. A relative value is taken from the repository root, where
    the user typed it: a queued `dvc exp run` runs the stages in a temporary copy (.dvc/tmp/exps/tmp*/) and sets
    DVC_ROOT to the original repository, so the path means the same there as in the workspace."""
    mirror = env.get("DATA_MIRROR")
    if not mirror:
        return None
    path = Path(mirror).expanduser()
    return path if path.is_absolute() else Path(os.environ.get("DVC_ROOT") or os.getcwd()) / path


def resolve_source(source, key="data.source"):
    """(kind, location): ("local", abs dir), ("mirror", abs dir) or ("hub", dataset id). Touches no network.
    `key` names the param in messages."""
    path = Path(source).expanduser()
    if path.is_dir():
        return "local", str(path.resolve())
    if not HUB_ID.match(source):
        raise DataError(f"{key}: {show(source)} is neither an existing directory nor a Hugging Face dataset "
                        f"id; fix the path, or use a Hub id such as stanfordnlp/snli")
    mirror = mirror_directory()
    if mirror and mirror.exists() and not mirror.is_dir():
        raise DataError(f"{key}: NLI_DATA_MIRROR={os.environ['NLI_DATA_MIRROR']} is a file, not a directory; set it "
                        f"to the directory that holds one folder per dataset (snli/, mnli/ ...), or unset it to use "
                        f"the Hub")
    if mirror:
        # Offline machines keep a copy of each dataset under the mirror, by full id or by bare name.
        names = [source, source.split("/")[-1], *MIRROR_ALIASES.get(source, ())]
        tried = list(dict.fromkeys(mirror / name for name in names))
        for candidate in tried:
            if candidate.is_dir():
                return "mirror", str(candidate.resolve())
        given = env.get("DATA_MIRROR")
        relative = "" if Path(given).expanduser().is_absolute() else (
            f" (NLI_DATA_MIRROR={given} is relative: taken from {os.environ.get('DVC_ROOT') or os.getcwd()})")
        raise DataError(f"{key}: NLI_DATA_MIRROR is set but no directory for '{source}' exists at "
                        f"{' or '.join(map(str, tried))}{relative}; put the dataset there, set NLI_DATA_MIRROR to "
                        f"an absolute path, or unset it to use the Hub")
    return "hub", source


def _refuse_hub_status(source, key, status):
    """DataError for a Hub dataset that is gated or does not exist (by hub.probe's `status`)."""
    from qlora_nli.runtime import hub

    message = hub.refusal(status, "dataset", key, source, "; fix the id or the path")
    if message:
        raise DataError(message)


def _no_split(key, where, split, found):
    return DataError(f"{key}: {where} has no '{split}' split (found: {found_names(found)}); name "
                     f"one of those")


def load_hub_dataset(source, key="data.source", wanted=SPLITS):
    """The Hub's DatasetDict, after a quick probe (hub.probe): offline, `load_dataset` alone retries, then raises."""
    from qlora_nli.runtime import hub

    unreachable = (f"{key}: cannot reach the Hugging Face Hub for '{source}' and NLI_DATA_MIRROR is not set; "
                   f"connect to the Hub, or set NLI_DATA_MIRROR to a directory holding "
                   f"{source.split('/')[-1]}/{_braces(wanted)}.jsonl")
    status = hub.probe(source, "dataset")  # OFFLINE: skip the probe, load_dataset may still find the local cache
    _refuse_hub_status(source, key, status)
    if status == hub.UNREACHABLE:
        raise DataError(unreachable)
    import datasets

    try:
        return datasets.load_dataset(source)
    except ConnectionError as e:
        log.info("load_dataset failed: %s", shorten(e, 300))
        raise DataError(unreachable)


def check_source(source, split_names, key="data.source"):
    """What can be checked of a source without reading its data, before DVC deletes prepare's outputs: that it
    resolves (as `Source` resolves it) and has each of `split_names`: the split's file in a directory or mirror (the
    file `Source.read` would read), the split in a save_to_disk folder's dataset_dict.json, or the split in the Hub's
    information about the dataset. DataError when it does not; None when every split was found; else a sentence
    saying what could not be checked (the Hub is unreachable), which `prepare` then checks as it reads."""
    kind, location = resolve_source(source, key)
    if kind == "hub":
        return _check_hub_splits(location, split_names, key)
    directory = Path(location)
    if (directory / "dataset_dict.json").is_file():
        try:
            found = json.loads((directory / "dataset_dict.json").read_text())["splits"]
        except (OSError, ValueError, KeyError, TypeError):
            return f"{directory / 'dataset_dict.json'} names no splits, so prepare checks them as it reads"
        have = list(map(str, found)) if isinstance(found, list) else []
    else:
        for split in split_names:
            _split_file(directory, split, key)
        return None
    for split in split_names:
        if split not in have:
            raise _no_split(key, directory, split, have)
    return None


def _check_hub_splits(source, split_names, key):
    from qlora_nli.runtime import hub

    status = hub.probe(source, "dataset")
    _refuse_hub_status(source, key, status)
    if status != hub.OK:
        return (f"the Hugging Face Hub is {'switched off (HF_HUB_OFFLINE)' if status == hub.OFFLINE else 'unreachable'}"
                f", so its splits of '{source}' could not be checked; prepare checks them as it reads")
    import datasets

    try:
        have = datasets.get_dataset_split_names(source)
    except Exception as e:  # many configurations, a script dataset, a network failure: the names stay unknown
        log.info("split names of %s: %s: %s", source, type(e).__name__, shorten(str(e), 200))
        return f"the Hub did not list the splits of '{source}', so prepare checks them as it reads"
    for split in split_names:
        if split not in have:
            raise _no_split(key, f"hub:{source}", split, have)
    return None


# --- raw records: (line or row number, record) per split, and the hash of what was read -------------------------

def _split_file(directory, split, key):
    """The raw file of a split and its column names (premise, hypothesis, label order)."""
    if any((directory / name).exists() for name in SNLI1_FILES.values()):
        if split not in SNLI1_FILES:
            raise DataError(f"{key}: {directory} has the SNLI 1.0 layout, whose splits are "
                            f"{', '.join(SNLI1_FILES)}; there is no split '{split}'")
        path = directory / SNLI1_FILES[split]
        if not path.is_file():
            raise DataError(f"{key}: {path} is missing; the SNLI 1.0 layout needs "
                            f"{', '.join(SNLI1_FILES.values())}")
        return path, SNLI1_COLUMNS
    candidates = [directory / f"{split}.{ext}" for ext in HF_EXTENSIONS]
    found = [path for path in candidates if path.is_file()]
    not_files = [path for path in candidates if path.exists() and not path.is_file()]
    if not found and not_files:
        raise DataError(f"{key}: {not_files[0]} is a directory, not a file; the {split} split must be a file "
                        f"of rows (move the rows into {not_files[0].name}, or remove the directory)")
    if not found:
        snli1 = f", {SNLI1_FILES[split]} (SNLI 1.0 layout)" if split in SNLI1_FILES else ""
        raise DataError(f"{key}: {directory} has no {split} split; expected one of "
                        f"{', '.join(f'{split}.{ext}' for ext in HF_EXTENSIONS)}{snli1} or a datasets.save_to_disk "
                        f"folder")
    if len(found) > 1:
        raise DataError(f"{key}: {directory} has several {split} files ({', '.join(p.name for p in found)}); "
                        f"keep one")
    return found[0], HF_COLUMNS


class Source:
    """An opened data source: where it is, and the Hub's or save_to_disk's DatasetDict if it is one."""

    def __init__(self, source, key="data.source", wanted=SPLITS):
        self.key = key
        kind, location = resolve_source(source, key)
        self.location, self.dataset = location, None
        if kind == "hub":
            self.dataset = load_hub_dataset(location, key, tuple(wanted))
        elif (Path(location) / "dataset_dict.json").is_file():
            self.dataset = _load_from_disk(location, key)
        # Recorded without machine-specific absolute paths, so the manifest (and dvc.lock) match across machines.
        mirror = os.path.relpath(location, os.path.realpath(mirror_directory() or "/"))
        self.read_from = {"hub": f"hub:{location}", "local": f"local:{source}",
                          "mirror": f"mirror:$NLI_DATA_MIRROR/{mirror}"}[kind]

    def read(self, split):
        """(rows, counts, sha256 of what was read) of the source's split named `split`."""
        if self.dataset is not None:
            name = f"{self.read_from} split {split}"
            if split not in self.dataset:
                raise _no_split(self.key, self.read_from, split, self.dataset)
            _check_columns(name, self.dataset[split].column_names, HF_COLUMNS)
            digest = hashlib.sha256()
            rows, counts = _clean(name, "row", _dataset_records(self.dataset[split], digest), HF_COLUMNS)
            sha = digest.hexdigest()
        else:
            path, columns = _split_file(Path(self.location), split, self.key)
            unit, records, sha = _read_file(path, columns)
            rows, counts = _clean(str(path), unit, records, columns)
        log.info("%s %s: %d rows, %d unlabeled dropped, %d with empty text skipped, %d kept", self.read_from, split,
                 counts["raw"], counts["unlabeled_dropped"], counts["skipped_empty"], len(rows))
        return rows, counts, sha


def load_splits(source, split_names=None, key="data.source"):
    """({role: rows}, info) for the roles train, validation and test; `split_names` maps each role to the source's
    split name (default: the role's own name). info says where the data came from and what was dropped."""
    names = {role: (split_names or {}).get(role, role) for role in SPLITS}
    opened = Source(source, key, list(names.values()))
    splits, info = {}, {"read_from": opened.read_from, "raw_sha256": {}, "counts": {}}
    for role in SPLITS:
        rows, counts, sha = opened.read(names[role])
        splits[role] = rows
        info["raw_sha256"][role] = sha
        info["counts"][role] = counts
    return splits, info


def evenly_spaced(rows, n, key="n"):
    """n rows at indices floor(i * len / n): deterministic, and spread over the whole split (its order is arbitrary)."""
    check_split_size(key, n, len(rows))
    return [rows[i * len(rows) // n] for i in range(n)]


def check_split_size(key, requested, available, path="params.yaml"):
    """Prepare samples without replacement: asking for more pairs than a split holds is a params error."""
    if requested > available:
        hint = ', or "all"' if key.endswith(("n_test", ".n")) else ""
        raise ParamsError(f"{path}: {key} = {requested} is larger than the split ({available} labeled pairs); "
                          f"allowed: an integer from 1 to {available}{hint}")
