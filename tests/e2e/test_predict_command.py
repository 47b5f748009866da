"""nli-predict as a command: the module entry point in a process of its own, reading stdin, writing stdout."""
import json
import subprocess
import sys

import pytest
from helpers.predict import make_predict_project
from pipeline import REPO, env

from qlora_nli.prompts import LABELS


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A tiny model, an adapter for it, params.yaml naming the model, and pairs.jsonl (helpers/predict.py)."""
    return make_predict_project(tmp_path_factory.mktemp("predict"))


@pytest.mark.slow
def test_predict_runs_as_a_command_on_stdin(project):
    """The module entry point end to end, in its own process, reading stdin and writing stdout."""
    result = subprocess.run([sys.executable, "-m", "qlora_nli.cli", "predict", "--params", str(project.params)],
                            input=(project.root / "pairs.jsonl").read_text(), cwd=project.root, env=env(REPO),
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["id"] for r in rows] == [p["id"] for p in project.pairs]
    assert all(r["prediction"] in LABELS and sum(r["probabilities"].values()) == pytest.approx(1, abs=1e-5)
               for r in rows)
