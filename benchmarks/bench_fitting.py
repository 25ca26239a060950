"""The calibration fits on a realistic sample set: 14 log-spaced lengths, 2% noise.

Same fitting code `kvbench calibrate` runs (relative-error NNLS with held-out points); each
case first checks that the fit recovers the coefficients it was given.
"""

import numpy as np
import pytest

from kvbench.calibration import fitting
from kvbench.calibration.plans import geometric_sizes

SIZES = np.array(geometric_sizes(16, 65536, 14), dtype=float)
CASES = {
    "swap": (lambda n: fitting.swap_design(n, 16, "swap_out"),  # one direction
             np.array([0.02, 0.0048, 0.004])),
    "recompute": (fitting.recompute_design, np.array([3.0, 0.07, 1.2e-6])),
}


@pytest.mark.parametrize("name", CASES)
def test_fit(benchmark, name):
    design_of, truth = CASES[name]
    design = design_of(SIZES)
    rng = np.random.default_rng(0)
    latency_ms = design.matrix @ truth * (1 + 0.02 * rng.standard_normal(len(SIZES)))
    held = fitting.holdout_mask(len(SIZES))
    fit = fitting.fit_nnls(design, latency_ms, held)
    np.testing.assert_allclose(fit.predict(design), design.matrix @ truth, rtol=0.1)
    benchmark.group = "calibration fits"
    benchmark(fitting.fit_nnls, design, latency_ms, held)
    benchmark.extra_info.update({"num_points": len(SIZES), "r2": fit.r2,
                                 "heldout_mape": fit.heldout_mape})


def test_decode_fit(benchmark):
    batch, context = np.meshgrid([1, 4, 16, 64, 128, 256], [512, 2048, 8192])
    design = fitting.decode_design(batch.ravel(), context.ravel())
    truth = np.array([6.0, 0.05, 1.5e-5])
    num_points = len(design.matrix)
    latency_ms = design.matrix @ truth * (1 + 0.02 * np.random.default_rng(1).standard_normal(
        num_points))
    fit = fitting.fit_nnls(design, latency_ms, fitting.holdout_mask(num_points, every=3))
    np.testing.assert_allclose(fit.predict(design), design.matrix @ truth, rtol=0.1)
    benchmark.group = "calibration fits"
    benchmark(fitting.fit_nnls, design, latency_ms)
    benchmark.extra_info.update({"num_points": num_points, "r2": fit.r2})
