"""check_params checks every data source and split it can without reading the data (data.check_source), so that a bad
one stops `dvc repro` before DVC deletes prepare's outputs. The Hub is asked only when it can be reached.
Under `dvc repro`: tests/e2e/test_bad_input.py."""
import json
import sys
import time

import pytest
from tiny import write_nli_dir

from qlora_nli.data import sources
from qlora_nli.runtime import hub
from qlora_nli.runtime.errors import DataError


def refused(call):
    with pytest.raises(DataError) as e:
        call()
    assert "\n" not in str(e.value)
    return str(e.value)


@pytest.fixture
def mirror(tmp_path, monkeypatch):
    (tmp_path / "mirror" / "mnli").mkdir(parents=True)
    (tmp_path / "mirror" / "mnli" / "validation_matched.jsonl").write_text("")  # never read: the file is enough
    monkeypatch.setenv("NLI_DATA_MIRROR", str(tmp_path / "mirror"))
    return tmp_path / "mirror"


def test_a_split_the_mirror_lacks_is_named_before_anything_is_read(mirror):
    key = "data.extra_sets.mnli.source"
    assert sources.check_source("nyu-mll/multi_nli", ["validation_matched"], key) is None
    message = refused(lambda: sources.check_source("nyu-mll/multi_nli", ["validation_mismatched"], key))
    assert message.startswith(f"{key}: {mirror / 'mnli'} has no validation_mismatched split; expected one of "
                              "validation_mismatched.jsonl")


def test_a_source_the_mirror_lacks_is_named(mirror):
    message = refused(lambda: sources.check_source("owner/unknown", ["test"], "data.extra_sets.x.source"))
    assert message.startswith("data.extra_sets.x.source: NLI_DATA_MIRROR is set but no directory for 'owner/unknown'")


def test_a_local_directory_and_a_save_to_disk_folder(tmp_path):
    write_nli_dir(tmp_path / "nli")
    assert sources.check_source(str(tmp_path / "nli"), ["train", "validation", "test"]) is None
    assert "has no dev split" in refused(lambda: sources.check_source(str(tmp_path / "nli"), ["dev"]))
    (tmp_path / "saved").mkdir()
    (tmp_path / "saved" / "dataset_dict.json").write_text(json.dumps({"splits": ["train", "test"]}))
    assert sources.check_source(str(tmp_path / "saved"), ["test"]) is None
    assert refused(lambda: sources.check_source(str(tmp_path / "saved"), ["validation"])) == (
        f"data.source: {tmp_path / 'saved'} has no 'validation' split (found: train, test); name one of those")
    assert "neither an existing directory" in refused(lambda: sources.check_source("./no/such dir", ["test"]))


def test_the_hub_unreachable_is_said_and_left_to_prepare(monkeypatch):
    monkeypatch.delenv("NLI_DATA_MIRROR", raising=False)
    monkeypatch.setattr(hub, "probe", lambda repo_id, repo_type: hub.UNREACHABLE)
    monkeypatch.setitem(sys.modules, "datasets", None)  # importing datasets would fail: it must not be asked
    note = sources.check_source("nyu-mll/multi_nli", ["validation_matched"], "data.extra_sets.m.source")
    assert note == ("the Hugging Face Hub is unreachable, so its splits of 'nyu-mll/multi_nli' could not be checked; "
                    "prepare checks them as it reads")


def test_the_hub_reachable_is_asked_for_the_split_names(monkeypatch):
    import datasets

    monkeypatch.delenv("NLI_DATA_MIRROR", raising=False)
    monkeypatch.setattr(hub, "probe", lambda repo_id, repo_type: hub.OK)
    monkeypatch.setattr(datasets, "get_dataset_split_names", lambda source: ["train", "validation_matched"])
    assert sources.check_source("nyu-mll/multi_nli", ["validation_matched"]) is None
    assert refused(lambda: sources.check_source("nyu-mll/multi_nli", ["validation_mismatched"])) == (
        "data.source: hub:nyu-mll/multi_nli has no 'validation_mismatched' split (found: train, validation_matched); "
        "name one of those")
    monkeypatch.setattr(hub, "probe", lambda repo_id, repo_type: hub.NOT_FOUND)
    assert "neither a local directory nor a dataset on the Hugging Face Hub" in refused(
        lambda: sources.check_source("owner/none", ["test"]))


def test_the_real_probe_does_not_hang_without_the_hub(monkeypatch):
    """No mock: this machine cannot reach the Hub, and the probe gives up within its timeout."""
    monkeypatch.delenv("NLI_DATA_MIRROR", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    start = time.monotonic()
    note = sources.check_source("nyu-mll/multi_nli", ["validation_matched"])
    if note is None:
        pytest.skip("the Hugging Face Hub is reachable here")
    assert "could not be checked" in note and time.monotonic() - start < 60
