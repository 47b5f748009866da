"""How many torch threads a process computes with on the CPU, chosen from what it can use and kept right while other
processes come and go.

Why it matters: torch's OpenMP runtime (libgomp on Linux) ends every parallel region at a barrier where the
finished threads spin (GOMP_SPINCOUNT, 300,000 spins by default) before they sleep. With a thread per core and one
other busy process on the machine, one of our threads is always preempted, every region waits for it while the
others spin, and training runs at a quarter of its speed or less (docs/performance.md). The waiting policy
(OMP_WAIT_POLICY, GOMP_SPINCOUNT) is read once, when libgomp loads at `import torch`, and passive waiting costs
speed on an idle machine; the lever left while running is the thread count. torch.set_num_threads applies to the
parallel regions the calling thread starts next, so `adapt` runs between passes in the compute loops (training
micro-batches, scoring passes, generation batches), never in a background thread.

`compute.num_threads` (read by `configure`):
  N > 0   N threads for the whole run: the same count gives byte-identical results on a rerun (another count changes
          the last digits of the losses and weights).
  0       auto. Usable cores: the CPUs this process may run on (affinity), no more than the cgroup's CPU quota
          allows and no more than torch's own default (OMP_NUM_THREADS, else the physical cores), shared evenly by
          the ranks of one machine (torchrun's OMP_NUM_THREADS=1 is not taken as a choice). Of those it takes the
          ones other processes leave free: the busy time of its CPUs in /proc/stat minus its own (os.times), over
          a short sample at the start and then over each window of WINDOW_SECONDS; the count changes only when two
          windows in a row agree, so an idle machine keeps one count (and reproducible results) for the whole run.
The choice and its reasons are logged and recorded (`describe`: metrics/train.json's device line).
"""
import logging
import math
import os
import time
from dataclasses import dataclass, field

log = logging.getLogger(__name__)


START_SAMPLE_SECONDS = 0.25   # longer = a steadier first reading, a later start
WINDOW_SECONDS = 2.0          # shorter = reacts sooner to a process that starts or stops, more changes on short bursts
WAIT_VARIABLES = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")


# ------------------------------------------------------------------------------------------------------------------
# Readers of what the process can use (tests patch these)
# ------------------------------------------------------------------------------------------------------------------

def affinity_cpus():
    """Ids of the CPUs this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0))
    return list(range(os.cpu_count() or 1))


def _cgroup_dirs(proc_cgroup):
    """(v2 path, v1 cpu-controller path) of this process's cgroup, from /proc/self/cgroup; None where absent."""
    v2 = v1 = None
    try:
        with open(proc_cgroup) as f:
            for line in f:
                _, controllers, path = line.rstrip("\n").split(":", 2)
                if controllers == "":
                    v2 = path
                elif "cpu" in controllers.split(","):
                    v1 = path
    except (OSError, ValueError):
        pass
    return v2, v1


def _read(path):
    try:
        with open(path) as f:
            return f.read().split()
    except OSError:
        return None


def cgroup_quota(root="/sys/fs/cgroup", proc_cgroup="/proc/self/cgroup"):
    """CPUs per period the cgroup may use (cgroup v2 cpu.max, v1 cpu.cfs_quota_us / cpu.cfs_period_us), or None
    without a limit. The process's own cgroup directory first, then the mount's root (a container sees its own
    cgroup there)."""
    v2, v1 = _cgroup_dirs(proc_cgroup)
    for directory in dict.fromkeys(filter(None, [v2 and root + v2.rstrip("/"), root])):
        words = _read(f"{directory}/cpu.max")
        if words:
            try:
                return None if words[0] == "max" else int(words[0]) / int(words[1])
            except (ValueError, IndexError):
                return None
    for mount in (f"{root}/cpu", f"{root}/cpu,cpuacct"):
        for directory in dict.fromkeys(filter(None, [v1 and mount + v1.rstrip("/"), mount])):
            quota, period = _read(f"{directory}/cpu.cfs_quota_us"), _read(f"{directory}/cpu.cfs_period_us")
            if quota and period:
                try:
                    return None if int(quota[0]) < 0 else int(quota[0]) / int(period[0])
                except ValueError:
                    return None
    return None


def cpu_ticks(cpus, path="/proc/stat"):
    """(busy, total) clock ticks of the given CPUs since boot, or None where /proc/stat cannot be read. Busy is
    everything but idle and iowait; steal (a hypervisor running another guest) counts as busy."""
    wanted = {f"cpu{c}" for c in cpus}
    busy = total = 0
    try:
        with open(path) as f:
            for line in f:
                name, *values = line.split()
                if name in wanted:
                    ticks = [int(v) for v in values[:8]]
                    total += sum(ticks)
                    busy += sum(ticks) - ticks[3] - ticks[4]
    except (OSError, ValueError, IndexError):
        return None
    return (busy, total) if total else None


def own_cpu_seconds():
    """CPU seconds this process (all its threads) has used."""
    t = os.times()
    return t.user + t.system


_TORCH_DEFAULT = []


def torch_default_threads():
    """torch's thread count before anything here changed it (OMP_NUM_THREADS, else the physical cores)."""
    if not _TORCH_DEFAULT:
        import torch
        _TORCH_DEFAULT.append(torch.get_num_threads())
    return _TORCH_DEFAULT[0]


def wait_policy():
    """The OpenMP waiting behaviour in effect, as the environment set it before torch loaded."""
    set_ = [f"{name}={os.environ[name]}" for name in WAIT_VARIABLES if name in os.environ]
    return ", ".join(set_) if set_ else "OpenMP default waiting (spin, then sleep)"


# ------------------------------------------------------------------------------------------------------------------
# The choice
# ------------------------------------------------------------------------------------------------------------------

class LoadMeter:
    """Cores of `cpus` kept busy by other processes between two readings."""

    def __init__(self, cpus, clock_ticks=None):
        self.cpus = cpus
        self.hz = clock_ticks or os.sysconf("SC_CLK_TCK")
        self.since = time.monotonic()
        self.last = self._read()

    def _read(self):
        return cpu_ticks(self.cpus), own_cpu_seconds()

    def others(self):
        """Cores busy elsewhere since the last call (or creation), or None where /proc/stat is unreadable."""
        (ticks, own), (ticks0, own0) = self._read(), self.last
        self.last, self.since = (ticks, own), time.monotonic()
        if ticks is None or ticks0 is None or ticks[1] <= ticks0[1]:
            return None
        busy, total = ticks[0] - ticks0[0], ticks[1] - ticks0[1]
        per_cpu = total / len(self.cpus)  # ticks that passed on each CPU
        return max(0.0, (busy - (own - own0) * self.hz) / per_cpu)


def free_threads(cap, n_cpus, others):
    """Threads for the cores other processes leave free: a core counts as taken from half a core of other work on."""
    if others is None:
        return cap
    return max(1, min(cap, math.floor(n_cpus - others + 0.5)))


@dataclass
class Choice:
    requested: int
    threads: int      # now
    reason: str
    start: int = 0    # at the start
    auto: bool = False
    cap: int = 0
    n_cpus: int = 0
    others_at_start: float | None = None
    used: set = field(default_factory=set)
    changes: int = 0
    meter: LoadMeter | None = None
    pending: int | None = None


_CHOICE = []  # the process's choice, once configure ran


def usable_cores(local_world_size=1):
    """(cores this process may compute on, CPUs it may run on, why): affinity, cgroup quota and torch's default,
    shared by the ranks of this machine."""
    cpus = affinity_cpus()
    quota = cgroup_quota()
    limits = [(len(cpus), f"{len(cpus)} CPUs in affinity")]
    limits.append((max(1, math.floor(quota)), f"cgroup quota {quota:g} CPUs") if quota is not None
                  else (len(cpus), "no cgroup quota"))
    if local_world_size == 1:  # under torchrun, OMP_NUM_THREADS=1 is torchrun's default, not a choice
        default = torch_default_threads()
        env = os.environ.get("OMP_NUM_THREADS")
        limits.append((default, f"torch default {default}" + (f" (OMP_NUM_THREADS={env})" if env else "")))
    cores = min(n for n, _ in limits)
    why = ", ".join(text for _, text in limits)
    if local_world_size > 1:
        cores = max(1, cores // local_world_size)
        why += f"; shared by {local_world_size} ranks"
    return cores, cpus, why


def configure(requested, local_world_size=1, sample_seconds=START_SAMPLE_SECONDS):
    """Set torch's threads for this process from `compute.num_threads` (module docstring) and remember the choice
    for `adapt` and `describe`. Returns the Choice."""
    import torch

    torch_default_threads()  # before the first set_num_threads
    if requested:
        choice = Choice(requested, requested, "compute.num_threads")
    else:
        cap, cpus, why = usable_cores(local_world_size)
        meter = LoadMeter(cpus)
        time.sleep(sample_seconds)
        others = meter.others()
        threads = free_threads(cap, len(cpus), others)
        load = "load unknown" if others is None else f"{others:.1f} cores busy elsewhere"
        choice = Choice(0, threads, f"auto: {cap} usable ({why}); {load}", auto=True, cap=cap, n_cpus=len(cpus),
                        others_at_start=others, meter=meter if others is not None else None)
    torch.set_num_threads(choice.threads)
    choice.start = choice.threads
    choice.used.add(choice.threads)
    _CHOICE[:] = [choice]
    log.info("torch threads: %d (%s); %s", choice.threads, choice.reason, wait_policy())
    return choice


def adapt():
    """Between passes: with auto threads, follow the cores other processes leave free, re-read every
    WINDOW_SECONDS; a new count needs two windows in a row. Does nothing otherwise (fixed count, not configured,
    load unreadable)."""
    if not _CHOICE or _CHOICE[0].meter is None:
        return
    choice = _CHOICE[0]
    if time.monotonic() - choice.meter.since < WINDOW_SECONDS:
        return
    others = choice.meter.others()
    target = free_threads(choice.cap, choice.n_cpus, others)
    if target == choice.threads or others is None:
        choice.pending = None
        return
    if choice.pending != target:
        choice.pending = target
        return
    import torch

    log.info("torch threads: %d -> %d (%.1f cores busy elsewhere)", choice.threads, target, others)
    torch.set_num_threads(target)
    choice.threads, choice.pending = target, None
    choice.used.add(target)
    choice.changes += 1


def describe():
    """The threads part of the device line: the count, why, and, with auto threads, the counts used while running."""
    if not _CHOICE:
        import torch
        return f"{torch.get_num_threads()} torch threads"
    choice = _CHOICE[0]
    if not choice.auto:
        return f"{choice.threads} torch threads ({choice.reason}; {wait_policy()})"
    if choice.meter is None:
        running = "not adapted"
    else:
        low, high = min(choice.used), max(choice.used)
        running = (f"{low}-{high} while running, {choice.changes} change{'s' if choice.changes != 1 else ''}"
                   if low != high else f"{low} while running")
    return f"{choice.start} torch threads at start ({choice.reason}; {running}; {wait_policy()})"


def reset():
    """Forget the choice (tests)."""
    _CHOICE.clear()
