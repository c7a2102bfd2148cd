# fastgen: the two commands. Both work on a fresh machine with only Python >= 3.10.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip

.PHONY: demo test test-latest lint bench clean

# `make test` installs the exact versions in constraints.txt (reproducible CI); `make test-latest` installs the
# newest versions that pyproject's ranges allow into a separate venv.
$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	# A CPU wheel satisfies the torch range; install it first so pip never pulls a CUDA build here.
	$(PIP) install --quiet "torch>=2.6,<2.14" -c constraints.txt
	$(PIP) install --quiet -e ".[dev]" -c constraints.txt
	touch $@

LATEST := .venv-latest
$(LATEST)/.installed: pyproject.toml
	$(PYTHON) -m venv $(LATEST)
	$(LATEST)/bin/python -m pip install --quiet "torch>=2.6,<2.14"
	$(LATEST)/bin/python -m pip install --quiet --upgrade -e ".[dev]"
	touch $@

test-latest: $(LATEST)/.installed
	$(LATEST)/bin/python -m pytest -q

demo: $(VENV)/.installed
	$(VENV)/bin/fastgen demo

test: $(VENV)/.installed
	$(PY) -m pytest -q

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check fastgen tests benchmarks

bench: $(VENV)/.installed
	$(PY) -m benchmarks.run_all

clean:
	rm -rf $(VENV) $(LATEST) build *.egg-info .pytest_cache

# The GPU check (benchmarks/gpu_check.py): fp16/bf16 agreement, attention, samples/s, distillation it/s and
# memory, one FSDP2 step; under 8 minutes on a CUDA machine; writes the "GPU" section of BENCHMARKS.md.
.PHONY: gpu-check
gpu-check: $(VENV)/.installed
	$(PY) benchmarks/gpu_check.py
