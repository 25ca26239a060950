"""Triton kernels (`@triton.jit` only; shape checks, grids and launches live in `kvbench.ops`).

Importing a kernel module needs Triton. Set TRITON_INTERPRET=1 before the first import to run
the kernels on CPU tensors in Triton's interpreter (tests do); the choice is fixed at import.
"""
