"""Model loading: the real embedded GGUF file, 4-bit parameter accounting, device and dtype choice."""
import os
from types import SimpleNamespace

import pytest
import torch

from qlora_nli.model import adapters, embedded, loading
from qlora_nli.runtime.errors import ModelLoadError, ParamsError


@pytest.mark.slow  # converts the real embedded GGUF file
def test_embedded_gguf_converts_and_loads_in_4bit(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    name = "embedded:smollm2-135m-instruct"
    path = embedded.resolve_model_path(name)
    assert (tmp_path / "qlora-nli/models/smollm2-135m-instruct/config.json").exists() and path.startswith(str(tmp_path))
    tokenizer = loading.load_tokenizer(name)
    assert tokenizer.pad_token is not None and len(tokenizer("Premise: a dog runs.").input_ids) > 3
    model = loading.load_base_model({"name": name, "load_in_4bit": True, "compute_dtype": "auto"}, "cpu")
    assert model.config.model_type == "llama" and model.config.num_hidden_layers == 30
    counts = loading.count_parameters(model)
    assert counts["total"] == 134_515_008  # SmolLM2-135M, embeddings tied
    assert counts["numel_as_stored"] < counts["total"]  # packed 4-bit halves numel()
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([tokenizer("Hello").input_ids])).logits
    assert torch.isfinite(logits).all()


def test_compute_dtype_choice():
    assert loading.pick_compute_dtype("cpu") == torch.float32
    assert loading.pick_compute_dtype("cpu", "bfloat16") == torch.bfloat16


@pytest.mark.parametrize("capability, expected", [
    ((7, 5), torch.float16),   # T4 (Turing): bf16 only emulated, slow
    ((7, 0), torch.float16),   # V100 (Volta)
    ((8, 0), torch.bfloat16),  # A100 (Ampere)
    ((8, 9), torch.bfloat16),  # L4 (Ada)
    ((9, 0), torch.bfloat16),  # H100 (Hopper)
])
def test_gpu_compute_dtype_follows_the_capability(monkeypatch, capability, expected):
    """The device queries are faked below torch.cuda.is_bf16_supported, which stays real: on a pre-Ampere GPU it
    answers True by default because bf16 can be emulated there, and emulated bf16 must not be chosen."""
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    properties = SimpleNamespace(major=capability[0], minor=capability[1], name="fake GPU")
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: properties)
    monkeypatch.setattr(torch.cuda, "_check_bf16_tensor_supported", lambda device: True, raising=False)
    assert loading.pick_compute_dtype("cuda") == expected
    assert loading.pick_compute_dtype("cuda", "float32") == torch.float32  # an explicit choice is kept


def test_cuda_requested_without_gpu_is_one_line(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ParamsError, match="compute.device"):
        loading.pick_device("cuda")
    assert loading.pick_device("auto") == "cpu"


def test_lora_attaches_to_tiny_models(tiny_model_dir):
    model = loading.load_base_model({"name": str(tiny_model_dir), "load_in_4bit": True, "compute_dtype": "auto"}, "cpu")
    base = loading.count_parameters(model)
    model = adapters.attach_lora(model, {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": "all-linear",
                                       "layers": "all"})
    after = loading.count_parameters(model)
    # r (in + out) per adapted linear layer, r = 4, hidden 64, key/value 32 (2 of 4 heads), intermediate 128, 2 blocks:
    # Llama q, k, v, o, gate, up, down: 4 (128 + 96 + 96 + 128 + 192 + 192 + 192) = 4096 per block;
    # Phi q, k, v, dense, fc1, fc2: 4 (128 + 96 + 96 + 128 + 192 + 192) = 3328 per block
    assert after["trainable"] == {"llama": 2 * 4096, "phi": 2 * 3328}[model.config.model_type]
    assert after["total"] == base["total"] + after["trainable"]


def test_unloadable_model_is_one_line(tmp_path):
    broken = tmp_path / "not-a-model"
    broken.mkdir()
    with pytest.raises(ModelLoadError) as e:
        loading.load_tokenizer(str(broken))
    message = str(e.value)
    assert "model.name" in message and str(broken) in message and "\n" not in message


def _adapted_blocks(model):
    return {int(name.split(".layers.")[1].split(".")[0]) for name, _ in model.named_parameters() if "lora_A" in name}


def _adapted_names(model):
    return {name.split(".lora_A")[0].rsplit(".", 1)[-1] for name, _ in model.named_parameters() if "lora_A" in name}


def test_lora_on_the_last_blocks_only(tiny_model_dir):
    params = {"name": str(tiny_model_dir), "load_in_4bit": True, "compute_dtype": "auto"}
    lora = {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": "all-linear"}
    every = adapters.attach_lora(loading.load_base_model(params, "cpu"), {**lora, "layers": "all"})
    last = adapters.attach_lora(loading.load_base_model(params, "cpu"), {**lora, "layers": 1})
    assert _adapted_blocks(every) == {0, 1} and _adapted_blocks(last) == {1}
    assert _adapted_names(last) == _adapted_names(every)  # "all-linear" means the same layers within a block
    assert loading.count_parameters(last)["trainable"] * 2 == loading.count_parameters(every)["trainable"]
    listed = adapters.attach_lora(loading.load_base_model(params, "cpu"), {**lora, "target_modules": ["q_proj"],
                                                                           "layers": 1})
    assert _adapted_blocks(listed) == {1} and _adapted_names(listed) == {"q_proj"}


def test_more_lora_layers_than_blocks_is_one_line(tiny_model_dir):
    model = loading.load_base_model({"name": str(tiny_model_dir), "load_in_4bit": True, "compute_dtype": "auto"},
                                     "cpu")
    with pytest.raises(ParamsError) as e:
        adapters.attach_lora(model, {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": "all-linear", "layers": 3})
    message = str(e.value)
    assert "lora.layers = 3" in message and "from 1 to 2" in message and "\n" not in message


def test_4bit_weights_stay_as_loaded_through_inference_on_any_cpu(tiny_model_dir, monkeypatch):
    """On CPUs with AVX512-BF16, bitsandbytes repacks a 4-bit layer at its first inference forward for a bfloat16
    kernel (block scales rounded to bfloat16) and keeps that kernel in training: validation between epochs would
    change the frozen base. Such a CPU is simulated, so that this checks the same on every machine."""
    import bitsandbytes as bnb
    import bitsandbytes.nn.modules

    monkeypatch.setattr(bitsandbytes.nn.modules, "has_avx512bf16", lambda: True)
    model = loading.load_base_model({"name": str(tiny_model_dir), "load_in_4bit": True, "compute_dtype": "auto"},
                                     "cpu")
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    before = [(m.weight.data.clone(), m.weight.quant_state.absmax.clone()) for m in layers]
    assert layers
    with torch.no_grad():
        model(input_ids=torch.tensor([[1, 2, 3, 4]]))
    for m, (weight, absmax) in zip(layers, before):
        assert not getattr(m.weight.quant_state, "packing_format_for_cpu", False)
        assert torch.equal(m.weight.data, weight) and torch.equal(m.weight.quant_state.absmax, absmax)


def test_cpu_description_names_the_vector_width_of_torchs_kernels(monkeypatch):
    """The same run on AVX2 and on AVX-512 kernels differs in the last digits: metrics/train.json says which ran."""
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    assert loading.describe_device("cpu").startswith(f"cpu: {os.cpu_count()} logical cores (AVX512 kernels), ")


# What loading printed that asks for nothing (qlora_nli/__init__.py says why each is harmless); the bitsandbytes one
# only on a CPU with AVX512-BF16, so the script below also logs it the way bitsandbytes does.
HARMLESS = ["Failed to load CPU gemm_4bit_forward from kernels-community", "`is_gradient_checkpointing` is deprecated",
            "Could not find a config file in embedded:smollm2-135m-instruct"]
LOAD_SAVE_RELOAD = """
import logging, sys
from qlora_nli.model import adapters, loading
logging.basicConfig(level=logging.INFO)  # as a stage does (errors.run_stage)
params = {"name": "embedded:smollm2-135m-instruct", "load_in_4bit": True, "compute_dtype": "auto"}
model = adapters.attach_lora(loading.load_base_model(params, "cpu"),
                             {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": "all-linear", "layers": 1})
adapters.save_adapter(model, sys.argv[1])
adapters.load_for_inference(params, "cpu", sys.argv[1])  # reads the alias back from the saved adapter
bnb = logging.getLogger("bitsandbytes.backends.cpu.ops")
bnb.warning("Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please make sure you already "
            "`pip install kernels` and the kernels >= 0.11.1", "offline")
bnb.warning("another bitsandbytes warning")
"""


def test_loading_the_tiny_model_prints_none_of_the_known_harmless_warnings(tmp_path):
    """A fresh interpreter, as a stage is: load in 4-bit, attach LoRA, save, reload the saved adapter."""
    import subprocess
    import sys

    from tiny import make_tiny_model

    make_tiny_model("llama", tmp_path / "cache" / "qlora-nli" / "models" / "smollm2-135m-instruct")
    # Python's default warning filters, as a user's shell has them: FutureWarning and UserWarning show
    environment = {**{k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"},
                   "XDG_CACHE_HOME": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", LOAD_SAVE_RELOAD, str(tmp_path / "adapter")], env=environment,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert [message for message in HARMLESS if message in done.stderr] == [], done.stderr[-3000:]
    assert "another bitsandbytes warning" in done.stderr  # only that message of its logger is dropped
    assert "Warning" not in done.stderr, done.stderr[-3000:]  # and no other warning came up instead
