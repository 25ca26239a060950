# Two commands for a fresh machine: `make calibrate` (the main job) and `make test`.
PYTHON ?= python3
TORCH_VERSION ?= 2.13.0
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup calibrate stability test test-gpu bench bench-check bench-save bench-compare report clean

setup: $(STAMP)

# torch first and pinned: an unpinned `torch` makes pip fetch the newest CUDA build (GBs).
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==$(TORCH_VERSION)
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

calibrate: $(STAMP)
	$(BIN)/kvbench calibrate

# Five `kvbench calibrate --device cpu --quick` runs and the spread of what they fit (a quiet
# machine: the load column says how busy it was).
stability: $(STAMP)
	$(BIN)/python benchmarks/stability.py

test: $(STAMP)
	TRITON_INTERPRET=1 $(BIN)/python -m pytest -q

# GPU tests run the compiled kernels: no interpreter (they skip cleanly without a GPU).
test-gpu: $(STAMP)
	$(BIN)/python -m pytest -q -m gpu

# Benchmarks: never in `make test`. Baselines live in results/benchmarks/<machine-slug>/ (the
# slug names the CPU model or the GPU; pytest-benchmark's own machine id does not name the GPU).
BENCH_DIR = results/benchmarks/$(shell $(BIN)/kvbench machine --slug)
BENCH = $(BIN)/python -m pytest benchmarks -q --benchmark-storage=file://$(BENCH_DIR) \
	--benchmark-columns=median,iqr,rounds --benchmark-sort=name

bench: $(STAMP)
	$(BENCH)

bench-save: $(STAMP)
	$(BENCH) --benchmark-save=$(shell git rev-parse --short HEAD)

bench-compare: $(STAMP)
	$(BENCH) --benchmark-compare --benchmark-compare-fail=median:10%

# CI: every benchmark once, as a test (checks each op against its reference, no timing).
bench-check: $(STAMP)
	TRITON_INTERPRET=1 $(BIN)/python -m pytest benchmarks -q --benchmark-disable

report: $(STAMP)
	$(BIN)/kvbench report

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .benchmarks
