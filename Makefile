# resnet_fused: set-up, tests and benchmarks on a fresh machine.
#
#   make test    virtual environment + dependencies + build + the test suite
#   make bench   the same set-up, then the benchmarks on this machine
#
# Variables: PYTHON (interpreter that creates the venv), VENV (its folder), MAX_JOBS
# (parallel compile jobs), TEST_WORKERS (test processes, default 2), RESNET_FUSED_SKIP_CUDA=1
# (CPU-only build).

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
BENCH_OUT ?= benchmarks/results
export MAX_JOBS ?= 2
# pytest-xdist worker processes for `make test` (each with one intra-op thread: tests/conftest.py)
TEST_WORKERS ?= 2

DEPS := torch torchvision triton ninja pybind11 pytest pytest-xdist hypothesis timm numpy matplotlib scikit-learn setuptools wheel ruff

.PHONY: all venv install test bench lint format info clean

all: test

# (made again when this file changes: a dependency added here reaches existing venvs)
$(VENV)/.deps-installed: Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install $(DEPS)
	touch $@

venv: $(VENV)/.deps-installed

# Builds resnet_fused._C (CPU always; CUDA when torch has CUDA and nvcc is found).
install: venv
	$(PY) -m pip install --no-build-isolation --no-deps -e .
	$(PY) -m resnet_fused info

test: install
	$(PY) -m pytest -n $(TEST_WORKERS)

bench: install
	$(PY) -m resnet_fused bench --out $(BENCH_OUT)

info: install
	$(PY) -m resnet_fused info

lint: venv
	$(PY) -m ruff check resnet_fused tests benchmarks examples setup.py
	$(PY) -m ruff format --check resnet_fused tests benchmarks examples setup.py

format: venv
	$(PY) -m ruff format resnet_fused tests benchmarks examples setup.py
	$(PY) -m ruff check --fix resnet_fused tests benchmarks examples setup.py

clean:
	rm -rf build *.egg-info resnet_fused/_C*.so
