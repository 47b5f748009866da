"""Under NLI_TORCHRUN: a bad switch or process count is one line before any rank starts, and a rank's one-line
error is printed once, by the launcher, without torchrun's ChildFailedError traceback (under torchrun:
tests/e2e/test_distributed.py)."""
from types import SimpleNamespace

import pytest

from qlora_nli.runtime import errors, launch, threads
from qlora_nli.runtime.errors import ParamsError
from qlora_nli.runtime.launch import check_process_count, torchrun_arguments


def one_line(call):
    with pytest.raises(ParamsError) as e:
        call()
    message = str(e.value)
    assert message and "\n" not in message and message.startswith("NLI_TORCHRUN")
    return message


@pytest.fixture
def cores(monkeypatch):
    """Pretend this process may run on `n` CPUs (affinity) under cgroup quota `quota` (None: no quota)."""
    def set_cores(n, quota=None):
        monkeypatch.setattr(threads, "affinity_cpus", lambda: list(range(n)))
        monkeypatch.setattr(threads, "cgroup_quota", lambda *args, **kwargs: quota)
    return set_cores


@pytest.mark.parametrize("value, fragment", [("-1", "-1 is negative"), ("0", "0 is zero"), ("-0", "is zero")])
def test_a_count_below_one_says_what_is_wrong(value, fragment):
    message = one_line(lambda: torchrun_arguments(value))
    assert fragment in message and "unset it for one process" in message and "names no" not in message


@pytest.mark.parametrize("arguments, fragment", [
    (["--standalone", "--nproc-per-node=0"], "--nproc-per-node=0: a process count must be at least 1"),
    (["--nnodes", "2", "--nproc-per-node", "0"], "--nproc-per-node=0: a process count must be at least 1"),
    (["--nproc_per_node=-3"], "--nproc-per-node=-3: a process count must be at least 1"),
    (["--nproc-per-node=two"], "--nproc-per-node='two' is not a process count"),
    (["--nproc-per-node"], "--nproc-per-node='' is not a process count"),
])
def test_a_bad_nproc_per_node_is_one_line(arguments, fragment, cores):
    cores(2)
    assert fragment in one_line(lambda: check_process_count(arguments, "cpu"))


@pytest.mark.parametrize("n_cpus, quota, count, refused_above", [
    (2, None, 2, None),
    (2, None, 3, 2),
    (2, None, 64, 2),
    (16, 1.5, 2, None),   # a fraction of a core still runs a rank: 1.5 is rounded up to 2
    (16, 1.5, 3, 2),
    (4, None, "auto", None),  # torchrun resolves the words from the machine's devices
])
def test_more_ranks_than_usable_cores_are_refused(cores, n_cpus, quota, count, refused_above):
    cores(n_cpus, quota)
    arguments = ["--standalone", f"--nproc-per-node={count}"]
    if refused_above is None:
        check_process_count(arguments, "cpu")
        return
    message = one_line(lambda: check_process_count(arguments, "cpu"))
    assert f"{count} processes on this machine, which has {refused_above} usable CPU cores" in message
    assert f"use at most {refused_above}" in message


def test_start_refuses_64_ranks_on_2_cores_before_launching(cores, monkeypatch):
    cores(2)
    launched = []
    monkeypatch.setattr(launch, "launch", launched.append)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.setenv("NLI_TORCHRUN", "64")
    one_line(lambda: launch.start("cpu"))
    assert launched == []
    monkeypatch.setenv("NLI_TORCHRUN", "2")
    launch.start("cpu")
    assert launched == [["--standalone", "--nproc-per-node=2"]]


def test_the_weights_floor_counts_the_config_by_hand(tmp_path):
    import json

    from tiny import make_tiny_model

    from qlora_nli.model.loading import weights_bytes

    path = make_tiny_model("llama", tmp_path / "m")
    vocab = json.loads((path / "config.json").read_text())["vocab_size"]
    model = {"name": str(path), "trust_remote_code": False, "compute_dtype": "auto", "load_in_4bit": True}
    # hidden 64, intermediate 128, 2 layers: 2 * (2 * 64 * 64 + 2 * 64 * 128) = 49,152 linear weights; float32 on CPU
    assert weights_bytes(model, "cpu") == 49152 // 2 + vocab * 64 * 4        # NF4: half a byte each
    assert weights_bytes({**model, "load_in_4bit": False}, "cpu") == 49152 * 4 + vocab * 64 * 4


@pytest.mark.parametrize("device, gpus, free_gib, count, refused", [
    ("cpu", 0, 10, 2, False),      # 2 x 4 GiB fit in 10
    ("cpu", 0, 10, 3, True),       # 3 x 4 GiB do not
    ("cuda", 2, 10, 4, False),     # 2 ranks per GPU: 2 x 4 GiB in 10 GiB each
    ("cuda", 2, 10, 6, True),      # 3 ranks on one GPU
    ("cuda", 2, 3, 2, True),       # one rank per GPU, and its 4 GiB do not fit in 3
])
def test_more_ranks_than_the_memory_holds_are_refused(cores, monkeypatch, device, gpus, free_gib, count, refused):
    cores(16)
    monkeypatch.setattr(launch.torch.cuda, "device_count", lambda: gpus)
    monkeypatch.setattr(launch.torch.cuda, "mem_get_info", lambda i: (free_gib * 2**30, 80 * 2**30))
    monkeypatch.setattr(launch, "available_memory",
                        lambda device, n_gpus=0: (free_gib * 2**30, "made up") if device == "cpu" or n_gpus else
                        (None, "no GPU"))
    arguments = ["--standalone", f"--nproc-per-node={count}"]
    if not refused:
        check_process_count(arguments, device, 4 * 2**30)
        return
    message = one_line(lambda: check_process_count(arguments, device, 4 * 2**30))
    assert "x 4.0 GiB" in message and f"the {free_gib:.1f} GiB made up" in message


def test_available_memory_reads_meminfo_and_the_emptiest_gpu(monkeypatch):
    free = {0: 7 * 2**30, 1: 5 * 2**30}
    monkeypatch.setattr(launch.torch.cuda, "mem_get_info", lambda i: (free[i], 80 * 2**30))
    assert launch.available_memory("cuda", 2) == (5 * 2**30, "free on the emptiest GPU")
    available, where = launch.available_memory("cpu")
    meminfo = dict(line.split(":", 1) for line in open("/proc/meminfo").read().splitlines())
    assert available == int(meminfo["MemAvailable"].split()[0]) * 1024 and "MemAvailable" in where


def test_a_rank_leaves_its_line_to_the_launcher(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(errors.RANK_LINES, str(tmp_path))
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(SystemExit) as e:
        errors.run_stage(lambda: (_ for _ in ()).throw(ParamsError("train.epochs = 0 is out of range")))
    assert e.value.code == 1 and capsys.readouterr().err == ""
    assert (tmp_path / "rank-1").read_text() == "train.epochs = 0 is out of range"


def test_the_launcher_prints_the_lowest_ranks_line_once(tmp_path):
    failures = {0: SimpleNamespace(exitcode=1), 1: SimpleNamespace(exitcode=1)}
    (tmp_path / "rank-1").write_text("line of rank 1")
    (tmp_path / "rank-0").write_text("line of rank 0")
    assert launch._failure(failures, tmp_path) == (1, "line of rank 0")
    # rank 1 failed first and torchrun stopped rank 0 (SIGTERM) after it had left its line: the status is rank 1's
    assert launch._failure({0: SimpleNamespace(exitcode=-15), 1: SimpleNamespace(exitcode=1)},
                                tmp_path) == (1, "line of rank 0")
    (tmp_path / "rank-0").unlink()
    assert launch._failure({1: SimpleNamespace(exitcode=1)}, tmp_path) == (1, "line of rank 1")


def test_a_killed_rank_is_named_with_the_shells_exit_status(tmp_path):
    status, line = launch._failure({1: SimpleNamespace(exitcode=-9), 3: SimpleNamespace(exitcode=1)}, tmp_path)
    assert status == 128 + 9 and line == "NLI_TORCHRUN: rank 1 failed (killed by SIGKILL); its output is above"
