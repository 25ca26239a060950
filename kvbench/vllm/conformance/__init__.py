"""vLLM 0.32's own scheduler, async-scheduler and KV connector unit tests as kvbench's
conformance suite.

The tests come from vLLM's source release (`source`: the vllm 0.32.0 sdist from PyPI, its
sha256 checked, only `tests/` unpacked into .cache/vllm-src); their test model,
facebook/opt-125m, is a local config.json (`opt-125m/`, reached through vLLM's
VLLM_MODEL_REDIRECT_PATH, no downloads). `run` runs them once on plain vLLM, then once per
variant with kvbench's scheduler class (and its write-through connector where a test builds
vLLM's OffloadingConnector) swapped in by the pytest plugin `plugin`, and judges:

* kvbench's default options: every test that passes on plain vLLM passes;
* other options (victim and admission policies): every such test that fails is listed in
  `differences.toml` with why the policy makes it fail, and fails on a test assertion, never
  an exception;
* every variant: no test leaves a leaked block (a reference count that no request's block list
  accounts for) or a lost request (unfinished, in no queue) that plain vLLM did not.

    make conformance                     # what CI runs (make test-vllm calls it)
    python -m kvbench.vllm.conformance --out results/conformance/vllm-0.32.0.json
"""
