"""Merge a LoRA adapter into its base and save a standalone Hugging Face model (no peft needed to load it).

By default (`merge_into="trained"`) the adapter is added to the weights it was trained against: with
`model.load_in_4bit` (QLoRA) the NF4 base dequantized to float32, exactly the weights `evaluate` and `nli-predict`
compute with. Each adapted weight becomes Wq + (alpha / r) * B @ A, rounded once to the chosen dtype, so the export
predicts what the report measured. `merge_into="original"` adds the same delta to the base's original weights
instead: a different model from the one the adapter was trained with (QLoRA trains B @ A to correct the NF4-rounded
Wq, not W), which scores lower (docs/predict.md). Merging back into 4-bit weights (peft's merge on a 4-bit model)
would round the sum to the 4-bit grid again, whose steps are coarse next to the small LoRA delta: never done here.

Beside the weights: the tokenizer, EXPORT.json (what was merged into what), the model card the `report` stage
wrote for this adapter (README.md), optionally the same model as GGUF (qlora_nli.gguf_export), and lm-eval task
files for the pipeline's evaluation sets (qlora_nli.lm_eval_tasks).
"""
import json
import logging
from pathlib import Path

import torch

from qlora_nli.model import adapters, embedded, loading
from qlora_nli.model.adapters import adapter_sha256, check_adapter_dir
from qlora_nli.runtime.errors import ArtifactError
from qlora_nli.runtime.files import file_on_the_way
from qlora_nli.runtime.io import atomic_path

log = logging.getLogger(__name__)


DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
MERGE_INTO = {  # --merge-into: what EXPORT.json says the adapter was added to
    "trained": "the weights the adapter was trained against ({}), in float32",
    "original": "the base's original weights without 4-bit quantization, in float32 (not the weights the adapter "
                "was trained against: it predicts differently from `evaluate`, docs/predict.md)",
}
# Ends the line of a missing --adapter: leaving it out is no fix when the fine-tuned model is wanted, only an option
EXPORT_WITHOUT_ADAPTER = (" (without --adapter, nli-export exports the base model as evaluate@baseline scores it, "
                          "not fine-tuned)")
CARD = "README.md"  # the model card's name in an export (the Hugging Face Hub shows it)


def merged_model(model_params, adapter_dir, merge_into="trained"):
    """(model, tokenizer): base + adapter merged in float32 on the CPU, as a plain transformers model (no 4-bit
    layers, no quantization config), into the weights `merge_into` names. Without an adapter: the base alone, as
    `evaluate@baseline` scores it (dequantized from 4-bit when `model.load_in_4bit`)."""
    if merge_into not in MERGE_INTO:
        raise ArtifactError(f"--merge-into {merge_into}: allowed: {', '.join(MERGE_INTO)}")
    if adapter_dir is not None:
        check_adapter_dir(adapter_dir, "--adapter", EXPORT_WITHOUT_ADAPTER)
        adapter_dir = str(adapter_dir)
    load_in_4bit = model_params["load_in_4bit"] and merge_into == "trained"
    params = {**model_params, "load_in_4bit": load_in_4bit, "compute_dtype": "float32"}
    # On the CPU load_for_inference dequantizes the 4-bit layers (the very values bitsandbytes computes with) and
    # merges the adapter into them.
    model = adapters.load_for_inference(params, "cpu", adapter_dir,
                                        adapter_fix=f"it was not trained on '{model_params['name']}': give that base "
                                                    f"model with --model or model.name")
    tokenizer = loading.load_tokenizer(model_params["name"], model_params.get("trust_remote_code", False))
    return embedded.plain_copy(model, model_params.get("trust_remote_code", False)), tokenizer


def export_merged(model_params, adapter_dir, out_dir, dtype="float32", overwrite=False, merge_into="trained",
                  card=None, gguf=False, task_sets=None, template=None):
    """Write base + adapter, merged, as a model directory at `out_dir`: weights, config, tokenizer, EXPORT.json, the
    model card `card` (if given) as README.md, `model.gguf` if `gguf`, and lm-eval tasks for `task_sets` ({set name:
    JSONL path}) formatted with `template`. All of it appears at once, or nothing does."""
    from qlora_nli.infer import gguf as gguf_export
    from qlora_nli.infer import lm_eval_tasks

    out_dir = check_out_dir(out_dir, overwrite)
    card_text = read_card(card, adapter_dir) if card is not None and adapter_dir is not None else None
    if task_sets:
        lm_eval_tasks.check_sets(task_sets)
    if gguf:
        # before the merge, which takes a while
        gguf_export.check_exportable(loading.load_config(model_params["name"], model_params.get("trust_remote_code",
                                                                                                    False)))
    model, tokenizer = merged_model(model_params, adapter_dir, merge_into)
    trained_on = "NF4 4-bit base, dequantized" if model_params["load_in_4bit"] else "base without quantization"
    merged_into = MERGE_INTO[merge_into].format(trained_on)
    log.info("merged %s into %s: %s; saving it as %s in %s", adapter_dir, model_params["name"], merged_into, dtype,
             out_dir)
    merged = model.to(DTYPES[dtype])
    merged.config.use_cache = True  # load_base_model turns the cache off for scoring; generation wants it back
    with atomic_path(out_dir) as tmp:
        merged.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        source = {"base": model_params["name"], "base_path": loading.resolve_model_path(model_params["name"]),
                  "adapter": None if adapter_dir is None else str(adapter_dir),
                  "adapter_sha256": None if adapter_dir is None else adapter_sha256(adapter_dir), "dtype": dtype,
                  "merge_into": merge_into, "merged_into": merged_into}
        if card_text is not None:
            (tmp / CARD).write_text(card_text)
        if gguf:
            source["gguf"] = gguf_export.write_gguf(merged, tokenizer, model_params["name"], tmp / gguf_export.FILE,
                                                    dtype)
        if task_sets:
            source["lm_eval"] = lm_eval_tasks.write_tasks(tmp / lm_eval_tasks.FOLDER, task_sets, template)
        (tmp / "EXPORT.json").write_text(json.dumps(source, indent=2) + "\n")
    return out_dir


def check_out_dir(out_dir, overwrite):
    """`out_dir` where the export can go, before anything loads: new (or replaced with `overwrite`), below a
    directory."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise ArtifactError(f"--out {out_dir}: already exists; choose a new directory, or pass --overwrite to "
                            f"replace it")
    above = file_on_the_way(out_dir)
    if above is not None:
        raise ArtifactError(f"--out {out_dir}: {above} is a file, not a directory; choose a directory below a "
                            f"directory")
    return out_dir


def read_card(card, adapter_dir):
    """The model card's text, refused when it describes another adapter (its `adapter_sha256` line differs)."""
    card = Path(card)
    if not card.is_file():
        state = "is a directory, not a file" if card.is_dir() else "no such file"
        raise ArtifactError(f"--card {card}: {state}; run `dvc repro report` (it writes the model card), or "
                            f"pass --no-card")
    try:
        text = card.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ArtifactError(f"--card {card}: not UTF-8 text at byte {e.start}; re-save it as UTF-8, or pass --no-card")
    except OSError as e:
        raise ArtifactError(f"--card {card}: cannot read it ({e.strerror or type(e).__name__}); fix its "
                            f"permissions, or pass --no-card")
    want = adapter_sha256(adapter_dir)
    if want is not None and want not in text:
        raise ArtifactError(f"--card {card}: describes another adapter than {adapter_dir} (its adapter_sha256 is "
                            f"not {want[:12]}...); run `dvc repro report` to write the card of this adapter, or pass "
                            f"--no-card")
    return text
