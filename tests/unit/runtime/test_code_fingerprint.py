"""finetune's checkpoint fingerprint covers exactly the code the stage runs: its script and every package module it
imports, directly or through each other (the same files dvc.yaml lists as its code deps)."""
import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from pipeline import REPO

from qlora_nli.runtime.code import code_sha256, import_closure

STAGE = "stages/finetune.py"


def _copy(tmp_path):
    for name in ("stages", "qlora_nli"):
        shutil.copytree(REPO / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__"))
    return tmp_path


def _modules_loaded_by_importing(module, root):
    """qlora_nli files that Python really loads when importing `module` from `root`: an independent, runtime view
    of the static closure (which also holds imports made later, inside functions)."""
    code = (f"import sys; import {module}; "
            "print('\\n'.join(m.__file__ for n, m in sys.modules.items() if n.startswith('qlora_nli.')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=root, env={"PYTHONPATH": str(root), "PATH": "/usr/bin"},
                         capture_output=True, text=True, check=True).stdout
    files = {Path(f).resolve().relative_to(Path(root).resolve()).as_posix() for f in out.split()}
    # a subpackage's __init__.py holds only a docstring: the closure leaves it out (runtime/code.py)
    inits = {f for f in files if f.endswith("/__init__.py")}
    assert all(ast.get_docstring(tree := ast.parse((Path(root) / f).read_text())) and len(tree.body) == 1
               for f in inits), inits
    return files - inits


def test_closure_holds_every_module_the_stage_loads_and_the_declared_deps():
    closure = import_closure(REPO / STAGE)
    loaded = _modules_loaded_by_importing("stages.finetune", REPO)
    assert {"qlora_nli/prompts.py", "qlora_nli/runtime/launch.py", "qlora_nli/train/loop.py"} <= loaded
    assert loaded <= closure, f"loaded at import but missing from the closure: {loaded - closure}"
    deps = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]["finetune"]["deps"]
    assert closure == {d for d in deps if d.startswith("qlora_nli/")}


def test_fingerprint_changes_with_every_file_of_the_closure_and_no_other(tmp_path):
    root = _copy(tmp_path)
    stage = root / STAGE
    before = code_sha256(stage)
    assert code_sha256(stage) == before
    covered = import_closure(stage) | {STAGE}
    # the files the stage declares in dvc.yaml, listed by hand there: each must move the fingerprint
    declared = {d for d in yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]["finetune"]["deps"]
                if d.endswith(".py")}
    assert declared <= covered
    every = {p.relative_to(root).as_posix() for p in [*root.glob("qlora_nli/**/*.py"), *root.glob("stages/*.py")]}
    assert every - covered, "some package files are outside finetune's closure (e.g. analysis/stats.py)"
    for path in sorted(every):
        original = (root / path).read_bytes()
        (root / path).write_bytes(original + b"# a comment\n")
        changed = code_sha256(stage) != before
        (root / path).write_bytes(original)
        assert changed == (path in covered), f"{path}: fingerprint changed={changed}, in closure={path in covered}"
    assert code_sha256(stage) == before


def test_fingerprint_depends_on_file_names_not_only_bytes(tmp_path):
    """Two files' contents swapped give another fingerprint: each file is hashed with its path."""
    root = _copy(tmp_path)
    stage = root / STAGE
    before = code_sha256(stage)
    a, b = root / "qlora_nli/runtime/hub.py", root / "qlora_nli/runtime/errors.py"
    a_bytes, b_bytes = a.read_bytes(), b.read_bytes()
    a.write_bytes(a_bytes + b_bytes)
    b.write_bytes(b"")
    assert code_sha256(stage) != before


@pytest.mark.parametrize("source, expected", [
    ("from qlora_nli import prompts\n", {"qlora_nli/prompts.py"}),
    ("from qlora_nli.prompts import format_prompt\n", {"qlora_nli/prompts.py"}),
    ("import qlora_nli.prompts\n", {"qlora_nli/prompts.py"}),
    ("def f():\n    from qlora_nli import hub\n", {"qlora_nli/hub.py", "qlora_nli/errors.py"}),  # in a function,
                                                                                        # and hub's own import
    ("from qlora_nli import no_such_module\nimport os\n", set()),
])
def test_import_closure_of_small_scripts(tmp_path, source, expected):
    (tmp_path / "qlora_nli").mkdir()
    (tmp_path / "qlora_nli/prompts.py").write_text("X = 1\n")
    (tmp_path / "qlora_nli/hub.py").write_text("from qlora_nli.errors import E\n")  # transitive
    (tmp_path / "qlora_nli/errors.py").write_text("E = 1\n")
    (tmp_path / "stages").mkdir()
    (tmp_path / "stages/s.py").write_text(source)
    assert import_closure(tmp_path / "stages/s.py") == expected
