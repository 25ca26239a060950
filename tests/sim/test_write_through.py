"""Write-through KV offloading (kvbench/sim/write_through.py): vLLM's OffloadingConnector rules
(full prompt blocks stored as computed, the host LRU, a load past the prefix-cache hit that the
request waits for) and kvbench's resume choice, on tiny workloads; the decode fast path and the
block books under it."""

from __future__ import annotations

import dataclasses
import json
from types import SimpleNamespace

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from kvbench.cli import app
from kvbench.hardware import get_hardware
from kvbench.models import get_model
from kvbench.profile import analytic_profile
from kvbench.sim import Costs, SimConfig, Simulator, Workload, simulate, summarize
from kvbench.sim.engines import ENGINES
from kvbench.sim.policies import ADMISSION, PREEMPTIONS, VICTIMS, load_if_cheaper
from kvbench.sim.requests import FINISHED, LOADING, REJECTED, RUNNING, cdiv
from kvbench.sim.steplog import first_difference
from kvbench.sim.tokens import random_token_ids
from kvbench.sim.workloads import TokenIds
from kvbench.sim.write_through import PENDING, HostCache

PROFILE = analytic_profile(get_model("llama-2-7b"), get_hardware("h100-sxm"))
COSTS = Costs.from_profile(PROFILE)
# A fixed cost on every copy: loading a short prompt costs more than computing it again.
DEAR_COPIES = dataclasses.replace(COSTS, costs=dataclasses.replace(
    COSTS.costs, swap_out_fixed_ms=2.0, swap_in_fixed_ms=2.0))


def workload(arrival_s, prompt, output) -> Workload:
    output = np.asarray(output, dtype=np.int64)
    return Workload("test", np.asarray(arrival_s, dtype=np.float64),
                    np.asarray(prompt, dtype=np.int64), output, output)


def offloading(**settings) -> SimConfig:
    return SimConfig.build(kv_offloading=True, **settings)


def random_workload(seed: int, n: int) -> Workload:
    rng = np.random.default_rng(seed)
    output = rng.integers(1, 400, n)
    return Workload("test", np.cumsum(rng.exponential(0.05, n)), rng.integers(16, 1500, n),
                    output, np.full(n, 400))


def two_requests(prompt: int) -> tuple[Workload, dict]:
    """Two requests whose prompts fit the cache together and whose outputs do not: the second
    is preempted once (vllm-legacy: no prefix cache to keep its blocks, no async scheduling)."""
    blocks = cdiv(prompt, 16)
    return workload([0.0, 0.0], [prompt, prompt], [40, 40]), {
        "engine": "vllm-legacy", "num_gpu_blocks": 2 * blocks + 3, "num_cpu_blocks": 2 * blocks}


def test_only_full_prompt_blocks_are_stored_as_they_are_computed():
    """A 100-token prompt in chunks of 40: blocks 0-1, 2-4 and 5 go to the host with the chunk
    that completes them, each chunk one copy priced on its step; the partial block and the
    output's blocks never do."""
    sim = Simulator(workload([0.0], [100], [40]), offloading(max_num_batched_tokens=40), COSTS)
    result = sim.run()
    assert result.requests.stored_tokens[0] == 96
    assert list(sim.write_through.host.blocks.values()) == [0] * 6  # all stored, readable
    summary = summarize(result)
    copies_ms = COSTS.costs.swap_out_ms(np.array([32, 48, 16])).sum()
    assert summary["swap_s"] == pytest.approx(copies_ms / 1e3)
    assert summary["swapped_bytes"] == pytest.approx(6 * result.block_bytes)
    assert summary["loaded_tokens"] == 0 and summary["preemptions"] == 0


def test_host_cache_is_an_lru_of_readable_blocks():
    host = HostCache(4)
    assert host.store([1, 2]) == [1, 2]
    assert host.store([3, 4, 5]) is None  # 1 and 2 are still being stored: nothing can go
    assert host.lookup([1, 2, 3]) == (2, True)
    host.stored([1, 2])
    assert host.store([3, 4, 5]) == [3, 4, 5]  # evicts 1, the least recent
    host.stored([3, 4, 5])
    host.pin([2], 1)  # being loaded
    assert host.store([2, 6]) == [6]  # 2 is held; 3 goes, not 2 (offered, and being loaded)
    assert list(host.blocks) == [2, 4, 5, 6]
    host.refresh([4, 5])  # a finished request's blocks: the most recent, its first last
    assert list(host.blocks) == [2, 6, 5, 4]
    host.pin([2], -1)
    assert host.store([7, 8]) == [7, 8]  # 2 and 5 go; 6 is still being stored
    assert list(host.blocks) == [6, 4, 7, 8]
    assert host.store([9, 10]) is None  # only 4 could go: nothing does
    host.stored([6, 7, 8])
    assert host.store([9]) == [9]  # 6, the least recent now
    assert list(host.blocks.items()) == [(4, 0), (7, 0), (8, 0), (9, PENDING)]
    assert host.lookup([4, 7, 9, 3]) == (3, True)


@pytest.mark.parametrize("asynchronous", [False, True])
def test_swap_loads_what_the_device_lost_and_waits_for_it(asynchronous):
    """Request 2 is preempted (LIFO) right after its prefill. When request 1 finishes, the
    prefix cache still holds its first block and the host its whole prompt: it loads the rest
    in one step, in which it is not scheduled (vLLM's WAITING_FOR_REMOTE_KVS), and runs once the
    load is reported with that step's output: the next step, or the one after under async
    scheduling (the next is scheduled before the output lands)."""
    work = workload([0.0, 0.0, 0.0], [64, 64, 64], [80, 20, 40])
    config = offloading(preemption="swap", num_gpu_blocks=14, async_scheduling=asynchronous)
    result = Simulator(work, config, COSTS, record=True).run()
    log, req = result.step_log, result.requests
    assert log.events("preempted", 1) == [2]
    assert log.loaded_request.tolist() == [2] and log.swapped_request.size == 0
    load_step = int(log.loaded_step[0])
    assert log.events("cached", load_step) == [2]
    cached = int(log.cached_tokens[log.cached_step == load_step][0])
    loaded = int(log.loaded_tokens[0])
    assert (cached, loaded) == (16, 48)  # the host gives what the device lost
    delay = 2 if asynchronous else 1
    for step in range(load_step, load_step + delay):
        assert 2 not in dict(log.batch(step))
    assert dict(log.batch(load_step + delay))[2] == 1  # its KV is back: it decodes
    assert req.loaded_tokens.tolist() == [0, 0, 48]
    assert req.stored_tokens.tolist() == [64, 64, 64]
    copies_ms = (3 * COSTS.costs.swap_out_ms(64) + COSTS.costs.swap_in_ms(48))
    assert summarize(result)["swap_s"] == pytest.approx(float(copies_ms) / 1e3)


@pytest.mark.parametrize("prompt", [32, 1024])
@pytest.mark.parametrize("preemption", ["recompute", "swap", "selector"])
def test_the_preemption_policy_picks_whether_a_victim_loads(preemption, prompt):
    """`recompute` never loads, `swap` always does, `selector` loads when the copy costs less
    than the prefill it saves: with a 4 ms fixed cost per copy, the long victim loads and the
    short one computes its prompt again. Every policy stores the prompts."""
    view = SimpleNamespace(costs=DEAR_COPIES.costs)
    cheaper = bool(load_if_cheaper(view, np.array([0]), np.array([prompt]))[0])
    assert cheaper == (prompt == 1024)  # the prices cross between the two
    work, replica = two_requests(prompt)
    req = simulate(work, offloading(preemption=preemption, **replica), DEAR_COPIES).requests
    assert req.num_preemptions.tolist() == [0, 1]
    loads = {"recompute": False, "swap": True, "selector": cheaper}[preemption]
    assert req.loaded_tokens.tolist() == [0, prompt if loads else 0]
    assert req.stored_tokens.tolist() == [prompt, prompt]


def test_loaded_positions_are_not_recomputed():
    """The victim of `two_requests` recomputes what it had computed, less what it loads; its
    wasted FLOPs shrink by those of the loaded prompt."""
    work, replica = two_requests(64)
    recomputed = simulate(work, offloading(preemption="recompute", **replica), COSTS).requests
    loaded = simulate(work, offloading(preemption="swap", **replica), COSTS).requests
    assert recomputed.recompute_tokens[1] > 64
    assert loaded.loaded_tokens[1] == 64
    assert recomputed.recompute_tokens[1] - loaded.recompute_tokens[1] == 64
    model = get_model("llama-2-7b")
    saved = model.chunk_flops(np.array([0]), np.array([64]))[0]
    assert recomputed.wasted_flops[1] - loaded.wasted_flops[1] == pytest.approx(saved)


def test_small_host_cache_loads_fewer_tokens():
    """The host holds num_cpu_blocks blocks: fewer of them, less found when victims resume;
    none, nothing stored."""
    work = random_workload(2, 150)
    loaded, stored = [], []
    for num_cpu_blocks in (0, 40, 4000):
        sim = Simulator(work, offloading(preemption="swap", num_gpu_blocks=250,
                                         num_cpu_blocks=num_cpu_blocks), COSTS)
        while sim.step():
            assert len(sim.write_through.host.blocks) <= num_cpu_blocks
        summary = summarize(sim.result())
        assert summary["completed"] == work.num_requests and summary["preemptions"] > 0
        loaded.append(summary["loaded_tokens"])
        stored.append(int(sim.requests.stored_tokens.sum()))
    assert loaded[0] == stored[0] == 0 and stored[1] > 0
    assert loaded[0] < loaded[1] < loaded[2]


@pytest.mark.parametrize("shared", [False, True])
def test_a_new_request_loads_blocks_another_request_offloaded(shared):
    """Without prefix caching the host is the only cache: a request whose prompt is another's
    (their block hashes agree) loads it, all of it, and computes its last token again; with
    random prompts nothing is found."""
    work = workload([0.0, 5.0], [80, 80], [10, 10])
    tokens = random_token_ids(work, 0)
    if shared:
        flat = tokens.flat.copy()
        flat[tokens.offsets[1]:tokens.offsets[1] + 80] = tokens.prompt(0)
        tokens = TokenIds(tokens.offsets, flat, tokens.output_token)
    config = offloading(preemption="swap", enable_prefix_caching=False)
    result = Simulator(work, config, COSTS, tokens=tokens, record=True).run()
    req, log = result.requests, result.step_log
    assert req.loaded_tokens.tolist() == [0, 80 if shared else 0]
    first = int(np.flatnonzero(log.batch_request == 1)[0])
    assert log.batch_tokens[first] == (1 if shared else 80)


@pytest.mark.parametrize("preemption,shared,overrides", [
    ("swap", False, {}),
    ("selector", False, {"async_scheduling": False}),
    ("recompute", False, {}),
    ("swap", True, {}),
    ("swap", False, {"num_cpu_blocks": 6}),  # stores the host has no room for, retried
    ("swap", True, {"enable_prefix_caching": False, "async_scheduling": False}),
])
def test_decode_fast_path_matches_step_by_step(preemption, shared, overrides):
    """Decode runs stop where a step would store, load or start a load: the same steps,
    copies and summary as stepping one by one."""
    work = random_workload(2, 150)
    tokens = random_token_ids(work, 0)
    if shared:  # every third request starts with request 0's first 64 tokens
        flat = tokens.flat.copy()
        for i in range(3, work.num_requests, 3):
            flat[tokens.offsets[i]:tokens.offsets[i] + 64] = tokens.prompt(0)[:64]
        tokens = TokenIds(tokens.offsets, flat, tokens.output_token)
    config = offloading(preemption=preemption, num_gpu_blocks=250,
                        **{"num_cpu_blocks": 400, **overrides})
    fast = Simulator(work, config, COSTS, tokens=tokens, record=True).run()
    slow = Simulator(work, config.replace(decode_runs=False), COSTS, tokens=tokens,
                     record=True).run()
    assert first_difference(fast.step_log, slow.step_log) is None
    for column in ("finish_s", "loaded_tokens", "stored_tokens", "recompute_tokens"):
        np.testing.assert_array_equal(getattr(fast.requests, column),
                                      getattr(slow.requests, column), err_msg=column)
    fast_summary, slow_summary = summarize(fast), summarize(slow)
    for key, value in slow_summary.items():
        if isinstance(value, float):
            assert fast_summary[key] == pytest.approx(value, rel=1e-9), key
        else:
            assert fast_summary[key] == value, key
    assert (fast_summary["loaded_tokens"] > 0) == (preemption != "recompute")


@st.composite
def scenarios(draw):
    """Small workloads under memory pressure: most preempt, many load."""
    n = draw(st.integers(4, 16))
    gaps = draw(st.lists(st.floats(0, 0.02), min_size=n, max_size=n))
    prompt = draw(st.lists(st.integers(16, 300), min_size=n, max_size=n))
    output = draw(st.lists(st.integers(1, 120), min_size=n, max_size=n))
    config = offloading(
        admission=draw(st.sampled_from(sorted(ADMISSION))),
        victim=draw(st.sampled_from(sorted(VICTIMS))),
        preemption=draw(st.sampled_from(sorted(PREEMPTIONS))),
        num_gpu_blocks=draw(st.integers(22, 48)),
        num_cpu_blocks=draw(st.integers(0, 60)),
        max_num_seqs=draw(st.integers(1, 12)),
        max_num_batched_tokens=draw(st.integers(16, 512)),
        engine=draw(st.sampled_from(sorted(ENGINES))),
        enable_prefix_caching=draw(st.sampled_from([None, False, True])),
        async_scheduling=draw(st.sampled_from([None, False, True])),
        watermark=draw(st.sampled_from([None, 0.05])),
        max_model_len=draw(st.sampled_from([None, 400])),
    )
    return workload(np.cumsum(gaps) - gaps[0], prompt, output), config


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenarios())
def test_block_books_under_write_through(scenario):
    """Every step: no block lost or over capacity (a loading request holds its blocks), the
    host within its size; at the end every request finished, nothing loading or pinned."""
    work, config = scenario
    sim = Simulator(work, config, COSTS)
    req, host, bs = sim.requests, sim.write_through.host, sim.block_size
    while sim.step():
        assert int(req.gpu_blocks.sum()) + sim.free_gpu_blocks == sim.usable_blocks
        run = sim.running
        assert (req.state[run] == RUNNING).all()
        np.testing.assert_array_equal(req.gpu_blocks[run], cdiv(req.computed_tokens[run], bs))
        loading = np.fromiter(sim.loading, dtype=np.int64)
        assert (req.state[loading] == LOADING).all()
        assert (req.gpu_blocks[loading] >= cdiv(req.computed_tokens[loading], bs)).all()
        assert len(host.blocks) <= sim.replica.num_cpu_blocks
        assert min(host.blocks.values(), default=0) >= PENDING
    result = sim.result()
    assert result.livelock is None
    assert (req.state[req.state != REJECTED] == FINISHED).all()
    assert not sim.loading and all(state <= 0 for state in host.blocks.values())
    if config.policy.preemption == "recompute":
        assert summarize(result)["loaded_tokens"] == 0


def test_simulate_flag():
    result = CliRunner().invoke(app, ["simulate", "--synthetic",
                                      "requests=120,rate=30,long-prompt=0.3,long-output=0.3",
                                      "--num-gpu-blocks", "300", "--kv-offloading",
                                      "--preemption", "swap", "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["preemptions"] > 0 and summary["loaded_tokens"] > 0
    assert summary["swap_preemptions"] == 0  # nothing is swapped at preemption
