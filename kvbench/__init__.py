"""kvbench: measure, fit and choose how to preempt an LLM request's KV cache (swap or recompute)."""

__version__ = "0.1.0"

from kvbench.selector import select_preemption_strategy  # noqa: E402

__all__ = ["__version__", "select_preemption_strategy"]
