"""Shared test setup: the repository root and tests/ on sys.path, and one tiny random model per test session."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from tiny import make_tiny_model  # noqa: E402


@pytest.fixture(scope="session", params=["llama", "phi"])
def tiny_model_dir(request, tmp_path_factory):
    """A tiny random model of each architecture the pipeline targets: Llama (SmolLM2) and Phi (Phi-2)."""
    return make_tiny_model(request.param, tmp_path_factory.mktemp(f"tiny-{request.param}"))
