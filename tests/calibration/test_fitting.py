"""Fits (kvbench.calibration.fitting): relative-error NNLS recovers known coefficients, never
returns a negative one, and does not care about the unit of the latencies."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvbench.calibration import fitting
from kvbench.calibration.plans import geometric_sizes
from kvbench.costmodel import CostModel, DecodeModel

DESIGNS = {
    "swap_out": lambda n: fitting.swap_design(n, 16, "swap_out"),
    "swap_in": lambda n: fitting.swap_design(n, 16, "swap_in"),
    "recompute": fitting.recompute_design,
    # decode: batch sizes n, each at a context of 3·n + 7 tokens (B·T is not collinear with B)
    "decode": lambda n: fitting.decode_design(n, 3 * np.asarray(n) + 7),
}


def noisy(y, rel, seed=0):
    return y * (1 + rel * np.random.default_rng(seed).standard_normal(y.shape))


def beta(fit):
    """The coefficients in the design's column order."""
    return np.array(list(fit.coefficients.values()))


def test_coefficients_are_named_after_the_fields_of_the_models_they_build():
    """A fit's coefficients build the model by name: `CostModel(**out, **in, **recompute)`."""
    n = [16, 100, 1000, 5000]
    fits = {kind: fitting.fit_nnls(DESIGNS[kind](n), np.log(n)) for kind in DESIGNS}
    costs = CostModel(**fits["swap_out"].coefficients, **fits["swap_in"].coefficients,
                      **fits["recompute"].coefficients)
    assert costs.swap_out_ms_per_block == fits["swap_out"].coefficients["swap_out_ms_per_block"]
    assert costs.swap_in_fixed_ms == fits["swap_in"].coefficients["swap_in_fixed_ms"]
    assert DecodeModel(**fits["decode"].coefficients).d0_ms == beta(fits["decode"])[0]
    design = fitting.swap_design([16, 100], 16, "swap_in").without("swap_in_ms_per_token")
    assert design.names == ("swap_in_fixed_ms", "swap_in_ms_per_block")
    np.testing.assert_array_equal(design.matrix, [[1, 1], [1, 7]])
    with pytest.raises(ValueError, match="swap phase must be one of"):
        fitting.swap_design([16], 16, "swap")


def test_out_and_in_are_fitted_apart():
    """Each direction's fit recovers its own coefficients from its own latencies."""
    n = np.array(geometric_sizes(16, 65536, 14), dtype=float)
    truth = {"swap_out": np.array([0.05, 0.0, 0.02]), "swap_in": np.array([0.2, 0.0, 0.05])}
    held = fitting.holdout_mask(len(n))
    for phase, coefficients in truth.items():
        design = fitting.swap_design(n, 16, phase).without(f"{phase}_ms_per_token")
        y = noisy(fitting.swap_design(n, 16, phase).matrix @ coefficients, 0.01)
        fit = fitting.fit_nnls(design, y, held)
        assert set(fit.coefficients) == {f"{phase}_fixed_ms", f"{phase}_ms_per_block"}
        np.testing.assert_allclose(beta(fit), coefficients[[0, 2]], rtol=0.1)
        assert fit.heldout_mape < 0.03


def test_recompute_fit_recovers_quadratic_coefficients():
    n = np.array(geometric_sizes(32, 32768, 14), dtype=float)
    truth = np.array([5.0, 0.3, 2e-5])
    y = noisy(fitting.recompute_design(n).matrix @ truth, 0.01)
    held = fitting.holdout_mask(len(n))
    fit = fitting.fit_nnls(fitting.recompute_design(n), y, held)
    np.testing.assert_allclose(beta(fit), truth, rtol=0.1)
    assert fit.r2 > 0.99 and fit.heldout_mape < 0.03
    assert held.sum() >= 3 and not held[0] and not held[-1]


def test_swap_fit_separates_per_token_and_per_block_costs():
    n = np.array([1, 3, 16, 17, 40, 100, 257, 1000, 4096, 5000, 16384], dtype=float)
    truth = {"swap_out_fixed_ms": 0.05, "swap_out_ms_per_token": 0.002,
             "swap_out_ms_per_block": 0.01}
    design = fitting.swap_design(n, 16, "swap_out")
    np.testing.assert_array_equal(design.matrix[:4, 2], [1, 1, 1, 2])
    fit = fitting.fit_nnls(design, design.matrix @ list(truth.values()))
    assert fit.coefficients == pytest.approx(truth, rel=1e-6)
    assert fit.r2 == pytest.approx(1.0) and fit.heldout_mape is None


def test_fit_coefficients_stay_non_negative():
    n = np.array(geometric_sizes(16, 4096, 10), dtype=float)
    y = 0.01 * n - 0.1  # unconstrained least squares would give a negative intercept
    unconstrained = np.linalg.lstsq(fitting.recompute_design(n).matrix / y[:, None],
                                    np.ones_like(y), rcond=None)[0]
    assert unconstrained[0] < 0
    fit = fitting.fit_nnls(fitting.recompute_design(n), y)
    assert (beta(fit) >= 0).all() and fit.coefficients["recompute_fixed_ms"] == 0


@pytest.mark.parametrize("bad", [[1.0, 0.0, 2.0], [1.0, np.nan, 2.0], [1.0, -1.0, 2.0]])
def test_fit_rejects_non_positive_or_nan_latencies(bad):
    with pytest.raises(ValueError, match="finite and positive"):
        fitting.fit_nnls(fitting.recompute_design([1, 2, 3]), bad)


def test_fit_needs_enough_points():
    with pytest.raises(ValueError, match="at least 3 points"):
        fitting.fit_nnls(fitting.recompute_design([1, 2]), [1.0, 2.0])


def test_decode_design_columns():
    np.testing.assert_array_equal(fitting.decode_design([2, 4], [10, 100]).matrix,
                                  [[1, 2, 20], [1, 4, 400]])


def test_mape_is_relative_to_the_measurement():
    # |11 - 10| / 10 = 0.1 and |1.5 - 2| / 2 = 0.25: mean 0.175 (as a fraction, not percent)
    assert fitting.mape([10.0, 2.0], [11.0, 1.5]) == pytest.approx(0.175)
    assert fitting.mape([3.0], [3.0]) == 0.0


def test_heldout_mape_is_the_error_on_the_held_out_points_only():
    n = np.array(geometric_sizes(16, 4096, 9), dtype=float)
    design = fitting.recompute_design(n)
    y = design.matrix @ np.array([1.0, 0.01, 1e-5])
    held = fitting.holdout_mask(len(n))
    y_off = y.copy()
    y_off[held] *= 1.2  # the held-out points lie 20% above the model the others define
    fit = fitting.fit_nnls(design, y_off, held)
    np.testing.assert_allclose(beta(fit), [1.0, 0.01, 1e-5], rtol=1e-6)
    # predicted = y, measured = 1.2·y on every held-out point: |y - 1.2y| / 1.2y = 1/6
    assert fit.heldout_mape == pytest.approx(1 / 6)
    assert fit.r2 == pytest.approx(1.0)


# --- properties ---------------------------------------------------------------------------------

sizes = st.lists(st.integers(1, 65536), min_size=4, max_size=20, unique=True).map(sorted)
# Each term's share of the latency at the largest size: 0 (term absent) or from 1% to 100x.
shares = st.lists(st.one_of(st.just(0.0), st.floats(0.01, 100.0)), min_size=3, max_size=3)


@settings(max_examples=60, deadline=None)
@given(kind=st.sampled_from(sorted(DESIGNS)), n=sizes, share=shares)
def test_noiseless_latencies_give_back_the_exact_coefficients(kind, n, share):
    design = DESIGNS[kind](n)
    x = design.matrix
    if np.linalg.matrix_rank(x / x.max(axis=0)) < 3:
        return  # e.g. every size a whole number of blocks: ceil(n/16) = n/16 is not separable
    # Coefficients scaled so that each term contributes `share` at the largest size.
    truth = np.array(share) / x[-1]
    truth[0] += 0.05  # a fixed cost: latencies are positive
    y = x @ truth
    fit = fitting.fit_nnls(design, y)
    # Compared by contribution (coefficient x its largest column value) relative to the largest
    # latency, so a term worth 1e-9 ms per token² is held to the same standard as a 5 ms one.
    scale = x.max(axis=0) / y.max()
    np.testing.assert_allclose(beta(fit) * scale, truth * scale, atol=1e-6)
    np.testing.assert_allclose(fit.predict(design), y, rtol=1e-6)
    assert fit.r2 == pytest.approx(1.0)


@settings(max_examples=60, deadline=None)
@given(kind=st.sampled_from(sorted(DESIGNS)), n=sizes,
       latency_ms=st.lists(st.floats(1e-3, 1e4), min_size=20, max_size=20))
def test_coefficients_are_never_negative(kind, n, latency_ms):
    fit = fitting.fit_nnls(DESIGNS[kind](n), latency_ms[:len(n)])
    assert (beta(fit) >= 0).all()


@settings(max_examples=60, deadline=None)
@given(kind=st.sampled_from(sorted(DESIGNS)), n=sizes,
       latency_ms=st.lists(st.floats(1e-3, 1e4), min_size=20, max_size=20),
       factor=st.floats(1e-3, 1e3))
def test_relative_error_fit_does_not_depend_on_the_latency_unit(kind, n, latency_ms, factor):
    """Latencies k times larger (seconds vs ms, a slower machine): coefficients k times larger,
    the same R² and the same held-out error, because every residual is relative."""
    design = DESIGNS[kind](n)
    y = np.array(latency_ms[:len(n)])
    held = fitting.holdout_mask(len(n), every=2)
    base, scaled = fitting.fit_nnls(design, y, held), fitting.fit_nnls(design, factor * y, held)
    scale = design.matrix.max(axis=0) / y.max()  # compare by contribution, as above
    np.testing.assert_allclose(beta(scaled) * scale / factor, beta(base) * scale, atol=1e-6)
    assert scaled.r2 == pytest.approx(base.r2, abs=1e-6)
    if base.heldout_mape is not None:
        assert scaled.heldout_mape == pytest.approx(base.heldout_mape, rel=1e-6, abs=1e-9)


@pytest.mark.parametrize("latency_ms", [0.05, 0.001, 7.3])
def test_r2_of_constant_latencies_reproduced_is_one(latency_ms):
    """No variance to explain: rounding in the fit must not turn R² into 0 or a huge negative."""
    y = np.full(6, latency_ms)
    fit = fitting.fit_nnls(fitting.recompute_design([1, 2, 3, 4, 5, 6]), y)
    assert fit.r2 == 1.0 and fit.r2_unweighted == 1.0
    assert fitting.r_squared(y, y + 0.01 * latency_ms) == 0.0
