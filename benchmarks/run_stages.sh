#!/usr/bin/env bash
# The pipeline's stages in dvc.yaml order, without DVC: for a machine where DVC cannot be installed (the lent GPU
# box of the README's GPU section). `dvc repro` is the normal way; data/ must already hold the prepared sample.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m stages.evaluate baseline
python -m stages.finetune
python -m stages.evaluate finetuned
python -m stages.failure_cases
python -m stages.report
