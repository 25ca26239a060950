"""The compile gate: kvbench's Triton kernels compiled for sm_90 and sm_80 without a GPU, and
checked (registers, spills, shared memory, 16-byte accesses, tensor cores).

    python -m kvbench.compile_gate             # the gate (make compile-gate; CI)
    python -m kvbench.compile_gate --survey    # attention candidates and the rule's picks

`driver.py` is the stand-in Triton driver, `gate.py` the cases and checks, `ptx.py` what is
read in the PTX, `survey.py` the attention candidates, `report.py` the markdown.
"""
