"""The torch thread choice (qlora_nli/runtime/threads.py): what the process may use (affinity, cgroup quota, torch's default,
ranks), the load of other processes, the changes while running, and the record in the device line."""
import pytest
import torch

from qlora_nli.model import loading
from qlora_nli.runtime import threads

WAIT = "OpenMP default waiting (spin, then sleep)"


@pytest.fixture(autouse=True)
def no_thread_variables(monkeypatch):  # conftest.py restores torch's threads after each test
    for name in threads.WAIT_VARIABLES + ("OMP_NUM_THREADS",):
        monkeypatch.delenv(name, raising=False)


class Machine:
    """What the readers see: CPUs in the affinity mask, cgroup quota, torch's default, and a script of the cores
    other processes keep busy, one value per reading of the load (start sample first)."""

    def __init__(self, monkeypatch, cpus, quota=None, default=None, others=()):
        self.others = list(others)
        self.readings = 0
        monkeypatch.setattr(threads, "affinity_cpus", lambda: list(range(cpus)))
        monkeypatch.setattr(threads, "cgroup_quota", lambda: quota)
        monkeypatch.setattr(threads, "torch_default_threads", lambda: cpus if default is None else default)
        monkeypatch.setattr(threads.LoadMeter, "others", lambda meter: self._next())
        monkeypatch.setattr(threads, "WINDOW_SECONDS", 0.0)

    def _next(self):
        self.readings += 1
        return self.others.pop(0)


@pytest.mark.parametrize("cpus, quota, default, local_world_size, others, expected", [
    (4, None, None, 1, 0.0, 4),     # idle: every CPU
    (4, 2.5, None, 1, 0.0, 2),      # quota 2.5 CPUs: 2 threads that are never throttled
    (4, 0.5, None, 1, 0.0, 1),      # a quota below one CPU still computes
    (2, None, None, 1, 1.0, 1),     # one busy process: the core it leaves
    (2, None, None, 1, 0.67, 1),    # ... as it shows while our 2 threads spin beside it
    (2, None, None, 1, 0.4, 2),     # light background work keeps both
    (2, None, None, 1, 2.0, 1),     # every core taken: one thread, never zero
    (4, None, 1, 1, 0.0, 1),        # OMP_NUM_THREADS=1 (torch's default) caps a single process
    (8, None, 1, 2, 0.0, 4),        # ranks share the CPUs; torchrun's OMP_NUM_THREADS=1 is not a cap
    (2, None, None, 2, 0.0, 1),     # 2 ranks on 2 cores: one thread each
    (8, None, 1, 2, 5.0, 3),        # ranks: what other processes leave
    (4, None, None, 1, None, 4),    # /proc/stat unreadable: what the process may use
])
def test_auto_threads(monkeypatch, cpus, quota, default, local_world_size, others, expected):
    Machine(monkeypatch, cpus, quota, default, [others])
    choice = threads.configure(0, local_world_size, sample_seconds=0)
    assert choice.threads == expected
    assert torch.get_num_threads() == expected


def test_explicit_threads_are_fixed_and_never_read_the_load(monkeypatch):
    machine = Machine(monkeypatch, 2, others=[2.0, 2.0, 2.0])
    choice = threads.configure(3)
    for _ in range(3):
        threads.adapt()
    assert (choice.threads, torch.get_num_threads(), machine.readings) == (3, 3, 0)
    assert threads.describe() == f"3 torch threads (compute.num_threads; {WAIT})"


def test_adapts_to_load_after_two_windows_in_a_row(monkeypatch):
    # start: a busy process (1 thread); it stops for 2 windows (2 threads); a blip of one window changes nothing;
    # it comes back for 2 windows (1 thread)
    machine = Machine(monkeypatch, 2, others=[1.0, 0.0, 0.0, 1.0, 0.1, 0.9, 0.9])
    threads.configure(0, sample_seconds=0)
    seen = [torch.get_num_threads()]
    for _ in range(6):
        threads.adapt()
        seen.append(torch.get_num_threads())
    assert seen == [1, 1, 2, 2, 2, 2, 1]
    assert machine.readings == 7
    assert loading.describe_device("cpu").endswith(
        "1 torch threads at start (auto: 2 usable (2 CPUs in affinity, no cgroup quota, torch default 2); "
        f"1.0 cores busy elsewhere; 1-2 while running, 2 changes; {WAIT})")


def test_adapt_waits_for_the_window(monkeypatch):
    machine = Machine(monkeypatch, 2, others=[0.0, 2.0, 2.0])
    threads.configure(0, sample_seconds=0)
    monkeypatch.setattr(threads, "WINDOW_SECONDS", 3600.0)
    threads.adapt()
    threads.adapt()
    assert (machine.readings, torch.get_num_threads()) == (1, 2)


def test_device_line_records_quota_environment_and_wait_policy(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    Machine(monkeypatch, 8, quota=4.0, default=3, others=[0.2, 0.3])
    threads.configure(0, sample_seconds=0)
    threads.adapt()
    assert loading.describe_device("cpu").endswith(
        "3 torch threads at start (auto: 3 usable (8 CPUs in affinity, cgroup quota 4 CPUs, torch default 3 "
        "(OMP_NUM_THREADS=3)); 0.2 cores busy elsewhere; 3 while running; OMP_WAIT_POLICY=PASSIVE)")


def test_unreadable_load_is_recorded_as_such(monkeypatch):
    Machine(monkeypatch, 2, others=[None])
    threads.configure(0, sample_seconds=0)
    assert threads.describe() == (f"2 torch threads at start (auto: 2 usable (2 CPUs in affinity, no cgroup quota, "
                                  f"torch default 2); load unknown; not adapted; {WAIT})")


# ------------------------------------------------------------------------------------------------------------------
# The readers, on files written here
# ------------------------------------------------------------------------------------------------------------------

def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


@pytest.mark.parametrize("files, expected", [
    ({"cpu.max": "150000 100000\n"}, 1.5),                                       # v2, container's own at the root
    ({"cpu.max": "max 100000\n"}, None),                                         # v2, no limit
    ({"cpu.max": "max 100000\n", "user.slice/job/cpu.max": "50000 100000\n"}, 0.5),   # v2, own cgroup first
    ({"cpu/cpu.cfs_quota_us": "200000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 2.0),  # v1
    ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),      # v1, no limit
    ({"cpu,cpuacct/job/cpu.cfs_quota_us": "300000\n", "cpu,cpuacct/job/cpu.cfs_period_us": "100000\n"}, 3.0),
    ({}, None),                                                                  # no cgroup files
    ({"cpu.max": "garbage\n"}, None),
])
def test_cgroup_quota(tmp_path, files, expected):
    root = tmp_path / "cgroup"
    root.mkdir()
    for name, text in files.items():
        write(root / name, text)
    write(tmp_path / "self-cgroup", "0::/user.slice/job\n4:cpu,cpuacct:/job\n3:memory:/other\n")
    assert threads.cgroup_quota(str(root), str(tmp_path / "self-cgroup")) == expected


def test_cpu_ticks_of_the_affinity_cpus_only(tmp_path):
    stat = tmp_path / "stat"
    #                user nice system idle iowait irq softirq steal guest guest_nice
    stat.write_text("cpu  90 0 30 900 30 0 0 0 0 0\n"
                    "cpu0 10 1 5 100 4 1 1 2 0 0\n"
                    "cpu1 20 0 10 200 6 0 0 0 0 0\n"
                    "cpu2 60 0 15 600 20 0 0 0 0 0\n"
                    "intr 12345 1 2\n")
    # busy = all but idle and iowait: cpu0 10+1+5+1+1+2 = 20, cpu2 60+15 = 75; total cpu0 124, cpu2 695
    assert threads.cpu_ticks([0, 2], str(stat)) == (95, 819)
    assert threads.cpu_ticks([7], str(stat)) is None
    assert threads.cpu_ticks([0], str(tmp_path / "missing")) is None


def test_load_meter_subtracts_this_process(monkeypatch):
    ticks = iter([(1000, 4000), (1300, 4400)])
    own = iter([5.0, 6.0])
    monkeypatch.setattr(threads, "cpu_ticks", lambda cpus: next(ticks))
    monkeypatch.setattr(threads, "own_cpu_seconds", lambda: next(own))
    meter = threads.LoadMeter([0, 1], clock_ticks=100)
    # 400 ticks over 2 CPUs = 200 per CPU; busy 300 ticks, of which ours 1.0 s = 100 ticks: 200 / 200 = 1 core
    assert meter.others() == pytest.approx(1.0)
