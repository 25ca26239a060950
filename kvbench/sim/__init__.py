"""Scheduler simulator: how much serving time preemption wastes, and what a scheduler saves.

    workloads.py   synthetic mixes and trace replay (Azure 2023 and plain CSV schemas)
    requests.py    per-request state as a struct of numpy arrays
    engines.py     ReplicaSpec: vLLM's settings by vLLM's names, and the named engines
    config.py      SimConfig (policy, replica, knobs), Costs (what prices preemptions and steps)
    run.py         RunSpec: a run's inputs (workload, costs, config), parsed once by every entry
    kv_cache.py    KVCacheManager: the engine's only door to the block pool (blocks.py)
    view.py        the scheduler state a policy reads (SchedulerView), engine-independent
    engine.py      the step loop: schedule running, admit waiting, preempt, launch, output
    decode_runs.py the fast path: runs of plain decode steps at once (SimConfig.decode_runs)
    result.py      SimResult (what a run produced) and Batch (a step in flight)
    policies.py    admission, victim and preemption policies by name; PolicySpec, Knobs, bind
    predictors.py  output-length predictors, registered by name
    metrics.py     per-request and aggregate metrics, JSON and CSV; METRICS names them
    plots.py       figures of a run and of a comparison
    steptime.py    what a step costs (StepPricer): the profile's costs, or constant/linear
    study.py       the policy comparison behind `kvbench compare-policies` (tables, files)
    sweep/         sweeps: spec, plan, run, outputs, plot
"""

from kvbench.sim.config import Costs, SimConfig
from kvbench.sim.engine import Simulator, simulate
from kvbench.sim.metrics import summarize
from kvbench.sim.result import SimResult
from kvbench.sim.workloads import Workload, load_workload, read_trace, synthetic

__all__ = ["Costs", "SimConfig", "SimResult", "Simulator", "Workload", "load_workload",
           "read_trace", "simulate", "summarize", "synthetic"]
