"""Data-parallel stages on torch.distributed: the switch that starts a stage on N processes, and what ranks share.

The switch is the environment variable NLI_TORCHRUN, read by `start` at the top of a stage:
  unset, empty or "1"   one process, exactly as without this module;
  an integer N > 1      the stage re-executes itself as `python -m torch.distributed.run --standalone
                        --nproc-per-node N <script> <args>` (N ranks on this machine);
  anything else         torchrun's own arguments, passed as they are, e.g. for two machines
                        "--nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint host:29500 --rdzv-id run1".
A process that torchrun started (LOCAL_RANK is set) never re-executes, so launching a stage under torchrun or
`accelerate launch` directly works too. An environment variable rather than a param: results must not depend on the
number of processes, and a param would enter dvc.lock and change the stages' hashes.
"""
import logging
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist

from qlora_nli.runtime.errors import RunError

log = logging.getLogger(__name__)
# How far 1 and N processes may differ (relative), in float32: only the order of summation differs between them (each
# rank sums its micro-batches, then the ranks' sums are added), which moves results by a few float32 epsilons
# (1.2e-7) per step. 1e-4 is orders of magnitude above that, and far below what a wrongly weighted or missing
# gradient sum produces. Used by tests/unit/runtime/test_ranks.py and benchmarks/gpu_check.py.
SAME_RESULT_RELATIVE = 1e-4


@dataclass(frozen=True)
class Ranks:
    """Where this process stands: its rank among `world_size` processes, and the torch.distributed backend
    (None for a single process, which never initialises a process group)."""
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    backend: str | None = None

    @property
    def is_main(self):
        return self.rank == 0

    @property
    def writes(self):
        """Whether this process writes the stage's outputs: local rank 0 of each node (each node's checkout gets the
        same outputs; one writer per checkout). On one machine that is rank 0 alone."""
        return self.local_rank == 0

    def share(self, items):
        """This rank's items of `items`: every world_size-th, starting at its rank (all of them for one process)."""
        return items[self.rank::self.world_size]


SINGLE = Ranks()


def pick_backend(device, local_world_size, n_gpus):
    """NCCL when every rank on this machine has a GPU of its own; gloo on CPU, and when ranks share a GPU: NCCL
    refuses two ranks on one device ("Duplicate GPU detected"), gloo sums the GPU tensors through host memory
    (slower, the same numbers)."""
    if device != "cuda":
        return "gloo"
    if local_world_size > n_gpus:
        log.info("%d ranks share %d GPU(s): backend gloo (NCCL allows one rank per GPU)", local_world_size, n_gpus)
        return "gloo"
    return "nccl"


def sum_gradients(parameters, loss):
    """Sum the gradients of `parameters` and the float `loss` over all ranks, in one all_reduce; returns the summed
    loss. A rank that ran no micro-batch of the step contributes zeros; a gradient that is None on every rank stays
    None (as it would in one process, where the optimizer then skips that parameter)."""
    device = parameters[0].device
    flat = [p.grad.flatten().float() if p.grad is not None else torch.zeros(p.numel(), device=device)
            for p in parameters]
    present = torch.tensor([p.grad is not None for p in parameters], dtype=torch.float32, device=device)
    buffer = torch.cat([*flat, present, torch.tensor([loss], dtype=torch.float32, device=device)])
    dist.all_reduce(buffer)
    offset = 0
    for p, found in zip(parameters, buffer[-1 - len(parameters):-1].tolist()):
        values = buffer[offset:offset + p.numel()]
        offset += p.numel()
        p.grad = values.view_as(p).to(p.dtype).clone() if found else None
    return buffer[-1].item()


def gather_by_index(ranks, pieces):
    """{index: value} of every rank merged into one dict on every rank (values any picklable objects)."""
    if ranks.world_size == 1:
        return pieces
    everyone = [None] * ranks.world_size
    dist.all_gather_object(everyone, pieces)
    return {i: v for part in everyone for i, v in part.items()}


def barrier(ranks):
    if ranks.world_size > 1:
        dist.barrier()


@contextmanager
def main_first(ranks):
    """The writer of each node (`Ranks.writes`) runs the body first (it may clean up files, e.g. stale checkpoints),
    the other ranks after it."""
    if not ranks.writes:
        barrier(ranks)
    yield
    if ranks.writes:
        barrier(ranks)


def from_rank0(ranks, make):
    """`make()` computed on rank 0, the same value returned on every rank (all must call this): for what differs
    between processes (wall-clock times, resources) but must be the same in every node's outputs."""
    if ranks.world_size == 1:
        return make()
    box = [make() if ranks.is_main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def check_same_inputs(ranks, fingerprint, stage):
    """RunError on every rank unless every rank (every node's checkout) computed the same `fingerprint` of the
    stage's params, data and code: nodes on different inputs would otherwise sum gradients of different data."""
    seen = gather_by_index(ranks, {ranks.rank: fingerprint})
    if len(set(seen.values())) > 1:
        each = ", ".join(f"rank {r}: {v[:12]}" for r, v in sorted(seen.items()))
        raise RunError(f"{stage}: the nodes' inputs differ (params.yaml, data/, code; {each}); give every node the "
                       f"same commit, params.yaml and data.source, then rerun `dvc repro` on every node")
