#!/usr/bin/env bash
# The pipeline's stages in dvc.yaml order, without DVC: for a machine where DVC cannot be installed (the lent GPU
# box of the README's GPU section). `dvc repro` is the normal way; data/ must already hold the prepared sample.
set -euo pipefail
cd "$(dirname "$0")/.."
python stages/evaluate.py baseline
python stages/finetune.py
python stages/evaluate.py finetuned
python stages/failure_cases.py
python stages/report.py
