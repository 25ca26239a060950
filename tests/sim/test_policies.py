"""Policies and predictors by name: each registered one on hand-built states."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvbench.selector import select_preemption_strategy
from kvbench.sim import Costs, SimConfig, Simulator, Workload, simulate, summarize
from kvbench.sim.policies import ADMISSION, PREEMPTIONS, VICTIMS, future_peak_blocks
from kvbench.sim.predictors import MIN_HISTORY_SAMPLES, PREDICTORS
from kvbench.sim.requests import cdiv
from kvbench.sim.view import Requests, StateView

COSTS = Costs.analytic("llama-2-7b", "h100-sxm")
BLOCK_BYTES = 16 * COSTS.model.kv_bytes_per_token


def batch(computed, remaining=None, known=None, max_total=None, shared=None) -> Requests:
    """Decoding requests with `computed` tokens in the cache (blocks to match; `shared` of them
    also held by another running request)."""
    computed = np.asarray(computed)
    return Requests.of(computed_tokens=computed,
                       shared_blocks=np.zeros(computed.size) if shared is None else shared,
                       known_tokens=computed + 1 if known is None else known,
                       blocks=cdiv(computed, 16),
                       predicted_remaining=np.full(computed.size, 100) if remaining is None
                       else remaining,
                       max_total_tokens=computed + 100 if max_total is None else max_total)


def view(running: Requests, num_gpu_blocks=1000, free_cpu_blocks=0, costs=COSTS) -> StateView:
    return StateView(running=running, block_size=16, num_gpu_blocks=num_gpu_blocks,
                     free_cpu_blocks=free_cpu_blocks,
                     block_bytes=16 * costs.model.kv_bytes_per_token, costs=costs.costs)


def pick(name, state: StateView, swaps=None, **knobs) -> int:
    swaps = np.zeros(state.running.size, bool) if swaps is None else swaps
    return VICTIMS[name](state, swaps, **knobs)


def test_registries_hold_the_issue_names():
    assert set(ADMISSION) == {"fcfs", "reserve-max", "future-kv"}
    assert set(VICTIMS) == {"lifo", "lcf", "cost-aware"}
    assert set(PREEMPTIONS) == {"recompute", "swap", "selector"}
    assert set(PREDICTORS) == {"oracle", "noisy", "history", "max"}


# --- victims -----------------------------------------------------------------------------------

def test_lifo_evicts_the_most_recently_admitted():
    assert pick("lifo", view(batch([105, 55, 305]))) == 2


def test_lcf_evicts_the_least_computed_latest_on_ties():
    assert pick("lcf", view(batch([104, 54, 304, 54]))) == 3
    assert pick("lcf", view(batch([104, 54, 304]))) == 1


def test_cost_aware_evicts_cheapest_per_mb_and_spares_nearly_done():
    # Recompute cost per MB grows with context (the n² term): the shortest is cheapest per MB.
    assert pick("cost-aware", view(batch([4004, 704, 2004], [195, 195, 195]))) == 1
    # The second finishes within protect_steps: spared.
    assert pick("cost-aware", view(batch([4004, 897, 2004], [195, 2, 195]))) == 2
    # All protected: the cheapest all the same.
    assert pick("cost-aware", view(batch([897, 997], [2, 2]))) == 0
    assert pick("cost-aware", view(batch([4004, 897, 2004], [195, 2, 195])),
                protect_steps=1) == 1


def test_cost_aware_prices_by_the_preemption_mode():
    tokens = np.array([16, 20000])  # swap is cheaper per MB for the long one, recompute not
    state = view(batch(tokens))
    freed_mb = cdiv(tokens, 16) * BLOCK_BYTES / 1e6
    by_swap = int(np.argmin(COSTS.costs.swap_ms(tokens) / freed_mb))
    by_recompute = int(np.argmin(COSTS.costs.recompute_ms(tokens) / freed_mb))
    assert by_swap != by_recompute
    assert pick("cost-aware", state, swaps=np.array([True, True])) == by_swap
    assert pick("cost-aware", state) == by_recompute


# --- preemption modes --------------------------------------------------------------------------

def test_recompute_never_swaps():
    state = view(batch([100, 2000]), free_cpu_blocks=10_000)
    assert not PREEMPTIONS["recompute"](state, state.running).any()


def test_swap_only_while_cpu_space_remains():
    state = view(batch([100, 2000]), free_cpu_blocks=10)  # 7 and 125 blocks
    np.testing.assert_array_equal(PREEMPTIONS["swap"](state, state.running), [True, False])


@pytest.mark.parametrize("model", ["llama-2-7b", "llama-3-8b", "qwen2.5-0.5b"])
def test_selector_matches_the_cli_selector(model):
    costs = Costs.analytic(model, "l4")
    tokens = np.array([1, 16, 300, 5000, 20000])
    state = view(batch(tokens), free_cpu_blocks=100_000, costs=costs)
    expected = np.array(select_preemption_strategy(tokens, {"model": model, "hardware": "l4"})
                        ["strategies"]) == "swap"
    np.testing.assert_array_equal(PREEMPTIONS["selector"](state, state.running), expected)
    state = view(batch(tokens), free_cpu_blocks=0, costs=costs)
    assert not PREEMPTIONS["selector"](state, state.running).any()


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
    running = batch([100, 100], remaining=[100, 300], known=[101, 101])
    candidate = batch([0], remaining=[200], known=[200])
    assert ADMISSION["future-kv"](view(running, num_gpu_blocks=60), candidate) is True
    assert ADMISSION["future-kv"](view(running, num_gpu_blocks=45), candidate) is False


def test_future_kv_limits_predicted_long_requests():
    running = batch([10], remaining=[590])
    knobs = {"long_output_tokens": 512, "max_long_requests": 1}
    assert ADMISSION["future-kv"](view(running), batch([0], [600]), **knobs) is False
    assert ADMISSION["future-kv"](view(running), batch([0], [100]), **knobs) is True
    assert ADMISSION["future-kv"](view(running), batch([0], [600])) is True


def test_victims_count_only_what_preempting_frees():
    # The first request's 100 blocks are a system prompt the third request shares: preempting
    # it frees 4 blocks and recomputes 64 tokens, less than the second's 1000.
    running = batch([1664, 1000, 1700], shared=[100, 0, 100])
    assert pick("lcf", view(running)) == 0
    assert pick("lcf", view(batch([1664, 1000, 1700]))) == 1
    # cost-aware: the freed MB and the recompute past the kept prefix, per MB.
    costs = COSTS.costs
    per_mb = (costs.recompute_ms(np.array([1664, 1000, 1700]))
              - costs.recompute_ms(np.array([1600, 0, 1600])).clip(0) * [1, 0, 1]) / (
        (cdiv(np.array([1664, 1000, 1700]), 16) - [100, 0, 100]) * BLOCK_BYTES / 1e6)
    assert pick("cost-aware", view(running)) == int(np.argmin(per_mb))


def test_future_kv_counts_the_candidate_after_its_shared_prefix():
    running = batch([1000], remaining=[10], known=[1001])
    alone = batch([0], remaining=[10], known=[1000])
    assert ADMISSION["future-kv"](view(running, num_gpu_blocks=100), alone) is False
    # 50 of its 63 prompt blocks are the running request's prefix: it needs 14 more.
    sharing = batch([0], remaining=[10], known=[1000], shared=[50])
    assert ADMISSION["future-kv"](view(running, num_gpu_blocks=100), sharing) is True


def test_reserve_max_reserves_prompt_plus_max_tokens():
    running, candidate = batch([101], max_total=[800]), batch([0], max_total=[800])  # 50 blocks
    assert ADMISSION["reserve-max"](view(running, num_gpu_blocks=100), candidate) is True
    assert ADMISSION["reserve-max"](view(running, num_gpu_blocks=99), candidate) is False
    assert ADMISSION["fcfs"](view(running, num_gpu_blocks=99), candidate) is True


def test_no_admission_in_a_step_that_preempted(monkeypatch):
    """vLLM V1: the waiting queue is not served in a step that preempted."""
    steps = []
    schedule, admit = Simulator._schedule_running, Simulator._admit_waiting

    def recording_schedule(self):
        out = schedule(self)
        steps.append({"preempted": out[3], "admission_tried": False})
        return out

    def recording_admit(self, budget, admitted):
        steps[-1]["admission_tried"] = True
        return admit(self, budget, admitted)

    monkeypatch.setattr(Simulator, "_schedule_running", recording_schedule)
    monkeypatch.setattr(Simulator, "_admit_waiting", recording_admit)
    rng = np.random.default_rng(5)
    n = 40
    work = Workload("t", np.cumsum(rng.exponential(0.01, n)), rng.integers(16, 300, n),
                    rng.integers(20, 200, n), np.full(n, 200))
    config = SimConfig.build(num_gpu_blocks=40, max_num_batched_tokens=64)
    summary = summarize(simulate(work, config, COSTS))
    assert summary["completed"] == n and summary["preemptions"] > 0
    assert any(s["preempted"] for s in steps)
    assert not any(s["preempted"] and s["admission_tried"] for s in steps)
    assert any(s["admission_tried"] for s in steps)


# --- predictors --------------------------------------------------------------------------------

def predict(predictor, output, prompt=None, max_tokens=None):
    output = np.asarray(output)
    prompt = np.full(output.size, 100) if prompt is None else np.asarray(prompt)
    max_tokens = output * 4 if max_tokens is None else np.asarray(max_tokens)
    return predictor.predict(np.arange(output.size), prompt, max_tokens, output)


def test_oracle_and_max():
    np.testing.assert_array_equal(predict(PREDICTORS["oracle"](), [5, 50, 500]), [5, 50, 500])
    np.testing.assert_array_equal(predict(PREDICTORS["max"](), [5, 50, 500]), [20, 200, 2000])


def test_noisy_is_seeded_lognormal_and_bounded():
    output = np.full(4000, 200)
    noisy = PREDICTORS["noisy"]
    guess = predict(noisy(seed=3, noise_sigma=0.5), output)
    np.testing.assert_array_equal(guess, predict(noisy(seed=3, noise_sigma=0.5), output))
    assert not np.array_equal(guess, predict(noisy(seed=4, noise_sigma=0.5), output))
    assert guess.min() >= 1 and guess.max() <= 800
    assert np.std(np.log(guess / 200)) == pytest.approx(0.5, rel=0.1)
    np.testing.assert_array_equal(predict(noisy(noise_sigma=0.0), output), output)


def test_noisy_factor_belongs_to_the_request_id_whatever_the_call_order():
    noisy = PREDICTORS["noisy"](seed=1)
    output, prompt = np.full(10, 200), np.full(10, 10)
    late = noisy.predict(np.array([7, 9]), prompt[:2], output[:2] * 4, output[:2])
    early = noisy.predict(np.arange(7), prompt[:7], output[:7] * 4, output[:7])
    np.testing.assert_array_equal(np.concatenate([early, late]),
                                  predict(PREDICTORS["noisy"](seed=1), output)[[*range(7), 7, 9]])


def test_history_uses_the_prompt_bucket_quantile():
    prompt = np.array([100] * MIN_HISTORY_SAMPLES + [3000] * MIN_HISTORY_SAMPLES)
    output = np.array(list(range(1, MIN_HISTORY_SAMPLES + 1)) + [400] * MIN_HISTORY_SAMPLES)
    history = PREDICTORS["history"](history_quantile=0.5)
    new_prompts, new_max = np.array([120, 2500]), np.array([1000, 1000])

    def guess():
        return history.predict(np.array([0, 1]), new_prompts, new_max, np.array([7, 7])).tolist()

    assert guess() == [1000, 1000]  # nothing seen: max
    history.observe(prompt[:MIN_HISTORY_SAMPLES], output[:MIN_HISTORY_SAMPLES])
    short_median = int(np.rint(np.median(np.arange(1, MIN_HISTORY_SAMPLES + 1))))
    # 120 shares the 64-127 bucket; 2500 falls back to all buckets (the same samples so far).
    assert guess() == [short_median, short_median]
    history.observe(prompt[MIN_HISTORY_SAMPLES:], output[MIN_HISTORY_SAMPLES:])
    assert guess() == [short_median, 400]


def test_outliving_a_prediction_doubles_it():
    work = Workload("t", np.zeros(1), np.array([10]), np.array([50]), np.array([60]))
    # One step per call, to see each revision (a run of decode steps may span several).
    config = SimConfig.build(predictor="noisy", noise_sigma=0.0, num_gpu_blocks=100,
                             decode_runs=False)
    sim = Simulator(work, config, COSTS)
    sim.predictor.predict = lambda *columns: np.array([4])
    seen = set()
    while sim.step():
        seen.add(int(sim.requests.predicted_output_tokens[0]))
    assert seen >= {8, 16, 32, 60}


def test_each_policy_by_name_completes_a_pressured_workload():
    rng = np.random.default_rng(0)
    n = 60
    work = Workload("t", np.cumsum(rng.exponential(0.02, n)), rng.integers(16, 600, n),
                    rng.integers(1, 200, n), np.full(n, 200))
    base = SimConfig.build(num_gpu_blocks=80, num_cpu_blocks=20)
    for axis, registry in (("admission", ADMISSION), ("victim", VICTIMS),
                           ("preemption", PREEMPTIONS), ("predictor", PREDICTORS)):
        for name in registry:
            config = base.replace(**{axis: name})
            summary = summarize(simulate(work, config, COSTS))
            assert summary["completed"] == n, (axis, name)
            assert summary["policy"] == config.policy_name


def test_every_keyword_of_every_registered_function_is_a_knob():
    """A policy's or predictor's keyword that is not a `Knobs` field could never be set: a
    misspelled knob would keep its default silently."""
    import inspect

    from kvbench.sim.policies import KNOB_FIELDS, REGISTRIES

    positional = {"view", "candidate", "swaps", "victims", "self"}
    for axis, registry in REGISTRIES.items():
        for name, fn in registry.items():
            keywords = set(inspect.signature(fn).parameters) - positional
            assert keywords <= set(KNOB_FIELDS), (axis, name, keywords - set(KNOB_FIELDS))


def test_bind_gives_each_function_its_knobs_and_a_misspelled_knob_is_an_error():
    from kvbench.sim.config import SimConfig
    from kvbench.sim.policies import Knobs, PolicySpec, bind

    bound = bind(ADMISSION["future-kv"], Knobs(headroom_fraction=0.2, protect_steps=9))
    assert bound.keywords == {"headroom_fraction": 0.2, "long_output_tokens": 512,
                              "max_long_requests": None}
    assert PolicySpec.parse("future-kv/lcf/swap/history@vllm-legacy").name == \
        "future-kv/lcf/swap/history@vllm-legacy"
    with pytest.raises(ValueError, match="unknown setting 'headroom_fracton'"):
        SimConfig.build(headroom_fracton=0.1)
