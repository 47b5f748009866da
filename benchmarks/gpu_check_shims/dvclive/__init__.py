"""Stand-in for dvclive on a machine where DVC cannot be installed (dvclive imports dvc): benchmarks/gpu_check.py
puts this folder on PYTHONPATH only when the real package is missing. It takes stages/finetune.py's calls and
records nothing; the check reads the losses from the checkpoints and metrics/train.json instead."""


class Live:
    def __init__(self, *args, **kwargs):
        self.step = 0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def log_metric(self, *args, **kwargs):
        pass
