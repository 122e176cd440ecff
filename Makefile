# Set-up and entry points. Every target creates/uses the virtualenv in $(VENV).
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
FMNIST_DIR := /usr/share/datasets/fashion-mnist
PYTEST_ARGS ?=

.PHONY: venv data test test-fast test-unit demo docs bench reproduce diversity channels clean

$(VENV)/.installed: setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -e '.[test]'
	touch $@

venv: $(VENV)/.installed

# Fashion-MNIST comes from the Debian package; install it when missing and we can (root).
data:
	@if [ ! -d $(FMNIST_DIR) ]; then \
	  if [ "$$(id -u)" = "0" ] && command -v apt-get >/dev/null; then \
	    (apt-get install -y dataset-fashion-mnist || \
	     (apt-get update && apt-get install -y dataset-fashion-mnist)) || \
	    echo "warning: could not install dataset-fashion-mnist"; \
	  else \
	    echo "note: $(FMNIST_DIR) missing; install the Debian package dataset-fashion-mnist" \
	         "or set FT_KERAS_DATA_DIR"; \
	  fi; \
	fi

test: venv data
	$(PY) -m pytest -q -ra $(PYTEST_ARGS) tests

test-fast: venv data
	$(PY) -m pytest -q -ra -m "not slow" $(PYTEST_ARGS) tests

# The unit tier: synthetic data only (no data set needed).
test-unit: venv
	$(PY) -m pytest -q -ra -m "not real_data and not slow" $(PYTEST_ARGS) tests

demo: venv data
	$(PY) examples/demo.py

# The documentation site (mkdocs.yml) into site/; --strict turns every warning (a broken link, an
# unresolved API reference) into a failure.
$(VENV)/.docs-installed: $(VENV)/.installed
	$(PY) -m pip install -e '.[docs]'
	touch $@

docs: $(VENV)/.docs-installed
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict --site-dir site

# Section 3 (tfmot baseline) needs the `bench` extra; without it the table says "not measured".
bench: venv data
	$(PY) -m pip install -e '.[bench]' || echo "note: could not install ft_keras[bench]"
	$(PY) bench/step_overhead.py

# The reproduction benchmark (~1 hour on 2 CPU cores; QUICK=1 for a ~5-minute smoke run).
reproduce: venv data
	$(PY) bench/reproduce.py $(if $(QUICK),--quick,)

# The EDST ticket-diversity sweep (~1.5 hours on 2 CPU cores; QUICK=1 for a ~2-minute smoke run).
# Rerunning resumes an interrupted sweep from docs/diversity.json.
diversity: venv data
	$(PY) bench/diversity.py $(if $(QUICK),--quick,)

# Channel-level tickets against dense, EDST and the DST Ensemble, with served size and latency
# (docs/results_channels.md; ~4 hours (3 to 5) on 2 quiet CPU cores: run it on a quiet machine,
# latency is measured). QUICK=1 for a ~3-minute smoke run into the temp dir (docs/ untouched).
# Rerunning resumes an interrupted run from docs/results_channels.json.
channels: venv data
	$(PY) bench/channels.py $(if $(QUICK),--quick,)

clean:
	rm -rf $(VENV) .pytest_cache build site *.egg-info
