"""Merge a LoRA adapter into its base and save a standalone Hugging Face model (no peft needed to load it).

The merge goes into the base loaded WITHOUT 4-bit quantization, in float32: each adapted weight becomes
W + (alpha / r) * B @ A, rounded once to the chosen dtype. Merging into the NF4 weights instead (peft's merge on a
4-bit model) would round the sum to the 4-bit grid again, whose steps are coarse next to the small LoRA delta.
"""
import json
import logging
from pathlib import Path

import torch

from qlora_nli import modeling
from qlora_nli.errors import ArtifactError
from qlora_nli.io import atomic_path
from qlora_nli.predict import load_model

log = logging.getLogger(__name__)

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def export_merged(model_params, adapter_dir, out_dir, dtype="float32", overwrite=False):
    """Write base + adapter, merged, as a model directory (weights, config, tokenizer, EXPORT.json) at `out_dir`."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise ArtifactError(f"--out {out_dir}: already exists; choose a new directory, or pass --overwrite to "
                            f"replace it")
    # float32 on the CPU: the sum is exact before the one rounding to `dtype`, and no GPU is needed.
    unquantized = {**model_params, "load_in_4bit": False, "compute_dtype": "float32"}
    model, tokenizer = load_model(unquantized, adapter_dir, "cpu")  # on the CPU the adapter comes merged
    log.info("merged %s into %s (float32); saving it as %s in %s", adapter_dir, model_params["name"], dtype, out_dir)
    merged = model.to(DTYPES[dtype])
    merged.config.use_cache = True  # load_base_model turns the cache off for scoring; generation wants it back
    with atomic_path(out_dir) as tmp:
        merged.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        source = {"base": model_params["name"], "base_path": modeling.resolve_model_path(model_params["name"]),
                  "adapter": str(adapter_dir), "dtype": dtype,
                  "merged_into": "the base without 4-bit quantization, in float32"}
        (tmp / "EXPORT.json").write_text(json.dumps(source, indent=2) + "\n")
    return out_dir
