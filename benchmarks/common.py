"""What the benchmarks share: children in fresh interpreters, the fp32 matmul peak, machine info, numbers for tables.

Each benchmark script runs its measured work in child processes (`run_child`: the script itself with
`--child ROLE --spec SPEC --result RESULT`), so that a child's peak RSS and imports are its own and the parent stays
small (it never imports torch).
"""
import json
import logging
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
MATMUL_SIZE, MATMUL_REPS = 2048, 10
DVC_REPEATS = 3

sys.path.insert(0, str(REPO))  # run as a script from anywhere, with or without `pip install -e .`
# Nothing of qlora_nli is imported here: bench_eval's children import it from another tree.

log = logging.getLogger("bench")


def read_json(path):
    return json.loads(Path(path).read_text())


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def parse_value(text):
    """YAML value as `dvc exp run -S` reads it; text that YAML would turn into a mapping (a template starting
    with `{premise}`) or cannot parse stays a plain string."""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    return text if isinstance(value, dict) else value


def run_child(script, role, spec, workdir, cwd=REPO, role_arg=None):
    """Run one side (or the matmul peak) in a fresh interpreter; its progress goes straight to our terminal."""
    spec_path, result_path = Path(workdir) / f"{role}.spec.json", Path(workdir) / f"{role}.result.json"
    spec_path.write_text(json.dumps(spec))
    cmd = [sys.executable, str(Path(script).resolve()), "--child", role_arg or role, "--spec", str(spec_path),
           "--result", str(result_path)]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd)
    seconds = time.perf_counter() - start
    if proc.returncode != 0 or not result_path.exists():
        log.error("%s child failed (exit code %s); see its output above", role, proc.returncode)
        return {"error": f"child process exited with code {proc.returncode}", "process_seconds": round(seconds, 1)}
    result = json.loads(result_path.read_text())
    result["process_seconds"] = round(seconds, 1)
    return result


def dvc_command():
    exe = shutil.which("dvc", path=str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", ""))
    return [exe] if exe else [sys.executable, "-m", "dvc"]


def time_dvc_noop():
    """`dvc repro` with nothing to do: the cost a user pays for every `dvc repro`/`dvc exp run` check."""
    dvc = dvc_command()
    start = time.perf_counter()
    status = subprocess.run(dvc + ["status", "--json"], cwd=REPO, capture_output=True, text=True)
    status_seconds = round(time.perf_counter() - start, 2)
    result = {"seconds": None, "runs_seconds": [], "status_seconds": status_seconds, "reason": None}
    if status.returncode != 0:
        result["reason"] = f"`dvc status` failed (exit {status.returncode}): {status.stderr.strip()[-300:]}"
        return result
    try:
        changed = json.loads(status.stdout or "{}")
    except json.JSONDecodeError:
        changed = {"?": status.stdout.strip()[-300:]}
    if changed:
        # Timing `dvc repro` now would run the pipeline (an hour), not measure a no-op.
        result["reason"] = (f"not measured: `dvc status` is not up to date ({len(changed)} stage(s) changed: "
                            f"{', '.join(sorted(changed))}); run `dvc repro` once, then rerun the benchmark")
        return result
    for _ in range(DVC_REPEATS):
        start = time.perf_counter()
        proc = subprocess.run(dvc + ["repro"], cwd=REPO, capture_output=True, text=True)
        result["runs_seconds"].append(round(time.perf_counter() - start, 2))
        if proc.returncode != 0:
            result["reason"] = f"`dvc repro` failed (exit {proc.returncode}): {proc.stderr.strip()[-300:]}"
            return result
        result["output_tail"] = proc.stdout.strip()[-300:]
    result["seconds"] = statistics.median(result["runs_seconds"])
    return result


def machine_info():
    import psutil
    import torch

    cpu_model = None
    try:
        with open("/proc/cpuinfo") as f:
            cpu_model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    versions = {}
    for package in ("torch", "transformers", "bitsandbytes", "peft", "accelerate", "dvc"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return {
        "cpu_model": cpu_model or platform.processor(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),  # torch's CPU kernels: AVX2, AVX512, ...
        "cpu_count_logical": os.cpu_count(),
        "cpu_count_physical": psutil.cpu_count(logical=False),
        "memory_total_mb": round(psutil.virtual_memory().total / 2**20),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": versions,
    }


def enter_repo(*data_files):
    """chdir to the repository and check that the prepared data the benchmark reads are there."""
    os.chdir(REPO)
    for path in data_files:
        if not Path(path).exists():
            raise SystemExit(f"{path} is missing: run `dvc repro prepare` first")


def target_lines(targets, digits):
    """The "targets:" block of a benchmark's table: one [PASS]/[FAIL]/[n/a] line per target."""
    lines = ["targets:"]
    for t in targets:
        verdict = {True: "PASS", False: "FAIL", None: "n/a"}[t["pass"]]
        lines.append(f"  [{verdict:4s}] {t['name']}: {fmt(t['value'], digits)} (target {t['target']})")
    return lines


def fmt(value, digits=1):
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def rss_peak_mb():
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # KiB on Linux


def set_threads(n):
    import torch

    if n:
        torch.set_num_threads(n)
    return torch.get_num_threads()


def child_matmul(spec):
    """Achievable fp32 matmul FLOP/s on this machine: the denominator of % of peak."""
    import torch

    out = {}
    for n_threads in spec["threads"]:
        actual = set_threads(n_threads)
        a, b = torch.randn(MATMUL_SIZE, MATMUL_SIZE), torch.randn(MATMUL_SIZE, MATMUL_SIZE)
        for _ in range(3):  # warm-up: thread pool, caches, the BLAS kernel choice
            torch.mm(a, b)
        rates = []
        for _ in range(MATMUL_REPS):
            start = time.perf_counter()
            torch.mm(a, b)
            rates.append(2 * MATMUL_SIZE**3 / (time.perf_counter() - start))
        out[str(n_threads)] = {"torch_threads": actual, "best_flops_per_second": round(max(rates)),
                               "median_flops_per_second": round(statistics.median(rates))}
        log.info("matmul peak at %d threads: %.1f GFLOP/s (median %.1f)", actual, max(rates) / 1e9,
                 statistics.median(rates) / 1e9)
    return {"threads": out}




def matmul_peak(peaks, threads):
    """{threads: best and before/after} from the `child_matmul` results taken before and after the measured work:
    the best is the denominator of % of peak, a drop between before and after says the machine was busy."""
    out = {}
    for t in threads:
        runs = [p["threads"][str(t)] for p in peaks if "threads" in p]
        if runs:
            out[str(t)] = {
                "torch_threads": runs[0]["torch_threads"],
                "peak_flops_per_second": max(r["best_flops_per_second"] for r in runs),
                "before_best": runs[0]["best_flops_per_second"], "before_median": runs[0]["median_flops_per_second"],
                "after_best": runs[-1]["best_flops_per_second"] if len(runs) > 1 else None,
            }
    return out


# A script run as `script STOP` / `script CONT` around each timed block, to pause other jobs that share the CPU (an
# experiment sweep, say) so that they do not enter the timings; unset, nothing is paused.
PAUSE_SCRIPT = os.environ.get("BENCH_PAUSE_SCRIPT")
MAX_PAUSE_SECONDS = 90


class PausedSweep:
    """`with PausedSweep(script):` stops the jobs sharing this CPU (`script STOP`) while the block is timed and
    continues them after (`script CONT`, also on errors). A pause never lasts longer than MAX_PAUSE_SECONDS: a timer
    continues them then, and `expired` says that the rest of the block was timed beside them. Without a script
    (BENCH_PAUSE_SCRIPT unset) it does nothing."""

    def __init__(self, script=PAUSE_SCRIPT, limit=MAX_PAUSE_SECONDS):
        self.script = Path(script) if script else None
        self.limit, self.expired, self.timer = limit, False, None

    def _signal(self, what):
        if self.script is not None and self.script.exists():
            subprocess.run([str(self.script), what], capture_output=True, timeout=30)

    def _expire(self):
        self.expired = True
        self._signal("CONT")

    def __enter__(self):
        import threading

        self._signal("STOP")
        self.timer = threading.Timer(self.limit, self._expire)
        self.timer.daemon = True
        self.timer.start()
        return self

    def __exit__(self, *exc):
        self.timer.cancel()
        self._signal("CONT")
