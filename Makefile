# make train: set up .venv and run the quickstart; make test: the test suite; make bench: generation, ingest and training speed.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
export WANDB_SILENT := true

.PHONY: setup train test bench lint clean

$(BIN)/ovcf-installed: pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[dev]"
	touch $@

setup: $(BIN)/ovcf-installed

train: setup
	$(BIN)/python -m ovcf.train model=densenet121

test: setup
	WANDB_MODE=disabled $(BIN)/python -m pytest -q

bench: setup
	WANDB_MODE=disabled $(BIN)/python -m ovcf.bench_synth
	WANDB_MODE=disabled $(BIN)/python -m ovcf.bench_ingest
	WANDB_MODE=disabled $(BIN)/python -m ovcf.bench
	WANDB_MODE=disabled $(BIN)/python -m ovcf.bench_seg --precision fp32 --steps 5

lint: setup
	$(BIN)/ruff check ovcf tests
	$(BIN)/ruff format --check ovcf tests

clean:
	rm -rf $(VENV) .cache logs data/synthetic
