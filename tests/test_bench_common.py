"""benchmarks/common.py: the pause of a sweep sharing the CPU always ends (after the block, on errors, at the limit)."""
import time

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

