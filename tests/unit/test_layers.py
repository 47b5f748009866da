"""The package's layer contract ([tool.importlinter] in pyproject.toml), checked in this process through
import-linter's own API, and the rule that a subpackage's __init__.py holds only its docstring (so that importing
one module of a subpackage never imports its siblings, and the import graph is the modules' own imports)."""
import ast
import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import importlinter.api  # noqa: F401  (configures import-linter's readers and graph builder, as its CLI does)
from importlinter.application import use_cases

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[2]
PACKAGE = REPO / "qlora_nli"

# Top to bottom: each layer may import only those below it. Written out here, not read from pyproject.toml, so that
# loosening the contract there (a layer moved, dropped, or the contract removed) fails this test.
LAYERS = ["cli", "config", "report", "analysis", "train", "infer", "model", "forward", "data", "prompts", "runtime"]


def test_the_contract_is_the_layer_order():
    options = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["importlinter"]
    assert options["root_package"] == "qlora_nli"
    layers = [c for c in options["contracts"] if c["type"] == "layers"]
    assert len(layers) == 1, "pyproject.toml: expected one layers contract"
    assert layers[0]["containers"] == ["qlora_nli"] and layers[0].get("exhaustive") is True
    assert layers[0]["layers"] == LAYERS
    assert not layers[0].get("ignore_imports"), "the layer contract makes no exceptions"


def test_the_package_keeps_its_layers(capsys):
    # import-linter finds the package as Python would import it: it must be this checkout's
    assert Path(importlib.util.find_spec("qlora_nli").origin).parent == PACKAGE
    kept = use_cases.lint_imports(str(REPO / "pyproject.toml"), cache_dir=None, no_logo=True)
    printed = capsys.readouterr().out  # import-linter's report: each forbidden chain, with its line numbers
    assert kept, printed
    assert "Contracts: 1 kept, 0 broken." in printed, printed


def test_an_upward_import_breaks_the_contract(tmp_path):
    """The same contract over a copy of the package with one import from the bottom layer into a higher one:
    lint-imports must name it (so the contract above is not kept by checking nothing)."""
    copy = tmp_path / "copy"
    shutil.copytree(PACKAGE, copy / "qlora_nli", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", copy / "pyproject.toml")
    files = copy / "qlora_nli" / "runtime" / "files.py"
    text = files.read_text().rstrip("\n") + "\n"
    line = len(text.splitlines()) + 1
    files.write_text(text + "from qlora_nli.train import loop  # noqa: E402,F401\n")
    code = ("import sys; from importlinter.cli import lint_imports; "
            "sys.exit(lint_imports(no_cache=True, no_logo=True))")
    result = subprocess.run([sys.executable, "-c", code], cwd=copy, capture_output=True, text=True, check=False,
                            env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(copy)}, timeout=60)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "qlora_nli.runtime is not allowed to import qlora_nli.train" in result.stdout, result.stdout
    assert f"qlora_nli.runtime.files -> qlora_nli.train.loop (l.{line})" in result.stdout, result.stdout


def _subpackages():
    return sorted(p.parent for p in PACKAGE.rglob("__init__.py") if p.parent != PACKAGE)


def test_every_directory_of_modules_is_a_package():
    """A directory of modules without __init__.py would be a namespace package: setuptools' find leaves it out."""
    for directory in {p.parent for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts}:
        assert (directory / "__init__.py").is_file(), f"{directory.relative_to(REPO)}: no __init__.py"


def test_subpackage_inits_hold_only_a_docstring():
    found = {p.relative_to(PACKAGE).as_posix() for p in _subpackages()}
    assert {"runtime", "data", "model", "infer", "train", "analysis", "report"} <= found, found
    for directory in _subpackages():
        init = directory / "__init__.py"
        body = ast.parse(init.read_text(), filename=str(init)).body
        what = [f"l. {node.lineno}: {type(node).__name__}" for node in body]
        assert len(body) == 1 and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
            and isinstance(body[0].value.value, str), \
            f"{init.relative_to(REPO)} must hold only its docstring, not {what}"
