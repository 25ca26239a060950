"""Timing (kvbench.calibration.timing): raw samples kept, median and spread reported."""

import numpy as np
import pytest

from kvbench.calibration.timing import Timing, measure


def test_timing_keeps_samples_and_reports_median_and_iqr():
    t = Timing([1.0, 2.0, 3.0, 4.0, 100.0])
    assert t.median_ms == 3.0 and t.spread_ms == pytest.approx(2.0)
    calls = []
    timing = measure(lambda: calls.append(1), "cpu", warmup=2, reps=7, max_rel_spread=np.inf)
    assert len(timing.samples_ms) == 7 and len(calls) == 9


def test_recorded_points_keep_the_values_of_their_loop():
    """Inside `recording()`, a closure made in a loop is registered with the values it was
    timed with: called again later it does the same work, not the loop's last iteration's."""
    from kvbench.calibration.schedule import recording

    seen = []
    with recording() as points:
        for n in (1, 2, 3):
            measure(lambda: seen.append(n), "cpu", warmup=0, reps=1)
    seen.clear()
    for fn, _, _ in points:
        fn()
    assert seen == [1, 2, 3]
