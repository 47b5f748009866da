"""docs/reliability.md names the tests that prove each row: every test it names exists, as a test function of the
file it names (`file.py::name`, or `::name` for another test of the file named just before it)."""
import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
NAME = re.compile(r"`((?:tests/(?:\w+/)*)?test_\w+\.py)?(?:::(\w+))?`")


def find_test_file(name):
    """The file under tests/ (at any depth: unit/<subpackage>/, e2e/) of this name; test file names are unique, so
    the document may name a file without its folder. A name that is no such file, or more than one, gives a path
    that does not exist."""
    found = sorted((REPO / "tests").rglob(Path(name).name))
    return found[0] if len(found) == 1 else REPO / "tests" / "no-single-file" / Path(name).name


def named_tests(text):
    """[(file, test or None)] in the order the document names them."""
    found, last = [], None
    for file, test in NAME.findall(text):
        if file:
            last = find_test_file(file)
        if file or test:
            found.append((last, test or None))
    return found


def functions_of(path):
    tree = ast.parse(path.read_text())
    return {node.name for node in ast.walk(tree) if isinstance(node, ast.FunctionDef) and node.name.startswith("test")}


def test_every_test_named_in_reliability_md_exists():
    named = named_tests((REPO / "docs" / "reliability.md").read_text())
    assert len(named) > 40  # the tables' names were found
    missing = []
    for path, test in named:
        if path is None or not path.is_file():
            missing.append(f"{path}: no such file (for {test})")
        elif test and test not in functions_of(path):
            missing.append(f"{path.name}::{test}")
    assert not missing, missing


def test_the_check_sees_a_wrong_name():
    named = named_tests("`tests/test_stats.py::test_wilson_known_values`, `::test_no_such_test`, `test_nothing.py`")
    assert [(p.name, t) for p, t in named] == [("test_stats.py", "test_wilson_known_values"),
                                              ("test_stats.py", "test_no_such_test"), ("test_nothing.py", None)]
    assert "test_no_such_test" not in functions_of(named[1][0]) and not named[2][0].is_file()
