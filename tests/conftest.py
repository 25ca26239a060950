"""Shared test setup: markers that skip cleanly where a test cannot run, and `run_cli`.

`gpu` (registered in pyproject.toml): skipped without a CUDA GPU, and under TRITON_INTERPRET=1
(these tests run the compiled kernels at real sizes: `pytest -m gpu` without the interpreter).
`interpreter`: runs Triton kernels on CPU tensors; skipped unless Triton is installed and
TRITON_INTERPRET=1 (`make test` sets it).
`vllm` (registered in pyproject.toml): drives vLLM itself; skipped where vLLM is not installed
(`make test-vllm` runs them in .venv-vllm).
"""

import io
import os
import sys
from contextlib import redirect_stderr, redirect_stdout
from unittest import mock

import pytest
import torch


def pytest_configure(config):
    config.addinivalue_line("markers", "interpreter: runs Triton kernels on CPU tensors "
                                       "(needs TRITON_INTERPRET=1)")


def pytest_collection_modifyitems(config, items):
    from kvbench.ops.launch import triton_unavailable_reason
    from kvbench.vllm import unavailable_reason as vllm_unavailable_reason

    if not torch.cuda.is_available():
        gpu_reason = "needs a CUDA GPU"
    elif os.environ.get("TRITON_INTERPRET") == "1":
        gpu_reason = "runs compiled Triton kernels: unset TRITON_INTERPRET and run pytest -m gpu"
    else:
        gpu_reason = None
    skips = {"gpu": gpu_reason, "interpreter": triton_unavailable_reason("cpu"),
             "vllm": vllm_unavailable_reason()}
    for item in items:
        for marker, reason in skips.items():
            if reason and marker in item.keywords:
                item.add_marker(pytest.mark.skip(reason=reason))


def _run_cli(*args: str) -> tuple[int, str, str]:
    """`kvbench ARGS` through the console entry point, in process: (exit code, stdout, stderr)."""
    from kvbench import cli

    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err), mock.patch.object(sys, "argv",
                                                                        ["kvbench", *args]):
        try:
            cli.main()
        except SystemExit as exc:
            code = exc.code
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="session")
def run_cli():
    """The console entry point as a function (session-scoped: usable inside hypothesis tests)."""
    return _run_cli
