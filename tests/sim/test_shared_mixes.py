"""Synthetic mixes whose requests share prefixes (kvbench.sim.shared_mixes)."""

from __future__ import annotations

import numpy as np
import pytest

from kvbench.sim.shared_mixes import MultiTurnSpec, multi_turn, parse_mix
from kvbench.sim.workloads import WorkloadError, load_workload


def test_a_turns_prompt_is_the_conversation_so_far():
    spec = MultiTurnSpec(sessions=5, turns=3, rate_per_s=0.5, think_s=4.0,
                         system_prompt_tokens=32, input_tokens=40, output_tokens=10,
                         max_tokens=15)
    w = multi_turn(spec, seed=3)
    assert w.num_requests == 15 and np.all(np.diff(w.arrival_s) >= 0)
    prompts = [w.tokens.prompt(i) for i in range(w.num_requests)]
    system = prompts[0][:32]
    assert all(np.array_equal(p[:32], system) for p in prompts)  # one system prompt for all
    # Each prompt that another prompt extends by (its output, repeated) then new input is the
    # previous turn of that session: every session has exactly turns - 1 such links.
    links = 0
    for i, p in enumerate(prompts):
        after = np.concatenate([p, np.full(w.output_tokens[i], w.tokens.output_token[i])])
        later = [j for j, q in enumerate(prompts) if q.size > after.size
                 and np.array_equal(q[:after.size], after)]
        assert len(later) <= spec.turns - 1
        if later:
            links += 1
            assert all(w.arrival_s[j] >= w.arrival_s[i] for j in later)
    assert links == spec.sessions * (spec.turns - 1)


def test_system_prompt_mix_shares_the_prompt_it_picks():
    w = load_workload(None, "system-prompt:requests=300,prompts=3,skew=1,"
                            "system-prompt-tokens=64,input-tokens=20,output-tokens=8,"
                            "max-tokens=16", seed=1)
    heads = {tuple(w.tokens.prompt(i)[:64]) for i in range(w.num_requests)}
    assert len(heads) == 3
    counts = sorted((sum(tuple(w.tokens.prompt(i)[:64]) == h for i in range(w.num_requests))
                     for h in heads), reverse=True)
    assert counts[0] > counts[-1]  # Zipf: the first prompt is the most used
    tails = {tuple(w.tokens.prompt(i)[64:]) for i in range(w.num_requests)}
    assert len(tails) == w.num_requests  # the user inputs are each request's own


def test_load_options_apply_to_mixes():
    w = load_workload(None, "multi-turn:sessions=20,turns=2", rate_scale=2.0, num_requests=7,
                      max_tokens=600, seed=0)
    assert w.num_requests == 7 and w.tokens.offsets.size == 8
    assert np.all(w.max_tokens == 600)


@pytest.mark.parametrize(("spec", "message"), [
    ("multi-turn:sessions=0", "multi-turn spec: sessions must be an integer from 1 to"),
    ("multi-turn:turn=3", "multi-turn spec: 'turn=3' is not KEY=VALUE with KEY one of sessions"),
    ("multi-turn:rate=fast", "multi-turn spec: rate='fast' is not a valid float"),
    ("system-prompt:skew=-1", "system-prompt spec: skew must be at least 0"),
    ("system-prompt:output-tokens=400,max-tokens=100", "max-tokens (100) must be at least"),
    ("multi-turn:turns=400,input-tokens=20000",
     "its prompts may hold 484320640000 tokens in all, above 500,000,000"),
])
def test_bad_specs_are_one_error(spec, message):
    with pytest.raises(WorkloadError) as info:
        parse_mix(spec)
    assert message in str(info.value) and "\n" not in str(info.value)
