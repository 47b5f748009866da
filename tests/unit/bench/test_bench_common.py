"""Benchmark helpers: the pause of a sweep sharing the CPU always ends (after the block, on errors, at the limit), and
bench_eval scores an older revision in fp32 on every CPU."""
import time
from types import SimpleNamespace

import pytest

from benchmarks.common import PausedSweep


@pytest.fixture
def signal_script(tmp_path):
    received = tmp_path / "received"
    script = tmp_path / "sweep_signal.sh"
    script.write_text(f'#!/bin/sh\necho "$1" >> {received}\n')
    script.chmod(0o755)
    return script, received


def test_the_sweep_continues_after_the_timed_block_even_when_it_fails(signal_script):
    script, received = signal_script
    with pytest.raises(RuntimeError):
        with PausedSweep(script, limit=60):
            assert received.read_text().split() == ["STOP"]
            raise RuntimeError("the timed work failed")
    assert received.read_text().split() == ["STOP", "CONT"]


def test_a_pause_never_outlasts_its_limit(signal_script):
    script, received = signal_script
    with PausedSweep(script, limit=0.05) as pause:
        deadline = time.monotonic() + 10
        while received.read_text().split() != ["STOP", "CONT"] and time.monotonic() < deadline:
            time.sleep(0.02)
        assert received.read_text().split() == ["STOP", "CONT"]  # continued while the block still runs
    assert pause.expired



def test_bench_eval_scores_an_older_tree_without_the_bfloat16_repacking(tiny_model_dir, monkeypatch):
    """An older revision's loader lets bitsandbytes repack 4-bit layers for a bfloat16 kernel on AVX512-BF16 CPUs
    (simulated here, so that this checks the same on every machine): the benchmark must time fp32 scoring on both
    sides, as the stages do."""
    import bitsandbytes.nn.modules
    import torch

    from benchmarks import bench_eval
    from qlora_nli.model import loading

    monkeypatch.setattr(bitsandbytes.nn.modules, "has_avx512bf16", lambda: True)

    def older_load_base_model(model_params, device):  # as before keep_4bit_weights_as_loaded
        model = loading.load_base_model(model_params, device)
        for module in model.modules():
            if hasattr(module, "support_avx512bf16_for_cpu"):
                module.support_avx512bf16_for_cpu = True
        return model

    older = SimpleNamespace(load_base_model=older_load_base_model)
    params = {"name": str(tiny_model_dir), "load_in_4bit": True, "compute_dtype": "auto"}
    model, loader = bench_eval._load(older, params, None)
    assert loader == "load_base_model + load_adapter + eval"
    with torch.no_grad():
        model(input_ids=torch.tensor([[1, 2, 3, 4]]))
    layers = [m for m in model.modules() if hasattr(m, "support_avx512bf16_for_cpu")]
    assert layers and not any(getattr(m.weight.quant_state, "packing_format_for_cpu", False) for m in layers)
