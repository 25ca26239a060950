"""Sweeps: policies x workloads x rate scales x cache sizes x seeds, one simulation per cell.

A spec (TOML, or YAML with PyYAML) names the axes and the settings every cell shares:

    policies = ["fcfs/lifo/recompute/oracle", "future-kv/lifo/recompute/history"]
    traces = ["azure-conv-2023"]       # bundled traces by name, or CSV paths relative to the spec
    synthetic = ["requests=400,rate=20,long-output=0.3"]   # `--synthetic` mixes
    rate_scales = [1.0, 2.0]
    num_gpu_blocks = [1000, 2000]                  # omit: sized from the GPU's memory
    seeds = [0, 1]
    model = "llama-2-7b"                           # analytic costs; or profile = "x.json"
    max_num_seqs = 256                             # any other `simulate` option, by name

A cell is exactly `kvbench simulate --trace T (or --synthetic S) --rate-scale R --num-gpu-
blocks G --seed N` under one policy, with the spec's shared settings (`RunSpec.from_options`:
replica settings, knobs, costs; an unknown name is an error). Cells run in this process
(`jobs=1`), in `jobs` processes, or as one Ray task each (`ray_address`), and finish in any
order. This process writes each finished cell at once, atomically, to `<out>/cells/<key>.json`
(workers write nothing, so a cluster needs no shared file system). The key hashes everything
the result depends on, by content: the cell, the shared settings, the trace and profile file
contents (not their paths) and a hash of kvbench's source (`plan`). Running the same spec into
the same folder again skips every cell whose file is there, so an interrupted sweep (Ctrl-C
writes the outputs of the finished cells and says how many are kept), or one whose workers
died, resumes where it stopped. `sweep.json` (with the run's provenance), `sweep.csv` (a row
per finished cell, in plan order) and `sweep.png` are rewritten as cells finish and when the
sweep ends.

The console shows a table per load level (rate scale): each policy's mean over the level's
cells. To render sweep.csv as Markdown, a table per metric with a column per load level (as
docs' are), name it in a `<!-- report: path/to/sweep.csv -->` block of a docs page and run
`kvbench report` (`kvbench.report.sweep_markdown`).

Modules: `spec` (SweepSpec, load_spec), `plan` (cells and their keys), `run` (runners,
run_sweep), `outputs` (cell files, sweep.json/csv, the console tables), `plot` (sweep.png).
"""

from kvbench.sim.sweep.outputs import (
    CELLS_DIR,
    SWEEP_CSV,
    SWEEP_JSON,
    SWEEP_PNG,
    policy_means,
    policy_tables,
)
from kvbench.sim.sweep.plan import SYNTHETIC, plan_sweep
from kvbench.sim.sweep.run import SweepInterrupted, run_sweep
from kvbench.sim.sweep.spec import SweepError, SweepSpec, load_spec

__all__ = ["CELLS_DIR", "SWEEP_CSV", "SWEEP_JSON", "SWEEP_PNG", "SYNTHETIC", "SweepError",
           "SweepInterrupted", "SweepSpec", "load_spec", "plan_sweep", "policy_means",
           "policy_tables", "run_sweep"]
