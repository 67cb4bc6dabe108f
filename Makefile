# Two quick-start commands:
#   make demo  - set up the device-side install, classify the sample cells with the bundled model, then the sample
#                fields (every red cell found and classified; overlays in demo_overlays/)
#   make test  - set up the full install (training + tests) and run the test suite, then the device layer again
#                in a fresh base install (no TensorFlow, `pip install .` not editable)
PYTHON ?= python3
VENV ?= .venv
DEVICE_VENV ?= .venv-device
BIN := $(VENV)/bin
PIP := $(BIN)/pip --disable-pip-version-check -q

.PHONY: demo test test-device install install-dev bench clean webapp system-deps

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip

# The phone page's runtime (OpenCV.js, LiteRT.js and its wasm) comes from npm, pinned by web/package-lock.json, and
# is copied into edge_runtime/webapp/vendor/ (package data, gitignored). Node/npm and Chromium (the page's end-to-end
# test) come from Debian's packages where missing (needs root or sudo).
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
system-deps:
	@command -v node >/dev/null && command -v npm >/dev/null || ($(SUDO) apt-get update && $(SUDO) apt-get install -y nodejs npm)
	@command -v chromium >/dev/null || ($(SUDO) apt-get update && $(SUDO) apt-get install -y chromium)

webapp: system-deps
	cd web && npm ci --no-audit --no-fund
	node web/scripts/build_webapp.mjs

install: $(BIN)/python webapp
	$(PIP) install -e '.[fields]'

install-dev: $(BIN)/python webapp
	$(PIP) install -e '.[train,dev,fields]'

# The demo's commands live in scripts/check_readme_demo.py, which also checks README's pasted output against them.
demo: install
	$(BIN)/python scripts/check_readme_demo.py --run

test: install-dev
	$(BIN)/python -m pytest -q
	$(MAKE) test-device

# The device layer as a field device gets it: a fresh venv, a real (non-editable) install of the base package plus
# pytest, no TensorFlow; run from outside the source tree so nothing is imported from it by accident.
test-device:
	rm -rf $(DEVICE_VENV)
	$(PYTHON) -m venv $(DEVICE_VENV)
	$(DEVICE_VENV)/bin/pip --disable-pip-version-check -q install . pytest
	cd $(DEVICE_VENV) && ./bin/python -c "import importlib.util as u; assert u.find_spec('tensorflow') is None"
	cd $(DEVICE_VENV) && ./bin/python -m pytest -q -p no:cacheprovider -m "not train" $(CURDIR)/tests

bench: install
	$(BIN)/edge-bench cells --threads 1

clean:
	rm -rf $(VENV) $(DEVICE_VENV) build *.egg-info web/node_modules edge_runtime/webapp/vendor samples_results.csv samples_summary.json fields_results.csv \
		demo_overlays
