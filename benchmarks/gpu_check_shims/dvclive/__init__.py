"""Stand-in for dvclive on a machine where DVC cannot be installed (dvclive imports dvc): benchmarks/gpu_check.py
puts this folder on PYTHONPATH only when the real package is missing. It takes stages/finetune.py's calls and
records nothing but the empty layout finetune moves into its outputs (plots/, metrics.json); the check reads the
losses from the checkpoints and metrics/train.json instead."""
import os


class Live:
    def __init__(self, dir="dvclive", *args, **kwargs):
        self.step = 0
        os.makedirs(os.path.join(dir, "plots"), exist_ok=True)
        with open(os.path.join(dir, "metrics.json"), "w") as f:
            f.write("{}\n")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def log_metric(self, *args, **kwargs):
        pass
