#!/usr/bin/env bash
# benchmarks/gpu_check.py on a bare GPU machine (no network, no package index, no DVC): bitsandbytes from the wheel
# that `python benchmarks/gpu_check.py pack` downloaded into .gpu_check/wheels/ (here), the SNLI files from
# .gpu_check/data/. Arguments go to `gpu_check.py run`; docs/gpu.md has the whole command.
set -euo pipefail
cd "$(dirname "$0")/.."
PACK=${GPU_CHECK_PACK:-.gpu_check}
PYTHON=${PYTHON:-python3}
if ! "$PYTHON" -c "import bitsandbytes" 2>/dev/null; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/gpu_check_site \
        "$PACK"/wheels/bitsandbytes-*.whl
    export PYTHONPATH=/tmp/gpu_check_site${PYTHONPATH:+:$PYTHONPATH}
fi
export NLI_DATA_MIRROR=${NLI_DATA_MIRROR:-$PWD/$PACK/data} HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
exec "$PYTHON" benchmarks/gpu_check.py run --pack "$PACK" "$@"
