import hashlib
import json
import logging
import pickle
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from qlora_nli.model.adapters import ADAPTER_WEIGHTS, check_weights_file, save_adapter
from qlora_nli.runtime import distributed
from qlora_nli.runtime.errors import CheckpointError
from qlora_nli.runtime.io import atomic_path
from qlora_nli.train.record import RECORD_KEYS

log = logging.getLogger(__name__)


def fingerprint(*parts):
    """Hash of everything that defines a run (params, data, code): a checkpoint is resumed only under the same hash."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


CHECKPOINT_WEIGHTS = ADAPTER_WEIGHTS[0]  # the adapter weights save_adapter writes into a checkpoint, restore loads


class Checkpoints:
    """`checkpoints/epoch-N/`: the adapter, `run.json` (which run and epoch), `state.pt` (optimizer, scheduler,
    RNG states, history) and `record.json` (`run_record`: the seconds each epoch took and what the run used, kept apart
    so that `state.pt` has the same bytes on every run of the same params, data and code). Each is written to a
    temporary directory and renamed, so a kill or Ctrl-C leaves only complete checkpoints.

    Nothing read back can run code: a checkpoint may come from a DVC remote or be dropped into the folder. `run.json`
    is JSON, the adapter is safetensors, and `state.pt` holds only tensors and plain Python values (NumPy's RNG state
    is stored as a tensor and ints), so it loads with `torch.load(weights_only=True)`; anything else is refused.
    Owner: the finetune process of this workspace (rank 0 when there are several): it alone writes and deletes here.
    With `resume=False` (params train.resume) `latest` deletes every checkpoint and finds none: training starts over."""

    def __init__(self, root, run_fingerprint, resume=True):
        self.root = Path(root)
        self.run_fingerprint = run_fingerprint
        self.resume = resume

    def save(self, epoch, model, optimizer, scheduler, scaler, history, record=None, rng_of_ranks=None):
        """`rng_of_ranks` (several processes): every rank's `rng_states()`, so that each rank resumes its own and every
        node writes the same bytes."""
        with atomic_path(self.root / f"epoch-{epoch}") as tmp:
            save_adapter(model, tmp)
            (tmp / "run.json").write_text(json.dumps({"fingerprint": self.run_fingerprint, "epoch": epoch}) + "\n")
            if record is not None:
                (tmp / "record.json").write_text(json.dumps(record, sort_keys=True) + "\n")
            torch.save({
                "fingerprint": self.run_fingerprint,
                "epoch": epoch,
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict(),
                "rng": rng_of_ranks[0] if rng_of_ranks else rng_states(),
                **({"rng_of_ranks": rng_of_ranks} if rng_of_ranks else {}),
                "history": history,
            }, tmp / "state.pt")

    def save_epoch(self, epoch, setup, ranks, run_record=None):
        """Checkpoint `epoch` of `setup` (TrainingSetup) with `run_record` (record.run_record). With several ranks:
        rank 0's record (its times and resources) and every rank's RNG states, so that every node writes the same
        checkpoint; the writer of each node (its local rank 0) writes it."""
        record = distributed.from_rank0(ranks, lambda: run_record) if run_record is not None else None
        rng = distributed.gather_by_index(ranks, {ranks.rank: rng_states()}) if ranks.world_size > 1 else {}
        if ranks.writes:
            self.save(epoch, setup.model, setup.optimizer, setup.scheduler, setup.scaler, setup.history, record,
                      [rng[r] for r in sorted(rng)])

    def epochs(self):
        """The epochs of this very run found in the folder, oldest first."""
        found = self.root.glob("epoch-*") if self.root.exists() else []
        return sorted(int(p.name.split("-")[1]) for p in found
                      if p.name.split("-")[1].isdigit() and self._run_of(p) == self.run_fingerprint)

    def resume_note(self):
        """What the next run does after this one is interrupted, by the complete checkpoints of this run on disk."""
        epochs = self.epochs()
        if not epochs:
            return "no epoch is complete yet; `dvc repro` starts the training again"
        if not self.resume:
            return f"epoch {epochs[-1]} is complete, but train.resume is false: `dvc repro` starts over"
        return f"epoch {epochs[-1]} is complete, `dvc repro` resumes from it"

    def _run_of(self, directory):
        """The fingerprint `directory` was written under, from JSON only; None if it has none (older format)."""
        try:
            return json.loads((directory / "run.json").read_text()).get("fingerprint")
        except (OSError, ValueError, AttributeError):
            return None

    def latest(self):
        """(epoch, directory, state) of the newest checkpoint of this very run, else None (and others' go)."""
        found = sorted(self.root.glob("epoch-*"), key=lambda p: int(p.name.split("-")[1])) if self.root.exists() else []
        if not found:
            return None
        if not self.resume:
            log.info("train.resume is false: deleting %s, training starts from epoch 1", self.root)
            shutil.rmtree(self.root)
            return None
        if self._run_of(found[-1]) != self.run_fingerprint:  # decided before unpickling anything
            log.info("checkpoints in %s belong to other params or data (or an older format): starting fresh", self.root)
            shutil.rmtree(self.root)
            return None
        return self.load(found[-1])

    def load(self, directory):
        """(epoch, directory, state) of the checkpoint in `directory`, checked (see `latest`)."""
        directory = Path(directory)
        state_file = directory / "state.pt"
        fix = f"delete {self.root}/ to start fresh (rm -r {self.root})"
        older = [e for e in self.epochs() if f"epoch-{e}" != directory.name]
        if older:
            fix = f"delete {directory} to resume from epoch-{older[-1]} (rm -r {directory}), or " + fix
        try:
            state = torch.load(state_file, weights_only=True)
        except pickle.UnpicklingError:
            raise CheckpointError(f"{state_file}: refused to load, it holds objects other than tensors and plain "
                                  f"values (an older version's checkpoint, another program's file, or a crafted one); "
                                  f"nothing in it was run; {fix}") from None
        except (RuntimeError, EOFError, OSError, ValueError) as e:
            raise CheckpointError(f"{state_file}: cannot be read ({type(e).__name__}: truncated or not a "
                                  f"checkpoint); {fix}") from None
        if not isinstance(state, dict) or state.get("fingerprint") != self.run_fingerprint:
            raise CheckpointError(f"{state_file}: does not belong to {directory / 'run.json'}; {fix}")
        # What `restore` loads into the model, checked before the base model loads. A checkpoint is written whole
        # (renamed into place), so one with missing or damaged weights was changed by something else: refused, as a
        # damaged state.pt is, rather than silently trained from an older epoch.
        weights = directory / CHECKPOINT_WEIGHTS
        if not weights.is_file():
            raise CheckpointError(f"{directory}: no {CHECKPOINT_WEIGHTS}, the checkpoint is incomplete; {fix}")
        check_weights_file(weights, fix, CheckpointError)
        return state["epoch"], directory, state

    def restore(self, checkpoint, model, optimizer, scheduler, scaler, rank=0):
        """Load `checkpoint` (from `latest`) into the model, optimizer, scheduler, scaler and the RNGs (`rank`'s own
        where the checkpoint holds every rank's); returns its (history, record), the record None if it has none."""
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        epoch, directory, state = checkpoint
        set_peft_model_state_dict(model, load_file(directory / CHECKPOINT_WEIGHTS))
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        of_ranks = state.get("rng_of_ranks") or [state["rng"]]
        rng = of_ranks[rank] if rank < len(of_ranks) else state["rng"]
        random.setstate(rng["python"])
        np.random.set_state(_numpy_rng_from_plain(rng["numpy"]))
        torch.set_rng_state(rng["torch"])
        if rng["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        try:
            record = json.loads((directory / "record.json").read_text())
        except (OSError, ValueError):
            record = None  # written without one, or unreadable: metrics/train.json then times only this run's epochs
        if not isinstance(record, dict) or not RECORD_KEYS <= set(record):
            record = None
        return state["history"], record


def rng_states():
    """This process's Python, NumPy, torch and CUDA RNG states, as a checkpoint keeps them."""
    return {"python": random.getstate(), "numpy": _numpy_rng_to_plain(np.random.get_state()),
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def _numpy_rng_to_plain(state):
    """NumPy's legacy RNG state ('MT19937', uint32 keys, pos, has_gauss, cached_gaussian) without NumPy objects, so
    that `torch.load(weights_only=True)` reads it back without allow-listing NumPy types."""
    name, keys, pos, has_gauss, cached_gaussian = state
    return {"name": str(name), "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
            "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)}


def _numpy_rng_from_plain(plain):
    keys = plain["keys"].numpy().astype(np.uint32)
    return plain["name"], keys, plain["pos"], plain["has_gauss"], plain["cached_gaussian"]


def newest_common_checkpoint(checkpoints, newest, ranks):
    """The checkpoint every rank resumes: `newest` (from `latest`) for one process; with several, the newest epoch
    that every rank's checkpoints/ holds (each node keeps its own: one that died while writing epoch N, or a fresh
    checkout, holds fewer), so that all ranks restore the same state. None: training starts over everywhere."""
    if ranks.world_size == 1:
        return newest
    held = distributed.gather_by_index(ranks, {ranks.rank: checkpoints.epochs()})
    common = set.intersection(*(set(epochs) for epochs in held.values()))
    epoch = max(common, default=None)
    if epoch != (newest[0] if newest else None):
        log.info("resuming after epoch %s, the newest that every node holds (checkpoints per rank: %s)", epoch,
                 ", ".join(f"rank {r}: {e or 'none'}" for r, e in sorted(held.items())))
        return checkpoints.load(checkpoints.root / f"epoch-{epoch}") if epoch is not None else None
    return newest
