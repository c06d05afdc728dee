# `make test` and `make demo` build .venv from nothing (pip only; torch comes from this machine's wheels).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed

.PHONY: test demo lint bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet torch==2.14.1 torchvision==0.29.1
	$(PIP) install --quiet -e '.[dev]'
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m ruff check src tests examples benchmarks
	# the model zoos in a process of their own: one process for everything peaked at 24 GiB
	$(PY) -m pytest -q -p no:cacheprovider -m "not zoo"
	$(PY) -m pytest -q -p no:cacheprovider -m zoo

demo: $(STAMP)
	$(PY) -m convolutionalize demo --output demo-output

lint: $(STAMP)
	$(PY) -m ruff check src tests examples benchmarks

bench: $(STAMP)
	$(PY) benchmarks/conversion.py

clean:
	rm -rf $(VENV) demo-output .pytest_cache
