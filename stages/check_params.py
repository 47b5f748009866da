"""Stage check_params: every param checked before DVC touches any stage's outputs.

DVC deletes a stage's outputs before it runs the stage's command, so a stage that finds a bad param itself has
already lost them (git-tracked metrics and plots included). Every other stage depends on params.checked, so DVC
runs this stage first, and a failure here stops `dvc repro` with every output as it was. params.checked has the
same bytes for every valid params.yaml: a changed param still reruns only the stages that declare its group.

Checked here: each value (params.check_params); compute.device and model.compute_dtype against the machine;
lora.target_modules and lora.layers against the model's config (no weights load); data.n_* against the split
sizes recorded in data/manifest.json, when it describes the same data.source; data.source and every source of
data.extra_sets with their splits, as far as that needs no reading of the data (data.check_source: the split's file
in a directory or NLI_DATA_MIRROR, or the split in the Hub's information when the Hub can be reached).
"""
import json
import logging
from pathlib import Path

from qlora_nli.config import load_params
from qlora_nli.data.sources import SAMPLE_SIZES, check_source, check_split_size
from qlora_nli.model import loading
from qlora_nli.runtime.errors import run_stage, stage_arguments
from qlora_nli.runtime.files import write_text

log = logging.getLogger("check_params")

OUTPUT = "params.checked"
MANIFEST = Path("data/manifest.json")
def recorded_split_sizes(source):
    """{split: labeled pairs} as the last prepare counted them, or {} when it read another source (or none)."""
    try:
        manifest = json.loads(MANIFEST.read_text())
        if manifest["source"] != source:
            return {}
        return {split: c["raw"] - c["unlabeled_dropped"] - c["skipped_empty"] for split, c in manifest["counts"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):  # no usable manifest: prepare checks itself
        return {}


def data_sources(p):
    """(param, source, split names) of every source prepare reads: data.source and each of data.extra_sets, named in
    messages as prepare names them."""
    yield "data.source", p["source"], list(dict.fromkeys(p["splits"].values()))
    for name, spec in p["extra_sets"].items():
        yield f"data.extra_sets.{name}.source", spec["source"], [spec["split"]]


def main():
    params = load_params()
    device = loading.pick_device(params["compute"]["device"])
    loading.check_model_params(params, device)
    available = recorded_split_sizes(params["data"]["source"])
    for split, key in SAMPLE_SIZES.items():
        n = params["data"][key]
        if n != "all" and split in available:
            check_split_size(f"data.{key}", n, available[split])
    for key, source, splits in data_sources(params["data"]):
        unchecked = check_source(source, splits, key)
        if unchecked:
            log.info("%s: %s", key, unchecked)
    write_text(OUTPUT, "params.yaml passed stages/check_params.py\n")
    log.info("params.yaml is valid")


if __name__ == "__main__":
    stage_arguments(__doc__)
    run_stage(main, log_format="%(name)s: %(message)s")
