"""Policies and predictors by name: each registered one on hand-built states."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvbench.hardware import get_hardware
from kvbench.models import get_model
from kvbench.profile import analytic_profile
from kvbench.selector import select_preemption_strategy
from kvbench.sim import SimConfig, Simulator, Workload, simulate, summarize
from kvbench.sim.policies import ADMISSION, PREEMPTIONS, VICTIMS, future_peak_blocks
from kvbench.sim.predictors import MIN_HISTORY_SAMPLES, PREDICTORS
from kvbench.sim.requests import RUNNING, cdiv

PROFILE = analytic_profile(get_model("llama-2-7b"), get_hardware("h100-sxm"))


def running_sim(prompt, generated, output=None, max_tokens=None, **config) -> Simulator:
    """A simulator whose requests are all running, decoding, with the given token counts."""
    prompt, generated = np.asarray(prompt), np.asarray(generated)
    n = prompt.size
    output = np.asarray(output) if output is not None else generated + 100
    limit = np.asarray(max_tokens) if max_tokens is not None else output
    work = Workload("hand-built", np.zeros(n), prompt, output, limit)
    sim = Simulator(work, SimConfig(**{"gpu_blocks": 1000, **config}), PROFILE)
    req = sim.requests
    req.generated_tokens[:] = generated
    req.computed_tokens[:] = prompt + generated - 1
    req.gpu_blocks[:] = cdiv(req.computed_tokens, sim.block_size)
    req.predicted_output_tokens[:] = sim.predictor.predict(np.arange(n))
    req.state[:] = RUNNING
    sim.running = np.arange(n)
    sim.free_gpu_blocks -= int(req.gpu_blocks.sum())
    return sim


def test_registries_hold_the_issue_names():
    assert set(ADMISSION) == {"fcfs", "reserve-max", "future-kv"}
    assert set(VICTIMS) == {"lifo", "lcf", "cost-aware"}
    assert set(PREEMPTIONS) == {"recompute", "swap", "selector"}
    assert set(PREDICTORS) == {"oracle", "noisy", "history", "max"}


# --- victims -----------------------------------------------------------------------------------

def test_lifo_evicts_the_most_recently_admitted():
    sim = running_sim([100, 50, 300], [5, 5, 5])
    assert VICTIMS["lifo"](sim, np.array([2, 0, 1])) == 1


def test_lcf_evicts_the_least_computed_latest_on_ties():
    sim = running_sim([100, 50, 300, 50], [5, 5, 5, 5])
    assert VICTIMS["lcf"](sim, np.arange(4)) == 3
    assert VICTIMS["lcf"](sim, np.array([0, 1, 2])) == 1


def test_cost_aware_evicts_cheapest_per_mb_and_spares_nearly_done():
    # Recompute cost per MB grows with context (the n² term): the shortest is cheapest per MB.
    sim = running_sim([4000, 700, 2000], [5, 5, 5], output=[200, 200, 200])
    assert VICTIMS["cost-aware"](sim, np.arange(3)) == 1
    sim = running_sim([4000, 700, 2000], [5, 198, 5], output=[200, 200, 200])  # 1 finishes soon
    assert VICTIMS["cost-aware"](sim, np.arange(3)) == 2
    sim = running_sim([700, 800], [198, 198], output=[200, 200])  # all protected: cheapest
    assert VICTIMS["cost-aware"](sim, np.arange(2)) == 0


def test_cost_aware_prices_by_the_preemption_mode():
    tokens = np.array([16, 4000])
    sim = running_sim(tokens, [1, 1], preemption="swap", cpu_swap_blocks=10_000)
    costs = sim.costs
    freed_mb = sim.requests.gpu_blocks * sim.block_bytes / 1e6
    expected = int(np.argmin(costs.swap_ms(tokens) / freed_mb))
    assert VICTIMS["cost-aware"](sim, np.arange(2)) == expected


# --- preemption modes --------------------------------------------------------------------------

def test_recompute_never_swaps():
    sim = running_sim([100, 2000], [1, 1], cpu_swap_blocks=10_000)
    assert not PREEMPTIONS["recompute"](sim, np.arange(2)).any()


def test_swap_only_while_cpu_space_remains():
    sim = running_sim([100, 2000], [1, 1], cpu_swap_blocks=10)  # 7 and 125 blocks
    np.testing.assert_array_equal(PREEMPTIONS["swap"](sim, np.arange(2)), [True, False])


@pytest.mark.parametrize("model", ["llama-2-7b", "llama-3-8b", "qwen2.5-0.5b"])
def test_selector_matches_the_cli_selector(model):
    profile = analytic_profile(get_model(model), get_hardware("l4"))
    tokens = np.array([1, 16, 300, 5000, 20000])
    work = Workload("t", np.zeros(5), tokens, np.full(5, 10), np.full(5, 10))
    sim = Simulator(work, SimConfig(preemption="selector", gpu_blocks=5000,
                                    cpu_swap_blocks=100_000), profile)
    sim.requests.computed_tokens[:] = tokens
    expected = np.array(select_preemption_strategy(tokens, profile)["strategies"]) == "swap"
    np.testing.assert_array_equal(PREEMPTIONS["selector"](sim, np.arange(5)), expected)
    sim.free_cpu_blocks = 0
    assert not PREEMPTIONS["selector"](sim, np.arange(5)).any()


# --- admission ---------------------------------------------------------------------------------

def brute_force_peak_blocks(known, remaining, block_size):
    """Step the growth one token at a time and take the largest total (exact blocks)."""
    peak = 0
    for t in range(int(remaining.max()) + 1):
        alive = remaining >= t
        peak = max(peak, int(cdiv(known[alive] + t, block_size).sum()))
    return peak


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 500), st.integers(1, 200)), min_size=1, max_size=20),
       st.sampled_from([1, 16]))
def test_future_peak_bounds_the_stepped_peak(requests, block_size):
    known, remaining = (np.array(x) for x in zip(*requests))
    bound = future_peak_blocks(known, remaining, block_size)
    exact = brute_force_peak_blocks(known, remaining, block_size)
    assert exact <= bound <= exact + 2 * known.size + 1


def test_future_kv_admits_only_within_capacity():
    # Two running requests, 101 tokens each, 100 and 300 to go; a candidate of 200 + 200.
    # Bound: max((402 + 3·100)/16 + 3, (301 + 2·200)/16 + 2, (101 + 300)/16 + 1) = 46.9 blocks.
    work = Workload("t", np.zeros(3), np.array([100, 100, 200]), np.array([101, 301, 200]),
                    np.array([101, 301, 200]))
    for capacity, admitted in ((60, True), (45, False)):
        sim2 = Simulator(work, SimConfig(admission="future-kv", gpu_blocks=capacity), PROFILE)
        req = sim2.requests
        req.generated_tokens[:2] = 1
        req.predicted_output_tokens[:] = req.output_tokens
        sim2.running = np.arange(2)
        assert ADMISSION["future-kv"](sim2, 2) is admitted


def test_future_kv_limits_predicted_long_requests():
    work = Workload("t", np.zeros(3), np.full(3, 10), np.array([600, 600, 600]),
                    np.full(3, 600))
    config = SimConfig(admission="future-kv", gpu_blocks=10_000, long_output_tokens=512,
                       max_long_requests=1)
    sim = Simulator(work, config, PROFILE)
    sim.requests.predicted_output_tokens[:] = 600
    sim.running = np.array([0])
    assert ADMISSION["future-kv"](sim, 1) is False
    sim.requests.predicted_output_tokens[1] = 100
    assert ADMISSION["future-kv"](sim, 1) is True


def test_reserve_max_reserves_prompt_plus_max_tokens():
    work = Workload("t", np.zeros(2), np.array([100, 100]), np.array([10, 10]),
                    np.array([700, 700]))
    sim = Simulator(work, SimConfig(admission="reserve-max", gpu_blocks=100), PROFILE)
    sim.running = np.array([0])  # 800 tokens = 50 blocks reserved
    assert ADMISSION["reserve-max"](sim, 1) is True
    sim.num_gpu_blocks = 99
    assert ADMISSION["reserve-max"](sim, 1) is False
    assert ADMISSION["fcfs"](sim, 1) is True


def test_no_admission_in_a_step_that_preempted(monkeypatch):
    """vLLM V1: the waiting queue is not served in a step that preempted."""
    steps = []
    schedule, admit = Simulator._schedule_running, Simulator._admit_waiting

    def recording_schedule(self):
        out = schedule(self)
        steps.append({"preempted": out[3], "admission_tried": False})
        return out

    def recording_admit(self, budget):
        steps[-1]["admission_tried"] = True
        return admit(self, budget)

    monkeypatch.setattr(Simulator, "_schedule_running", recording_schedule)
    monkeypatch.setattr(Simulator, "_admit_waiting", recording_admit)
    rng = np.random.default_rng(5)
    n = 40
    work = Workload("t", np.cumsum(rng.exponential(0.01, n)), rng.integers(16, 300, n),
                    rng.integers(20, 200, n), np.full(n, 200))
    summary = summarize(simulate(work, SimConfig(gpu_blocks=40, max_num_batched_tokens=64),
                                 PROFILE))
    assert summary["completed"] == n and summary["preemptions"] > 0
    assert any(s["preempted"] for s in steps)
    assert not any(s["preempted"] and s["admission_tried"] for s in steps)
    assert any(s["admission_tried"] for s in steps)


# --- predictors --------------------------------------------------------------------------------

def make_predictor(name, output, prompt=None, max_tokens=None, **config):
    n = len(output)
    output = np.asarray(output)
    work = Workload("t", np.zeros(n), np.asarray(prompt if prompt is not None else [100] * n),
                    output, np.asarray(max_tokens if max_tokens is not None else output * 4))
    sim = Simulator(work, SimConfig(predictor=name, **config), PROFILE)
    return sim.predictor, sim.requests


def test_oracle_and_max():
    oracle, _ = make_predictor("oracle", [5, 50, 500])
    np.testing.assert_array_equal(oracle.predict(np.arange(3)), [5, 50, 500])
    top, _ = make_predictor("max", [5, 50, 500])
    np.testing.assert_array_equal(top.predict(np.arange(3)), [20, 200, 2000])


def test_noisy_is_seeded_lognormal_and_bounded():
    output = np.full(4000, 200)
    noisy, _ = make_predictor("noisy", output, noise_sigma=0.5, seed=3)
    again, _ = make_predictor("noisy", output, noise_sigma=0.5, seed=3)
    other, _ = make_predictor("noisy", output, noise_sigma=0.5, seed=4)
    ids = np.arange(output.size)
    guess = noisy.predict(ids)
    np.testing.assert_array_equal(guess, again.predict(ids))
    assert not np.array_equal(guess, other.predict(ids))
    assert guess.min() >= 1 and guess.max() <= 800
    assert np.std(np.log(guess / 200)) == pytest.approx(0.5, rel=0.1)
    exact, _ = make_predictor("noisy", output, noise_sigma=0.0)
    np.testing.assert_array_equal(exact.predict(ids), output)


def test_history_uses_the_prompt_bucket_quantile():
    n = 2 * MIN_HISTORY_SAMPLES + 2
    prompt = [100] * MIN_HISTORY_SAMPLES + [3000] * MIN_HISTORY_SAMPLES + [120, 2500]
    output = list(range(1, MIN_HISTORY_SAMPLES + 1)) + [400] * MIN_HISTORY_SAMPLES + [7, 7]
    history, req = make_predictor("history", output, prompt, max_tokens=[1000] * n,
                                  history_quantile=0.5)
    last = np.array([n - 2, n - 1])
    np.testing.assert_array_equal(history.predict(last), [1000, 1000])  # nothing seen: max
    history.observe(np.arange(MIN_HISTORY_SAMPLES))  # the short-prompt bucket only
    short_median = int(np.rint(np.median(np.arange(1, MIN_HISTORY_SAMPLES + 1))))
    # 120 shares the 64-127 bucket; 2500 falls back to all buckets (the same samples so far).
    np.testing.assert_array_equal(history.predict(last), [short_median, short_median])
    history.observe(np.arange(MIN_HISTORY_SAMPLES, 2 * MIN_HISTORY_SAMPLES))
    assert history.predict(last).tolist() == [short_median, 400]


def test_outliving_a_prediction_doubles_it():
    work = Workload("t", np.zeros(1), np.array([10]), np.array([50]), np.array([60]))
    sim = Simulator(work, SimConfig(predictor="noisy", noise_sigma=0.0, gpu_blocks=100),
                    PROFILE)
    sim.predictor.predict = lambda ids: np.array([4])
    seen = set()
    while sim.step():
        seen.add(int(sim.requests.predicted_output_tokens[0]))
    assert seen >= {8, 16, 32, 60}


def test_each_policy_by_name_completes_a_pressured_workload():
    rng = np.random.default_rng(0)
    n = 60
    work = Workload("t", np.cumsum(rng.exponential(0.02, n)), rng.integers(16, 600, n),
                    rng.integers(1, 200, n), np.full(n, 200))
    base = SimConfig(gpu_blocks=80, cpu_swap_blocks=20)
    for axis, registry in (("admission", ADMISSION), ("victim", VICTIMS),
                           ("preemption", PREEMPTIONS), ("predictor", PREDICTORS)):
        for name in registry:
            config = dataclasses.replace(base, **{axis: name})
            summary = summarize(simulate(work, config, PROFILE))
            assert summary["completed"] == n, (axis, name)
            assert summary["policy"] == config.policy_name
