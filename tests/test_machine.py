"""`kvbench machine [--slug]`: this machine's fingerprint, and the slug that names its folder of
benchmark baselines (the Makefile's results/benchmarks/$(kvbench machine --slug)) and its section
of the results page."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from kvbench import __version__
from kvbench.cli import app
from kvbench.hardware import (
    device_slug,
    fingerprint,
    fingerprint_slug,
    get_hardware,
    resolve_device,
)
from kvbench.models import get_model
from kvbench.profile import analytic_profile, save
from kvbench.report import build_report

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()
SLUG = re.compile(r"[a-z0-9]+(-[a-z0-9]+)*")


def test_machine_prints_the_fingerprint_as_json():
    result = runner.invoke(app, ["machine", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert set(info) == {"device", "device_name", "cpu_model", "cpu_count", "cpu", "python",
                         "torch", "triton", "kvbench", "commit", "cuda", "driver"}
    assert info["device"] == "cpu" and info["cpu_count"] == os.cpu_count()
    assert set(info["cpu"]) == {"vendor", "family", "model", "stepping", "isa"}
    assert set(info["cpu"]["isa"]) == {"amx", "avx512_bf16", "avx512", "avx2", "amx_fp16",
                                       "capability", "onednn_bf16", "onednn_fp16"}
    assert info["cpu"]["isa"]["capability"] == torch.backends.cpu.get_cpu_capability()
    assert info["kvbench"] == __version__ and info["torch"] == torch.__version__
    assert info["device_name"].endswith(f"({os.cpu_count()} cores)")


def test_machine_slug_as_the_makefile_runs_it():
    """One file-name-safe line on stdout, nothing else, from the console entry point."""
    done = subprocess.run([sys.executable, "-m", "kvbench.cli", "machine", "--slug"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stderr == ""
    assert done.stdout == device_slug(resolve_device()) + "\n"
    assert SLUG.fullmatch(done.stdout.strip())


def test_slug_is_the_fingerprint_slug_of_the_printed_fingerprint():
    for device in ["cpu"] + (["cuda"] if torch.cuda.is_available() else []):
        slug = runner.invoke(app, ["machine", "--device", device, "--slug"]).stdout.strip()
        printed = json.loads(runner.invoke(app, ["machine", "--device", device]).stdout)
        assert slug == fingerprint_slug(printed) == device_slug(device)


@pytest.mark.parametrize(("env", "slug"), [
    ({"device": "cpu", "cpu_model": "Intel(R) Xeon(R) CPU @ 2.20GHz", "cpu_count": 2},
     "cpu-intel-xeon-2c"),
    ({"device": "cpu", "cpu_model": "AMD EPYC 7B13 64-Core Processor", "cpu_count": 16},
     "cpu-amd-epyc-7b13-64-core-16c"),
    ({"device": "cuda", "device_name": "NVIDIA H100 80GB HBM3"}, "nvidia-h100-80gb-hbm3"),
    ({"device": "analytic", "device_name": "h100-sxm"}, "h100-sxm"),
])
def test_fingerprint_slugs(env, slug):
    assert fingerprint_slug(env) == slug


def test_baselines_and_profiles_of_this_machine_share_one_report_section(tmp_path):
    """Benchmarks saved under results/benchmarks/<machine --slug>/ and a profile measured here
    land in the same section of the results page."""
    slug = runner.invoke(app, ["machine", "--slug", "--device", "cpu"]).stdout.strip()
    bench = tmp_path / "benchmarks" / slug / "Linux-CPython-3.11-64bit" / "0001_abc.json"
    bench.parent.mkdir(parents=True)
    bench.write_text(json.dumps({"datetime": "2026-01-01T00:00:00", "benchmarks": []}))
    prof = analytic_profile(get_model("tiny"), get_hardware("l4"))
    measured = prof.model_copy(update={"source": "measured", "environment": fingerprint("cpu")})
    save(measured, tmp_path / "profiles" / "tiny.json")
    report = build_report(tmp_path)
    assert re.findall(r"^## (.+)$", report, re.MULTILINE) == [slug]
    section = report.split(f"## {slug}", 1)[1]
    assert "[tiny](profiles/tiny.json)" in section and "0001_abc.json" in section


@pytest.mark.parametrize(("device", "message"), [
    ("tpu", "unknown device 'tpu'"),
    pytest.param("cuda", "no CUDA GPU", marks=pytest.mark.skipif(
        torch.cuda.is_available(), reason="checks the no-GPU message")),
])
def test_machine_bad_device_is_one_line(device, message):
    result = runner.invoke(app, ["machine", "--device", device, "--slug"])
    assert result.exit_code == 2 and result.stdout == ""
    assert result.stderr.count("\n") == 1 and message in result.stderr
