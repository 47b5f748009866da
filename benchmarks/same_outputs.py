"""Do two revisions of the code compute the same thing? Runs the whole pipeline (`dvc repro`) with this checkout's code
and with the code of git revision REV (a temporary `git worktree`), back to back on this machine, with the same params,
and compares every output byte for byte.

    NLI_DATA_MIRROR=../shared/data python benchmarks/same_outputs.py --against REV \
        --set data.n_train=128 --set train.epochs=2 --new-set compute.num_threads=2 --old-set train.num_threads=2

`--set` applies to both sides, `--old-set` and `--new-set` to one side only (for a param the two name differently);
give a fixed thread count on both sides, since with `num_threads: 0` the thread count, and the results' last digits, follow the load.
Compared: models/adapter, predictions/, evidence/, metrics/ (the keys that hold wall-clock times or resources left out),
plots/, dvclive/, data/, reports/failure_cases.*; and reports/ (report, model card, figures) as each side's code renders
them from the same artifacts, the old side's (the report quotes the measured times). dvc.lock: the hashes of the outputs without measured times in them must match (code deps
and params may differ). Prints a table and writes benchmarks/results/same_outputs.json (or --out); exits 1 if any output differs.
"""
import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

from common import REPO, machine_info, parse_value

OUTPUTS = ["models/adapter", "checkpoints", "predictions", "evidence", "metrics", "plots", "dvclive", "data",
           "reports/failure_cases.json", "reports/failure_cases.md"]
# The report quotes the measured times: each side's report is compared after rendering from the same artifacts (the old
# side's), so that it is the rendering code that is compared.
REPORT = ["reports/report.md", "reports/model_card.md", "reports/figures"]
REPORT_INPUTS = ["metrics", "reports/failure_cases.json", "data/manifest.json", "predictions", "models/adapter"]
# keys that hold measured times or resources: they differ between any two runs
TIMING_KEYS = {"time", "eval_seconds", "pairs_per_second", "throughput", "resources", "device", "epoch_seconds"}
RESULT = REPO / "benchmarks/results/same_outputs.json"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--against", required=True, help="git revision of the other side")
    parser.add_argument("--set", action="append", default=[], metavar="GROUP.KEY=VALUE", help="params, both sides")
    parser.add_argument("--old-set", action="append", default=[], metavar="GROUP.KEY=VALUE",
                        help="params for REV's side only")
    parser.add_argument("--new-set", action="append", default=[], metavar="GROUP.KEY=VALUE",
                        help="params for this checkout's side only")
    parser.add_argument("--workdir", default=None, help="where the two copies go (default: a temporary folder)")
    parser.add_argument("--out", type=Path, default=RESULT, help=f"the JSON written (default: {RESULT.relative_to(REPO)})")
    return parser.parse_args(argv)


def set_params(root, settings):
    path = root / "params.yaml"
    params = yaml.safe_load(path.read_text())
    for setting in settings:
        name, value = setting.split("=", 1)
        *groups, key = name.split(".")
        node = params
        for group in groups:
            node = node[group]
        node[key] = parse_value(value)
    path.write_text(yaml.safe_dump(params, sort_keys=False))


def copy_of(revision, where):
    """A checkout of `revision` (or of this working tree, for None) at `where`, the venv linked in."""
    if revision is None:
        files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, check=True,
                               capture_output=True, text=True).stdout.split()
        for name in files:
            if (REPO / name).is_file():
                (where / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(REPO / name, where / name)
        for command in (["init", "-q"], ["add", "-A"], ["-c", "user.name=same_outputs", "-c", "user.email=none",
                                                     "commit", "-qm", "this checkout's working tree"]):
            subprocess.run(["git", *command], cwd=where, check=True)  # dvclive needs a commit to start from
    else:
        subprocess.run(["git", "worktree", "add", "-q", "--detach", str(where), revision], cwd=REPO, check=True)
    (where / ".venv").symlink_to(REPO / ".venv")


def repro(root, side):
    env = {**os.environ, "PATH": f"{REPO / '.venv/bin'}:{os.environ['PATH']}"}
    if env.get("NLI_DATA_MIRROR"):  # given relative to where this runs, not to each side's copy
        env["NLI_DATA_MIRROR"] = str(Path(env["NLI_DATA_MIRROR"]).absolute())
    if subprocess.run(["dvc", "repro", "--force"], cwd=root, env=env).returncode != 0:
        raise SystemExit(f"same_outputs: `dvc repro --force` failed on the {side} side ({root}): its output is above")


def without_timings(value):
    if isinstance(value, dict):
        return {k: without_timings(v) for k, v in value.items() if k not in TIMING_KEYS}
    if isinstance(value, list):
        return [without_timings(v) for v in value]
    return value


def _plain(value):
    """`value` (as torch.load gives it) with each tensor replaced by its dtype, shape and the sha256 of its bytes."""
    import torch

    if isinstance(value, torch.Tensor):
        return [str(value.dtype), list(value.shape), hashlib.sha256(value.contiguous().view(-1).view(torch.uint8)
                                                                   .numpy().tobytes()).hexdigest()]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def digest(path):
    """sha256 of a file; of its JSON without the timing keys for metrics/, dvclive/metrics.json and a checkpoint's
    record.json. A checkpoint's run.json and state.pt without the run's fingerprint (a hash of params, data and code:
    another code gives another by design), state.pt's tensors by their bytes."""
    if path.name == "state.pt":
        import torch

        state = torch.load(path, weights_only=True)
        state.pop("fingerprint")
        return hashlib.sha256(json.dumps(_plain(state)).encode()).hexdigest()
    if path.name == "run.json" and "checkpoints" in path.parts:
        run = json.loads(path.read_text())
        run.pop("fingerprint")
        return hashlib.sha256(json.dumps(run).encode()).hexdigest()
    data = path.read_bytes()
    if path.suffix == ".json" and ("metrics" in path.parts or path.parent.name == "dvclive"
                                   or path.name == "record.json"):
        data = json.dumps(without_timings(json.loads(data))).encode()  # key order kept: it is part of the bytes
    return hashlib.sha256(data).hexdigest()


def files_of(root, outputs=OUTPUTS):
    found = {}
    for output in outputs:
        base = root / output
        for path in sorted([base] if base.is_file() else base.rglob("*")):
            if path.is_file():
                found[path.relative_to(root).as_posix()] = digest(path)
    return found


def lock_outputs(root):
    """{stage: output path: md5} from dvc.lock, for the outputs without measured times in them (those with times are
    compared above, without their timing keys)."""
    stages = yaml.safe_load((root / "dvc.lock").read_text())["stages"]
    timed = ("metrics/", "checkpoints", "dvclive/metrics.json", *REPORT)
    return {f"{name}: {out['path']}": out.get("md5") for name, stage in stages.items() for out in stage.get("outs", [])
            if not out["path"].startswith(timed)}


def main(argv=None):
    args = parse_args(argv)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="same-outputs-"))
    sides = {"old": work / "old", "new": work / "new"}
    sides["new"].mkdir(parents=True)
    copy_of(None, sides["new"])
    copy_of(args.against, sides["old"])
    set_params(sides["new"], args.set + args.new_set)
    set_params(sides["old"], args.set + args.old_set)
    try:
        for name in ("old", "new"):  # back to back, nothing else on the machine
            print(f"== dvc repro, {name} side ({sides[name]})", flush=True)
            repro(sides[name], name)
        old, new = files_of(sides["old"]), files_of(sides["new"])  # before the report inputs are copied over
        for name in REPORT_INPUTS:  # the new side's report, rendered from the old side's artifacts
            target = sides["new"] / name
            shutil.rmtree(target) if target.is_dir() else target.unlink()
            (shutil.copytree if (sides["old"] / name).is_dir() else shutil.copy2)(sides["old"] / name, target)
        subprocess.run([str(REPO / ".venv/bin/python"), "-m", "stages.report"], cwd=sides["new"], check=True)
        old.update(files_of(sides["old"], REPORT))
        new.update(files_of(sides["new"], REPORT))
        differ = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
        lock_old, lock_new = lock_outputs(sides["old"]), lock_outputs(sides["new"])
        lock_differ = sorted(k for k in lock_old.keys() | lock_new.keys() if lock_old.get(k) != lock_new.get(k))
        for name in differ:  # what differs in a text file, for the log
            if name.endswith((".md", ".json", ".jsonl", ".csv")) and (sides["old"] / name).is_file():
                subprocess.run(["diff", str(sides["old"] / name), str(sides["new"] / name)], check=False)
    finally:
        if not args.workdir:  # a given workdir is kept, to look at the two sides
            subprocess.run(["git", "worktree", "remove", "--force", str(sides["old"])], cwd=REPO, check=False)
    print(f"{'files compared':<40} {len(old.keys() | new.keys())}")
    print(f"{'files that differ':<40} {len(differ)}")
    for name in differ:
        print(f"  {name}")
    print(f"{'dvc.lock outputs that differ':<40} {len(lock_differ)}")
    for name in lock_differ:
        print(f"  {name}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "against": subprocess.run(["git", "rev-parse", args.against], cwd=REPO, capture_output=True,
                                  text=True).stdout.strip(),
        "this": subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip(),
        "settings": {"both": args.set, "old_only": args.old_set, "new_only": args.new_set}, "machine": machine_info(),
        "files_compared": len(old.keys() | new.keys()), "files_differ": differ,
        "lock_outputs_compared": len(lock_old.keys() | lock_new.keys()), "lock_outputs_differ": lock_differ,
    }, indent=2) + "\n")
    return 1 if differ or lock_differ else 0


if __name__ == "__main__":
    sys.exit(main())
