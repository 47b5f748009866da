"""How faithful `nli-export` is on the committed run: accuracy of each export on the test pairs, loaded with plain
transformers (and the GGUF file with transformers' GGUF loader), next to the adapter's predictions that `evaluate`
wrote; then lm-evaluation-harness on the same exports, with the task files `nli-export` writes.

    python benchmarks/export_check.py            # after `dvc repro`; writes benchmarks/results/export.json

Every export goes to a temporary directory; nothing in the workspace changes except the results file.
"""
import glob
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from qlora_nli.config import load_params
from qlora_nli.infer.export import export_merged
from qlora_nli.infer.lm_eval_tasks import pipeline_sets
from qlora_nli.infer.scoring import score_labels
from qlora_nli.prompts import format_prompt
from qlora_nli.runtime.errors import ArgumentParser

EXPORTS = {  # name: (adapter, --merge-into, --gguf)
    "fine-tuned, merged into the trained (dequantized NF4) weights": ("models/adapter", "trained", True),
    "fine-tuned, merged into the original weights": ("models/adapter", "original", False),
    "base, as evaluate@baseline scores it": (None, "trained", False),
}


def rows(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def labels_of(model, tokenizer, prompts, batch_size):
    return score_labels(model.eval(), tokenizer, prompts, batch_size).argmax(-1).tolist()


def lm_eval(model_dir, tasks, work):
    command = [str(Path(sys.executable).parent / "lm_eval"), "--model", "hf", "--model_args",
               f"pretrained={model_dir}", "--tasks", ",".join(tasks), "--include_path", str(model_dir / "lm_eval"),
               "--device", "cpu", "--batch_size", "8", "--output_path", str(work)]
    subprocess.run(command, check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    results = json.loads(Path(sorted(glob.glob(str(work / "**/results_*.json"), recursive=True))[-1]).read_text())
    return {task: results["results"][task]["acc,none"] for task in tasks}, results["versions"], " ".join(command)


def main():
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/export.json"))
    parser.add_argument("--no-lm-eval", dest="lm_eval", action="store_false")
    parser.add_argument("--tasks", nargs="+", default=["qlora_nli_test"], help="lm-eval tasks to run (of the export's)")
    args = parser.parse_args()
    os.chdir(ROOT)
    params = load_params()
    test = rows("data/test.jsonl")
    prompts = [format_prompt(params["prompt"]["template"], r) for r in test]
    gold = [r["label"] for r in test]
    reference = {
        "fine-tuned": [r["pred"] for r in sorted(rows("predictions/finetuned.jsonl"), key=lambda r: r["id"])],
        "base": [r["pred"] for r in sorted(rows("predictions/baseline.jsonl"), key=lambda r: r["id"])],
    }
    order = sorted(range(len(test)), key=lambda i: test[i]["id"])  # predictions are compared by pair id
    sets = pipeline_sets("data")
    results = {"date": time.strftime("%Y-%m-%d"), "torch": torch.__version__, "n_test": len(test), "exports": {}}
    batch = params["evaluate"]["batch_size"]
    for name, (adapter, merge_into, gguf) in EXPORTS.items():
        with tempfile.TemporaryDirectory() as tmp:
            out = export_merged(params["model"], adapter, Path(tmp) / "exported", "float32", merge_into=merge_into,
                                gguf=gguf, task_sets=sets, template=params["prompt"]["template"])
            labels = labels_of(AutoModelForCausalLM.from_pretrained(out), AutoTokenizer.from_pretrained(out),
                               prompts, batch)
            ref = reference["fine-tuned" if adapter else "base"]
            entry = {"accuracy": sum(p == g for p, g in zip(labels, gold)) / len(gold),
                     "agrees_with_evaluate": sum(labels[i] == ref[k] for k, i in enumerate(order)),
                     "evaluate_accuracy": sum(ref[k] == gold[i] for k, i in enumerate(order)) / len(gold),
                     "predicted": {k: labels.count(k) for k in range(3)}}
            if gguf:
                folder = out / "gguf"
                g_tok = AutoTokenizer.from_pretrained(folder, gguf_file="model.gguf")
                g_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file="model.gguf", dtype=torch.float32)
                g_labels = labels_of(g_model, g_tok, prompts, batch)
                entry["gguf"] = {"accuracy": sum(p == g for p, g in zip(g_labels, gold)) / len(gold),
                                 "agrees_with_evaluate": sum(g_labels[i] == ref[k] for k, i in enumerate(order)),
                                 "bytes": (folder / "model.gguf").stat().st_size}
            if args.lm_eval:
                tasks = [t for t in json.loads((out / "EXPORT.json").read_text())["lm_eval"] if t in args.tasks]
                entry["lm_eval"], results["lm_eval_versions"], results["lm_eval_command"] = lm_eval(
                    out, tasks, Path(tmp) / "lm")
            results["exports"][name] = entry
            print(name, json.dumps(entry), flush=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print("\n| export | accuracy (transformers) | agrees with evaluate | evaluate's accuracy | GGUF | lm-eval |")
    print("|---|---|---|---|---|---|")
    for name, e in results["exports"].items():
        gguf = f"{100 * e['gguf']['accuracy']:.1f}%" if "gguf" in e else "-"
        harness = ", ".join(f"{k} {100 * v:.1f}%" for k, v in e.get("lm_eval", {}).items()) or "-"
        print(f"| {name} | {100 * e['accuracy']:.1f}% | {e['agrees_with_evaluate']} / {len(test)} | "
              f"{100 * e['evaluate_accuracy']:.1f}% | {gguf} | {harness} |")


if __name__ == "__main__":
    main()
