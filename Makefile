# make train: set up .venv and run the quickstart; make test: the test suite; make bench: generation, ingest and training speed.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
export WANDB_SILENT := true

.PHONY: setup browser train test bench lint lock clean

$(BIN)/ovcf-installed: pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[dev]"
	touch $@

setup: $(BIN)/ovcf-installed

# The report test renders report.html in a real headless Chromium (Debian's package; needs root or sudo).
browser:
	@command -v chromium >/dev/null || command -v chromium-browser >/dev/null || \
	  (SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	   $$SUDO apt-get install -y -q --no-install-recommends chromium >/dev/null || \
	   ($$SUDO apt-get update -q >/dev/null && $$SUDO apt-get install -y -q --no-install-recommends chromium >/dev/null)) || \
	  echo "warning: Chromium could not be installed; the browser test of report.html will be skipped"

train: setup
	$(BIN)/python -m ovcf.train model=densenet121

test: setup browser
	WANDB_MODE=disabled OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -n 2 --dist load --maxschedchunk 2 --durations=15

bench: setup
	WANDB_MODE=disabled $(BIN)/python -m ovcf.bench

lint: setup
	$(BIN)/ruff check ovcf tests
	$(BIN)/ruff format --check ovcf tests

# constraints.txt from a fresh venv: the newest versions of .[dev] (torch and torchvision kept at their
# pins); then raise pyproject's floors to them (tests/test_packaging.py names any that differ).
lock:
	rm -rf .lock-venv && $(PY) -m venv .lock-venv
	.lock-venv/bin/python -m pip install -q --upgrade pip
	.lock-venv/bin/python -m pip install -q -e ".[dev]" $$(grep -E '^(torch|torchvision)==' constraints.txt)
	{ sed -n '/^#/p' constraints.txt; .lock-venv/bin/python -m pip freeze --exclude-editable | grep -v '^ovcf'; } > constraints.new
	mv constraints.new constraints.txt && rm -rf .lock-venv

clean:
	rm -rf $(VENV) .cache logs data/synthetic
