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
