"""Every entry point's command line: `--help` prints the usage and exits 0; an unknown option or an extra argument is
one line on stderr with exit status 2; neither reads or writes anything. The entry points are read from dvc.yaml's
commands and pyproject.toml's console scripts, so a new stage or script is tested without being listed here."""
import hashlib
import importlib
import runpy
import shlex
import sys
import tomllib

import pytest
import yaml
from pipeline import REPO, make_project


def dvc_commands():
    """{id: argv after `python`} of every command in dvc.yaml, a foreach stage once per key."""
    commands = {}
    for name, stage in yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"].items():
        if "foreach" in stage:
            for key in stage["foreach"]:
                commands[f"{name}@{key}"] = shlex.split(stage["do"]["cmd"].replace("${key}", key))[1:]
        else:
            commands[name] = shlex.split(stage["cmd"])[1:]
    return commands


def console_scripts():
    """{name: "module:function"} of pyproject.toml's [project.scripts]."""
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]


ENTRY_POINTS = {**{f"dvc.yaml {k}": ("module", v) for k, v in dvc_commands().items()},
                **{f"script {k}": ("script", (k, v)) for k, v in console_scripts().items()}}


def test_the_entry_points_are_found():
    # the derivation itself: dvc.yaml's stages (evaluate twice) and both console scripts
    assert {"dvc.yaml evaluate@baseline", "dvc.yaml evaluate@finetuned", "dvc.yaml prepare", "dvc.yaml finetune",
            "script nli-predict", "script nli-export"} <= set(ENTRY_POINTS)
    assert ENTRY_POINTS["dvc.yaml evaluate@finetuned"] == ("module", ["-m", "stages.evaluate", "finetuned"])


def call(kind, spec, extra, monkeypatch):
    """Run the entry point in this process, as its command would with `extra` appended; its exit status."""
    if kind == "module":
        assert spec[0] == "-m", spec  # dvc.yaml runs every stage as a module (see there why)
        monkeypatch.setattr(sys, "argv", [spec[1], *spec[2:], *extra])
        run = lambda: runpy.run_module(spec[1], run_name="__main__", alter_sys=True)  # noqa: E731
    else:
        name, target = spec
        module, function = target.split(":")
        monkeypatch.setattr(sys, "argv", [name, *extra])
        run = getattr(importlib.import_module(module), function)
    try:
        run()
    except SystemExit as e:
        return 0 if e.code is None else e.code if isinstance(e.code, int) else 1
    return 0


def snapshot(root):
    """Every file and directory under `root` with a hash of its bytes and its modification time."""
    return {str(p.relative_to(root)): (p.is_dir() or hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if ".git" not in p.parts and ".dvc" not in p.parts}


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A project where every stage could run (params, tiny model, raw data): a stage that ignored its command line
    would write its outputs here."""
    return make_project(tmp_path_factory.mktemp("entry") / "project")


@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_help_prints_usage_and_touches_nothing(entry, project, monkeypatch, capsys):
    monkeypatch.chdir(project)
    before = snapshot(project)
    assert call(*ENTRY_POINTS[entry], ["--help"], monkeypatch) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: ") and "--help" in out
    assert snapshot(project) == before


@pytest.mark.parametrize("extra", [["--bogus-flag"], ["surplus-word"]], ids=["unknown option", "extra argument"])
@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_unknown_arguments_are_one_line_and_touch_nothing(entry, extra, project, monkeypatch, capsys):
    monkeypatch.chdir(project)
    before = snapshot(project)
    assert call(*ENTRY_POINTS[entry], extra, monkeypatch) == 2
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert captured.out == "" and len(lines) == 1, captured.err
    assert "--help" in lines[0]
    if extra == ["--bogus-flag"]:
        assert "unrecognized arguments: --bogus-flag" in lines[0] or "required" in lines[0]
    assert snapshot(project) == before


def test_evaluate_with_two_models_is_refused(project, monkeypatch, capsys):
    """`evaluate baseline finetuned --help` used to run a full baseline evaluation; `--help` now wins, and the two
    names without it are an extra argument."""
    monkeypatch.chdir(project)
    assert call("module", ["-m", "stages.evaluate", "baseline", "finetuned"], [], monkeypatch) == 2
    assert capsys.readouterr().err.strip() == ("python -m stages.evaluate: unrecognized arguments: finetuned; "
                                               "see python -m stages.evaluate --help")
    assert call("module", ["-m", "stages.evaluate", "baseline", "finetuned"], ["--help"], monkeypatch) == 0
    assert call("module", ["-m", "stages.evaluate", "bogus"], [], monkeypatch) == 2
    assert "invalid choice: 'bogus'" in capsys.readouterr().err
