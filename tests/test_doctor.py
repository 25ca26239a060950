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


def test_estimate_follows_the_plan():
    """llama-3-8b on CUDA: the swap cache holds 2 x 65536 tokens at 128 KiB per token (bf16,
    32 layers, 8 KV heads, head_dim 128); the swap space is half of it."""
    est = doctor.estimate_calibration(get_model("llama-3-8b"), "cuda")
    assert est.swap_device_bytes == 2 * 65536 * 128 * 1024 == 16 * GIB
    assert est.swap_host_bytes == 8 * GIB
    assert est.device_peak_bytes >= est.swap_device_bytes
    quick = doctor.estimate_calibration(get_model("llama-3-8b"), "cuda", quick=True)
    assert quick.swap_device_bytes < est.swap_device_bytes and quick.timed_seconds > 0


def test_a_calibration_that_cannot_fit_is_refused(monkeypatch):
    monkeypatch.setattr(doctor, "host_available_bytes", lambda: 4 * GIB)
    spec = get_model("qwen2.5-7b")
    check = doctor._calibration(spec, "cpu", 16, False)
    assert check.status == "fail" and "4.0 GiB is available" in check.detail
    with pytest.raises(ValueError, match="calibrating qwen2.5-7b on the CPU needs about"):
        doctor.require_calibration_fits(spec, "cpu")
    result = CliRunner().invoke(app, ["calibrate", "--device", "cpu", "--model", "qwen2.5-7b"])
    assert result.exit_code == 2 and "error: calibrating qwen2.5-7b" in result.output


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
