# Two commands for a fresh machine: `make calibrate` (the main job) and `make test`.
PYTHON ?= python3
TORCH_VERSION ?= 2.13.0
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup calibrate test bench bench-save bench-compare report clean

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

test: $(STAMP)
	TRITON_INTERPRET=1 $(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .benchmarks
