"""One prefix for the project's environment variables (NLI_); the older QLORA_NLI_ names still work and say once that
they are deprecated."""
import logging

import pytest

from qlora_nli.runtime import env, launch


@pytest.fixture(autouse=True)
def fresh(monkeypatch):
    monkeypatch.setattr(env, "_warned", set())
    for name in ("NLI_TORCHRUN", "QLORA_NLI_TORCHRUN", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)


def test_the_new_name_is_read_and_wins_over_the_old_one(monkeypatch, caplog):
    monkeypatch.setenv("QLORA_NLI_TORCHRUN", "3")
    monkeypatch.setenv("NLI_TORCHRUN", "2")
    with caplog.at_level(logging.WARNING):
        assert env.get("TORCHRUN") == "2"
    assert not caplog.records


def test_the_old_name_still_works_and_says_so_once(monkeypatch, caplog):
    monkeypatch.setenv("QLORA_NLI_TORCHRUN", "2")
    with caplog.at_level(logging.WARNING):
        assert [env.get("TORCHRUN") for _ in range(3)] == ["2", "2", "2"]
    assert [r.getMessage() for r in caplog.records] == [
        "QLORA_NLI_TORCHRUN is deprecated: set NLI_TORCHRUN instead (the same meaning)"]


def test_unset_gives_the_default():
    assert env.get("TORCHRUN") is None and env.get("TORCHRUN", "") == ""


def test_the_switch_reads_the_old_name_too(monkeypatch):
    """The launcher's switch goes through env.get: an old environment still starts one process per value."""
    monkeypatch.setenv("QLORA_NLI_TORCHRUN", "0")
    with pytest.raises(Exception, match="^NLI_TORCHRUN=0: a process count must be at least 1"):
        launch.start("cpu")
