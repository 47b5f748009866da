"""GPU check at the target model's size without its weights: random-weight models built from Phi-2's and SmolLM2-135M's
configurations, fine-tuned and evaluated by the real stages, timed and measured. Results: one JSON file and a table.

Random weights run the same kernels, 4-bit quantization, LoRA layers and all-reduce as trained ones, so speed, memory
and the 1-vs-2-process agreement are measured; accuracy is not (the weights know nothing).

    python benchmarks/gpu_check.py pack [--pack .gpu_check]
        Here, with the project's venv (gguf, pip, the SNLI mirror): writes into the ignored folder --pack what a bare
        GPU machine lacks: the embedded model's tokenizer (tokenizer.json) and SmolLM2-135M's config, both read from
        the embedded GGUF; a copy of the SNLI/MNLI files of NLI_DATA_MIRROR that the default params read; the pinned
        bitsandbytes wheel (pip download --no-deps). docs/gpu.md: how to run the check there (benchmarks/gpu_check.sh).
    python benchmarks/gpu_check.py run [--pack .gpu_check] [--plan phi-2:bfloat16:1,smollm2-135m:float16:2,...]
                                       [--epochs 1] [--budget-seconds 400]
                                       [--model-config NAME=CONFIG.json] [--tokenizer DIR] [--set group.key=value]
                                       [--workdir DIR] [--out benchmarks/results/gpu_check.json]

Per model: a random-weight directory (save_pretrained of the config, seed 0, the tokenizer beside it), written once.
Per run (model:compute dtype:processes of --plan, in its order): a working directory with params.yaml (the
repository's params.yaml, model.name = the directory, model.compute_dtype, train.epochs = --epochs, then each --set)
and the sample that `stages.prepare` wrote once; then, without DVC, `python -m stages.finetune`, `stages.evaluate
baseline` (1-process runs only: 2-process scoring is byte-identical to 1 process, tests/unit/runtime/test_ranks.py) and
`stages.evaluate finetuned`; 2 processes through NLI_TORCHRUN=2. A run that would not end inside
--budget-seconds (judged by the same model's runs so far) is skipped and recorded as skipped. The JSON is rewritten
after every run, so a killed check leaves the runs it finished.

Recorded per run:
  seconds per epoch, and 5 epochs: measured when --epochs is 5, else the mean epoch times 5, marked "projected"
  peak GPU memory: torch.cuda.max_memory_allocated and max_memory_reserved of finetune's rank 0 (its
                   metrics/train.json), and the device's used memory sampled through NVML by this script while each
                   stage ran (all ranks, every stage)
  train tokens/s   (prompt + answer tokens per example) x examples x epochs / training seconds
  useful FLOP/s    benchmarks/flops.py's useful FLOPs of an epoch (the model's dims from a meta-device copy with the
                   same LoRA) / mean epoch seconds, as % of the matmul peak measured here (bf16 8192^3 torch.mm on a
                   GPU, fp32 2048^3 on CPU) and of the chip's datasheet dense bf16 peak where known
  eval pairs/s     metrics/<model>.json pairs_per_second (all pairs scored / scoring seconds)
  1 vs 2 processes every step loss of both runs (unrounded, from the last checkpoint's history): the largest relative
                   difference against the CPU test's tolerance (qlora_nli.runtime.distributed.SAME_RESULT_RELATIVE); not
                   comparable under dropout in the frozen base (Phi-2's resid_pdrop): each rank draws its own masks
Also: the versions of torch, transformers, peft, accelerate, bitsandbytes, tokenizers and safetensors found, against
requirements.txt.
"""
import importlib.util
import json
import logging
import math
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/common.py, when run from anywhere

from common import REPO, fmt, parse_value  # noqa: E402

from qlora_nli.runtime.distributed import SAME_RESULT_RELATIVE
from qlora_nli.runtime.errors import ArgumentParser
from qlora_nli.runtime.files import write_json

log = logging.getLogger("gpu_check")

# microsoft/phi-2's published config.json (PhiForCausalLM); bos/eos/pad are set to the tokenizer's ids when the
# directory is written. Its vocabulary (51,200) is larger than the embedded tokenizer's (49,152): with random weights
# the rows no token reaches are never used; the work per token is Phi-2's.
PHI_2 = {"model_type": "phi", "architectures": ["PhiForCausalLM"], "vocab_size": 51200, "hidden_size": 2560,
         "intermediate_size": 10240, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32,
         "partial_rotary_factor": 0.4, "rope_theta": 10000.0, "hidden_act": "gelu_new",
         "max_position_embeddings": 2048, "layer_norm_eps": 1e-5, "initializer_range": 0.02, "resid_pdrop": 0.1,
         "embd_pdrop": 0.0, "attention_dropout": 0.0, "qk_layernorm": False, "tie_word_embeddings": False}
EMBEDDED = "embedded:smollm2-135m-instruct"
SMOLLM2 = "smollm2-135m"  # config read from the embedded GGUF by `pack`, into <pack>/smollm2-135m.json
PINNED = ("torch", "transformers", "peft", "accelerate", "bitsandbytes", "tokenizers", "safetensors")
# Dense (no sparsity) datasheet peaks, by a part of the name torch reports.
DATASHEET_BF16 = {"H200": 989e12, "H100 80GB HBM3": 989e12, "A100": 312e12}
T4_FP16_DATASHEET = 65e12
# First what matters most when the budget ends the check: Phi-2's speed and memory, then the 1-vs-2-process agreement
# on the model without dropout, bf16 before fp16; Phi-2 on 2 processes last (2 ranks on one GPU share its time).
DEFAULT_PLAN = ("phi-2:bfloat16:1", f"{SMOLLM2}:bfloat16:1", f"{SMOLLM2}:bfloat16:2", "phi-2:float16:1",
                f"{SMOLLM2}:float16:1", f"{SMOLLM2}:float16:2", "phi-2:bfloat16:2", "phi-2:float16:2")
TARGET_EPOCHS = 5  # the seeds' figure: 5 epochs on 1,000 pairs
DROPOUT_KEYS = ("resid_pdrop", "embd_pdrop", "attention_dropout", "hidden_dropout", "dropout")
SHIMS = Path(__file__).resolve().parent / "gpu_check_shims"


def parse_args(argv=None):
    parser = ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    pack = sub.add_parser("pack", help="write what a bare GPU machine lacks into --pack (run here)")
    pack.add_argument("--pack", default=str(REPO / ".gpu_check"))
    run = sub.add_parser("run", help="build the models, run the stages, write the JSON")
    run.add_argument("--pack", default=str(REPO / ".gpu_check"))
    run.add_argument("--model-config", action="append", default=[], metavar="NAME=CONFIG.json",
                     help="another model: a config.json with model_type (tests use a tiny one)")
    run.add_argument("--tokenizer", help="tokenizer directory (default: <pack>/tokenizer)")
    run.add_argument("--plan", default=",".join(DEFAULT_PLAN), help="model:dtype:processes,... in this order")
    run.add_argument("--epochs", type=int, default=1)
    run.add_argument("--budget-seconds", type=float, default=400)
    run.add_argument("--set", action="append", default=[], metavar="group.key=value")
    run.add_argument("--workdir", default="/tmp/gpu_check")
    run.add_argument("--out", default=str(REPO / "benchmarks/results/gpu_check.json"))
    child = sub.add_parser("model", help="(internal) write one model directory and measure the device")
    child.add_argument("--spec", required=True)
    child.add_argument("--result", required=True)
    return parser.parse_args(argv)


# ------------------------------------------------------------------------------------------------------------------
# pack: here, where gguf, pip and the data mirror are
# ------------------------------------------------------------------------------------------------------------------

def pinned_versions():
    """{package: (operator, version)} of requirements.txt."""
    pins = {}
    for line in (REPO / "requirements.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        for op in ("==", ">="):
            if op in line:
                name, version = line.split(op, 1)
                pins[name.strip().lower()] = (op, version.strip())
                break
    return pins


def pack(args):
    from transformers import AutoConfig, AutoTokenizer

    from qlora_nli.data.sources import mirror_directory
    from qlora_nli.model import embedded

    out = Path(args.pack)
    out.mkdir(parents=True, exist_ok=True)
    gguf = embedded.embedded_gguf_path(EMBEDDED)
    log.info("tokenizer and config of %s", gguf.name)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    shutil.rmtree(out / "tokenizer", ignore_errors=True)
    tokenizer.save_pretrained(out / "tokenizer")
    config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name).to_dict()
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path", "transformers_version"):
        config.pop(key, None)
    write_json(out / f"{SMOLLM2}.json", config)

    mirror = mirror_directory()
    if mirror is None:
        sys.exit("pack: set NLI_DATA_MIRROR to the directory holding snli/ and mnli/ (the offline SNLI sample)")
    shutil.rmtree(out / "data", ignore_errors=True)
    for path in sorted(mirror.rglob("*")):  # the files only: a read-only mirror's modes would stick to the copy
        if path.is_file() and not path.name.startswith("."):
            (out / "data" / path.relative_to(mirror)).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, out / "data" / path.relative_to(mirror))

    op, version = pinned_versions()["bitsandbytes"]
    wheels = out / "wheels"
    shutil.rmtree(wheels, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                    "--python-version", "3.12", "--implementation", "cp", "--platform", "manylinux_2_24_x86_64",
                    "--platform", "manylinux_2_28_x86_64", "--platform", "manylinux_2_17_x86_64",
                    "--platform", "manylinux2014_x86_64", "-d", str(wheels), f"bitsandbytes{op}{version}"], check=True)
    sizes = {p.relative_to(out).as_posix(): p.stat().st_size for p in sorted(out.rglob("*")) if p.is_file()}
    log.info("%s: %.1f MiB in %d files", out, sum(sizes.values()) / 2**20, len(sizes))


# ------------------------------------------------------------------------------------------------------------------
# child: one model directory (random weights) and the device's peak, in a process of its own
# ------------------------------------------------------------------------------------------------------------------

def matmul_peak(device):
    """Best FLOP/s of torch.mm: bf16 8192^3 on a GPU (the chip's dense bf16 rate), fp32 on CPU (benchmarks/common)."""
    import torch

    if device != "cuda":
        from common import child_matmul
        best = child_matmul({"threads": [0]})["threads"]["0"]["best_flops_per_second"]
        return {"dtype": "float32", "flops_per_second": best}
    n = 8192
    a, b = (torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        torch.mm(a, b)
    rates = []
    for _ in range(10):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        torch.mm(a, b)
        stop.record()
        stop.synchronize()
        rates.append(2 * n**3 / (start.elapsed_time(stop) / 1e3))
    return {"dtype": "bfloat16", "flops_per_second": round(max(rates))}


def child_model(spec):
    """Write the model directory of `spec` (unless it exists) and report the device and, if asked, its peak."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    device = "cuda" if torch.cuda.is_available() else "cpu"
    out = {"device": device, "gpu_name": torch.cuda.get_device_name(0) if device == "cuda" else None}
    target = Path(spec["directory"])
    if not (target / "config.json").exists():
        tokenizer = AutoTokenizer.from_pretrained(spec["tokenizer"])
        config = dict(spec["config"])
        model_type = config.pop("model_type")
        ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
               "pad_token_id": tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id}
        config.update({k: v for k, v in ids.items() if v is not None})
        config = AutoConfig.for_model(model_type, **config)
        if config.vocab_size < len(tokenizer):
            raise SystemExit(f"{spec['name']}: vocab_size {config.vocab_size} < the tokenizer's {len(tokenizer)}")
        started = time.perf_counter()
        torch.manual_seed(0)
        dtype = torch.bfloat16 if device == "cuda" else torch.float32
        with torch.device(device):  # random init on the GPU: seconds, not minutes, at 2.7B parameters
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        tmp = target.with_name(target.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        tmp.rename(target)
        out["write_seconds"] = round(time.perf_counter() - started, 1)
        out["saved_dtype"] = str(dtype).replace("torch.", "")
        del model
    if spec.get("peak"):
        out["matmul_peak"] = matmul_peak(device)
    Path(spec["result"]).write_text(json.dumps(out))


# ------------------------------------------------------------------------------------------------------------------
# parent: the runs
# ------------------------------------------------------------------------------------------------------------------

def versions():
    pins = pinned_versions()
    out = {}
    for name in PINNED:
        try:
            found = metadata.version(name)
        except metadata.PackageNotFoundError:
            found = None
        op, pinned = pins.get(name, (None, None))
        out[name] = {"found": found, "required": f"{op}{pinned}" if pinned else None,
                     "matches": None if not (found and pinned) else (
                         found == pinned if op == "==" else _version_tuple(found) >= _version_tuple(pinned))}
    return out


def _version_tuple(text):
    parts = []
    for piece in text.split("+")[0].split("."):
        digits = "".join(c for c in piece if c.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


def model_configs(args):
    """{name: config dict}: the built-in Phi-2, SmolLM2 from the pack, and each --model-config."""
    configs = {"phi-2": PHI_2}
    smollm2 = Path(args.pack) / f"{SMOLLM2}.json"
    if smollm2.is_file():
        configs[SMOLLM2] = json.loads(smollm2.read_text())
    for item in args.model_config:
        name, _, path = item.partition("=")
        configs[name] = json.loads(Path(path).read_text())
    return configs


def dvclive_standin():
    """True where the stages get benchmarks/gpu_check_shims/dvclive: dvclive is missing, or GPU_CHECK_DVCLIVE_STANDIN=1
    asks for it (the CPU test runs the stand-in through the stages too)."""
    return importlib.util.find_spec("dvclive") is None or os.environ.get("GPU_CHECK_DVCLIVE_STANDIN") == "1"


def child_env(processes):
    """The stages' environment: this checkout first on PYTHONPATH (and the dvclive stand-in if dvclive is missing)."""
    paths = [str(REPO)]
    if dvclive_standin():
        paths.append(str(SHIMS))
    if os.environ.get("PYTHONPATH"):
        paths.append(os.environ["PYTHONPATH"])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths), "TOKENIZERS_PARALLELISM": "false"}
    env.pop("NLI_TORCHRUN", None)
    if processes > 1:
        env["NLI_TORCHRUN"] = str(processes)
    return env


class DeviceMemory:
    """Peak of the GPU's used memory (NVML, every 0.2 s) while the block runs; None without a GPU or pynvml."""

    def __init__(self, enabled):
        self.handle, self.peak, self.before = None, None, None
        if enabled:
            try:
                import pynvml
                pynvml.nvmlInit()
                self.nvml, self.handle = pynvml, pynvml.nvmlDeviceGetHandleByIndex(0)
            except Exception as e:  # no NVML library: the stages' own torch figures remain
                log.info("NVML unavailable: %s", e)

    def _used(self):
        return self.nvml.nvmlDeviceGetMemoryInfo(self.handle).used / 2**20

    def __enter__(self):
        if self.handle is not None:
            self.before = self.peak = self._used()
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()
        return self

    def _run(self):
        while not self._stop.wait(0.2):
            self.peak = max(self.peak, self._used())

    def __exit__(self, *exc):
        if self.handle is not None:
            self._stop.set()
            self._thread.join()
        return False


def run_stage(command, cwd, env, log_path, timeout, gpu):
    """`python COMMAND...` in `cwd`: (exit code or "timeout", seconds, device memory peak MB, before MB); its output
    goes to `log_path`."""
    started = time.perf_counter()
    with open(log_path, "w") as out, DeviceMemory(gpu) as memory:
        proc = subprocess.Popen([sys.executable, *command], cwd=cwd, env=env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # torchrun and its ranks with it
            proc.wait()
            code = "timeout"
    seconds = time.perf_counter() - started
    peak = round(memory.peak, 1) if memory.peak is not None else None
    before = round(memory.before, 1) if memory.before is not None else None
    return code, round(seconds, 1), peak, before


def tail(path, n=1500):
    text = Path(path).read_text(errors="replace") if Path(path).exists() else ""
    return text[-n:]


def base_params(overrides):
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    for item in overrides:
        key, _, value = item.partition("=")
        group, name = key.split(".", 1)
        params[group][name] = parse_value(value)
    return params


def prepare_data(workdir, params, env):
    """stages.prepare once, in workdir/data-prep; every run copies its data/."""
    from qlora_nli.config import check_params

    root = workdir / "data-prep"
    root.mkdir(parents=True, exist_ok=True)
    check_params(params)  # a bad --set stops here, with the params' own message
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    code, seconds, _, _ = run_stage(["-m", "stages.prepare"], root, env, root / "prepare.log", None, False)
    if code != 0:
        raise SystemExit(f"gpu_check: stages.prepare failed ({code}); see {root / 'prepare.log'}:\n"
                         f"{tail(root / 'prepare.log')}")
    log.info("prepared the sample in %.0f s", seconds)
    return root / "data"


def model_dims(config, lora, train):
    """benchmarks/flops.py's sizes of `config` with the params' LoRA, from a meta-device copy (no weights)."""
    import torch
    from flops import model_dims as dims_of
    from transformers import AutoConfig, AutoModelForCausalLM

    from qlora_nli.model import adapters, loading

    config = dict(config)
    config = AutoConfig.for_model(config.pop("model_type"), **config)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
        total = loading.count_parameters(model)["total"]
        model = adapters.attach_lora(model, lora, train["gradient_checkpointing"])
    return dims_of(model, total, loading.count_parameters(model)["trainable"], {"train": train})


def epoch_counts(tokenizer_dir, data_dir, template):
    """The useful-FLOP counts of one epoch over data/train.jsonl, with the stages' tokenization."""
    from qlora_nli.data.artifacts import data_row_problem, read_rows
    from qlora_nli.model import loading
    from qlora_nli.prompts import encode_answers, encode_prompts, format_prompt

    tokenizer = loading.load_tokenizer(str(tokenizer_dir))
    rows = read_rows(data_dir / "train.jsonl", data_row_problem)
    answers = encode_answers(tokenizer)
    prompts = encode_prompts(tokenizer, [format_prompt(template, r) for r in rows])
    lengths = [len(p) + len(answers[r["label"]]) for p, r in zip(prompts, rows)]
    return {"examples": len(rows), "real_tokens": sum(lengths),
            "answer_tokens": sum(len(answers[r["label"]]) for r in rows),
            "attn_pairs_real": sum(n * (n + 1) // 2 for n in lengths)}


def step_losses(root):
    """Every step's loss, unrounded, from the history in the newest checkpoint."""
    import torch

    found = sorted((root / "checkpoints").glob("epoch-*"), key=lambda p: int(p.name.split("-")[1]))
    if not found:
        return None
    # map_location: the optimizer state was saved on the GPU; loading it there would give this process a CUDA context
    state = torch.load(found[-1] / "state.pt", weights_only=True, map_location="cpu")
    return [s["loss"] for s in state["history"]["steps"]]


def summarize_run(run, root, dims, counts, peak, datasheet, epochs):
    """The figures of one finished run, from its metrics files."""
    from flops import useful_total

    train = json.loads((root / "metrics/train.json").read_text())
    per_epoch = train["time"]["per_epoch_seconds"]
    mean_epoch = sum(per_epoch) / len(per_epoch)
    resources = train["resources"]
    useful = useful_total(dims, counts) / mean_epoch
    run.update({
        "device": train["device"], "world_size": train["world_size"], "backend": train["backend"],
        "optimizer": train["optimizer"], "epochs": train["epochs"],
        "seconds_per_epoch": per_epoch,
        "seconds_5_epochs": round(train["time"]["total_seconds"] if epochs == TARGET_EPOCHS
                                  else TARGET_EPOCHS * mean_epoch, 1),
        "seconds_5_epochs_is": "measured" if epochs == TARGET_EPOCHS else
                               f"projected: mean of {epochs} epoch(s) x {TARGET_EPOCHS}",
        "train_tokens_per_second": train["throughput"]["tokens_per_second"],
        "train_examples_per_second": train["throughput"]["examples_per_second"],
        "useful_flops_per_epoch": useful_total(dims, counts),
        "useful_flops_per_second": round(useful),
        "useful_percent_of_measured_peak": round(100 * useful / peak["flops_per_second"], 3),
        "useful_percent_of_datasheet_bf16_peak": round(100 * useful / datasheet, 3) if datasheet else None,
        "torch_max_memory_allocated_mb": resources["torch_max_memory_allocated_mb"],
        "torch_max_memory_reserved_mb": resources.get("torch_max_memory_reserved_mb"),
        "gpu_memory_used_peak_mb_rank0_pynvml": resources["gpu_memory_used_peak_mb"],
        "process_rss_peak_mb": resources["process_rss_peak_mb"],
        "train_loss_per_epoch": train["train_loss_per_epoch"], "val_loss_per_epoch": train["val_loss_per_epoch"],
        "step_losses": step_losses(root),
        "parameters": train["parameters"],
    })
    if datasheet:
        # the same share of peak on a T4's fp16 tensor cores: a projection, not a measurement
        run["t4_projection_seconds_5_epochs"] = round(run["seconds_5_epochs"] * datasheet / T4_FP16_DATASHEET)
    run["evaluate"] = {}
    for name in ("baseline", "finetuned"):
        path = root / f"metrics/{name}.json"
        if path.exists():
            m = json.loads(path.read_text())
            run["evaluate"][name] = {"pairs_scored": m["pairs_scored"], "eval_seconds": m["eval_seconds"],
                                     "pairs_per_second": m["pairs_per_second"]}


def compare_processes(runs, configs):
    """Per model and dtype: the 1-process step losses against every multi-process run's."""
    out = []
    for run in runs:
        if run.get("status") != "ok" or run["processes"] == 1:
            continue
        one = next((r for r in runs if r.get("status") == "ok" and r["processes"] == 1
                    and (r["model"], r["compute_dtype"]) == (run["model"], run["compute_dtype"])), None)
        if one is None or not one.get("step_losses") or not run.get("step_losses"):
            continue
        a, b = one["step_losses"], run["step_losses"]
        finite = all(math.isfinite(x) for x in a + b)
        worst = max(abs(x - y) / max(abs(x), 1e-12) for x, y in zip(a, b)) if finite and len(a) == len(b) else None
        dropout = {k: v for k, v in configs[run["model"]].items() if k in DROPOUT_KEYS and v}
        out.append({"model": run["model"], "compute_dtype": run["compute_dtype"], "processes": [1, run["processes"]],
                    "steps": [len(a), len(b)], "max_relative_difference": worst, "tolerance": SAME_RESULT_RELATIVE,
                    "within_tolerance": worst is not None and worst <= SAME_RESULT_RELATIVE,
                    "comparable": not dropout,
                    "note": (f"dropout in the model ({dropout}): each rank draws its own masks, so the losses "
                             f"differ by design" if dropout else
                             "same batches, same gradient sum; only the order of summation differs")})
    return out


def print_table(report):
    head = (f"{'model':14s} {'dtype':9s} {'proc':>4s} {'s/epoch':>8s} {'5 ep s':>8s} {'alloc MB':>9s} "
            f"{'resv MB':>9s} {'dev MB':>8s} {'tok/s':>9s} {'%peak':>7s} {'base p/s':>9s} {'ft p/s':>8s}  status")
    lines = [head]
    for r in report["runs"]:
        ev = r.get("evaluate", {})
        mean = sum(r["seconds_per_epoch"]) / len(r["seconds_per_epoch"]) if r.get("seconds_per_epoch") else None
        lines.append(
            f"{r['model']:14s} {r['compute_dtype']:9s} {r['processes']:>4d} {fmt(mean):>8s} "
            f"{fmt(r.get('seconds_5_epochs')):>8s} {fmt(r.get('torch_max_memory_allocated_mb')):>9s} "
            f"{fmt(r.get('torch_max_memory_reserved_mb')):>9s} {fmt(r.get('device_memory_peak_mb')):>8s} "
            f"{fmt(r.get('train_tokens_per_second')):>9s} {fmt(r.get('useful_percent_of_measured_peak'), 2):>7s} "
            f"{fmt(ev.get('baseline', {}).get('pairs_per_second'), 1):>9s} "
            f"{fmt(ev.get('finetuned', {}).get('pairs_per_second'), 1):>8s}  {r['status']}")
    for c in report["process_agreement"]:
        worst = c["max_relative_difference"]
        verdict = ("within" if c["within_tolerance"] else "outside") + f" {c['tolerance']:g}"
        lines.append(f"1 vs {c['processes'][1]} processes, {c['model']} {c['compute_dtype']}: max relative step-loss "
                     f"difference {'-' if worst is None else f'{worst:.2e}'} "
                     f"({verdict}{'' if c['comparable'] else '; not comparable: ' + c['note']})")
    if report["runs"] and any(r.get("seconds_5_epochs_is", "").startswith("projected") for r in report["runs"]):
        lines.append(f"5 ep s: projected from {report['settings']['epochs']} measured epoch(s)")
    print("\n".join(lines), flush=True)


def make_model(model, config, tokenizer_dir, workdir, want_peak):
    """The model's directory, written by a child process (which also reports the device, and its peak if asked)."""
    spec = {"name": model, "config": config, "tokenizer": str(tokenizer_dir),
            "directory": str(workdir / "models" / model), "peak": want_peak}
    spec_path, result = workdir / f"{model}.spec.json", workdir / f"{model}.model.json"
    spec_path.write_text(json.dumps(spec))
    code, seconds, _, _ = run_stage([__file__, "model", "--spec", str(spec_path), "--result", str(result)], REPO,
                                    child_env(1), workdir / f"{model}.model.log", None, False)
    if code != 0:
        raise SystemExit(f"gpu_check: writing {model} failed ({code}):\n{tail(workdir / f'{model}.model.log')}")
    return Path(spec["directory"]), {**json.loads(result.read_text()), "seconds": seconds}


def run_one(run, root, directory, params, data_dir, device, deadline):
    """The stages of one run in `root`; fills run["stages"] and run["status"]."""
    shutil.rmtree(root, ignore_errors=True)
    shutil.copytree(data_dir, root / "data")
    run_params = json.loads(json.dumps(params))
    run_params["model"].update(name=str(directory), compute_dtype=run["compute_dtype"])
    (root / "params.yaml").write_text(yaml.safe_dump(run_params, sort_keys=False))
    n = run["processes"]
    stages = [["stages.finetune"]] + ([["stages.evaluate", "baseline"]] if n == 1 else []) + \
        [["stages.evaluate", "finetuned"]]
    run["stages"], run["status"] = {}, "ok"
    for stage in stages:
        name = "_".join(s.replace("stages.", "") for s in stage)
        code, seconds, dev_peak, dev_before = run_stage(["-m", *stage], root, child_env(n), root / f"{name}.log",
                                                        max(deadline - time.perf_counter(), 60), device == "cuda")
        run["stages"][name] = {"seconds": seconds, "exit": code, "device_memory_peak_mb": dev_peak,
                               "device_memory_before_mb": dev_before}
        log.info("%s %s x%d %s: exit %s in %.0f s", run["model"], run["compute_dtype"], n, name, code, seconds)
        if code != 0:
            run["status"] = f"{name} failed ({code})"
            run["log_tail"] = tail(root / f"{name}.log")
            return
    peaks = [s["device_memory_peak_mb"] for s in run["stages"].values() if s["device_memory_peak_mb"]]
    run["device_memory_peak_mb"] = max(peaks) if peaks else None


def plan(args, configs):
    """[(model, dtype, processes)] of --plan, in the order they run."""
    items = [tuple(item.split(":")) for item in args.plan.split(",") if item]
    if any(len(i) != 3 or not i[2].isdigit() or int(i[2]) < 1 for i in items):
        raise SystemExit(f"gpu_check: --plan {args.plan}: give model:dtype:processes items, comma-separated "
                         f"(e.g. phi-2:bfloat16:1)")
    items = [(m, d, int(p)) for m, d, p in items]
    for model, _, _ in items:
        if model not in configs:
            raise SystemExit(f"gpu_check: model {model}: no config (built in: phi-2; {SMOLLM2} after `pack`; "
                             f"others with --model-config {model}=CONFIG.json)")
    return items


def run_check(args):
    started = time.perf_counter()
    deadline = started + args.budget_seconds
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    tokenizer_dir = Path(args.tokenizer or Path(args.pack) / "tokenizer")
    if not (tokenizer_dir / "tokenizer_config.json").is_file():
        raise SystemExit(f"gpu_check: no tokenizer in {tokenizer_dir}; run `python benchmarks/gpu_check.py pack` "
                         f"here first, or give --tokenizer")
    configs = model_configs(args)
    runs = plan(args, configs)
    params = base_params(args.set)
    params["train"]["epochs"] = args.epochs
    data_dir = prepare_data(workdir, params, child_env(1))
    counts = epoch_counts(tokenizer_dir, data_dir, params["prompt"]["template"])
    report = {"generated": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "weights": "random (seed 0): speed, memory and process agreement are measured, accuracy is not",
              "settings": {"plan": [":".join(map(str, r)) for r in runs], "epochs": args.epochs,
                           "budget_seconds": args.budget_seconds, "set": args.set,
                           "train_examples": counts["examples"]},
              "versions": versions(), "python": sys.version.split()[0],
              "dvclive": ("stand-in that records nothing (benchmarks/gpu_check_shims)" if dvclive_standin() else
                          "installed"),
              "t4_projection": "seconds x this chip's datasheet dense bf16 peak / a T4's fp16 peak (65 TFLOP/s): "
                               "the same share of peak assumed, a projection, not a measurement",
              "epoch_counts": counts, "device": None, "gpu_name": None, "matmul_peak": None,
              "datasheet_dense_bf16_peak_flops": None, "models": {}, "runs": [], "process_agreement": []}
    made, durations = {}, {}
    for model, dtype, n in runs:
        run = {"model": model, "compute_dtype": dtype, "processes": n}
        report["runs"].append(run)
        known = durations.get(model, [])
        estimate = max(known) * (1.5 if n > 1 else 1) if known else 0
        if time.perf_counter() + estimate > deadline:
            run["status"] = (f"skipped: {time.perf_counter() - started:.0f} s spent, about {estimate:.0f} s more "
                             f"needed, budget {args.budget_seconds:.0f} s")
            log.info("%s %s x%d %s", model, dtype, n, run["status"])
            continue
        if model not in made:
            made[model] = make_model(model, configs[model], tokenizer_dir, workdir, report["matmul_peak"] is None)
            directory, info = made[model]
            if "matmul_peak" in info:
                name = info["gpu_name"]
                report.update({"device": info["device"], "gpu_name": name, "matmul_peak": info["matmul_peak"],
                               "datasheet_dense_bf16_peak_flops": next(
                                   (v for k, v in DATASHEET_BF16.items() if name and k in name), None)})
            dims = model_dims(configs[model], params["lora"], params["train"])
            report["models"][model] = {"config": configs[model], "dims": dims, "directory": info}
            log.info("%s: %.2fB parameters, directory ready in %.0f s", model, dims["parameters_total"] / 1e9,
                     info["seconds"])
        directory, _ = made[model]
        run_started = time.perf_counter()
        root = workdir / "runs" / f"{model}-{dtype}-x{n}"
        run_one(run, root, directory, params, data_dir, report["device"], deadline + 60)
        durations.setdefault(model, []).append(time.perf_counter() - run_started)
        if (root / "metrics/train.json").exists():
            summarize_run(run, root, report["models"][model]["dims"], counts, report["matmul_peak"],
                          report["datasheet_dense_bf16_peak_flops"], args.epochs)
        report["process_agreement"] = compare_processes(report["runs"], configs)
        report["seconds"] = round(time.perf_counter() - started, 1)
        write_json(args.out, report)
    report["seconds"] = round(time.perf_counter() - started, 1)
    write_json(args.out, report)
    print_table(report)
    log.info("wrote %s (%.0f s)", args.out, report["seconds"])
    return report


def main(argv=None):
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    args = parse_args(argv)
    if args.command == "pack":
        pack(args)
    elif args.command == "model":
        spec = json.loads(Path(args.spec).read_text())
        child_model({**spec, "result": args.result})
    else:
        run_check(args)


if __name__ == "__main__":
    main()
