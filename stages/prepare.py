"""Stage prepare: read SNLI (Hub, NLI_DATA_MIRROR or a local directory), take evenly spaced samples, write data/.

Outputs: data/{train,validation,test}.jsonl with rows {"id", "premise", "hypothesis", "label"}; data/sets/<name>.jsonl
for each extra evaluation set of data.extra_sets (any source and split name, e.g. MNLI's validation_matched); and
data/manifest.json saying where the data came from, the hash of each raw split and what was dropped or sampled.
"""
import logging

from qlora_nli.config import load_params
from qlora_nli.data.sources import (
    SAMPLE_SIZES,
    SPLITS,
    Source,
    evenly_spaced,
    load_splits,
)
from qlora_nli.runtime.errors import run_stage, stage_arguments
from qlora_nli.runtime.files import write_json, write_jsonl
from qlora_nli.runtime.io import all_or_none

log = logging.getLogger("prepare")


def main():
    p = load_params()["data"]

    log.info("reading %s", p["source"])
    splits, info = load_splits(p["source"], p["splits"])
    log.info("read from %s", info["read_from"])

    # Sample every split before writing anything, so that a too-large n fails before any output changes.
    samples = {}
    for split in SPLITS:
        key, n = f"data.{SAMPLE_SIZES[split]}", p[SAMPLE_SIZES[split]]
        rows = splits[split]
        samples[split] = rows if n == "all" else evenly_spaced(rows, n, key=key)
        info["counts"][split]["sampled"] = len(samples[split])
        log.info("%s: %d of %d labeled pairs", split, len(samples[split]), len(rows))

    extra, extra_info = {}, {}
    for name, spec in p["extra_sets"].items():
        key = f"data.extra_sets.{name}"
        log.info("reading extra set %s: %s, split %s", name, spec["source"], spec["split"])
        source = Source(spec["source"], f"{key}.source", [spec["split"]])
        rows, counts, sha = source.read(spec["split"])
        extra[name] = rows if spec["n"] == "all" else evenly_spaced(rows, spec["n"], key=f"{key}.n")
        extra_info[name] = {"source": spec["source"], "split": spec["split"], "read_from": source.read_from,
                            "raw_sha256": sha, "counts": {**counts, "sampled": len(extra[name])}}

    # All the files or none: a write that fails half-way must not leave new samples beside an old manifest.
    outputs = [f"data/{split}.jsonl" for split in SPLITS] + ["data/sets", "data/manifest.json"]
    with all_or_none(outputs) as staged:
        for split in SPLITS:
            write_jsonl(staged[f"data/{split}.jsonl"], samples[split])
        staged["data/sets"].mkdir()
        # Never an empty directory: Git keeps none, and a DVC output must exist in every clone.
        (staged["data/sets"] / "README.txt").write_text("One JSON-lines file per extra evaluation set of "
                                                        "params.yaml data.extra_sets, written by prepare.\n")
        for name, rows in extra.items():
            write_jsonl(staged["data/sets"] / f"{name}.jsonl", rows)
        write_json(staged["data/manifest.json"], {
            "source": p["source"],
            "read_from": info["read_from"],
            "raw_sha256": info["raw_sha256"],
            "splits": p["splits"],
            "counts": info["counts"],
            "extra_sets": extra_info,
            "sampling": "evenly spaced: index floor(i*N/n)",
        })
    log.info("wrote data/{train,validation,test}.jsonl, data/sets/ (%d extra sets) and data/manifest.json", len(extra))


if __name__ == "__main__":
    stage_arguments(__doc__)
    run_stage(main)
