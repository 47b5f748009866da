"""Starting a stage on several processes: torchrun's arguments from the switch, the checks of the process
count against this machine, and torchrun run in this process so that a failing rank ends in one line."""
import atexit
import io
import logging
import math
import os
import shlex
import signal
import sys
import tempfile
from contextlib import redirect_stderr
from pathlib import Path

import torch
import torch.distributed as dist

from qlora_nli.runtime import env, threads
from qlora_nli.runtime.distributed import SINGLE, Ranks, pick_backend
from qlora_nli.runtime.errors import RANK_LINES, ParamsError

log = logging.getLogger(__name__)


SWITCH = env.PREFIX + "TORCHRUN"


def torchrun_arguments(value):
    """torchrun's arguments for a value of the switch; [] for a single process."""
    value = value.strip()
    if value in ("", "1"):
        return []
    if value.lstrip("+-").isdigit():  # a count, "-1" included (not torchrun arguments)
        if int(value) < 1:
            raise ParamsError(f"{SWITCH}={value}: a process count must be at least 1, and {value} is "
                              f"{'negative' if int(value) < 0 else 'zero'}; give 2 or more processes, or unset it "
                              f"for one process")
        return ["--standalone", f"--nproc-per-node={int(value)}"]
    arguments = shlex.split(value)
    if not any(a.startswith(("--nproc-per-node", "--nproc_per_node")) for a in arguments):
        raise ParamsError(f"{SWITCH}='{value}' names no --nproc-per-node; give a process count (e.g. 2) or torchrun "
                          f"arguments including --nproc-per-node")
    return arguments


def _processes_per_node(arguments):
    """torchrun's --nproc-per-node among `arguments` as a number; 0 where it is a word torchrun resolves itself
    (auto, gpu, cpu, xpu)."""
    _, value = _value_of(arguments, *NPROC_OPTIONS)
    return int(value) if value and value.isdigit() else 0


NPROC_OPTIONS = ("--nproc-per-node", "--nproc_per_node")
NPROC_WORDS = ("auto", "cpu", "gpu", "xpu")  # counts torchrun resolves itself, from this machine's devices


def usable_cpus():
    """(CPU cores this process's ranks can run on, why): the CPUs of its affinity mask, no more than its cgroup quota
    (rounded up: a fraction of a core still runs a rank), as qlora_nli/runtime/threads.py reads them."""
    cpus = len(threads.affinity_cpus())
    quota = threads.cgroup_quota()
    if quota is not None and math.ceil(quota) < cpus:
        return math.ceil(quota), f"cgroup quota {quota:g} CPUs"
    return cpus, f"{cpus} CPUs in this process's affinity"


def available_memory(device, n_gpus=0):
    """(bytes a rank may use, where): the free memory of the emptiest GPU, or the machine's MemAvailable on CPU;
    (None, why) where it cannot be read."""
    if device == "cuda":
        free = [torch.cuda.mem_get_info(i)[0] for i in range(n_gpus)]
        return (min(free), "free on the emptiest GPU") if free else (None, "no GPU")
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024, "MemAvailable in /proc/meminfo"
    except (OSError, ValueError, IndexError):
        pass
    return None, "/proc/meminfo unreadable"


def check_process_count(arguments, device, weights_bytes=None):
    """Before torchrun starts anything: a --nproc-per-node that torchrun would fail on with a traceback (0, negative,
    not a number), and more ranks on this machine than it has usable cores, are one ParamsError line. Every rank holds
    a whole copy of the model and computes with at least one core of its own; ranks beyond the cores only time-share
    them, adding memory and communication, never speed, and the result is the same at any count (docs/distributed.md).
    On a GPU, ranks beyond the GPU count share GPUs (correct, each with its own copy of the model in that GPU's
    memory): a warning."""
    _, value = _value_of(arguments, *NPROC_OPTIONS)
    if value is None or value in NPROC_WORDS:
        return
    fix = "give a positive count (e.g. --nproc-per-node=2), or unset it for one process"
    if not value.lstrip("+-").isdigit():
        raise ParamsError(f"{SWITCH}: --nproc-per-node={value!r} is not a process count; allowed: an integer >= 1 or "
                          f"one of {', '.join(NPROC_WORDS)}; {fix}")
    count = int(value)
    if count < 1:
        raise ParamsError(f"{SWITCH}: --nproc-per-node={value}: a process count must be at least 1; {fix}")
    cores, why = usable_cpus()
    if count > cores:
        raise ParamsError(f"{SWITCH}: {count} processes on this machine, which has {cores} usable CPU cores ({why}); "
                          f"each rank holds a copy of the model and needs a core of its own, so more ranks only add "
                          f"memory, not speed; use at most {cores} (or unset it for one process)")
    n_gpus = torch.cuda.device_count() if device == "cuda" else 0
    if device == "cuda" and count > n_gpus:
        log.warning("%s: %d ranks on %d GPU(s): ranks share GPUs, each holding its own copy of the model in that GPU's "
                    "memory (correct, not faster)", SWITCH, count, n_gpus)
    # Memory: every rank holds the weights; activations come on top, so `weights_bytes` is a floor of what a rank
    # needs, and a count whose floor does not fit is refused (one that fits may still run out, later)
    sharing = math.ceil(count / n_gpus) if device == "cuda" and n_gpus else count
    available, where = available_memory(device, n_gpus)
    if weights_bytes and available is not None and sharing * weights_bytes > available:
        fit = max(1, available // weights_bytes) * (n_gpus if device == "cuda" and n_gpus else 1)
        raise ParamsError(f"{SWITCH}: {count} processes need at least {sharing} x {weights_bytes / 2**30:.1f} GiB for "
                          f"their copies of the model's weights{' on one GPU' if device == 'cuda' else ''}, more than "
                          f"the {available / 2**30:.1f} GiB {where}; use at most {fit} (or unset it for one process)")


def launch(arguments):
    """Run this program on the ranks `arguments` ask torchrun for, with torchrun's launcher in this process, then end
    the process with the ranks' exit status. A rank that stops on a library error leaves its line to this launcher
    (errors.exit_with), which prints one line for all ranks (rank 0's where it has one) instead of a line per rank
    under torchrun's ChildFailedError traceback; a rank that crashes or is killed prints its own output, and this
    launcher one line naming it."""
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.rendezvous.api import (
        RendezvousError,
        RendezvousTimeoutError,
    )

    command = [*arguments, *_this_program()]
    log.info("%s: %s", SWITCH, shlex.join([sys.executable, "-m", "torch.distributed.run", *command]))
    try:
        with redirect_stderr(io.StringIO()) as said:  # torchrun's usage and error, to end in one line
            torchrun_args = torchrun.parse_args(command)
    except SystemExit:
        last = (said.getvalue().strip().splitlines() or ["cannot parse them"])[-1]
        raise ParamsError(f"{SWITCH}='{env.get('TORCHRUN', '')}': torchrun refuses its arguments ({last}); see "
                          f"python -m torch.distributed.run --help") from None
    sys.stdout.flush()
    sys.stderr.flush()
    with tempfile.TemporaryDirectory(prefix="qlora-nli-ranks-") as lines:
        os.environ[RANK_LINES] = lines  # inherited by every rank torchrun starts
        logging.disable(logging.ERROR)  # torchrun's own warnings and errors about the ranks: the line below says it
        try:
            torchrun.run(torchrun_args)
            status, message = 0, None
        except ChildFailedError as e:
            status, message = _failure(e.failures, Path(lines), node_count(arguments))
        except (RendezvousTimeoutError, RendezvousError) as e:  # several nodes: one never came, or no endpoint
            status, message = 1, _rendezvous_failure(e, arguments)
        except SignalException as e:  # this launcher was told to stop (Ctrl-C, SIGTERM): torchrun stopped the ranks
            left = _rank_lines(Path(lines))
            status, message = 128 + e.sigval, left[min(left)] if left else None
        except Exception as e:  # noqa: BLE001  (rendezvous, port or store errors of torchrun itself)
            status = 1
            reason = " ".join(str(e).split())[:200]
            message = f"{SWITCH}: torchrun could not run the ranks ({type(e).__name__}: {reason})"
        finally:
            logging.disable(logging.NOTSET)
            del os.environ[RANK_LINES]
    if message:
        print(message, file=sys.stderr, flush=True)
    sys.exit(status)


def _rank_lines(directory):
    """{rank: its one-line error} of the ranks that left one in `directory`."""
    return {int(path.name.split("-")[1]): path.read_text(encoding="utf-8") for path in directory.glob("rank-*")}


def _failure(failures, directory, nodes=1):
    """(exit status, the one line) for torchrun's {rank: ProcessFailure}. The line is the lowest rank's that left one
    (rank 0's when it did). The status is that of a rank that exited with its line: a rank that failed first makes
    torchrun stop the others (SIGTERM), possibly after they left the same line. With several `nodes`, a rank that
    crashed or was killed (or lost a peer node) gets the way to go on."""
    lines = _rank_lines(directory)
    if lines:
        codes = [failures[r].exitcode for r in sorted(lines) if r in failures and failures[r].exitcode > 0]
        return (codes[0] if codes else 1), lines[min(lines)]
    rank = min(failures)
    code = failures[rank].exitcode
    what = f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit status {code}"
    again = ("; rerun `dvc repro` on every node: training resumes from the newest checkpoint every node holds"
             if nodes > 1 else "")
    return (code if code > 0 else 128 - code), f"{SWITCH}: rank {rank} failed ({what}); its output is above{again}"


# --- Several machines: the same command on every node (docs/distributed.md, "Several machines") --------------------
# Each node runs `dvc repro` in its own checkout. The writer of each node (`Ranks.writes`) writes that checkout's
# outputs from results every rank holds (all_gather, all_reduce); what differs between processes (wall-clock times,
# resources, RNG states) is rank 0's everywhere (`from_rank0`), so every node's outputs and dvc.lock are the same.

# torchrun's c10d rendezvous waits this long for all nodes when --rdzv-conf names no join_timeout (torch's default)
DEFAULT_JOIN_TIMEOUT = 600
DEFAULT_READ_TIMEOUT = 60  # ... and a node that is not the endpoint's host this long for the host's store


def _value_of(arguments, *names):
    """(index, value) of the torchrun option `names` among `arguments` (`--x v` or `--x=v`), else (None, None)."""
    for i, argument in enumerate(arguments):
        name, equals, value = argument.partition("=")
        if name in names:
            return i, value if equals else (arguments[i + 1] if i + 1 < len(arguments) else "")
    return None, None


def node_count(arguments):
    """The largest number of nodes torchrun's --nnodes allows (`2`, or `1:4` for an elastic range); 1 without it."""
    _, value = _value_of(arguments, "--nnodes")
    last = (value or "1").split(":")[-1]
    return int(last) if last.isdigit() else 1


def _rdzv_conf(arguments, key, default):
    _, conf = _value_of(arguments, "--rdzv-conf", "--rdzv_conf")
    pairs = dict(p.partition("=")[::2] for p in (conf or "").split(",") if "=" in p)
    return int(pairs[key]) if pairs.get(key, "").isdigit() else default


def stage_name(program):
    """`evaluate-baseline` for `-m stages.evaluate baseline` (or `stages/evaluate.py baseline`)."""
    words = [program[1].rpartition(".")[2] if program[0] == "-m" else os.path.splitext(os.path.basename(program[0]))[0],
             *(program[2:] if program[0] == "-m" else program[1:])]
    return "-".join("".join(c if c.isalnum() or c in "_." else "_" for c in w) for w in words if w)


def per_stage_rendezvous(arguments, program):
    """torchrun's arguments with a rendezvous id of this stage's own when they span several nodes: `--rdzv-id ID`
    becomes `ID-<stage>` (`qlora-nli-<stage>` without one). Every stage rendezvouses anew, and a node that DVC sends
    to another stage (its outputs were up to date there) can never join this stage's group: it times out instead."""
    if node_count(arguments) <= 1:
        return arguments
    i, value = _value_of(arguments, "--rdzv-id", "--rdzv_id")
    stage = stage_name(program)
    if i is None:
        return [*arguments, "--rdzv-id", f"qlora-nli-{stage}"]
    joined = "=" in arguments[i]
    rest = arguments[i + (1 if joined else 2):]
    return [*arguments[:i], f"--rdzv-id={value}-{stage}", *rest]


def _rendezvous_failure(error, arguments):
    """The one line for a rendezvous of several nodes that failed: a node that never arrived within join_timeout, or
    an endpoint nobody serves. Nothing of the stage has run on this node then: no output is written."""
    from torch.distributed.elastic.rendezvous.api import RendezvousTimeoutError

    stage, (_, endpoint) = stage_name(_this_program()), _value_of(arguments, "--rdzv-endpoint", "--rdzv_endpoint")
    _, rdzv_id = _value_of(arguments, "--rdzv-id", "--rdzv_id")
    if isinstance(error, RendezvousTimeoutError):
        return (f"{stage}: not all {node_count(arguments)} nodes joined the rendezvous {rdzv_id} at {endpoint} within "
                f"join_timeout={_rdzv_conf(arguments, 'join_timeout', DEFAULT_JOIN_TIMEOUT)} s; nothing was written; "
                f"start the same {SWITCH} (its own --node-rank) with `dvc repro` on every node, or raise join_timeout "
                f"in --rdzv-conf")
    return (f"{stage}: rendezvous {rdzv_id} at {endpoint} failed ({type(error).__name__}: "
            f"{str(error).splitlines()[0] if str(error) else 'no detail'}); nothing was written; check that node 0 "
            f"runs and that {endpoint} is its reachable address (read_timeout="
            f"{_rdzv_conf(arguments, 'read_timeout', DEFAULT_READ_TIMEOUT)} s)")


def _this_program():
    """How this process was started, for torchrun to start each rank the same way: `-m stages.finetune ...` for a
    module (dvc.yaml's form, see there why), else the script path and its arguments."""
    spec = getattr(sys.modules["__main__"], "__spec__", None)
    if spec is not None and spec.name:
        return ["-m", spec.name, *sys.argv[1:]]
    return sys.argv


def start(device, weights_bytes=None):
    """First call of a stage: re-execute under torchrun if the switch asks for it (this call then never returns),
    else join the process group when torchrun started this process. Returns this process's Ranks. `weights_bytes`
    (a callable, asked only when the switch is set): about how much memory one rank's copy of the model takes, for
    the check of the process count against this machine's memory."""
    if "LOCAL_RANK" not in os.environ:
        arguments = torchrun_arguments(env.get("TORCHRUN", ""))
        if arguments:
            check_process_count(arguments, device, weights_bytes() if weights_bytes else None)
            if "OMP_NUM_THREADS" not in os.environ and _processes_per_node(arguments) > 1:
                # What torchrun itself does then, without the banner it prints about it: each rank starts with
                # one OpenMP thread, and runtime.threads.configure gives it its share of the cores (or compute.num_threads).
                os.environ["OMP_NUM_THREADS"] = "1"
            launch(per_stage_rendezvous(arguments, _this_program()))  # ends this process with the ranks' status
        return SINGLE
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ["LOCAL_RANK"])
    if world_size == 1:
        return SINGLE
    local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    n_gpus = torch.cuda.device_count() if device == "cuda" else 0
    backend = pick_backend(device, local_world_size, n_gpus)
    if device == "cuda":  # ranks beyond the GPU count share GPUs (correct, not faster)
        torch.cuda.set_device(local_rank % n_gpus)
    dist.init_process_group(backend)
    atexit.register(dist.destroy_process_group)
    ranks = Ranks(rank=dist.get_rank(), world_size=world_size, local_rank=local_rank,
                  local_world_size=local_world_size, backend=backend)
    log.info("rank %d of %d (%s)", ranks.rank, ranks.world_size, backend)
    return ranks
