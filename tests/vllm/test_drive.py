"""Driving vLLM's own scheduler (marker `vllm`: `make test-vllm` runs these in .venv-vllm)."""

import numpy as np
import pytest

pytest.importorskip("vllm")

from kvbench.sim.engines import ReplicaSpec
from kvbench.sim.steplog import first_difference  # noqa: E402
from kvbench.sim.tokens import random_token_ids  # noqa: E402
from kvbench.sim.workloads import AZURE_CONV_TRACE, TokenIds, Workload, read_trace  # noqa: E402
from kvbench.vllm.drive import DriveError, drive  # noqa: E402

pytestmark = pytest.mark.vllm

# A small cache under a 64/2048 budget: the first 250 requests of the Azure conversation trace
# preempt dozens of times.
SMALL = dict(num_gpu_blocks=400, max_num_seqs=64, max_num_batched_tokens=2048)


@pytest.fixture(scope="module")
def trace():
    return read_trace(AZURE_CONV_TRACE, num_requests=250)


@pytest.fixture(scope="module")
def logs(trace):
    """One run per (prefix caching, async scheduling) setting, each run twice."""
    runs = {}
    for caching in (False, True):
        for async_scheduling in (False, True):
            config = ReplicaSpec(**SMALL, enable_prefix_caching=caching,
                                 async_scheduling=async_scheduling)
            runs[caching, async_scheduling] = (drive(trace, config), drive(trace, config))
    return runs


@pytest.mark.parametrize("caching", [False, True])
@pytest.mark.parametrize("async_scheduling", [False, True])
def test_trace_slice_preempts_and_is_deterministic(trace, logs, caching, async_scheduling):
    log, again = logs[caching, async_scheduling]
    assert first_difference(log, again) is None
    assert log.num_preemptions >= 10
    assert log.engine.endswith("(AsyncScheduler)" if async_scheduling else "(Scheduler)")
    # Every request finishes exactly once, never while preempted in the same step.
    assert sorted(log.finished_request.tolist()) == list(range(trace.num_requests))
    # The limits hold in every step.
    sizes = np.diff(log.batch_offsets)
    assert sizes.max() <= SMALL["max_num_seqs"]
    per_step = np.add.reduceat(log.batch_tokens, log.batch_offsets[:-1][sizes > 0])
    assert per_step.max() <= SMALL["max_num_batched_tokens"]
    # Each request computes prompt + output - 1 tokens, plus what preemption threw away, minus
    # what the prefix cache gave back on re-admission.
    computed = np.bincount(log.batch_request, log.batch_tokens, trace.num_requests)
    hits = np.bincount(log.cached_request, log.cached_tokens, trace.num_requests)
    needed = trace.prompt_tokens + trace.output_tokens - 1
    never_preempted = np.ones(trace.num_requests, dtype=bool)
    never_preempted[log.preempted_request] = False
    assert np.array_equal(computed[never_preempted], needed[never_preempted])
    assert (computed + hits >= needed).all()
    assert ((computed + hits)[~never_preempted] > needed[~never_preempted]).all()


def test_prefix_caching_gives_back_preempted_blocks(logs):
    """Random prompts share nothing, so every hit is a preempted request's own freed blocks."""
    for async_scheduling in (False, True):
        off, on = logs[False, async_scheduling][0], logs[True, async_scheduling][0]
        assert off.prefix_hit_tokens == 0
        assert on.prefix_hit_tokens > 0 and on.num_tokens < off.num_tokens
        assert set(on.cached_request.tolist()) <= set(on.preempted_request.tolist())
        assert (on.cached_tokens % 16 == 0).all()


def test_async_scheduling_changes_the_schedule(logs):
    """Finished requests free their blocks one step later: the logs part early."""
    line = first_difference(logs[False, False][0], logs[False, True][0])
    assert line is not None and line.startswith("step ")


def test_async_scheduling_decides_a_step_when_the_previous_one_starts():
    """Request 1 arrives at 10 ms, during request 0's prefill (0-20 ms): vLLM schedules it into
    the 20 ms step when scheduling synchronously, but under async scheduling the 20 ms step was
    decided at 0 ms, so it joins at 40 ms; request 1 finishes with the step after."""
    workload = Workload("two", np.array([0.0, 0.01]), np.array([40, 40]), np.array([6, 3]),
                        np.array([6, 3]))
    expect = {False: [[(0, 40)], [(0, 1), (1, 40)], [(0, 1), (1, 1)], [(0, 1), (1, 1)],
                      [(0, 1)], [(0, 1)]],
              True: [[(0, 40)], [(0, 1)], [(0, 1), (1, 40)], [(0, 1), (1, 1)],
                     [(0, 1), (1, 1)], [(0, 1)]]}
    for async_scheduling, batches in expect.items():
        log = drive(workload, ReplicaSpec(num_gpu_blocks=64, async_scheduling=async_scheduling))
        assert [log.batch(s) for s in range(log.num_steps)] == batches
        assert np.allclose(log.time_s, 0.02 * np.arange(6))
        assert log.finished_step.tolist() == [3 + async_scheduling, 5]


def two_requests(prompt_tokens: int, gap_s: float) -> Workload:
    return Workload("two", np.array([0.0, gap_s]), np.array([prompt_tokens, prompt_tokens]),
                    np.array([4, 4]), np.array([4, 4]))


def first_batch_of(log, request: int) -> list[tuple[int, int]]:
    step = int(np.searchsorted(log.batch_offsets, np.argmax(log.batch_request == request),
                               side="right") - 1)
    return log.batch(step)


@pytest.mark.parametrize("prompt_tokens", [16, 17, 100])
def test_given_token_ids_share_a_prompt_prefix(prompt_tokens):
    """The second request, arriving after the first finished, reuses its full prompt blocks up
    to prompt_len - 1 (vLLM recomputes the last prompt token to get its logits)."""
    workload = two_requests(prompt_tokens, gap_s=1.0)
    ids = random_token_ids(workload, seed=3)
    same = TokenIds(ids.offsets, np.concatenate([ids.prompt(0), ids.prompt(0)]), ids.output_token)
    config = ReplicaSpec(num_gpu_blocks=64, enable_prefix_caching=True)
    log = drive(workload, config, tokens=same)
    expect = (prompt_tokens - 1) // 16 * 16
    assert log.prefix_hit_tokens == expect
    assert log.cached_request.tolist() == ([1] if expect else [])
    assert first_batch_of(log, 1) == [(1, prompt_tokens - expect)]
    assert drive(workload, config, tokens=ids).prefix_hit_tokens == 0  # distinct prompts


def test_requests_that_cannot_fit_are_refused_by_name():
    """500 + 4 - 1 = 503 computed tokens need 32 blocks of 16; vLLM keeps one for null."""
    workload = two_requests(500, gap_s=0.0)
    with pytest.raises(DriveError, match=r"request 0: 503 tokens of KV need 32 blocks; the "
                                         r"cache has 31"):
        drive(workload, ReplicaSpec(num_gpu_blocks=32))
    log = drive(workload, ReplicaSpec(num_gpu_blocks=33))
    assert log.finished_request.tolist() == [0, 1]
    assert first_batch_of(log, 1)[0] == (1, 500)  # admitted only once request 0 is gone
    with pytest.raises(DriveError, match="request 0: prompt of 500 tokens is not shorter"):
        drive(workload, ReplicaSpec(num_gpu_blocks=64, max_model_len=500))
    with pytest.raises(DriveError, match="kv_offloading is simulated only"):
        drive(workload, ReplicaSpec(num_gpu_blocks=64, kv_offloading=True))
