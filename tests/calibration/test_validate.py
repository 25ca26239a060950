"""`kvbench validate` (kvbench.calibration.validate): fresh sizes, the report's figures, a real
run on the `tiny` model, and the command's output."""

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from kvbench.calibration import validate as validate_module
from kvbench.calibration.plans import geometric_sizes
from kvbench.calibration.validate import ValidationReport, check_device, fresh_sizes, validate
from kvbench.cli import app
from kvbench.hardware import get_hardware
from kvbench.models import get_model
from kvbench.profile import ProfileError, analytic_profile, parse, save
from kvbench.selector import select_preemption_strategy

SWAP_SIZES, RECOMPUTE_SIZES = [16, 64, 256, 1024], [16, 64, 256]


@pytest.fixture
def measured_tiny():
    """A 'measured' CPU profile of `tiny` (analytic coefficients, block size 8, fits valid up to
    1024 tokens), as `calibrate` would leave it: validate needs only these fields."""
    data = json.loads(analytic_profile(get_model("tiny"), get_hardware("l4"), block_size=8,
                                       max_tokens=1024).to_json())
    data.update(source="measured", environment={"device": "cpu", "device_name": "test CPU"})
    data["swap"]["impl"] = "torch"
    for phase in ("swap_out", "swap_in"):
        data[phase]["measurements"] = {"num_tokens": SWAP_SIZES}
    data["recompute"]["measurements"] = {"num_tokens": RECOMPUTE_SIZES}
    data["recompute"]["fit"]["max_tokens"] = 256
    return parse(data)


def test_fresh_sizes_avoid_calibrated_sizes():
    sizes = geometric_sizes(16, 4096, 9)
    fresh = fresh_sizes(sizes, 4)
    assert fresh and not set(fresh) & set(sizes)
    assert min(sizes) < min(fresh) and max(fresh) < max(sizes)


def test_fresh_sizes_are_geometric_midpoints():
    assert fresh_sizes([16, 64, 256, 1024], 3) == [32, 128, 512]
    assert fresh_sizes([16, 64, 256, 1024], 1) == [32]


# The swap round trip (out + in): predicted 0.16, 0.25, 0.5, 1; measured 0.2, 0.25, 0.4, 1.
REPORT = ValidationReport(
    num_tokens=[22, 54, 118, 259],
    swap_out_predicted_ms=[0.06, 0.1, 0.25, 0.5], swap_out_measured_ms=[0.05, 0.1, 0.2, 0.25],
    swap_in_predicted_ms=[0.1, 0.15, 0.25, 0.5], swap_in_measured_ms=[0.15, 0.15, 0.2, 0.75],
    recompute_predicted_ms=[0.1, 10.0, 20.0, 0.9], recompute_measured_ms=[0.1, 12.5, 20.0, 1.2],
    predicted_choice=["recompute", "swap", "swap", "recompute"],
    measured_choice=["recompute", "swap", "swap", "swap"])


def test_report_figures_by_hand():
    assert REPORT.agreement == 0.75  # the selector was wrong at 259 tokens only
    # swap: |0.16-0.2|/0.2 = 0.2, 0, |0.5-0.4|/0.4 = 0.25, 0 -> mean 0.1125
    assert REPORT.swap_mape == pytest.approx(0.1125)
    assert REPORT.swap_predicted_ms == pytest.approx([0.16, 0.25, 0.5, 1.0])
    # out: 0.2, 0, 0.25, 1 -> 0.3625; in: |0.1-0.15|/0.15 = 1/3, 0, 0.25, 1/3 -> 0.2292
    assert REPORT.swap_out_mape == pytest.approx(0.3625)
    assert REPORT.swap_in_mape == pytest.approx((1 / 3 + 0.25 + 1 / 3) / 4)
    # recompute: 0, |10-12.5|/12.5 = 0.2, 0, |0.9-1.2|/1.2 = 0.25 -> mean 0.1125
    assert REPORT.recompute_mape == pytest.approx(0.1125)
    assert REPORT.to_dict()["agreement"] == 0.75
    assert REPORT.summary_line() == ("decision agreement: 75%; prediction error: swap 11.2% "
                                     "(out 36.2%, in 22.9%), recompute 11.2%")


def test_validate_command_prints_the_report(monkeypatch, measured_tiny, tmp_path):
    path = save(measured_tiny, tmp_path / "tiny.json")
    monkeypatch.setattr(validate_module, "validate", lambda *args, **kwargs: REPORT)
    result = CliRunner().invoke(app, ["validate", "--profile", str(path), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0] == f"validate {path} on cpu"
    rows = [[c.strip() for c in line.strip("│").split("│")] for line in lines
            if line.startswith("│")]
    assert rows[3] == ["259", "0.500", "0.250", "0.500", "0.750", "1.000", "1.000", "0.900",
                       "1.200", "recompute", "swap"]
    assert lines[-1] == REPORT.summary_line()
    as_json = CliRunner().invoke(app, ["validate", "--profile", str(path), "--json"])
    saved = json.loads(as_json.stdout)  # with the command that made it (argv, here pytest's)
    assert saved.pop("command").startswith("kvbench ") and saved == REPORT.to_dict()


def test_validate_measures_fresh_points(measured_tiny):
    report = validate(measured_tiny, "cpu", count=3)
    sizes = report.num_tokens
    assert sizes == [32, 128]  # midpoints of 16, 64, 256 (the sizes both fits cover)
    assert all(m > 0 for m in report.swap_out_measured_ms + report.swap_in_measured_ms
               + report.recompute_measured_ms)
    assert report.predicted_choice == select_preemption_strategy(sizes, measured_tiny)["strategies"]
    costs = measured_tiny.cost_model()
    np.testing.assert_allclose(report.swap_out_predicted_ms, costs.swap_out_ms(sizes))
    np.testing.assert_allclose(report.swap_in_predicted_ms, costs.swap_in_ms(sizes))
    np.testing.assert_allclose(report.swap_predicted_ms, costs.swap_ms(sizes))
    np.testing.assert_allclose(report.recompute_predicted_ms, costs.recompute_ms(sizes))
    assert report.measured_choice == ["swap" if s <= r else "recompute" for s, r in
                                      zip(report.swap_measured_ms, report.recompute_measured_ms)]


def test_validate_refuses_another_device_unless_forced(measured_tiny):
    gpu_profile = measured_tiny.model_copy(
        update={"environment": {**measured_tiny.environment, "device": "cuda"}})
    with pytest.raises(ProfileError, match="measured on cuda .*, not cpu"):
        check_device(gpu_profile, "cpu")
    check_device(gpu_profile, "cpu", force=True)


def test_validate_refuses_an_analytic_profile(measured_tiny):
    analytic = measured_tiny.model_copy(update={"source": "analytic"})
    with pytest.raises(ProfileError, match="needs a measured profile"):
        check_device(analytic, "cpu")
