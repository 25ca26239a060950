"""The step log and its comparison (no engine needed)."""

import numpy as np
import pytest

from kvbench.sim.steplog import StepLogBuilder, first_difference


def make_log(engine="a", steps=None, preempted=(), finished=(), cached=()):
    """steps: [(time_s, [(request, tokens), ...])]; events: [(step, request[, tokens])]."""
    builder = StepLogBuilder(engine)
    for time_s, batch in steps or []:
        builder.add_step(time_s, [r for r, _ in batch], [t for _, t in batch])
    for name, events in (("preempted", preempted), ("finished", finished)):
        for step, request in events:
            builder.add_events(name, step, [request])
    for step, request, tokens in cached:
        builder.add_events("cached", step, [request], [tokens])
    return builder.build()


STEPS = [(0.0, [(0, 512), (1, 300)]), (0.02, [(0, 1), (1, 1), (2, 17)]),
         (0.04, [(0, 1), (2, 1)]), (0.06, [(2, 1)])]


def test_identical_logs_agree_and_count():
    a = make_log("vllm", STEPS, preempted=[(2, 1)], finished=[(2, 0), (3, 2)],
                 cached=[(1, 2, 16)])
    b = make_log("sim", STEPS, preempted=[(2, 1)], finished=[(2, 0), (3, 2)],
                 cached=[(1, 2, 16)])
    assert first_difference(a, b) is None
    assert a.num_steps == 4 and a.num_tokens == 512 + 300 + 19 + 2 + 1
    assert a.num_preemptions == 1 and a.prefix_hit_tokens == 16
    assert a.batch(1) == [(0, 1), (1, 1), (2, 17)]
    assert a.events("finished", 2) == [0] and a.events("finished", 1) == []
    assert a.summary()["num_finished"] == 2


def test_events_reported_late_keep_their_step_and_order():
    """Async scheduling reports a step's finishes after the next step is scheduled."""
    builder = StepLogBuilder("x")
    for time_s, batch in STEPS:
        builder.add_step(time_s, [r for r, _ in batch], [t for _, t in batch])
    builder.add_events("finished", 3, [2])
    builder.add_events("finished", 1, [5, 4])
    log = builder.build()
    assert log.finished_step.tolist() == [1, 1, 3]
    assert log.finished_request.tolist() == [5, 4, 2]


@pytest.mark.parametrize("change, expect", [
    (lambda s: s[2][1].__setitem__(1, (2, 2)), "step 2 (a at 0.040000 s, b at 0.040000 s): batch"
                                               " of 2 vs 2 requests differs at position 1: a "
                                               "request 2 x1 tokens, b request 2 x2 tokens"),
    (lambda s: s[1][1].pop(), "step 1 (a at 0.020000 s, b at 0.020000 s): batch of 3 vs 2 "
                              "requests differs at position 2: a request 2 x17 tokens, b "
                              "nothing"),
    (lambda s: s.__setitem__(3, (0.07, s[3][1])), "step 3 (a at 0.060000 s, b at 0.070000 s)"),
])
def test_first_difference_names_the_step_and_position(change, expect):
    steps = [(t, list(batch)) for t, batch in STEPS]
    change(steps)
    assert first_difference(make_log("a", STEPS), make_log("b", steps)) == expect


def test_first_difference_in_events_and_length():
    a = make_log("a", STEPS, preempted=[(2, 1)], finished=[(3, 2)])
    b = make_log("b", STEPS, preempted=[(1, 1)], finished=[(3, 2)])
    line = first_difference(a, b)
    assert line.startswith("step 1 ") and "preempted: a [], b [1]" in line
    c = make_log("c", STEPS[:3], preempted=[(2, 1)])
    assert first_difference(a, c) == ("a ran 4 steps, c 3; they agree on the first 3, then a "
                                       "schedules [(2, 1)]...")
    d = make_log("d", STEPS, preempted=[(2, 1)], finished=[(3, 2)], cached=[(0, 1, 32)])
    assert "step 0 " in first_difference(a, d)


def test_schedules_compare_without_their_clocks_and_report_both_times():
    later = [(t + 0.5, batch) for t, batch in STEPS]
    assert first_difference(make_log("a", STEPS), make_log("b", later)).startswith("step 0 ")
    assert first_difference(make_log("a", STEPS), make_log("b", later), times=False) is None
    changed = later[:2] + [(later[2][0], [(0, 1)])] + later[3:]
    line = first_difference(make_log("a", STEPS), make_log("b", changed), times=False)
    assert line.startswith("step 2 (a at 0.040000 s, b at 0.540000 s): ")


def test_a_large_log_compares_fast_and_finds_a_late_change():
    rng = np.random.default_rng(0)
    steps = [(0.02 * s, [(int(r), 1) for r in rng.permutation(200)[:150]])
             for s in range(3000)]
    a = make_log("a", steps)
    steps[2999] = (steps[2999][0], steps[2999][1][:-1] + [(999, 1)])
    b = make_log("b", steps)
    assert first_difference(a, a) is None
    assert first_difference(a, b).startswith("step 2999 ")
