"""Shared test setup: one tiny random model per test session (pyproject.toml puts the repository root and tests/ on
sys.path, so the checkout's code is what runs)."""
import pytest

from tiny import make_tiny_model


@pytest.fixture(scope="session", params=["llama", "phi"])
def tiny_model_dir(request, tmp_path_factory):
    """A tiny random model of each architecture the pipeline targets: Llama (SmolLM2) and Phi (Phi-2)."""
    return make_tiny_model(request.param, tmp_path_factory.mktemp(f"tiny-{request.param}"))
