# Two quick-start commands:
#   make demo  - set up the device-side install and classify the sample cells with the bundled model
#   make test  - set up the full install (training + tests) and run the test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PIP := $(BIN)/pip --disable-pip-version-check -q

.PHONY: demo test install install-dev bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip

install: $(BIN)/python
	$(PIP) install -e .

install-dev: $(BIN)/python
	$(PIP) install -e '.[train,dev]'

demo: install
	$(BIN)/edge-classify edge_runtime/samples --compare --output samples_results.csv --overwrite \
		--summary-json samples_summary.json --group-by patient

test: install-dev
	$(BIN)/python -m pytest -q

bench: install
	$(BIN)/edge-bench --threads 1

clean:
	rm -rf $(VENV) build *.egg-info samples_results.csv samples_summary.json
