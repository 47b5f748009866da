"""benchmarks/gpu_check.py end to end on CPU: a tiny random Llama through the real stages (fp32), so that the check is
known to work before a GPU runs it; plus its pieces that need no run (the 1-vs-N comparison, the version check)."""
import json
import math
import os
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
from pipeline import REPO
from tiny import make_tokenizer, write_nli_dir

sys.path.insert(0, str(REPO / "benchmarks"))
import gpu_check  # noqa: E402

# The tiny model: 2 blocks of hidden 64, 4 heads of 16 (2 key/value heads: k and v project to 32), MLP 128.
TINY = dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256)
# By hand: per block q 64*64 + k 64*32 + v 64*32 + o 64*64 + gate, up, down 3 * 64*128 = 36,864; 2 blocks.
BODY_LINEAR = 2 * 36_864
# LoRA r=16 on the last block (lora.layers=1) only: r * (in + out) summed = 16 * (128 + 96 + 96 + 128 + 3 * 192)
LORA = 16 * 1_024
SMALL = ["data.n_train=24", "data.n_val=6", "data.n_test=9", "data.extra_sets=null", "train.batch_size=8",
         "compute.num_threads=1", "evaluate.batch_size=4", "evaluate.probes=[]", "lora.layers=1"]
EPOCHS = 2


def check(tmp_path, plan):
    tokenizer = make_tokenizer()
    tokenizer.save_pretrained(tmp_path / "tokenizer")
    (tmp_path / "tiny.json").write_text(json.dumps({**TINY, "vocab_size": len(tokenizer)}))
    data = write_nli_dir(tmp_path / "nli")
    out = tmp_path / "check.json"
    command = [sys.executable, str(REPO / "benchmarks/gpu_check.py"), "run", "--model-config",
               f"tiny={tmp_path / 'tiny.json'}", "--tokenizer", str(tmp_path / "tokenizer"), "--plan", plan,
               "--epochs", str(EPOCHS), "--workdir", str(tmp_path / "work"), "--out", str(out),
               "--set", f"data.source={data}", *[a for item in SMALL for a in ("--set", item)]]
    env = {key: value for key, value in os.environ.items() if key != "NLI_TORCHRUN"}
    env.update(PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}", PYTHONPATH=str(REPO),
               OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", GPU_CHECK_DVCLIVE_STANDIN="1")
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return json.loads(out.read_text()), result.stdout


def assert_run_is_sane(run, report):
    assert run["status"] == "ok", run.get("log_tail")
    assert run["epochs"] == EPOCHS and len(run["seconds_per_epoch"]) == EPOCHS
    assert all(s > 0 for s in run["seconds_per_epoch"])
    # not measured at 5 epochs: the mean epoch times 5, and said so
    assert run["seconds_5_epochs"] == pytest.approx(5 * sum(run["seconds_per_epoch"]) / EPOCHS, abs=0.06)
    assert run["seconds_5_epochs_is"].startswith("projected")
    # 24 examples, 8 a batch: 3 steps an epoch
    assert len(run["step_losses"]) == 3 * EPOCHS and all(math.isfinite(x) and x > 0 for x in run["step_losses"])
    counts = report["epoch_counts"]
    assert counts["examples"] == 24
    seconds = sum(run["seconds_per_epoch"])
    assert run["train_tokens_per_second"] == pytest.approx(counts["real_tokens"] * EPOCHS / seconds, rel=0.01)
    assert 0 < run["useful_percent_of_measured_peak"] < 100
    assert run["torch_max_memory_allocated_mb"] is None  # CPU: not measured, never a zero
    assert run["evaluate"]["finetuned"]["pairs_per_second"] > 0


@pytest.mark.slow
def test_one_process_end_to_end(tmp_path):
    report, table = check(tmp_path, "tiny:float32:1")
    assert report["weights"].startswith("random")
    dims = report["models"]["tiny"]["dims"]
    assert (dims["n_body_linear"], dims["n_lora"], dims["n_backward_layers"]) == (BODY_LINEAR, LORA, 1)
    (run,) = report["runs"]
    assert_run_is_sane(run, report)
    # 9 test + 6 validation pairs (no probes, no extra sets)
    assert run["evaluate"]["baseline"]["pairs_scored"] == run["evaluate"]["finetuned"]["pairs_scored"] == 15
    assert run["evaluate"]["baseline"]["pairs_per_second"] > 0
    assert run["world_size"] == 1 and report["process_agreement"] == []
    assert report["dvclive"].startswith("stand-in")
    assert report["versions"]["peft"]["found"] == metadata.version("peft")
    assert report["versions"]["peft"]["required"] == "==" + re.search(
        r"^peft==(\S+)", (REPO / "requirements.txt").read_text(), re.M).group(1)
    assert re.search(r"^tiny\s+float32\s+1\s.*\sok$", table, re.M)


@pytest.mark.slow
def test_two_processes_give_the_one_process_losses(tmp_path):
    report, table = check(tmp_path, "tiny:float32:1,tiny:float32:2")
    one, two = report["runs"]
    for run in (one, two):
        assert_run_is_sane(run, report)
    assert (two["world_size"], two["backend"]) == (2, "gloo")
    assert "baseline" not in two["evaluate"]  # sharded scoring is compared byte for byte in test_distributed.py
    (agreement,) = report["process_agreement"]
    worst = max(abs(a - b) / abs(a) for a, b in zip(one["step_losses"], two["step_losses"]))
    assert agreement["max_relative_difference"] == pytest.approx(worst)
    assert agreement["comparable"] and agreement["within_tolerance"] and worst <= 1e-4
    assert "1 vs 2 processes, tiny float32" in table


def test_process_agreement_is_judged_per_model_and_dtype():
    def run(model, dtype, n, losses):
        return {"model": model, "compute_dtype": dtype, "processes": n, "status": "ok", "step_losses": losses}

    # a's fp16 run first: the bf16 2-process run must be compared with the bf16 1-process run, not the first found
    runs = [run("a", "float16", 1, [4.0, 4.0]), run("a", "bfloat16", 1, [2.0, 1.0]),
            run("a", "bfloat16", 2, [2.0, 1.0 + 2e-4]), run("b", "bfloat16", 1, [3.0]),
            run("b", "bfloat16", 2, [3.0 * (1 + 5e-5)])]
    configs = {"a": {"resid_pdrop": 0.0}, "b": {"resid_pdrop": 0.1}}
    a, b = gpu_check.compare_processes(runs, configs)
    assert (a["model"], a["compute_dtype"]) == ("a", "bfloat16")  # against a's bf16 run, not its fp16 one
    assert a["max_relative_difference"] == pytest.approx(2e-4) and not a["within_tolerance"] and a["comparable"]
    assert b["max_relative_difference"] == pytest.approx(5e-5) and b["within_tolerance"]
    assert not b["comparable"] and "dropout" in b["note"]


def test_versions_found_are_checked_against_requirements():
    found = gpu_check.versions()
    pinned = re.search(r"^transformers==(\S+)", (REPO / "requirements.txt").read_text(), re.M).group(1)
    assert found["transformers"] == {"found": metadata.version("transformers"), "required": f"=={pinned}",
                                     "matches": metadata.version("transformers") == pinned}
    assert found["torch"]["required"].startswith(">=") and found["torch"]["matches"] is True
    assert gpu_check._version_tuple("2.11.0+cu130") == (2, 11, 0) >= gpu_check._version_tuple("2.4")


def test_phi_2_shape_is_the_published_model():
    dims = gpu_check.model_dims(gpu_check.PHI_2, {"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": "all-linear",
                                                  "layers": 15}, {"gradient_checkpointing": False})
    # Phi-2's 2.78B parameters by hand: embeddings and lm_head 2 * 51200 * 2560, lm_head bias 51200, final norm
    # 2 * 2560; per block q, k, v, dense 4 * (2560^2 + 2560), fc1 2560 * 10240 + 10240, fc2 10240 * 2560 + 2560,
    # norm 2 * 2560
    block = 4 * (2560**2 + 2560) + 2560 * 10240 + 10240 + 10240 * 2560 + 2560 + 2 * 2560
    assert dims["parameters_total"] == 2 * 51200 * 2560 + 51200 + 2 * 2560 + 32 * block
    assert dims["n_body_linear"] == 32 * (4 * 2560**2 + 2 * 2560 * 10240)
    # LoRA r=16 on the last 15 blocks: q, k, v, dense 4 * 16 * 5120 + fc1, fc2 2 * 16 * 12800
    assert dims["n_lora"] == 15 * (4 * 16 * 5120 + 2 * 16 * 12800) and dims["n_backward_layers"] == 15
