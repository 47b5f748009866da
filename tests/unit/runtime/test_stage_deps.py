"""dvc.yaml declares exactly what each stage's code uses: the package modules it imports (transitively) and the
params groups (or single keys) it reads, so that a change to either reruns the stage and nothing else does."""
import re

import pytest
import yaml
from pipeline import REPO

from qlora_nli.runtime.code import import_closure

STAGES = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]


def _stage_defs():
    """(stage name, script path, deps, params) per stage; foreach stages once per item."""
    for name, stage in STAGES.items():
        body = stage.get("do", stage)
        command = body["cmd"].split()
        assert command[:2] == ["python", "-m"] and command[2].startswith("stages."), body["cmd"]
        script = command[2].replace(".", "/") + ".py"
        yield name, script, body.get("deps", []), body.get("params", [])


def _params_read(script):
    """Groups read whole (`params["g"]`) and single keys read (`params["g"]["k"]`) by a stage script."""
    text = (REPO / script).read_text()
    keys = set(re.findall(r'params\["(\w+)"\]\["(\w+)"\]', text))
    groups = set(re.findall(r'params\["(\w+)"\](?!\[)', text)) | set(re.findall(r'load_params\(\)\["(\w+)"\]', text))
    return groups, keys


@pytest.mark.parametrize("name, script, deps, params", list(_stage_defs()), ids=[s[0] for s in _stage_defs()])
def test_code_deps_are_the_transitive_imports(name, script, deps, params):
    declared = {d for d in deps if isinstance(d, str) and d.startswith("qlora_nli/")}
    assert script in deps, f"{name}: its own script {script} is not a dep"
    assert declared == import_closure(REPO / script, REPO), f"{name}: deps differ from what {script} imports"


@pytest.mark.parametrize("name, script, deps, params", list(_stage_defs()), ids=[s[0] for s in _stage_defs()])
def test_params_read_are_declared(name, script, deps, params):
    groups, keys = _params_read(script)
    if {"params.yaml": None} in params:  # the whole file: nothing to compare
        assert name == "check_params", f"{name}: only check_params declares every param"
        return
    declared = set(params)
    for group in groups:
        assert group in declared, f"{name}: {script} reads params group {group!r} but dvc.yaml does not declare it"
    for group, key in keys:
        assert group in declared or f"{group}.{key}" in declared, \
            f"{name}: {script} reads {group}.{key} but dvc.yaml declares neither {group} nor {group}.{key}"
    read = groups | {g for g, _ in keys} | {f"{g}.{k}" for g, k in keys}
    for entry in declared:
        assert entry in read, f"{name}: dvc.yaml declares params {entry!r} that {script} never reads"


def test_stage_commands_import_the_package_of_the_directory_they_run_in(tmp_path):
    """A queued experiment runs its stages in a temporary copy of the repository, while `pip install -e .` makes the
    workspace's qlora_nli importable from anywhere (a PYTHONPATH entry stands in for it here). dvc.yaml's
    `python -m stages.<name>` must import the copy's package; `python stages/<name>.py` would import the workspace's."""
    import shutil
    import subprocess
    import sys

    workspace = tmp_path / "workspace" / "qlora_nli"
    workspace.mkdir(parents=True)
    (workspace / "__init__.py").write_text("raise ImportError('imported the workspace package')\n")
    copy = tmp_path / "copy"
    for name in ("stages", "qlora_nli"):
        shutil.copytree(REPO / name, copy / name, ignore=shutil.ignore_patterns("__pycache__"))
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(workspace.parent)}

    def run(command):
        return subprocess.run([sys.executable, *command], cwd=copy, env=env, capture_output=True, text=True)

    as_in_dvc_yaml = run(STAGES["check_params"]["cmd"].split()[1:])  # no params.yaml in the copy: a clean ParamsError
    assert as_in_dvc_yaml.returncode == 1 and "params.yaml: file not found" in as_in_dvc_yaml.stderr
    assert "imported the workspace package" not in as_in_dvc_yaml.stderr
    as_a_script = run(["stages/check_params.py"])  # the form that picks the wrong package
    assert "imported the workspace package" in as_a_script.stderr
