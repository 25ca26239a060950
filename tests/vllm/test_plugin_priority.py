"""vLLM's priority scheduling policy with kvbench's victim policies: priorities come first, the
victim policy orders within the lowest priority level running (kvbench.vllm.scheduler)."""

from __future__ import annotations

import pytest

from kvbench.sim.engines import ReplicaSpec

pytestmark = pytest.mark.vllm

# (request id, priority, prompt tokens): with 16-token blocks every prompt fills its blocks, so
# the first decode step needs a block per request and the 6 usable blocks are all taken.
REQUESTS = [("0", 1, 16), ("1", 1, 64), ("2", 0, 16)]


def first_victim(plugin: dict | None, policy: str = "priority") -> str:
    pytest.importorskip("vllm")
    from vllm.sampling_params import SamplingParams
    from vllm.v1.outputs import ModelRunnerOutput
    from vllm.v1.request import Request

    from kvbench.vllm.drive import build_scheduler

    replica = ReplicaSpec(num_gpu_blocks=7, block_size=16, enable_prefix_caching=False,
                          async_scheduling=False)
    sched = build_scheduler(replica, 256, plugin=plugin, scheduling_policy=policy)
    for arrival, (request_id, priority, prompt) in enumerate(REQUESTS):
        sched.add_request(Request(
            request_id=request_id, prompt_token_ids=list(range(1, prompt + 1)),
            sampling_params=SamplingParams(max_tokens=32, ignore_eos=True), pooling_params=None,
            arrival_time=float(arrival), priority=priority))
    order = []  # the victims, in the order they were preempted
    preempt = sched._preempt_request
    sched._preempt_request = lambda request, *args, **kwargs: (
        order.append(request.request_id), preempt(request, *args, **kwargs))
    for _ in range(4):
        output = sched.schedule()
        if order:
            priorities = {r: p for r, p, _ in REQUESTS}
            assert all(sched.requests[r].priority == priorities[r] for r in order)  # unmarked
            return order[0]
        ids = list(output.num_scheduled_tokens)
        sched.update_from_output(output, ModelRunnerOutput(
            req_ids=ids, req_id_to_index={r: k for k, r in enumerate(ids)},
            sampled_token_ids=[[7] for _ in ids]))
    raise AssertionError("no preemption")


def test_vllms_priority_policy_preempts_the_latest_of_the_lowest_priority():
    assert first_victim(None) == "1"


def test_victim_policy_orders_within_the_lowest_priority_level():
    # lcf among priority 1: request 0 has the fewest tokens cached; over everyone (fcfs) lcf
    # would take request 2 (as few tokens, and the latest), which has the higher priority.
    assert first_victim({"victim": "lcf"}) == "0"
    assert first_victim({"victim": "lcf"}, policy="fcfs") == "2"


def test_default_options_keep_vllms_priority_choice():
    assert first_victim({}) == "1"
