"""Stage prepare: read SNLI (Hub, NLI_DATA_MIRROR or a local directory), take evenly spaced samples, write data/.

Outputs: data/{train,validation,test}.jsonl with rows {"id", "premise", "hypothesis", "label"}, and
data/manifest.json saying where the data came from, the hash of each raw split and what was dropped or sampled.
"""
import logging

from qlora_nli.data import SPLITS, evenly_spaced, load_splits
from qlora_nli.errors import run_stage
from qlora_nli.io import all_or_none, write_json, write_jsonl
from qlora_nli.params import load_params

log = logging.getLogger("prepare")


def main():
    p = load_params()["data"]
    sizes = {"train": ("data.n_train", p["n_train"]),
             "validation": ("data.n_val", p["n_val"]),
             "test": ("data.n_test", p["n_test"])}

    log.info("reading %s", p["source"])
    splits, info = load_splits(p["source"])
    log.info("read from %s", info["read_from"])

    # Sample every split before writing anything, so that a too-large n fails before any output changes.
    samples = {}
    for split in SPLITS:
        key, n = sizes[split]
        rows = splits[split]
        samples[split] = rows if n == "all" else evenly_spaced(rows, n, key=key)
        info["counts"][split]["sampled"] = len(samples[split])
        log.info("%s: %d of %d labeled pairs", split, len(samples[split]), len(rows))

    # All four files or none: a write that fails half-way must not leave new samples beside an old manifest.
    outputs = [f"data/{split}.jsonl" for split in SPLITS] + ["data/manifest.json"]
    with all_or_none(outputs) as staged:
        for split in SPLITS:
            write_jsonl(staged[f"data/{split}.jsonl"], samples[split])
        write_json(staged["data/manifest.json"], {
            "source": p["source"],
            "read_from": info["read_from"],
            "raw_sha256": info["raw_sha256"],
            "counts": info["counts"],
            "sampling": "evenly spaced: index floor(i*N/n)",
        })
    log.info("wrote data/{train,validation,test}.jsonl and data/manifest.json")


if __name__ == "__main__":
    run_stage(main)
