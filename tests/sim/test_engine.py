"""Simulator engine: invariants on random workloads (hypothesis), determinism, the decode
fast path, rejection, livelock and the step pricing, on small seeded workloads."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvbench.costmodel import CostModel, DecodeModel
from kvbench.hardware import get_hardware
from kvbench.models import get_model
from kvbench.profile import analytic_profile
from kvbench.sim import Costs, SimConfig, Simulator, Workload, simulate, summarize
from kvbench.sim.blocks import PrefixCachePool, PrefixHashes
from kvbench.sim.engines import ENGINES
from kvbench.sim.policies import ADMISSION, PREEMPTIONS, VICTIMS
from kvbench.sim.predictors import PREDICTORS
from kvbench.sim.private_blocks import PrivatePrefixPool
from kvbench.sim.requests import FINISHED, REJECTED, RUNNING, SWAPPED, WAITING, cdiv
from kvbench.sim.steplog import first_difference
from kvbench.sim.tokens import random_token_ids
from kvbench.sim.workloads import TokenIds

PROFILE = analytic_profile(get_model("llama-2-7b"), get_hardware("h100-sxm"))
COSTS = Costs.from_profile(PROFILE)


def workload(arrival_s, prompt, output, max_tokens=None) -> Workload:
    output = np.asarray(output, dtype=np.int64)
    return Workload("test", np.asarray(arrival_s, dtype=np.float64),
                    np.asarray(prompt, dtype=np.int64), output,
                    output if max_tokens is None else np.asarray(max_tokens, dtype=np.int64))


@st.composite
def scenarios(draw):
    n = draw(st.integers(1, 24))
    gaps = draw(st.lists(st.floats(0, 0.05), min_size=n, max_size=n))
    prompt = draw(st.lists(st.integers(1, 200), min_size=n, max_size=n))
    output = draw(st.lists(st.integers(1, 150), min_size=n, max_size=n))
    slack = draw(st.lists(st.integers(0, 200), min_size=n, max_size=n))
    work = workload(np.cumsum(gaps) - gaps[0], prompt, output, np.add(output, slack))
    config = SimConfig.build(
        admission=draw(st.sampled_from(sorted(ADMISSION))),
        victim=draw(st.sampled_from(sorted(VICTIMS))),
        preemption=draw(st.sampled_from(sorted(PREEMPTIONS))),
        predictor=draw(st.sampled_from(sorted(PREDICTORS))),
        num_gpu_blocks=draw(st.integers(8, 48)),
        num_cpu_blocks=draw(st.integers(0, 30)),
        max_num_seqs=draw(st.integers(1, 12)),
        max_num_batched_tokens=draw(st.integers(8, 512)),
        enable_chunked_prefill=draw(st.booleans()),
        headroom_fraction=draw(st.sampled_from([0.0, 0.1])),
        max_long_requests=draw(st.sampled_from([None, 0, 2])),
        long_output_tokens=64,
        seed=draw(st.integers(0, 3)),
        engine=draw(st.sampled_from(sorted(ENGINES))),
        enable_prefix_caching=draw(st.sampled_from([None, False, True])),
        async_scheduling=draw(st.sampled_from([None, False, True])),
        watermark=draw(st.sampled_from([None, 0.05])),
    )
    return work, config


def check_books(sim: Simulator) -> None:
    """Block accounting after a step: nothing lost, nothing over capacity."""
    req = sim.requests
    run = sim.running
    assert 0 <= sim.free_gpu_blocks <= sim.usable_blocks
    assert 0 <= sim.free_cpu_blocks <= sim.replica.num_cpu_blocks
    assert int(req.gpu_blocks.sum()) + sim.free_gpu_blocks == sim.usable_blocks
    assert int(req.cpu_blocks.sum()) + sim.free_cpu_blocks == sim.replica.num_cpu_blocks
    assert (req.state[run] == RUNNING).all()
    assert len(set(run.tolist())) == run.size <= sim.replica.max_num_seqs
    np.testing.assert_array_equal(req.gpu_blocks[run], cdiv(req.computed_tokens[run],
                                                            sim.block_size))
    idle = req.state != RUNNING
    assert (req.gpu_blocks[idle] == 0).all()
    assert (req.cpu_blocks[req.state != SWAPPED] == 0).all()
    assert (req.computed_tokens[req.state == WAITING] == 0).all()
    assert (req.generated_tokens <= req.output_tokens).all()
    assert sim.max_kv_blocks_used <= sim.usable_blocks


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenarios())
def test_invariants_on_random_workloads(scenario):
    work, config = scenario
    sim = Simulator(work, config, COSTS)
    while sim.step():
        check_books(sim)
    result = sim.result()
    req = result.requests
    assert result.livelock is None
    rejected = req.state == REJECTED
    assert set(np.flatnonzero(rejected).tolist()) == set(req.reject_reason)
    assert (req.state[~rejected] == FINISHED).all()
    np.testing.assert_array_equal(req.generated_tokens[~rejected], req.output_tokens[~rejected])
    assert sim.free_gpu_blocks == sim.usable_blocks
    assert sim.free_cpu_blocks == sim.replica.num_cpu_blocks
    assert not sim.in_flight
    assert (result.timeline_kv_blocks <= sim.usable_blocks).all()
    done = ~rejected
    assert (req.first_token_s[done] >= req.arrival_s[done]).all()
    assert (req.finish_s[done] >= req.first_token_s[done]).all()
    summary = summarize(result)
    assert summary["completed"] + summary["rejected"] == work.num_requests
    assert 0.0 <= summary["recompute_fraction"] < 1.0
    assert summary["preemptions"] == summary["swap_preemptions"] + summary["recompute_preemptions"]
    if config.policy.preemption == "recompute":
        assert summary["swap_preemptions"] == 0 and summary["swapped_bytes"] == 0
    if summary["recompute_preemptions"] == 0:
        assert summary["recompute_tokens"] == 0 and summary["recompute_fraction"] == 0
    if config.policy.admission == "reserve-max" and not sim.replica.async_scheduling:
        # (Under async scheduling a request is scheduled by max_tokens, one token past an
        # earlier stop, as vLLM does: at the cache's edge that token can preempt it.)
        assert summary["preemptions"] == 0


def random_workload(seed: int, n: int = 200) -> Workload:
    rng = np.random.default_rng(seed)
    return workload(np.cumsum(rng.exponential(0.05, n)), rng.integers(16, 1500, n),
                    rng.integers(1, 400, n), np.full(n, 400))


def test_same_seed_same_result():
    work = random_workload(1)
    config = SimConfig.build(admission="future-kv", victim="cost-aware", preemption="selector",
                       predictor="noisy", num_gpu_blocks=300, num_cpu_blocks=40, seed=7)
    first, second = simulate(work, config, COSTS), simulate(work, config, COSTS)
    assert summarize(first) == summarize(second)
    np.testing.assert_array_equal(first.requests.finish_s, second.requests.finish_s)
    np.testing.assert_array_equal(first.timeline_kv_blocks, second.timeline_kv_blocks)
    third = simulate(work, config.replace(seed=8), COSTS)
    assert not np.array_equal(third.requests.predicted_output_tokens,
                              first.requests.predicted_output_tokens)


def shared_prefix_tokens(work: Workload, seed: int = 0) -> TokenIds:
    """Random token ids where every third request starts with request 0's first 64 tokens."""
    ids = random_token_ids(work, seed)
    flat = ids.flat.copy()
    common = ids.prompt(0)[:64]
    for i in range(3, work.num_requests, 3):
        start = ids.offsets[i]
        k = min(common.size, int(work.prompt_tokens[i]))
        flat[start:start + k] = common[:k]
    return TokenIds(ids.offsets, flat, ids.output_token)


def length_limited_workload(seed: int, n: int) -> Workload:
    """`random_workload`, but every other request stops at its max_tokens."""
    work = random_workload(seed, n)
    max_tokens = work.max_tokens.copy()
    max_tokens[::2] = work.output_tokens[::2]
    return workload(work.arrival_s, work.prompt_tokens, work.output_tokens, max_tokens)


@pytest.mark.parametrize("policy,engine,shared,limits", [
    ("fcfs/lifo/recompute/oracle", "vllm-0.32", False, False),
    ("fcfs/lifo/recompute/oracle", "vllm-0.32", True, False),
    ("fcfs/lifo/recompute/oracle", "vllm-0.32", False, True),
    ("reserve-max/lifo/recompute/max", "vllm-0.32", False, False),
    ("future-kv/lcf/swap/history", "vllm-0.32", False, False),
    ("future-kv/cost-aware/selector/noisy", "vllm-0.32", True, False),
    ("future-kv/lifo/recompute/history", "vllm-0.32", False, True),
    ("fcfs/cost-aware/selector/noisy", "vllm-legacy", False, False),
    ("future-kv/lifo/recompute/oracle", "vllm-legacy", False, False),
    ("fcfs/lifo/recompute/oracle", "vllm-legacy", False, True),
])
def test_decode_fast_path_matches_step_by_step(policy, engine, shared, limits):
    """Skipping plain decode steps in one go (with requests waiting or not) changes nothing
    but the timeline's resolution: the same steps, batches, preemptions, hits and finishes at
    the same times, and the same summary. `limits`: half the requests stop at max_tokens, the
    rest may at max_model_len (under async, vLLM schedules neither's last token)."""
    admission, victim, preemption, predictor = policy.split("/")
    config = SimConfig.build(admission=admission, victim=victim, preemption=preemption,
                       predictor=predictor, num_gpu_blocks=250, num_cpu_blocks=30, engine=engine,
                       max_model_len=1200 if limits else None)
    work = length_limited_workload(2, 150) if limits else random_workload(2, 150)
    tokens = shared_prefix_tokens(work) if shared else None
    fast_sim = Simulator(work, config, COSTS, tokens=tokens, record=True)
    fast = fast_sim.run()
    if config.replica.enable_prefix_caching:
        assert fast_sim.kv.private_prefixes is not shared
    if limits:
        assert fast_sim.stops_at_limit.sum() > work.num_requests // 2
    slow = Simulator(work, config.replace(decode_runs=False), COSTS, tokens=tokens,
                     record=True).run()
    assert first_difference(fast.step_log, slow.step_log) is None
    for column in ("first_token_s", "finish_s", "prefix_hit_tokens", "recompute_tokens",
                   "predicted_output_tokens"):
        np.testing.assert_array_equal(getattr(fast.requests, column),
                                      getattr(slow.requests, column), err_msg=column)
    fast_summary, slow_summary = summarize(fast), summarize(slow)
    for key, value in slow_summary.items():
        if isinstance(value, float):
            assert fast_summary[key] == pytest.approx(value, rel=1e-9), key
        else:
            assert fast_summary[key] == value, key
    assert fast_summary["preemptions"] > 0 or admission != "fcfs"


@pytest.mark.parametrize("seed,policy,overrides", [
    (3, "fcfs/lifo/recompute/oracle", {}),
    (4, "fcfs/lcf/recompute/oracle", {"async_scheduling": False}),
    (5, "fcfs/cost-aware/swap/noisy", {"num_cpu_blocks": 60}),
    (6, "fcfs/cost-aware/selector/history", {"max_num_batched_tokens": 256}),
    (7, "fcfs/lifo/recompute/oracle", {"scheduler_reserve_full_isl": False,
                                       "max_num_seqs": 24}),
    (8, "fcfs/lifo/recompute/max", {"max_model_len": 900, "watermark": 0.05}),
])
def test_private_prefix_pool_schedules_as_the_block_pool(seed, policy, overrides, monkeypatch):
    """With prompts that share no first block the simulator keeps the cache as counts and
    named preempted blocks (PrivatePrefixPool); the full block pool schedules the same steps,
    preemptions, prefix-cache hits and finishes at the same times."""
    admission, victim, preemption, predictor = policy.split("/")
    config = SimConfig.build(admission=admission, victim=victim, preemption=preemption,
                       predictor=predictor, num_gpu_blocks=180, **overrides)
    work = random_workload(seed, 160)
    private = Simulator(work, config, COSTS, record=True)
    assert isinstance(private.kv.pool, PrivatePrefixPool)
    fast = private.run()
    monkeypatch.setattr(PrefixHashes, "first_blocks_distinct", lambda self: False)
    full = Simulator(work, config, COSTS, record=True)
    assert type(full.kv.pool) is PrefixCachePool
    slow = full.run()
    assert first_difference(fast.step_log, slow.step_log) is None
    assert summarize(fast) == summarize(slow)
    assert fast.step_log.num_preemptions > 0
    assert fast.step_log.prefix_hit_tokens > 0 or preemption != "recompute"


def test_fcfs_preempts_under_pressure_and_future_kv_does_not():
    work = random_workload(3)
    base = SimConfig.build(num_gpu_blocks=200)
    fcfs = summarize(simulate(work, base, COSTS))
    future = summarize(simulate(work, base.with_policy("future-kv/lifo/recompute/oracle"), COSTS))
    assert fcfs["preemptions"] > 20 and fcfs["recompute_fraction"] > 0.01
    assert future["preemptions"] <= 0.2 * fcfs["preemptions"]
    assert future["completed"] == fcfs["completed"] == work.num_requests


def test_request_that_can_never_fit_is_rejected_with_a_reason():
    work = workload([0.0, 0.0, 0.1], [100, 5000, 50], [10, 10, 10])
    result = simulate(work, SimConfig.build(num_gpu_blocks=64), COSTS)  # 1024 tokens
    summary = summarize(result)
    assert summary["completed"] == 2 and summary["rejected"] == 1
    # 5009 tokens of KV (the last token is never fed back); vLLM's null block leaves 63.
    assert "5009 tokens of KV need 314 blocks; the cache has 63" in summary["rejections"][1]


def test_no_chunked_prefill_rejects_what_the_token_budget_cannot_hold():
    work = workload([0.0, 0.0], [100, 600], [10, 10])
    config = SimConfig.build(num_gpu_blocks=100, max_num_batched_tokens=512,
                             enable_chunked_prefill=False)
    summary = summarize(simulate(work, config, COSTS))
    assert summary["completed"] == 1
    assert "max_num_batched_tokens (512)" in summary["rejections"][1]


@pytest.mark.parametrize("engine, steps", [("vllm-legacy", 50), ("vllm-0.32", 51)])
def test_livelock_is_reported_not_looped(engine, steps):
    work = workload([0.0], [2000], [5])
    config = SimConfig.build(num_gpu_blocks=200, max_num_batched_tokens=8, livelock_steps=50,
                       engine=engine)
    result = simulate(work, config, COSTS)
    assert result.livelock is not None and result.livelock["request_id"] == 0
    assert result.steps == steps  # under async scheduling one more step is in flight
    assert "no token generated in 50 iterations" in result.livelock["reason"]
    assert summarize(result)["unfinished"] == 1


def test_one_request_step_prices_and_counts():
    """A lone request: one prefill step, then decode steps priced by the decode model."""
    work = workload([0.0], [100], [3])
    result = simulate(work, SimConfig.build(num_gpu_blocks=100), COSTS)
    costs, decode = PROFILE.cost_model(), PROFILE.decode_model()
    prefill_ms = float(costs.recompute_ms(100))
    decode_ms = float(decode.step_ms(1, 101)) + float(decode.step_ms(1, 102))
    req = result.requests
    assert result.steps == 3
    assert req.first_token_s[0] == pytest.approx(prefill_ms / 1e3)
    assert req.finish_s[0] == pytest.approx((prefill_ms + decode_ms) / 1e3)
    model = get_model("llama-2-7b")
    expected_flops = (model.linear_flops_per_token * 102 + model.attention_flops(102)
                      + 3 * model.lm_head_flops)
    assert result.flops == pytest.approx(expected_flops)
    summary = summarize(result)
    assert summary["tpot_p50_ms"] == pytest.approx(decode_ms / 2)  # (e2e - ttft) / (n - 1)
    assert summary["tpot_div_n_p50_ms"] == pytest.approx(decode_ms / 3)  # (e2e - ttft) / n


def test_metrics_do_not_depend_on_when_the_first_request_arrives():
    """Makespan runs from the first arrival, whatever the workload's time origin."""
    work = random_workload(4, 40)
    late = dataclasses.replace(work, arrival_s=work.arrival_s + 100.0)
    config = SimConfig.build(num_gpu_blocks=150)
    first = summarize(simulate(work, config, COSTS))
    second = summarize(simulate(late, config, COSTS))
    for key in ("makespan_s", "throughput_tokens_per_s", "gpu_utilization",
                "useful_utilization", "ttft_p50_s", "e2e_p99_s"):
        assert second[key] == pytest.approx(first[key], rel=1e-6), key


def test_recompute_is_counted_as_waste_and_swap_is_priced():
    """Two requests that cannot both grow: the later one is preempted (LIFO)."""
    work = workload([0.0, 0.0], [64, 64], [40, 40])
    # 144 tokens: both prompts fit, not both outputs; no prefix cache to give KV back.
    config = SimConfig.build(num_gpu_blocks=9, engine="vllm-legacy")
    recompute = simulate(work, config, COSTS)
    req = recompute.requests
    assert req.num_preemptions.tolist() == [0, 1]
    assert req.recompute_tokens[1] == 64  # its prompt, computed once before the preemption
    model = get_model("llama-2-7b")
    n = int(req.recompute_tokens[1])
    assert req.wasted_flops[1] == pytest.approx(model.linear_flops_per_token * n
                                                + model.attention_flops(n))
    assert summarize(recompute)["recompute_fraction"] > 0
    swap = simulate(work, config.replace(preemption="swap", num_cpu_blocks=9),
                    COSTS)
    summary = summarize(swap)
    assert summary["swap_preemptions"] == 1 and summary["recompute_fraction"] == 0
    blocks = cdiv(n, 16)
    assert summary["swapped_bytes"] == pytest.approx(2 * blocks * swap.block_bytes)
    assert summary["swap_s"] == pytest.approx(float(PROFILE.cost_model().swap_ms(n)) / 1e3)
    no_room = summarize(simulate(work, config.replace(preemption="swap",
                                                           num_cpu_blocks=1), COSTS))
    assert no_room["swap_preemptions"] == 0 and no_room["recompute_preemptions"] == 1


def test_prefix_cache_gives_a_preempted_request_its_blocks_back():
    """vllm-0.32: the victim's full blocks stay cached; on re-admission it computes only what
    was evicted, and the hit is counted, not recomputed."""
    work = workload([0.0, 0.0], [64, 64], [40, 40])
    legacy = simulate(work, SimConfig.build(num_gpu_blocks=10, engine="vllm-legacy",
                                      null_block=True), COSTS).requests
    cached = simulate(work, SimConfig.build(num_gpu_blocks=10), COSTS).requests
    assert legacy.num_preemptions.tolist() == cached.num_preemptions.tolist() == [0, 1]
    assert cached.prefix_hit_tokens[1] > 0 and legacy.prefix_hit_tokens[1] == 0
    assert cached.recompute_tokens[1] < legacy.recompute_tokens[1]
    assert cached.prefix_hit_tokens[1] % 16 == 0


def test_gpu_blocks_derived_from_memory():
    sim = Simulator(workload([0.0], [10], [10]), SimConfig.build(), COSTS)
    model = get_model("llama-2-7b")
    expected = int((80 * 2**30 * 0.9 - model.weight_bytes) // (16 * model.kv_bytes_per_token))
    assert sim.replica.num_gpu_blocks == expected
    assert sim.replica.num_cpu_blocks == 4 * 2**30 // (16 * model.kv_bytes_per_token)
    l4 = Simulator(workload([0.0], [10], [10]), SimConfig.build(hardware="l4"), COSTS)
    assert 0 < l4.replica.num_gpu_blocks < sim.replica.num_gpu_blocks // 5  # 22.5 GiB
    with pytest.raises(ValueError, match="leave no KV cache"):
        Simulator(workload([0.0], [10], [10]), SimConfig.build(gpu_memory_gib=10), COSTS)


def test_profile_without_decode_uses_the_analytic_decode_model():
    profile = PROFILE.model_copy(update={"decode": None})
    sim = Simulator(workload([0.0], [10], [10]), SimConfig.build(), Costs.from_profile(profile))
    expected = DecodeModel.analytic(get_model("llama-2-7b"), get_hardware("h100-sxm"))
    assert sim.pricer.time.decode == expected
    assert isinstance(sim.costs, CostModel)


@pytest.mark.parametrize("field, value, message", [
    ("admission", "fifo", "unknown admission policy 'fifo'"),
    ("predictor", "orcale", "did you mean 'oracle'"),
    ("num_gpu_blocks", 0, "num_gpu_blocks must be an integer from 1"),
    ("max_num_seqs", 0, "max_num_seqs must be an integer from 1"),
    ("num_gpu_block", 10, "unknown setting 'num_gpu_block'"),
    ("headroom_fraction", 1.0, "headroom_fraction"),
    ("history_quantile", 0.0, "history_quantile"),
])
def test_config_errors_name_the_field(field, value, message):
    with pytest.raises(ValueError, match=message):
        SimConfig.build(**{field: value})


@pytest.mark.parametrize("text, fixed_ms, ms_per_token", [
    ("constant:20ms", 20.0, 0.0), ("linear:10ms+0.01ms/token", 10.0, 0.01)])
def test_public_step_time_prices_every_step_the_same_way(text, fixed_ms, ms_per_token):
    # One request: a 100-token prefill step, then 9 decode steps of one token each.
    result = simulate(workload([0.0], [100], [10]),
                      SimConfig.build(step_time=text, num_gpu_blocks=100), COSTS)
    assert result.steps == 10
    expected_ms = 10 * fixed_ms + ms_per_token * (100 + 9)
    assert result.end_s == pytest.approx(expected_ms / 1e3, rel=1e-12)
    assert result.busy_ms == pytest.approx(expected_ms, rel=1e-12)


@pytest.mark.parametrize("text", ["constant", "constant:20", "linear:10ms", "constant:-1ms",
                                  "linear:0ms+0ms/token", "fixed:3ms", "constant:nanms"])
def test_bad_step_time_is_one_clear_error(text):
    with pytest.raises(ValueError, match="step time"):
        SimConfig.build(step_time=text)


@pytest.mark.parametrize("source", ["multi-turn", "mooncake"])
@pytest.mark.parametrize("policy", ["fcfs/lifo/recompute/oracle",
                                    "future-kv/lcf/recompute/history"])
def test_decode_fast_path_matches_step_by_step_when_prompts_share(source, policy):
    """With requests waiting behind a head whose prefix-cache hit running requests may grow
    (conversations; Mooncake's trace), the fast path still changes nothing."""
    from kvbench.sim.workloads import MOONCAKE_SYNTHETIC_TRACE, load_workload, read_trace

    if source == "multi-turn":
        work = load_workload(None, "multi-turn:sessions=30,turns=4,rate=4,think-s=0.5,"
                                   "system-prompt-tokens=256,input-tokens=128,output-tokens=96,"
                                   "max-tokens=200", seed=1)
        blocks = 160
    else:
        work = read_trace(MOONCAKE_SYNTHETIC_TRACE, rate_scale=4.0, num_requests=120)
        work = work.subset(work.prompt_tokens + work.output_tokens <= 40_000)
        blocks = 4000
    admission, victim, preemption, predictor = policy.split("/")
    config = SimConfig.build(admission=admission, victim=victim, preemption=preemption,
                             predictor=predictor, num_gpu_blocks=blocks)
    fast_sim = Simulator(work, config, COSTS, record=True)
    fast = fast_sim.run()
    assert not fast_sim.kv.private_prefixes
    slow = Simulator(work, config.replace(decode_runs=False), COSTS, record=True).run()
    assert first_difference(fast.step_log, slow.step_log) is None
    assert fast.steps == slow.steps and fast.step_log.prefix_hit_tokens > 0
    np.testing.assert_array_equal(fast.requests.finish_s, slow.requests.finish_s)
