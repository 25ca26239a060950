"""The study's library side: inputs of a run from command options (kvbench.sim.run), the
policy list, the fan-out over policies and the comparison table (kvbench.sim.study); and
`summary_lines` (kvbench.sim.metrics), what `kvbench simulate` prints."""


import pytest
from rich.console import Console

from kvbench.hardware import get_hardware
from kvbench.models import get_model
from kvbench.profile import analytic_profile, save
from kvbench.sim import run as sim_run
from kvbench.sim.config import DEFAULT_MODEL, SimConfig
from kvbench.sim.metrics import METRICS, summarize, summary_lines
from kvbench.sim.run import STUDY_RATE_SCALE, RunSpec
from kvbench.sim.study import (
    STUDY_POLICIES,
    TABLE_COLUMNS,
    compare_policies,
    comparison_rows,
    comparison_table,
    parse_policies,
    run_one,
)
from kvbench.sim.workloads import AZURE_CONV_TRACE, WorkloadError, load_workload

SPEC = "requests=40,rate=30,long-prompt=0.3,long-output=0.3"


def sim_inputs(study_default=False, **options):
    """(workload, config, costs) from flat command options, as the commands get them."""
    return RunSpec.from_options(**options).resolve(study_default)


def test_inputs_from_a_synthetic_spec_and_analytic_costs():
    workload, config, costs = sim_inputs(synthetic=SPEC, seed=3, num_gpu_blocks=120,
                                         admission="future-kv")
    assert workload.num_requests == 40 and workload.name == load_workload(None, SPEC, seed=3).name
    assert costs.source == "analytic" and costs.model.name == DEFAULT_MODEL == "llama-2-7b"
    assert config == SimConfig.build(hardware="h100-sxm", block_size=16, seed=3,
                                     num_gpu_blocks=120, admission="future-kv")


def test_inputs_take_model_and_block_size_from_a_profile(tmp_path):
    path = save(analytic_profile(get_model("qwen2.5-7b"), get_hardware("l4"), block_size=32),
                tmp_path / "p.json")
    _, config, costs = sim_inputs(synthetic=SPEC, profile=path, hardware="l4")
    assert (costs.model.name, config.replica.block_size, config.replica.hardware) == (
        "qwen2.5-7b", 32, "l4")
    assert costs.costs.block_size == 32 and costs.source == "analytic"
    with pytest.raises(ValueError, match="either --profile or --model, not both"):
        sim_inputs(synthetic=SPEC, profile=path, model="tiny")


def test_the_study_defaults_to_the_azure_trace_at_its_rate(monkeypatch):
    calls = []

    def fake_load(trace, synthetic, rate_scale, *args):
        calls.append((trace, synthetic, rate_scale))
        return load_workload(None, SPEC)

    monkeypatch.setattr(sim_run, "load_workload", fake_load)
    sim_inputs(study_default=True)
    sim_inputs(study_default=True, rate_scale=0.5)
    sim_inputs(synthetic=SPEC, study_default=True)
    sim_inputs(synthetic=SPEC)
    assert calls == [(AZURE_CONV_TRACE, None, STUDY_RATE_SCALE), (AZURE_CONV_TRACE, None, 0.5),
                     (None, SPEC, 1.0), (None, SPEC, 1.0)]


def test_without_the_study_default_a_workload_must_be_named():
    with pytest.raises(WorkloadError, match="exactly one"):
        sim_inputs()


def test_parse_policies():
    assert parse_policies(None) == list(STUDY_POLICIES)
    assert parse_policies(" fcfs/lifo/swap/oracle , ,reserve-max/lcf/recompute/max") == [
        "fcfs/lifo/swap/oracle", "reserve-max/lcf/recompute/max"]
    assert parse_policies(",") == []


def test_compare_policies_in_order_with_progress_in_one_or_two_processes():
    workload, base, costs = sim_inputs(synthetic=SPEC, num_gpu_blocks=300)
    policies = ["fcfs/lifo/recompute/oracle", "future-kv/lifo/recompute/oracle",
                "fcfs/cost-aware/swap/history"]
    done = []
    results = compare_policies(workload, policies, base, costs, progress=done.append)
    assert done == [1, 2, 3]
    assert [r.config.policy_name for r in results] == policies
    single = summarize(run_one(workload, base.replace(victim="cost-aware", preemption="swap",
                                                      predictor="history"), costs))
    assert summarize(results[2]) == single
    parallel = compare_policies(workload, policies, base, costs, jobs=2)
    assert [summarize(r) for r in parallel] == [summarize(r) for r in results]


def test_comparison_table_has_a_short_header_per_column():
    workload, base, costs = sim_inputs(synthetic=SPEC, num_gpu_blocks=300)
    results = compare_policies(workload, ["fcfs/lifo/recompute/oracle",
                                          "future-kv/lifo/recompute/oracle"], base, costs)
    summaries = [summarize(r) for r in results]
    table = comparison_table(results, summaries)
    assert [c.header for c in table.columns] == [METRICS[c].label for c in TABLE_COLUMNS]
    console = Console(width=200, record=True, file=None, soft_wrap=True)
    with console.capture() as capture:
        console.print(table)
    text = capture.get()
    assert text.splitlines()[0].strip() == f"{workload.name} · llama-2-7b · 300 GPU blocks"
    row = comparison_rows(summaries)[1]
    assert f"{row['preemptions_removed_pct']:.4g}" in text.splitlines()[-2]


# --- metrics.summary_lines ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def summary():
    workload, config, costs = sim_inputs(synthetic=SPEC, num_gpu_blocks=300)
    return summarize(run_one(workload, config, costs))


def test_summary_lines(summary):
    lines = summary_lines(summary)
    assert lines[0] == "policy: fcfs/lifo/recompute/oracle"
    assert lines[3] == "completed: 40 (0 rejected, 0 unfinished)"
    assert lines[4] == (f"preemptions: {summary['preemptions']} (0 swapped, "
                        f"{summary['preemptions']} recomputed) of "
                        f"{summary['preempted_requests']} requests")
    ttft = [summary[f"ttft_p{p}_s"] for p in (50, 90, 99)]
    assert lines[8] == f"ttft_s: p50 {ttft[0]:.4g} p90 {ttft[1]:.4g} p99 {ttft[2]:.4g}"
    assert lines[-1] == f"max_kv_blocks_used: {summary['max_kv_blocks_used']} of 300"


def test_summary_lines_of_a_run_gone_wrong(summary):
    stuck = {**summary, "livelock": {"reason": "request 7 cannot fit"}, "rejected": 2,
             "rejections": {3: "prompt of 9000 tokens exceeds the cache", 5: "too long"},
             "tpot_p50_ms": None, "tpot_p90_ms": None, "tpot_p99_ms": None}
    lines = summary_lines(stuck)
    assert "tpot_ms: n/a" in lines
    assert lines[-2:] == ["livelock: request 7 cannot fit",
                          "rejected: request 3: prompt of 9000 tokens exceeds the cache"]
