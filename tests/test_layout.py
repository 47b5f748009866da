"""How the tests are laid out: no file under tests/ imports a test module (what several modules share lives in
helper modules, tests/helpers/ and tests/*.py without the test_ prefix, or in conftest.py fixtures), so each test
module can be moved, run or deleted alone."""
import ast
from pathlib import Path

TESTS = Path(__file__).resolve().parent


def imported_modules(tree):
    """Dotted names of the modules a module's code imports, at any depth; a relative import keeps its dots."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = "." * node.level + (node.module or "")
            yield base
            yield from (f"{base}.{a.name}" if node.module else base + a.name for a in node.names)


def imported_test_modules(source):
    """The test modules that `source` imports: each imported dotted name up to its first part that starts with
    test_ (`from test_x import y` imports test_x)."""
    found = set()
    for name in imported_modules(ast.parse(source)):
        parts = name.split(".")
        first = next((i for i, part in enumerate(parts) if part.startswith("test_")), None)
        if first is not None:
            found.add(".".join(parts[:first + 1]))
    return sorted(found)


def test_no_file_under_tests_imports_a_test_module():
    files = sorted(TESTS.rglob("*.py"))
    assert len([f for f in files if f.name.startswith("test_")]) > 30  # the suite was found
    found = {f.relative_to(TESTS).as_posix(): names for f in files
             if (names := imported_test_modules(f.read_text()))}
    assert found == {}, f"import the shared code from a helper module or a conftest.py fixture instead: {found}"


def test_the_check_sees_every_form_of_import():
    seen = imported_test_modules("import test_data\n"
                                 "from test_training import lora_model\n"
                                 "from unit.train.test_loop import x\n"
                                 "from . import test_stats\n"
                                 "def f():\n    from .test_scoring import y\n"
                                 "import tiny, helpers.stages\nfrom helpers import artifacts\nfrom pipeline import run\n")
    assert seen == [".test_scoring", ".test_stats", "test_data", "test_training", "unit.train.test_loop"]


def test_test_files_sit_by_kind_and_their_names_are_unique():
    """Unit tests under tests/unit/ (by the package's subpackage: runtime/, data/, model/, train/, infer/, analysis/,
    and bench/ for benchmarks/; config and prompts at tests/unit/), tests that run stages, DVC or whole commands as
    processes under tests/e2e/, checks of the repository's tests and docs at tests/. A file name says which test file
    is meant wherever it sits (docs/reliability.md names files so), and pytest imports test files by name."""
    files = sorted(TESTS.rglob("test_*.py"))
    places = {f.relative_to(TESTS).parent.as_posix() for f in files}
    allowed = {".", "unit", "e2e"} | {f"unit/{p}" for p in ("runtime", "data", "model", "train", "infer", "analysis",
                                                            "report", "bench")}
    assert places <= allowed, places - allowed
    names = [f.name for f in files]
    assert len(names) == len(set(names)), sorted(n for n in names if names.count(n) > 1)
