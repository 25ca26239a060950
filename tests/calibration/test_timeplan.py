"""The time plan: probes, an estimate per phase, sizes cut to the budget, a refusal up front."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from kvbench.calibration import timeplan
from kvbench.calibration.memory import MIN_POINTS
from kvbench.calibration.pipeline import (
    calibrate,
    calibration_plan,
    calibration_summary,
    plan_time,
)
from kvbench.calibration.plans import PLANS, CalibrationPlan, TokenSweep
from kvbench.calibration.timeplan import Probes, TimePlanError, fit_budget, probe
from kvbench.models import from_hf_dict, get_model

IMPLS = ("torch", "per_block")
PLENTY = {"host": 2**50, "device": 2**50}  # memory is not what these tests are about
# A 2-core AVX2-only CPU in float32, roughly (issue 20: a 512x896·896x4864 product in 108 ms
# on one of its threads): 40 GFLOP/s, 10 GB/s.
SLOW_CPU = Probes({"float32": 0.04, "bfloat16": 0.0007}, attention_ms=40.0,
                  swap_ms_per_block={"torch": 0.1, "per_block": 1.5}, stream_gbps=10.0,
                  randn_ns=8.0)
HUNDRED_B = from_hf_dict({"hidden_size": 12288, "num_hidden_layers": 96,
                          "num_attention_heads": 96, "num_key_value_heads": 8,
                          "intermediate_size": 49152, "vocab_size": 256000, "head_dim": 128},
                         "test", "dense-100b", dtype="float32")


def plan_for(spec, quick=True, probes=SLOW_CPU, budget_s=None):
    memory_plan = calibration_plan(spec, "cpu", 16, quick, available=PLENTY)
    return fit_budget(spec, "cpu", 16, memory_plan, PLANS[("cpu", quick)].interleave_s, quick,
                      IMPLS, probes=probes, budget_s=budget_s)


def test_probes_measure_this_machine():
    probes = probe(get_model("tiny"), "cpu", 16, IMPLS)
    assert probes.tflops["float32"] > 0 and probes.attention_ms > 0 and probes.randn_ns > 0
    assert probes.stream_gbps > 0 and set(probes.swap_ms_per_block) == set(IMPLS)


def test_a_plan_that_fits_is_left_as_it_is():
    plan = plan_for(get_model("tiny"))
    assert plan.shrunk == [] and plan.fits
    assert plan.sizes.prefill == calibration_plan(get_model("tiny"), "cpu", 16, True,
                                                  available=PLENTY).prefill_sizes
    assert plan.lines()[0].startswith("about ") and "s target for --quick: " in plan.lines()[0]


def test_a_slow_model_is_cut_to_the_budget_keeping_enough_points():
    spec = get_model("qwen2.5-0.5b", dtype="float32")
    plan = plan_for(spec)
    assert plan.fits and plan.budget_s == timeplan.BUDGET_S[True]
    assert plan.sizes.prefill[-1] < 2048 and len(plan.sizes.prefill) >= MIN_POINTS["prefill"]
    assert len(plan.sizes.swap) >= MIN_POINTS["swap"]
    assert len(plan.sizes.decode_batches) * len(plan.sizes.decode_contexts) >= \
        MIN_POINTS["decode"]
    assert any(change.startswith("prefill 9 sizes 32-2048 tokens -> 9 sizes 32-")
               for change in plan.shrunk)
    assert plan.lines()[1].startswith("shrunk to fit the budget: ")
    # The estimate falls as the plan shrinks: a bigger budget keeps more.
    roomy = plan_for(spec, budget_s=10 * plan.budget_s)
    assert roomy.sizes.prefill[-1] > plan.sizes.prefill[-1]


def test_estimates_grow_with_the_work():
    spec = get_model("qwen2.5-0.5b", dtype="float32")
    base = plan_for(spec, budget_s=1e9)
    slower = plan_for(spec, probes=dataclasses.replace(
        SLOW_CPU, tflops={"float32": 0.02}, attention_ms=80.0), budget_s=1e9)
    assert slower.estimate_s["prefill"] > 1.5 * base.estimate_s["prefill"]
    assert slower.estimate_s["swap"] == pytest.approx(base.estimate_s["swap"])


def test_a_model_whose_smallest_plan_takes_too_long_is_refused_in_one_line():
    with pytest.raises(TimePlanError) as refused:
        plan_for(HUNDRED_B)
    message = str(refused.value)
    assert "\n" not in message and message.startswith(
        "calibrating dense-100b (float32) on cpu would take about ")
    assert "even at its smallest plan" in message and "over the 10.0 min bound" in message


def test_the_refusal_comes_before_anything_long(run_cli, tmp_path, monkeypatch):
    """Through the CLI, with this machine's own probes: one error line, in seconds."""
    monkeypatch.setattr(timeplan, "REFUSE_S", {True: 1.0, False: 1.0})
    code, out, err = run_cli("calibrate", "--device", "cpu", "--model", "qwen2.5-0.5b",
                             "--dtype", "float32", "--quick", "--out", str(tmp_path / "p.json"))
    assert code == 2 and out == ""
    assert err.splitlines()[-1].startswith("error: calibrating qwen2.5-0.5b (float32) on cpu "
                                           "would take about ")
    assert not (tmp_path / "p.json").exists()


def test_the_profile_records_the_plan_beside_the_measured_seconds():
    spec = get_model("tiny")
    tiny = CalibrationPlan(swap_tokens=TokenSweep(16, 2048, 6),
                           prefill_tokens=TokenSweep(16, 512, 6), decode_batch_sizes=(1, 4, 8),
                           decode_contexts=(32, 128), per_block_max_tokens=None,
                           swap_interleave_s=0.2, prefill_interleave_s=0.2)
    memory_plan = calibration_plan(spec, "cpu", 8, True, plan=tiny)
    time_plan = plan_time(spec, "cpu", memory_plan, 8, True, plan=tiny)
    run = calibrate(spec, "cpu", block_size=8, quick=True, plan=tiny, time_plan=time_plan)
    extra = run.profile.extra
    assert set(extra["phase_seconds"]) == {"swap", "prefill", "decode"}
    assert set(extra["time_plan"]["estimate_s"]) == {"swap", "prefill", "decode", "fixed"}
    assert extra["time_plan"]["interleave_s"] == {"swap": 0.2, "prefill": 0.2}
    lines = calibration_summary(run.profile, [Path("p.json"), Path("p.samples.json"),
                                              Path("p.png")])
    assert any(line.startswith("time: swap ") and "(planned " in line for line in lines)
