"""The code a stage runs: its script and the package modules it imports, directly or through each other.

One source for two uses: dvc.yaml's code deps of every stage are checked against `import_closure`
(tests/unit/runtime/test_stage_deps.py), and finetune's checkpoint fingerprint hashes `code_sha256` of the same files, so a change
that reruns the stage in DVC also stops it from resuming epochs that the old code trained.
"""
import ast
import hashlib
from pathlib import Path

PACKAGE = "qlora_nli"


def _imported_names(tree):
    """Dotted names of the package that a module's code imports, at any depth (imports inside functions count)."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.module
            yield from (f"{node.module}.{a.name}" for a in node.names)


def _module_files(name, root):
    """The files of the package that importing the dotted `name` runs: its module, if it is one; a package's
    `__init__.py` is left out (each holds only a docstring, tests/unit/test_layers.py checks it)."""
    parts = name.split(".")
    if parts[0] != PACKAGE or len(parts) < 2:
        return []
    module = "/".join(parts) + ".py"
    return [module] if (root / module).is_file() else []


def import_closure(script, root=None):
    """Paths, relative to `root`, of the files of qlora_nli/ that `script` imports, directly or through each other.
    `root` is the directory holding qlora_nli/ and stages/; by default the parent of the script's directory."""
    root = Path(script).resolve().parents[1] if root is None else Path(root)
    seen, todo = set(), [Path(script)]
    while todo:
        for name in _imported_names(ast.parse(todo.pop().read_text())):
            for module in _module_files(name, root):
                if module not in seen:
                    seen.add(module)
                    todo.append(root / module)
    return seen


def code_sha256(script, root=None):
    """Hash of `script` and of every file of its import closure, each with its path relative to `root`."""
    script = Path(script).resolve()
    root = script.parents[1] if root is None else Path(root).resolve()
    digest = hashlib.sha256()
    for path in sorted([script.relative_to(root).as_posix(), *import_closure(script, root)]):
        data = (root / path).read_bytes()
        digest.update(f"{path}\0{len(data)}\0".encode())
        digest.update(data)
    return digest.hexdigest()
