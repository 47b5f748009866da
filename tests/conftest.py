"""Shared test setup: one tiny random model per test session (pyproject.toml puts the repository root and tests/ on
sys.path, so the checkout's code is what runs)."""
import pytest
from tiny import make_tiny_model


@pytest.fixture(scope="session", params=["llama", "phi"])
def tiny_model_dir(request, tmp_path_factory):
    """A tiny random model of each architecture the pipeline targets: Llama (SmolLM2) and Phi (Phi-2)."""
    return make_tiny_model(request.param, tmp_path_factory.mktemp(f"tiny-{request.param}"))


@pytest.fixture(autouse=True)
def torch_threads_as_they_were():
    """A test that runs an entry point in this process (cli.predict) sets torch's threads and leaves a choice that
    `threads.adapt` would follow in later tests: both are undone after each test."""
    import torch

    from qlora_nli.runtime import threads

    before = torch.get_num_threads()
    yield
    threads.reset()
    torch.set_num_threads(before)


@pytest.fixture
def workdir(tmp_path):
    """Every input of failure_cases and report, made up (helpers/artifacts.py), in tmp_path."""
    from helpers.artifacts import make_workdir

    return make_workdir(tmp_path)


@pytest.fixture
def stage_dir(tmp_path, monkeypatch):
    """Valid params (the model path leads nowhere) and valid data/ and models/adapter, as the stages find them; the
    working directory (helpers/stages.py)."""
    from helpers.stages import make_stage_dir

    monkeypatch.chdir(tmp_path)
    return make_stage_dir(tmp_path)
