"""What nli-predict and nli-export run on: a tiny model, an adapter for it, params.yaml naming the model, and a JSONL
file of pairs."""
import json
from types import SimpleNamespace

import yaml
from pipeline import REPO
from tiny import made_up_pairs, make_adapter, make_tiny_model

BATCH = 3  # evaluate.batch_size of the written params.yaml


def make_predict_project(root):
    """The tiny Llama, its adapter, params.yaml and pairs.jsonl (7 pairs: a last batch of one; a blank line) in
    `root`, as a namespace of their paths (and the pairs)."""
    model_dir = make_tiny_model("llama", root / "model")
    adapter = make_adapter(model_dir, root / "adapter")
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["model"]["name"] = str(model_dir)
    params["compute"]["device"] = "cpu"
    params["evaluate"]["batch_size"] = BATCH
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    pairs = [{**r, "id": i} for i, r in enumerate(made_up_pairs(7, 11))]
    lines = [json.dumps(r) for r in pairs]
    (root / "pairs.jsonl").write_text("\n".join(lines[:3] + [""] + lines[3:]) + "\n")  # a blank line is skipped
    return SimpleNamespace(root=root, model=model_dir, adapter=adapter, params=root / "params.yaml", pairs=pairs)
