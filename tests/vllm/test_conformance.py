"""The conformance suite (kvbench.vllm.conformance): how it judges a variant against plain
vLLM, the invariants it checks in every scheduler a test builds, and (marker `vllm`) the
suite itself is `make conformance`, which CI runs; here only what can fail in seconds."""

from __future__ import annotations

import pytest

from kvbench.vllm.conformance.run import DIFFERENCES, Difference, Outcome, differences, judge

PASS, FAIL = Outcome("passed", None), Outcome("failed", "AssertionError", (), "tests/t.py")
PLAIN = {"t::a": PASS, "t::b": PASS, "t::c[1]": PASS, "t::c[2]": PASS,
         "t::d": Outcome("failed", "ValidationError")}


def test_defaults_must_pass_what_vllm_passes():
    assert judge("kvbench", dict(PLAIN), PLAIN, {})["problems"] == []
    result = judge("kvbench", {**PLAIN, "t::b": FAIL}, PLAIN, {})
    assert result["problems"] == ["t::b: failed (AssertionError), passes on vLLM and is not a "
                                  "listed policy difference"]


def test_a_policy_difference_must_be_listed_an_assertion_and_still_fail():
    outcomes = {**PLAIN, "t::c[1]": FAIL, "t::c[2]": FAIL}
    listed = {"t::c[*]": Difference("asserts vLLM's victim")}
    result = judge("lcf", outcomes, PLAIN, listed)
    assert result["problems"] == []
    assert [d["reason"] for d in result["fails_where_vllm_passes"]] == ["asserts vLLM's victim"] * 2
    crash = {**outcomes, "t::c[2]": Outcome("failed", "KeyError", (), "vllm/x.py")}
    assert judge("lcf", crash, PLAIN, listed)["problems"] == [
        "t::c[2]: KeyError raised in vllm/x.py, not the listed AssertionError in tests/"]
    # Declared: the test's fake output does not fit the policy's schedule, and vLLM raises.
    declared = {"t::c[*]": Difference("fakes vLLM's schedule", "KeyError", "vllm/x.py")}
    assert judge("lcf", {**crash, "t::c[1]": crash["t::c[2]"]}, PLAIN, declared)[
        "problems"] == []
    ours = {**outcomes, "t::c[2]": Outcome("failed", "AssertionError", (), "kvbench/vllm/s.py")}
    assert judge("lcf", ours, PLAIN, listed)["problems"] == [
        "t::c[2]: AssertionError raised in kvbench/vllm/s.py, not the listed AssertionError in "
        "tests/"]
    stale = judge("lcf", dict(PLAIN), PLAIN, listed)["problems"]
    assert stale == ["differences.toml [lcf] 't::c[*]' matches no failing test"]


def test_lost_tests_and_new_invariant_problems_are_problems():
    outcomes = {k: v for k, v in PLAIN.items() if k != "t::a"}
    outcomes["t::b"] = Outcome("passed", None, ("request 3 (RUNNING) is in no queue",))
    assert judge("kvbench", outcomes, PLAIN, {})["problems"] == [
        "t::a: not run", "t::b: request 3 (RUNNING) is in no queue"]


@pytest.mark.vllm
def test_invariants_find_a_lost_request_and_its_blocks():
    pytest.importorskip("vllm")
    from vllm.sampling_params import SamplingParams
    from vllm.v1.request import Request

    from kvbench.sim.engines import ReplicaSpec
    from kvbench.vllm.conformance.plugin import invariants
    from kvbench.vllm.drive import build_scheduler

    replica = ReplicaSpec(num_gpu_blocks=16, block_size=16, enable_prefix_caching=False,
                          async_scheduling=False)
    sched = build_scheduler(replica, 256, plugin={})
    for i in range(2):
        sched.add_request(Request(request_id=str(i), prompt_token_ids=list(range(1, 40)),
                                  sampling_params=SamplingParams(max_tokens=8),
                                  pooling_params=None, arrival_time=float(i)))
    sched.schedule()
    assert invariants(sched) == []
    lost = sched.running.pop()  # dropped without freeing: its blocks leak with it
    assert invariants(sched) == [f"request {lost.request_id} (RUNNING) is in no queue"]
    blocks = sched.kv_cache_manager.get_block_ids(lost.request_id)[0]
    sched.kv_cache_manager.coordinator.single_type_managers[0].req_to_blocks.pop(
        lost.request_id)
    assert invariants(sched)[0] == f"block {blocks[0]}: ref_cnt 1, held 0 times"


def test_the_listed_differences_parse_and_explain_themselves():
    for variant in ("kvbench", "lcf", "cost-aware", "future-kv", "reserve-max"):
        for pattern, entry in differences(variant).items():
            assert pattern.startswith("tests/v1/") and len(entry.reason) > 40, pattern
    assert differences("kvbench") == {}  # the default options differ from vLLM nowhere
    assert DIFFERENCES.is_file()
