"""What a stage used: a background sampler of RAM, CPU and (through pynvml) GPU memory and utilisation.

Fields that cannot be measured are None with `gpu_unavailable_reason` saying why: a zero would claim a measurement.
"""
import os
import resource
import threading
import time

import psutil


def _mb(n_bytes):
    return round(n_bytes / 2**20, 1)


def _stats(values):
    return (round(max(values), 1), round(sum(values) / len(values), 1)) if values else (None, None)


class _Gpu:
    """pynvml handle of the GPU this process uses, or the reason there is none."""

    def __init__(self):
        self.handle, self.name, self.reason = None, None, None
        try:
            import torch
            if not torch.cuda.is_available():
                self.reason = "no CUDA GPU visible to torch (CPU run)"
                return
            import pynvml
            pynvml.nvmlInit()
            index = torch.cuda.current_device()
            visible = os.environ.get("CUDA_VISIBLE_DEVICES")
            if visible and visible.split(",")[index].strip().isdigit():
                index = int(visible.split(",")[index])
            self.nvml = pynvml
            self.handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            self.name = pynvml.nvmlDeviceGetName(self.handle)
        except Exception as e:  # pynvml missing, driver library absent, ...
            self.reason = f"pynvml unavailable: {type(e).__name__}: {e}"

    def sample(self, pid):
        nvml = self.nvml
        used = nvml.nvmlDeviceGetMemoryInfo(self.handle).used
        util = nvml.nvmlDeviceGetUtilizationRates(self.handle).gpu
        mine = None
        try:
            for proc in nvml.nvmlDeviceGetComputeRunningProcesses(self.handle):
                if proc.pid == pid and proc.usedGpuMemory is not None:
                    mine = proc.usedGpuMemory
        except nvml.NVMLError:
            pass  # containers often hide other processes' and even our own pid
        return used, util, mine


class ResourceMonitor:
    """Use as `with ResourceMonitor() as mon: ...`, then `mon.summary(outputs=[...])`."""

    def __init__(self, interval=0.5):
        self.interval = interval
        self.process = psutil.Process()
        self.rss, self.cpu, self.gpu_used, self.gpu_util, self.gpu_mine = [], [], [], [], []
        self._stop = threading.Event()

    def __enter__(self):
        self.gpu = _Gpu()
        if self.gpu.handle is not None:
            import torch
            torch.cuda.reset_peak_memory_stats()
        self.start = time.perf_counter()
        self.process.cpu_percent()  # the first call only sets the reference point
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.wait(self.interval):
            self._sample()

    def _sample(self):
        self.rss.append(self.process.memory_info().rss)
        # percent of the whole machine: 100 means every core busy with this process
        self.cpu.append(self.process.cpu_percent() / psutil.cpu_count())
        if self.gpu.handle is not None:
            used, util, mine = self.gpu.sample(self.process.pid)
            self.gpu_used.append(used)
            self.gpu_util.append(util)
            if mine is not None:
                self.gpu_mine.append(mine)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self._sample()
        self.wall_seconds = time.perf_counter() - self.start
        return False

    def summary(self, outputs=()):
        """What was used so far: after the `with` block, or inside it (a sample is taken now)."""
        from qlora_nli.runtime.files import tree_size_bytes

        running = self._thread.is_alive()
        if running:
            self._sample()
        wall_seconds = time.perf_counter() - self.start if running else self.wall_seconds
        # ru_maxrss (KiB on Linux) catches peaks that fall between two samples
        peak_rss = max(max(self.rss), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
        cpu_peak, cpu_mean = _stats(self.cpu)
        gpu_used_peak, gpu_used_mean = _stats([_mb(b) for b in self.gpu_used])
        util_peak, util_mean = _stats(self.gpu_util)
        torch_peak = torch_reserved_peak = None
        if self.gpu.handle is not None:
            import torch
            torch_peak = _mb(torch.cuda.max_memory_allocated())
            # what torch's caching allocator held at most: the allocated peak plus its cached, unused blocks
            torch_reserved_peak = _mb(torch.cuda.max_memory_reserved())
        return {
            "wall_seconds": round(wall_seconds, 1),
            "samples": len(self.rss),
            "process_rss_peak_mb": _mb(peak_rss),
            "process_rss_mean_mb": _mb(sum(self.rss) / len(self.rss)),
            "cpu_percent_mean": cpu_mean,
            "cpu_percent_peak": cpu_peak,
            "gpu_name": self.gpu.name,
            "gpu_memory_used_peak_mb": gpu_used_peak,
            "gpu_memory_used_mean_mb": gpu_used_mean,
            "gpu_process_memory_peak_mb": _mb(max(self.gpu_mine)) if self.gpu_mine else None,
            "torch_max_memory_allocated_mb": torch_peak,
            "torch_max_memory_reserved_mb": torch_reserved_peak,
            "gpu_utilization_mean_percent": util_mean,
            "gpu_utilization_peak_percent": util_peak,
            "gpu_unavailable_reason": self.gpu.reason,
            "disk_outputs_mb": _mb(sum(tree_size_bytes(p) for p in outputs if os.path.exists(p))),
        }
