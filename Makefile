# `make test` and `make demo` build .venv from nothing (pip only; torch comes from this machine's wheels).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed

.PHONY: test docs demo lint bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet torch==2.14.1 torchvision==0.29.1
	$(PIP) install --quiet -e '.[dev]'
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m ruff check src tests examples benchmarks tools
	$(MAKE) docs
	# the model zoos in a process of their own: one process for everything peaked at 24 GiB
	$(PY) -m pytest -q -p no:cacheprovider --durations=20 -m "not zoo"
	$(PY) -m pytest -q -p no:cacheprovider --durations=20 -m zoo

# the site into site/: the CLI reference is read from the real parser, the guide's pictures are
# copied from demo-output/ (make demo) when a finished demo is there, else the demo runs once
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict --site-dir site

demo: $(STAMP)
	$(PY) -m convolutionalize demo --output demo-output

lint: $(STAMP)
	$(PY) -m ruff check src tests examples benchmarks tools

bench: $(STAMP)
	$(PY) benchmarks/conversion.py

clean:
	rm -rf $(VENV) demo-output .pytest_cache site docs/images
