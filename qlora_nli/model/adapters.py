"""LoRA adapters: attach them for training, save them, load them for inference, and the one check of an
adapter directory (its config and the safetensors header) before any weights load."""
import hashlib
import json
import logging
import pickle
from pathlib import Path

import torch

from qlora_nli.model.embedded import EMBEDDED_MODELS, cache_dir
from qlora_nli.model.loading import (
    check_lora_layers,
    dequantize_4bit_layers,
    load_base_model,
)
from qlora_nli.runtime.errors import ArtifactError, ModelLoadError

log = logging.getLogger(__name__)


def attach_lora(model, lora_params, gradient_checkpointing=False):
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if getattr(model, "is_loaded_in_4bit", False):
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    targets, layers = lora_params["target_modules"], None
    if lora_params["layers"] != "all":
        # Adapting only the last N blocks: backward stops at the lowest adapted block, and the blocks below it
        # keep no activations for it: fewer adapted blocks, faster steps and less memory.
        n_blocks = model.config.num_hidden_layers
        check_lora_layers(lora_params["layers"], n_blocks)
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


RETRAIN = "rerun `dvc repro finetune` with the current model.name"


def load_adapter(model, adapter_dir, fix=RETRAIN):
    """The saved LoRA adapter on `model`; check it first with artifacts.check_adapter_dir (before the base loads).
    An adapter that does not fit raises ModelLoadError ending in `fix`."""
    from peft import PeftModel

    try:
        model = PeftModel.from_pretrained(model, adapter_dir, is_trainable=False)
    except (OSError, ValueError, KeyError, RuntimeError) as e:  # damaged weights, or trained on another base model
        reason = " ".join(str(e).split())[:160]
        raise ModelLoadError(f"{adapter_dir}: does not fit the base model ({type(e).__name__}: {reason}); {fix}")
    unused = adapter_weights_left_out(model, adapter_dir)
    if unused:
        raise ModelLoadError(f"{adapter_dir}: does not fit the base model ({len(unused)} of its weights match no "
                             f"layer, e.g. {unused[0]}); {fix}")
    return model


def adapter_weights_left_out(model, adapter_dir):
    """Saved LoRA weights that found no layer. peft attaches an adapter to every layer whose name matches and
    skips the rest without an error, so an adapter of another architecture with some equal layer names and shapes
    would load in part and predict quietly wrong."""
    from peft import get_peft_model_state_dict
    from safetensors import safe_open

    weights = Path(adapter_dir) / "adapter_model.safetensors"
    if not weights.is_file():  # an older .bin adapter: nothing to compare by name without unpickling it
        return []
    with safe_open(weights, "pt") as f:
        saved = set(f.keys())
    return sorted(saved - set(get_peft_model_state_dict(model)))


def load_for_inference(model_params, device, adapter_dir=None, adapter_fix=RETRAIN):
    """The frozen base model (plus the adapter in `adapter_dir`, if given) ready to score or generate. On CPU the 4-bit
    weights are dequantized once (bitsandbytes' CPU path dequantizes every weight on every call, into the very
    values kept here) and the adapter is merged into them, so a forward pass is the base model's plain matmuls
    without LoRA's small extra ones, at the cost of holding the block weights in the compute dtype. Merging changes
    only the rounding of W x + B A x: scores move by about 1e-5 (docs/performance.md). On a GPU the weights stay
    4-bit (memory is what QLoRA saves there) and the adapter stays separate."""
    model = load_base_model(model_params, device)
    if device == "cpu":
        dequantize_4bit_layers(model)
    if adapter_dir is not None:
        model = load_adapter(model, adapter_dir, adapter_fix)
        if device == "cpu":
            model = model.merge_and_unload(safe_merge=True)  # safe: a NaN in the sum stops the merge
    model.eval()
    return model


def save_adapter(model, directory):
    """`model.save_pretrained(directory)` (the LoRA weights only), written so that the same params and data give
    byte-identical files on every run and machine, and so the same hash in dvc.lock: peft writes set-valued config
    fields (target_modules) as a list in hash order, which changes from process to process, and names the base model by
    the directory it was loaded from, which for an embedded model is a per-user cache path."""
    model.save_pretrained(directory)
    for name, config in model.peft_config.items():
        adapter_dir = Path(directory) if name == "default" else Path(directory) / name  # peft's layout
        base = config.base_model_name_or_path
        portable = _portable_model_name(base)
        config_path = adapter_dir / "adapter_config.json"
        saved = json.loads(config_path.read_text())
        for key, value in config.to_dict().items():
            if isinstance(value, set):
                saved[key] = sorted(saved[key])
        if base:
            saved["base_model_name_or_path"] = portable
            card = adapter_dir / "README.md"  # peft's model card names the base model too
            if card.is_file() and portable != base:
                card.write_text(card.read_text().replace(base, portable))
        config_path.write_text(json.dumps(saved, indent=2, sort_keys=True))  # peft's own format, keys sorted


def _portable_model_name(path):
    """The alias of an embedded model for its converted directory in the user cache; any other name as it is."""
    for alias in EMBEDDED_MODELS:
        if path and Path(path) == cache_dir() / alias.split(":", 1)[1]:
            return alias
    return path
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")


ADAPTER_FIX = "rerun `dvc repro finetune`, or `dvc checkout models/adapter` for the one dvc.lock names"


def check_adapter_dir(path, option=None, or_else=""):
    """A LoRA adapter directory as `finetune` saves it, checked before any base model loads (which takes much longer):
    adapter_config.json is a JSON object naming its peft_type, and the weights can be read (`check_weights_file`).
    `option` is the command-line option that named the directory ("--adapter"), None for the pipeline's
    models/adapter; `or_else` ends the line of a missing directory (what leaving the option out does instead).
    Every problem is one ArtifactError line naming the file. Returns the directory as a Path."""
    path = Path(path)
    shown = f"{option} {path}" if option else str(path)
    if not path.is_dir():
        state = ("no such directory" if option else "missing") if not path.exists() else "not a directory"
        fix = ("train one with `dvc repro finetune` (it writes models/adapter) or restore the committed one with "
               "`dvc checkout models/adapter`" if option else ADAPTER_FIX)
        raise ArtifactError(f"{shown}: {state}; {fix}{or_else}")
    config = path / "adapter_config.json"
    if not config.is_file():
        fix = "give the directory that `finetune` wrote (models/adapter)" if option else ADAPTER_FIX
        raise ArtifactError(f"{shown}: no adapter_config.json in it, the adapter is incomplete; {fix}")
    try:
        document = json.loads(config.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ArtifactError(f"{config} line {e.lineno}: not valid JSON ({e.msg} at column {e.colno}), the file is "
                            f"truncated or damaged; {ADAPTER_FIX}")
    except (OSError, ValueError, RecursionError) as e:  # unreadable, not UTF-8, nested too deep
        raise ArtifactError(f"{config}: cannot be read as JSON ({type(e).__name__}), the file is damaged; "
                            f"{ADAPTER_FIX}")
    if not isinstance(document, dict) or not isinstance(document.get("peft_type"), str):
        raise ArtifactError(f"{config}: not a peft adapter config (no peft_type string); {ADAPTER_FIX}")
    weights = next((path / name for name in ADAPTER_WEIGHTS if (path / name).is_file()), None)
    if weights is None:
        raise ArtifactError(f"{shown}: no adapter weights ({' or '.join(ADAPTER_WEIGHTS)}), the adapter is "
                            f"incomplete; {ADAPTER_FIX}")
    check_weights_file(weights, ADAPTER_FIX)
    return path


def check_weights_file(path, fix, error=ArtifactError):
    """Raise `error` (one line, ending in `fix`) unless the weights file `path` can be read: for safetensors,
    its header parses and the file is exactly as long as the header's last tensor ends (what safetensors itself checks
    on opening, without reading the tensors); a .bin loads as tensors only (weights_only, nothing in it runs)."""
    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors import SafetensorError, safe_open
            try:
                with safe_open(path, "pt") as weights:
                    n_tensors = len(list(weights.keys()))
            except SafetensorError as e:
                reason = " ".join(str(e).split())[:120]
                raise error(f"{path}: cannot be read ({reason}), the file is truncated or damaged; {fix}")
        else:
            import torch
            try:
                n_tensors = len(torch.load(path, map_location="cpu", weights_only=True))
            except (RuntimeError, EOFError, ValueError, TypeError, pickle.UnpicklingError) as e:
                raise error(f"{path}: cannot be read ({type(e).__name__}), the file is truncated, damaged or "
                                    f"holds more than tensors; {fix}")
    except OSError as e:
        raise error(f"{path}: cannot read it ({e.strerror or type(e).__name__}); {fix}")
    if not n_tensors:
        raise error(f"{path}: holds no tensors; {fix}")


def adapter_sha256(adapter_dir):
    """sha256 of the adapter's weights file: what a model card names to say which adapter it describes."""
    weights = Path(adapter_dir) / ADAPTER_WEIGHTS[0]
    return hashlib.sha256(weights.read_bytes()).hexdigest() if weights.is_file() else None
