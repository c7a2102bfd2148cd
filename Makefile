# fastgen: the two commands. Both work on a fresh machine with only Python >= 3.10.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip

.PHONY: demo test lint bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# A CPU wheel satisfies the torch range; install it first so pip never pulls a CUDA build here.
	$(PIP) install --quiet "torch>=2.4,<2.14"
	$(PIP) install --quiet -e ".[dev]"
	touch $@

demo: $(VENV)/.installed
	$(VENV)/bin/fastgen demo

test: $(VENV)/.installed
	$(PY) -m pytest -q

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check fastgen tests benchmarks

bench: $(VENV)/.installed
	$(PY) -m benchmarks.run_all

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
