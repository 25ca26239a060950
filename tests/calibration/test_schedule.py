"""Issue 13, calibration stability: interleaved shuffled rounds within a budget, and the quiet
machine check (kvbench.calibration.schedule)."""

from __future__ import annotations

import time

import numpy as np
import pytest

from kvbench.calibration import schedule
from kvbench.calibration.plans import PLANS, CalibrationPlan, TokenSweep
from kvbench.calibration.schedule import busy_reason, interleave, machine_check, recording
from kvbench.calibration.timing import FIRST_LOOK_REPS, measure


def recorded(sizes, calls, sleep_s=0.0):
    with recording() as points:
        for n in sizes:
            def point():
                calls.append(n)
                time.sleep(sleep_s)
            measure(point, "cpu", warmup=1, reps=9)
    return points


def test_recording_takes_a_first_look_only():
    calls = []
    points = recorded([1, 2], calls)
    assert [len(t.samples_ms) for _, _, t in points] == [FIRST_LOOK_REPS] * 2
    assert calls == [1] * (1 + FIRST_LOOK_REPS) + [2] * (1 + FIRST_LOOK_REPS)


def test_rounds_visit_every_point_in_a_new_order_and_replace_the_samples():
    calls = []
    points = recorded(range(8), calls)
    calls.clear()
    report = interleave(points, budget_s=0.0, seed=1)
    assert report.rounds == schedule.MIN_ROUNDS and report.points == 8
    rounds = [calls[8 * r:8 * r + 8] for r in range(report.rounds)]
    assert all(sorted(r) == list(range(8)) for r in rounds)  # each round: every point once
    assert len({tuple(r) for r in rounds}) == report.rounds  # each in its own order
    assert rounds[0] != list(range(8))
    assert all(len(t.samples_ms) == report.rounds for _, _, t in points)


def test_rounds_fill_the_budget_and_stop_at_it():
    calls = []
    points = recorded([1, 2, 3], calls, sleep_s=0.002)
    report = interleave(points, budget_s=0.3)
    assert schedule.MIN_ROUNDS < report.rounds <= schedule.MAX_ROUNDS
    assert report.seconds < 0.3 + 0.1


def test_noisy_points_get_more_samples_within_the_budget(monkeypatch):
    """A point whose spread stays high is measured again while time is left, at most doubling
    its samples; a steady point is not."""
    rng = np.random.default_rng(0)
    noise = iter(np.abs(rng.normal(1.0, 0.5, 10_000)).tolist())
    monkeypatch.setattr(schedule, "_one_call_ms",
                        lambda fn, device: next(noise) if fn() == "noisy" else 1.0)
    with recording() as points:
        for kind in ("noisy", "steady"):
            measure(lambda: kind, "cpu", warmup=0, reps=3)
    report = interleave(points, budget_s=0.05)
    noisy, steady = (len(t.samples_ms) for _, _, t in points)
    assert steady == report.rounds and noisy == 2 * report.rounds
    assert report.extra_samples == report.rounds


def test_machine_check_and_busy_reason():
    check = machine_check("cpu")
    assert check["reference_ms"] > 0 and check["rel_spread"] >= 0
    assert check["cpu_count"] >= 1
    assert check["threads"] >= 1
    assert (check["parallel_speedup"] is None) == (check["threads"] == 1)
    quiet = {"reference_ms": 1.0, "rel_spread": 0.02, "load_1m": 0.3, "cpu_count": 2,
             "threads": 2, "parallel_speedup": 1.8}
    assert busy_reason(quiet) is None
    assert busy_reason({**quiet, "load_1m": 5.1}) == "load 5.1 on 2 cores"
    assert busy_reason({**quiet, "rel_spread": 0.3}) == "reference workload spread 30%"
    assert busy_reason({**quiet, "parallel_speedup": 0.4}) == (
        "2 threads ran it only 0.4x as fast as one: other processes hold the cores")
    assert busy_reason({**quiet, "load_1m": None, "parallel_speedup": None}) is None


@pytest.mark.parametrize("failing, exit_code", [(True, 1), (False, 0)])
def test_a_profile_missing_its_bar_is_written_beside_the_path(tmp_path, run_cli, monkeypatch,
                                                              failing, exit_code):
    """A fit over the quality bar no longer becomes the profile silently: it goes to
    <name>.rejected.json, marked, and the command exits 1 with one line (0 with --force)."""
    from kvbench.calibration import pipeline

    real = pipeline.calibrate

    def calibrate(*args, **kwargs):  # the bar's verdict is set: tiny's fits are noise-bound
        run = real(*args, **kwargs)
        run.failures = ["swap held-out error 42.8% exceeds 10%"] if failing else []
        quality = {**run.profile.extra["quality"], "passed": not failing,
                   "failures": run.failures}
        run.profile = run.profile.model_copy(
            update={"extra": {**run.profile.extra, "quality": quality}})
        return run

    tiny = CalibrationPlan(swap_tokens=TokenSweep(16, 2048, 6),
                           prefill_tokens=TokenSweep(16, 512, 6), decode_batch_sizes=(1, 4, 8),
                           decode_contexts=(32, 128), per_block_max_tokens=None,
                           swap_interleave_s=0.1, prefill_interleave_s=0.1)
    monkeypatch.setitem(PLANS, ("cpu", True), tiny)
    monkeypatch.setattr(pipeline, "calibrate", calibrate)
    out = tmp_path / "p.json"
    out.write_text("the profile in use")
    code, stdout, err = run_cli("calibrate", "--device", "cpu", "--model", "tiny", "--quick",
                                "--out", str(out))
    if failing:
        assert code == 1 and out.read_text() == "the profile in use"
        rejected = pipeline.load(tmp_path / "p.rejected.json")
        assert rejected.extra["quality"]["passed"] is False
        assert err.splitlines()[-1] == (
            f"error: the profile missed its quality bar (swap held-out error 42.8% exceeds 10%):"
            f" written to {tmp_path / 'p.rejected.json'}, {out} is as it was; calibrate again "
            "on a quiet machine, or pass --force to accept it")
        code, stdout, err = run_cli("calibrate", "--device", "cpu", "--model", "tiny",
                                    "--quick", "--out", str(out), "--force")
        assert code == 0 and pipeline.load(out).extra["quality"]["passed"] is False
        assert "warning: swap held-out error 42.8% exceeds 10%" in err
    else:
        assert code == exit_code, err
        assert pipeline.load(out).extra["quality"]["passed"] is True
        assert not (tmp_path / "p.rejected.json").exists()
