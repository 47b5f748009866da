"""Stage report: reports/report.md answers the assignment's five questions with the numbers the pipeline measured,
with its figures (reports/figures/*.svg), and the adapter's model card (reports/model_card.md).

Reads only artifacts (no model): metrics/{baseline,finetuned,train,comparison}.json, metrics/sets/ (extra evaluation
sets), reports/failure_cases.json, data/manifest.json, predictions/*.jsonl (for the reliability diagrams after
temperature), models/adapter (the hash the card names), and the params groups the card quotes.
"""
import logging

from qlora_nli.config import load_params
from qlora_nli.data import artifacts
from qlora_nli.model import adapters
from qlora_nli.report import figures, model_card
from qlora_nli.report.document import load_inputs, render
from qlora_nli.runtime.errors import run_stage, stage_arguments
from qlora_nli.runtime.files import write_text
from qlora_nli.runtime.io import all_or_none

log = logging.getLogger("report")


PREDICTIONS = {model: f"predictions/{model}.jsonl" for model in ("baseline", "finetuned")}
ADAPTER = "models/adapter"
OUTPUTS = {"report": "reports/report.md", "figures": "reports/figures", "card": "reports/model_card.md"}


def main():
    art = load_inputs()
    params = load_params()
    card_params = {"model": params["model"], "prompt": params["prompt"], "lora": params["lora"],
                   "train": params["train"]}
    predictions = {m: artifacts.read_rows(p, artifacts.prediction_row_problem) for m, p in PREDICTIONS.items()}
    sha = adapters.adapter_sha256(adapters.check_adapter_dir(ADAPTER))
    drawn = figures.report_figures(art, predictions)
    report = render(art, drawn)
    log.info("writing %s", ", ".join(OUTPUTS.values()))
    with all_or_none(list(OUTPUTS.values())) as staged:
        write_text(staged[OUTPUTS["report"]], report)
        figures.write_figures(staged[OUTPUTS["figures"]], drawn)
        write_text(staged[OUTPUTS["card"]], model_card.render(art, card_params, sha))


if __name__ == "__main__":
    stage_arguments(__doc__)
    run_stage(main, log_format="%(name)s: %(message)s")
