"""`kvbench doctor` on this CPU machine: what it checks, the calibration estimate and the
refusal, the ptxas-versus-driver rule. The GPU checks are unrun here (no GPU)."""

import json

import pytest
import torch
from typer.testing import CliRunner

from kvbench import doctor
from kvbench.cli import app
from kvbench.models import get_model

pytest.importorskip("triton")
GIB = 2**30


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU machine's screen")
def test_cpu_machine_is_ready_for_a_small_model_and_says_what_it_skipped():
    checks = {c.name: c for c in doctor.run_checks(get_model("qwen2.5-0.5b"), "cpu", quick=True)}
    assert checks["torch"].detail.startswith(torch.__version__)
    assert checks["GPU"].status == "skip" and "no CUDA GPU" in checks["GPU"].detail
    assert "Triton assembles sm_90 with ptxas" in checks["ptxas sm_90"].detail
    assert checks["calibration"].status == "ok"
    assert doctor.ready(list(checks.values()))


def test_the_calibration_check_is_the_time_plan(monkeypatch):
    """doctor sizes the calibration with calibrate's own time plan: a model it would refuse
    fails the check, in one line."""
    from kvbench.calibration import timeplan

    check = doctor._calibration(get_model("tiny"), "cpu", 16, True)
    assert check.status == "ok" and "s target for --quick: " in check.detail
    monkeypatch.setattr(timeplan, "REFUSE_S", {True: 0.0, False: 0.0})
    check = doctor._calibration(get_model("tiny"), "cpu", 16, True)
    assert check.status == "fail" and "would take about" in check.detail


def test_a_calibration_that_cannot_fit_is_refused(monkeypatch):
    """doctor and calibrate check the same memory plan (kvbench.calibration.memory)."""
    from kvbench.calibration import memory

    monkeypatch.setattr(memory, "available_bytes",
                        lambda device: {"host": 64 * 2**20, "device": 64 * 2**20})
    spec = get_model("qwen2.5-7b")
    check = doctor._calibration(spec, "cpu", 16, False)
    assert check.status == "fail" and check.detail.startswith("qwen2.5-7b (")
    result = CliRunner().invoke(app, ["calibrate", "--device", "cpu", "--model", "qwen2.5-7b"])
    assert result.exit_code == 2 and result.output.startswith("error: ")
    assert len(result.output.strip().splitlines()) == 1


@pytest.mark.parametrize("arch, driver, status, variable", [
    (90, (12, 4), "warn", "TRITON_PTXAS_BLACKWELL_PATH"),
    (80, (12, 4), "warn", "TRITON_PTXAS_PATH"),
    (90, (99, 0), "ok", None),
])
def test_ptxas_newer_than_the_driver_is_flagged_with_its_fix(arch, driver, status, variable):
    check = doctor._ptxas(arch, driver)
    assert check.status == status
    assert (variable in check.detail) if variable else "supports CUDA 99.0" in check.detail


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU machine's screen")
def test_cli_doctor_json():
    result = CliRunner().invoke(app, ["doctor", "--device", "cpu", "--quick", "--json"])
    assert result.exit_code == 0
    rows = json.loads(result.output)
    assert {r["name"] for r in rows} >= {"torch", "triton", "GPU", "calibration"}
    assert {r["status"] for r in rows} <= {"ok", "warn", "skip"}
