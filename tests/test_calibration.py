"""Calibration: fits recover known coefficients, timing, the pipeline end to end on `tiny`."""

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from kvbench.calibration import fitting
from kvbench.calibration.pipeline import calibrate, geometric_sizes
from kvbench.calibration.timing import Timing, measure
from kvbench.calibration.validate import check_device, fresh_sizes, validate
from kvbench.cli import app
from kvbench.models import get_model
from kvbench.profile import ProfileError, load, save
from kvbench.selector import select_preemption_strategy

TINY_PLAN = {"swap": (16, 2048, 6), "prefill": (16, 512, 6), "decode": ([1, 4, 8], [32, 128])}


def noisy(y, rel, seed=0):
    return y * (1 + rel * np.random.default_rng(seed).standard_normal(y.shape))


def test_recompute_fit_recovers_quadratic_coefficients():
    n = np.array(geometric_sizes(32, 32768, 14), dtype=float)
    truth = np.array([5.0, 0.3, 2e-5])
    y = noisy(fitting.recompute_design(n) @ truth, 0.01)
    held = fitting.holdout_mask(len(n))
    fit = fitting.fit_nnls(fitting.recompute_design(n), y, held)
    np.testing.assert_allclose(fit.coefficients, truth, rtol=0.1)
    assert fit.r2 > 0.99 and fit.heldout_mape < 0.03
    assert held.sum() >= 3 and not held[0] and not held[-1]


def test_swap_fit_separates_per_token_and_per_block_costs():
    n = np.array([1, 3, 16, 17, 40, 100, 257, 1000, 4096, 5000, 16384], dtype=float)
    truth = np.array([0.05, 0.002, 0.01])
    design = fitting.swap_design(n, 16)
    np.testing.assert_array_equal(design[:4, 2], [1, 1, 1, 2])
    fit = fitting.fit_nnls(design, design @ truth)
    np.testing.assert_allclose(fit.coefficients, truth, rtol=1e-6)
    assert fit.r2 == pytest.approx(1.0) and fit.heldout_mape is None


def test_fit_coefficients_stay_non_negative():
    n = np.array(geometric_sizes(16, 4096, 10), dtype=float)
    y = 0.01 * n - 0.1  # unconstrained least squares would give a negative intercept
    unconstrained = np.linalg.lstsq(fitting.recompute_design(n) / y[:, None], np.ones_like(y),
                                    rcond=None)[0]
    assert unconstrained[0] < 0
    fit = fitting.fit_nnls(fitting.recompute_design(n), y)
    assert (fit.coefficients >= 0).all() and fit.coefficients[0] == 0


@pytest.mark.parametrize("bad", [[1.0, 0.0, 2.0], [1.0, np.nan, 2.0], [1.0, -1.0, 2.0]])
def test_fit_rejects_non_positive_or_nan_latencies(bad):
    with pytest.raises(ValueError, match="finite and positive"):
        fitting.fit_nnls(fitting.recompute_design([1, 2, 3]), bad)


def test_fit_needs_enough_points():
    with pytest.raises(ValueError, match="at least 3 points"):
        fitting.fit_nnls(fitting.recompute_design([1, 2]), [1.0, 2.0])


def test_decode_design_columns():
    np.testing.assert_array_equal(fitting.decode_design([2, 4], [10, 100]),
                                  [[1, 2, 20], [1, 4, 400]])


def test_timing_keeps_samples_and_reports_median_and_iqr():
    t = Timing([1.0, 2.0, 3.0, 4.0, 100.0])
    assert t.median_ms == 3.0 and t.spread_ms == pytest.approx(2.0)
    calls = []
    timing = measure(lambda: calls.append(1), "cpu", warmup=2, reps=7, max_rel_spread=np.inf)
    assert len(timing.samples_ms) == 7 and len(calls) == 9


def test_fresh_sizes_avoid_calibrated_sizes():
    sizes = geometric_sizes(16, 4096, 9)
    fresh = fresh_sizes(sizes, 4)
    assert fresh and not set(fresh) & set(sizes)
    assert min(sizes) < min(fresh) and max(fresh) < max(sizes)


@pytest.fixture(scope="module")
def tiny_run():
    return calibrate(get_model("tiny"), "cpu", block_size=8, quick=True, plan=TINY_PLAN)


def test_pipeline_builds_a_measured_profile(tiny_run, tmp_path):
    prof = tiny_run.profile
    assert prof.source == "measured" and prof.environment["device"] == "cpu"
    assert prof.swap.impl in ("torch", "per_block") and prof.swap.block_size == 8
    sizes = geometric_sizes(*TINY_PLAN["swap"])
    assert prof.swap.measurements.num_tokens == sizes
    assert len(prof.swap.measurements.latency_ms) == len(sizes)
    assert all(x > 0 for x in prof.recompute.measurements.latency_ms)
    assert set(prof.extra["swap_impls"]) == {"torch", "per_block"}
    assert prof.extra["ceiling_gbps"]["out"] > 0
    assert prof.swap.fit.max_tokens == 2048 and prof.recompute.fit.max_tokens == 512
    for fit in (prof.swap.fit, prof.recompute.fit):
        assert fit.r2 is not None and fit.heldout_mape is not None
    # the recompute measurement is L layers (each with its attention) plus the LM head
    assert prof.recompute.measurements.latency_ms[-1] > prof.extra["attention"]["latency_ms"][-1]
    path = save(prof, tmp_path / "p.json")
    again = load(path)
    assert again == prof
    result = select_preemption_strategy([0, 10, 100], again)
    assert result["swap_costs_ms"][1] == round(float(prof.cost_model().swap_ms(10)), 4)


def test_validate_measures_fresh_points(tiny_run):
    report = validate(tiny_run.profile, "cpu", count=3)
    assert 1 <= len(report.num_tokens) <= 3
    assert all(m > 0 for m in report.swap_measured_ms + report.recompute_measured_ms)
    assert 0.0 <= report.agreement <= 1.0
    assert set(report.predicted_choice + report.measured_choice) <= {"swap", "recompute"}
    assert report.to_dict()["swap_mape"] == report.swap_mape


def test_validate_refuses_another_device_unless_forced(tiny_run):
    gpu_profile = tiny_run.profile.model_copy(
        update={"environment": {**tiny_run.profile.environment, "device": "cuda"}})
    with pytest.raises(ProfileError, match="measured on cuda .*, not cpu"):
        check_device(gpu_profile, "cpu")
    check_device(gpu_profile, "cpu", force=True)


runner = CliRunner()


def test_cli_calibrate_writes_profile_samples_and_plot(tmp_path, monkeypatch):
    from kvbench.calibration import pipeline

    monkeypatch.setitem(pipeline.PLANS, ("cpu", True), TINY_PLAN)
    out = tmp_path / "prof.json"
    res = runner.invoke(app, ["calibrate", "--device", "cpu", "--model", "tiny", "--quick",
                              "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "crossover_tokens" in res.stdout and "R²" in res.stdout
    assert load(out).model.name == "tiny"
    assert json.loads(out.with_suffix(".samples.json").read_text())["swap_out"]
    assert out.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"
    res = runner.invoke(app, ["select", "100", "--profile", str(out), "--model", "llama-3-8b"])
    assert res.exit_code == 2 and "profile is for model 'tiny'" in res.stderr
    res = runner.invoke(app, ["select", "100", "--profile", str(out), "--model", "llama-3-8b",
                              "--force", "--json"])
    assert res.exit_code == 0 and json.loads(res.stdout)["strategies"]


def test_cli_calibrate_interrupted_leaves_old_profile(tmp_path, monkeypatch):
    from kvbench.calibration import pipeline

    out = tmp_path / "prof.json"
    out.write_text("earlier profile")

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "calibrate", interrupted)
    res = runner.invoke(app, ["calibrate", "--device", "cpu", "--out", str(out)])
    assert res.exit_code == 130 and "nothing written" in res.stderr
    assert out.read_text() == "earlier profile"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prof.json"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_cli_calibrate_cuda_without_gpu_is_one_line_error():
    res = runner.invoke(app, ["calibrate", "--device", "cuda"])
    assert res.exit_code == 2
    assert res.stderr.strip().count("\n") == 0 and "no CUDA GPU" in res.stderr
