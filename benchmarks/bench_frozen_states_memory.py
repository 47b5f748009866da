"""Does `finetune` stay flat in memory and in time per example as the training set grows?

training.FrozenBlockStates keeps the states entering the lowest adapted block for every training example (76 MB per
1,000 pairs on the embedded model). They go to an unlinked temporary file read back per micro-batch, so peak RSS
should not grow with data.n_train. This runs the real stages once per size and compares:

    python benchmarks/bench_frozen_states_memory.py --set data.source=$PWD/../shared/data/snli \
        [--n-train 1000 6000] [--set group.key=value ...] [--out benchmarks/results/frozen_states_memory.json]

Each size runs `stages/prepare.py` then `stages/finetune.py` of this checkout in a temporary copy (a git repo, as
dvclive wants) with params.yaml's values, data.n_train = the size, train.epochs = 1 and any --set, one size after
the other, so each run is alone on the machine and its peak RSS is its own process's:
  peak RSS       metrics/train.json resources.process_rss_peak_mb (psutil samples and ru_maxrss of finetune: model
                 load, the frozen-block pass, the epoch, validation, saving)
  s / example    time.per_epoch_seconds[0] / n_train: the training epoch alone (the frozen-block pass before it
                 and the validation after it are excluded: both are per example by construction)
Targets (pass/fail in the JSON): the largest size's peak RSS and seconds per example within 10% of
the smallest size's. Try it at tiny sizes first, e.g. --n-train 16 24 --set model.name=<tiny model dir>
--set data.source=<dir> --set data.n_val=6 --set data.n_test=6.
"""
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine_info, parse_value  # noqa: E402

from qlora_nli.config import check_params
from qlora_nli.runtime.errors import ArgumentParser, NLIError
from qlora_nli.runtime.files import write_json
from common import read_json

log = logging.getLogger("bench_frozen_states_memory")
TOLERANCE = 0.10  # the targets: within 10% of the smallest size


def parse_args(argv=None):
    ap = ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n-train", type=int, nargs="+", default=[1000, 6000])
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="GROUP.KEY=VALUE")
    ap.add_argument("--out", default=str(REPO / "benchmarks/results/frozen_states_memory.json"))
    args = ap.parse_args(argv)
    if len(args.n_train) < 2 or min(args.n_train) < 1:
        ap.error("--n-train needs two or more sizes >= 1")
    return args


def build_params(overrides, n_train):
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    for item in overrides:
        key, sep, text = item.partition("=")
        group, dot, name = key.strip().partition(".")
        if not sep or not dot:
            raise SystemExit(f"--set {item!r}: expected GROUP.KEY=VALUE, e.g. data.source=/path/to/snli")
        params.setdefault(group, {})[name] = parse_value(text)
    params["data"]["n_train"] = n_train
    params["train"]["epochs"] = 1
    return check_params(params, "params.yaml + --set")


def run_size(params, workdir):
    """prepare + finetune in a fresh copy of the pipeline; returns metrics/train.json."""
    root = Path(workdir) / f"n{params['data']['n_train']}"
    for name in ("stages", "qlora_nli"):
        shutil.copytree(REPO / name, root / name, ignore=shutil.ignore_patterns("__pycache__"))
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    git = ["git", "-c", "user.name=bench", "-c", "user.email=bench@example.com"]
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"], [*git, "commit", "-qm", "bench"]):
        subprocess.run(cmd, cwd=root, check=True)
    for stage in ("stages/prepare.py", "stages/finetune.py"):
        log.info("n_train %d: %s", params["data"]["n_train"], stage)
        # the copied package first, not an installed one: what runs is this checkout's code
        env = {**os.environ, "PYTHONPATH": str(root), "TOKENIZERS_PARALLELISM": "false"}
        if subprocess.run([sys.executable, stage], cwd=root, env=env).returncode != 0:
            raise SystemExit(f"{stage} failed at n_train {params['data']['n_train']} (its message is above)")
    return read_json(root / "metrics/train.json")


def main(args):
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-frozen-states-") as workdir:
        for n in args.n_train:
            try:
                train = run_size(build_params(args.overrides, n), workdir)
            except NLIError as e:
                raise SystemExit(str(e))
            epoch_seconds = train["time"]["per_epoch_seconds"][0]
            rows.append({"n_train": n, "peak_rss_mb": train["resources"]["process_rss_peak_mb"],
                         "epoch_seconds": epoch_seconds, "seconds_per_example": round(epoch_seconds / n, 5),
                         "finetune_wall_seconds": train["resources"]["wall_seconds"], "device": train["device"]})
    small, large = rows[0], rows[-1]
    ratios = {"peak_rss": round(large["peak_rss_mb"] / small["peak_rss_mb"], 3),
              "seconds_per_example": round(large["seconds_per_example"] / small["seconds_per_example"], 3)}
    report = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "overrides": args.overrides,
        "sizes": rows,
        "ratios_largest_to_smallest": ratios,
        "targets": {key: {"max_ratio": 1 + TOLERANCE, "pass": ratio <= 1 + TOLERANCE} for key, ratio in ratios.items()},
    }
    print(f"\n{'n_train':>8} {'peak RSS MB':>12} {'epoch s':>9} {'s/example':>10}")
    for r in rows:
        print(f"{r['n_train']:>8} {r['peak_rss_mb']:>12.1f} {r['epoch_seconds']:>9.1f} "
              f"{r['seconds_per_example']:>10.4f}")
    for key, target in report["targets"].items():
        print(f"{key}: {ratios[key]:.3f} x the smallest size ({'pass' if target['pass'] else 'FAIL'}, "
              f"target <= {target['max_ratio']:.2f})")
    write_json(args.out, report)
    print(f"written {args.out}")


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    main(parse_args())
