"""Scheduler simulator: how much serving time preemption wastes, and what a scheduler saves.

    workloads.py   synthetic mixes and trace replay (Azure 2023 and plain CSV schemas)
    requests.py    per-request state as a struct of numpy arrays
    config.py      SimConfig (limits, policies by name, knobs), SimCosts (what prices a step)
    view.py        the scheduler state a policy reads (SchedulerView), engine-independent
    engine.py      the step loop: paged KV cache, continuous batching, preemption, pricing
    policies.py    admission, victim and preemption policies, registered by name
    predictors.py  output-length predictors, registered by name
    metrics.py     per-request and aggregate metrics, JSON and CSV
    plots.py       figures of a run and of a comparison
    steptime.py    what a step costs: the profile's costs, or constant/linear formulas
    study.py       run inputs from command options, and the policy comparison behind
                   `kvbench compare-policies` (tables, JSON, CSV, plot)
"""

from kvbench.sim.config import SimConfig, SimCosts
from kvbench.sim.engine import SimResult, Simulator, simulate
from kvbench.sim.metrics import summarize
from kvbench.sim.workloads import Workload, load_workload, read_trace, synthetic

__all__ = ["SimConfig", "SimCosts", "SimResult", "Simulator", "Workload", "load_workload",
           "read_trace", "simulate", "summarize", "synthetic"]
