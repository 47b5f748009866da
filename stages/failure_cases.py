"""Stage failure_cases: which test pairs fine-tuning fixed, left wrong or broke, and what those pairs have in common.

Reads  predictions/{baseline,finetuned}.jsonl, evidence/{baseline,finetuned}/probes.jsonl (the probes of evaluate)
Writes reports/failure_cases.json, reports/failure_cases.md, metrics/comparison.json, plots/accuracy.json

The probes turn explanations into counts: a case the fine-tuned model gets right from the hypothesis alone may be
decided by an annotation artifact rather than by inference (Gururangan et al. 2018, Poliak et al. 2018), and a case
whose answer flips under a label-preserving perturbation shows what the model does not rely on consistently.
"""
import logging

from qlora_nli.analysis.failure_cases import analyse
from qlora_nli.config import load_params
from qlora_nli.report.failure_cases import report_markdown
from qlora_nli.runtime.errors import run_stage, stage_arguments
from qlora_nli.runtime.files import write_json, write_text
from qlora_nli.runtime.io import all_or_none

log = logging.getLogger("failure_cases")


OUTPUTS = ["reports/failure_cases.json", "reports/failure_cases.md", "metrics/comparison.json", "plots/accuracy.json"]


def main():
    params = load_params()
    n_examples = params["failure_cases"]["n_examples"]

    result, comparison, examples = analyse(n_examples)
    log.info("%s", ", ".join(f"{k}: {v}" for k, v in result["counts"].items()))

    # All four or none: `report` reads them together, and a mix of old and new would contradict itself.
    with all_or_none(OUTPUTS) as staged:
        write_json(staged["reports/failure_cases.json"], result)
        write_text(staged["reports/failure_cases.md"], report_markdown(result, comparison, examples))
        write_json(staged["metrics/comparison.json"], comparison)
        write_json(staged["plots/accuracy.json"], [
            {"model": "baseline", "accuracy": comparison["baseline_accuracy"]},
            {"model": "finetuned", "accuracy": comparison["finetuned_accuracy"]}])


if __name__ == "__main__":
    stage_arguments(__doc__)
    run_stage(main, log_format="%(name)s: %(message)s")
