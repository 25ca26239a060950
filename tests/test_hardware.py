"""A fingerprint that tells CPUs apart: vendor, family, model, stepping and the instruction sets
that change the numbers (`kvbench.hardware.cpu_info`), in the slug that names a machine's
results and in the one-line warning of `select`, `validate`, `simulate`, `compare-policies` and
the vLLM plugin when a measured profile comes from other hardware."""

import json
import os
from pathlib import Path

import pytest
import torch

import kvbench.calibration.validate as validate_module
from kvbench import hardware
from kvbench.calibration.validate import ValidationReport
from kvbench.hardware import (
    cpu_info,
    device_slug,
    fingerprint,
    fingerprint_mismatch,
    fingerprint_slug,
    get_hardware,
)
from kvbench.models import get_model
from kvbench.profile import analytic_profile, load, save

ROOT = Path(__file__).resolve().parents[1]
ZEN3 = {"vendor": "AuthenticAMD", "family": 25, "model": 1, "stepping": 1,
        "isa": {"amx": False, "avx512_bf16": False, "avx512": False, "avx2": True,
                "capability": "AVX2"}}
ZEN4 = {**ZEN3, "model": 17,
        "isa": {**ZEN3["isa"], "avx512_bf16": True, "avx512": True, "capability": "AVX512"}}


def cpu_env(cpu: dict, cores: int = 2) -> dict:
    return {"device": "cpu", "device_name": f"AMD EPYC ({cores} cores)", "cpu_model": "AMD EPYC",
            "cpu_count": cores, "cpu": cpu}


@pytest.fixture
def on_zen4(monkeypatch):
    """This machine, as kvbench sees it, is a Zen 4 AMD EPYC."""
    monkeypatch.setattr(hardware, "cpu_info", lambda: ZEN4)
    monkeypatch.setattr(hardware, "cpu_model", lambda: "AMD EPYC")


def test_slug_names_family_model_stepping_isa_and_cores():
    assert fingerprint_slug(cpu_env(ZEN4)) == "cpu-amd-epyc-f25m17s1-avx512bf16-2c"
    assert fingerprint_slug(cpu_env(ZEN3)) == "cpu-amd-epyc-f25m1s1-avx2-2c"


@pytest.mark.parametrize("change", [{"model": 17}, {"stepping": 2},
                                    {"isa": {**ZEN3["isa"], "avx512_bf16": True}}],
                         ids=["model", "stepping", "avx512-bf16"])
def test_slugs_differ_in_one_field(change):
    assert fingerprint_slug(cpu_env({**ZEN3, **change})) != fingerprint_slug(cpu_env(ZEN3))


@pytest.mark.parametrize(("features", "level"), [
    ({"amx": True, "avx512_bf16": True, "avx512": True, "avx2": True}, "amx"),
    ({"avx512_bf16": True, "avx512": True, "avx2": True}, "avx512bf16"),
    ({"avx512": True, "avx2": True}, "avx512"),
    ({"avx2": True}, "avx2"),
    ({}, "baseline"),
])
def test_slug_takes_the_best_isa_level(features, level):
    isa = {"amx": False, "avx512_bf16": False, "avx512": False, "avx2": False,
           "capability": "DEFAULT", **features}
    assert fingerprint_slug(cpu_env({**ZEN3, "isa": isa})) == f"cpu-amd-epyc-f25m1s1-{level}-2c"


def test_this_machines_slug_is_its_fingerprints(on_zen4):
    assert device_slug("cpu") == f"cpu-amd-epyc-f25m17s1-avx512bf16-{os.cpu_count()}c"
    assert fingerprint_slug(fingerprint("cpu")) == device_slug("cpu")


def test_an_older_fingerprint_still_slugs_as_before():
    """A fingerprint from before `cpu_info` (the committed benchmark baselines' machines) keeps
    the name of its folder."""
    env = {"device": "cpu", "device_name": "AMD EPYC (2 cores)", "cpu_model": "AMD EPYC",
           "cpu_count": 2}
    assert fingerprint_slug(env) == "cpu-amd-epyc-2c"
    assert (ROOT / "results/benchmarks" / fingerprint_slug(env)).is_dir()


def test_the_committed_cpu_profiles_name_their_isa():
    paths = [p for p in (ROOT / "results/profiles").glob("cpu-*.json")
             if not p.name.endswith((".samples.json", ".validate.json"))]
    assert paths
    for path in paths:
        env = load(path).environment
        assert path.name.startswith(f"{fingerprint_slug(env)}-")
        assert set(env["cpu"]) >= {"vendor", "family", "model", "stepping", "isa"}
        assert {"avx2", "avx512", "avx512_bf16", "amx"} <= set(env["cpu"]["isa"])


def test_cpu_info_without_proc_cpuinfo(monkeypatch):
    """Off Linux: no vendor, family, model or stepping; torch's ISA report still."""
    monkeypatch.setattr(hardware, "proc_cpuinfo", dict)
    info = cpu_info.__wrapped__()
    assert (info["vendor"], info["family"], info["model"], info["stepping"]) == (None,) * 4
    assert info["isa"]["capability"] == torch.backends.cpu.get_cpu_capability()
    assert fingerprint_slug(cpu_env(info)).startswith("cpu-amd-epyc-")
    assert "none" not in fingerprint_slug(cpu_env(info))


def test_cpu_info_reads_proc_cpuinfo():
    if not Path("/proc/cpuinfo").exists():
        pytest.skip("no /proc/cpuinfo here")
    info = cpu_info()
    assert info["isa"]["avx2"] == torch.cpu._is_avx2_supported()
    if hardware.proc_cpuinfo().get("cpu family"):  # x86 Linux
        assert isinstance(info["family"], int) and isinstance(info["model"], int)


def test_mismatch_names_both_cpus(on_zen4):
    line = fingerprint_mismatch(cpu_env(ZEN3, os.cpu_count()))
    assert line == (f"profile measured on {os.cpu_count()}-core AMD EPYC family 25 model 1 "
                    "stepping 1 (AVX2, no AVX512-BF16, no AVX-512, ATen AVX2), this machine is "
                    f"{os.cpu_count()}-core AMD EPYC family 25 model 17 stepping 1 (AVX512-BF16, "
                    "ATen AVX512): its costs may not hold here")


@pytest.mark.parametrize("env", [
    cpu_env(ZEN4, os.cpu_count()),
    {"device": "analytic", "device_name": "h100-sxm"},
    # an older fingerprint that shows no difference in what it holds
    {"device": "cpu", "device_name": "AMD EPYC", "cpu_model": "AMD EPYC",
     "cpu_count": os.cpu_count()},
], ids=["same", "analytic", "older-same"])
def test_no_mismatch(on_zen4, env):
    assert fingerprint_mismatch(env) is None


def test_mismatch_of_an_older_fingerprint_says_it_is_incomplete(on_zen4):
    line = fingerprint_mismatch({"device": "cpu", "cpu_model": "Intel Xeon", "cpu_count": 64})
    assert line.startswith("profile measured on 64-core Intel Xeon (an older fingerprint, "
                           "without CPU family, model and ISA), this machine is ")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU line")
def test_cuda_profile_on_a_machine_without_gpu():
    assert fingerprint_mismatch({"device": "cuda", "device_name": "NVIDIA H100"}) == (
        "profile measured on NVIDIA H100, this machine has no CUDA GPU: its costs may not hold "
        "here")


# --- the commands that use a profile --------------------------------------------------------

def profile_file(tmp_path, environment: dict | None) -> str:
    """The tiny model's profile: analytic without `environment`, else measured there."""
    prof = analytic_profile(get_model("tiny"), get_hardware("l4"))
    if environment is not None:
        prof = prof.model_copy(update={"source": "measured", "environment": environment})
    return str(save(prof, tmp_path / "tiny.json"))


COMMANDS = {
    "select": ["select", "100", "--profile"],
    "simulate": ["simulate", "--synthetic", "requests=5,rate=8", "--num-gpu-blocks", "200",
                 "--profile"],
    "compare-policies": ["compare-policies", "--synthetic", "requests=5,rate=8",
                         "--policies", "fcfs/lifo/recompute/oracle", "--num-gpu-blocks", "200",
                         "--profile"],
}


def test_a_sweep_warns_once_of_its_profile(run_cli, on_zen4, tmp_path):
    """`kvbench sweep`: the spec names the profile."""
    profile = profile_file(tmp_path, cpu_env(ZEN3, os.cpu_count()))
    spec = tmp_path / "sweep.toml"
    spec.write_text(f'policies = ["fcfs/lifo/recompute/oracle"]\nsynthetic = ["requests=5,'
                    f'rate=8"]\nnum_gpu_blocks = [200]\nprofile = "{profile}"\n')
    code, _, err = run_cli("sweep", str(spec), "--out", str(tmp_path / "out"))
    assert code == 0, err
    assert err.count("warning: profile measured on") == 1, err


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize(("environment", "warned"), [
    (cpu_env(ZEN3, os.cpu_count()), True), (cpu_env(ZEN4, os.cpu_count()), False),
    (None, False)], ids=["other-cpu", "this-cpu", "analytic"])
def test_commands_warn_once_and_use_the_profile(run_cli, on_zen4, tmp_path, monkeypatch,
                                                command, environment, warned):
    monkeypatch.chdir(tmp_path)  # compare-policies writes sim-compare/ here
    code, out, err = run_cli(*COMMANDS[command], profile_file(tmp_path, environment))
    assert code == 0, err
    assert out
    warnings = [line for line in err.splitlines() if line.startswith("warning: profile measured")]
    assert len(warnings) == warned, err
    if warned:
        assert "family 25 model 1 stepping 1" in warnings[0]


def test_validate_warns(run_cli, on_zen4, tmp_path, monkeypatch):
    report = ValidationReport([32], [0.5], [0.5], [0.5], [0.5], [2.0], [2.0], ["swap"], ["swap"])
    monkeypatch.setattr(validate_module, "validate", lambda *args, **kwargs: report)
    path = profile_file(tmp_path, cpu_env(ZEN3, os.cpu_count()))
    code, out, err = run_cli("validate", "--profile", path, "--device", "cpu", "--json")
    assert code == 0 and json.loads(out) == {**report.to_dict(), "command": "kvbench validate "
                                              f"--profile {path} --device cpu --json"}
    assert err.count("warning: profile measured on") == 1, err


@pytest.mark.vllm
def test_vllm_plugin_warns(on_zen4, tmp_path, monkeypatch):
    from kvbench.vllm import scheduler
    from kvbench.vllm.options import PluginOptions

    logged = []
    monkeypatch.setattr(scheduler.logger, "warning", lambda *args: logged.append(args))
    spec = get_model("tiny")
    options = PluginOptions(profile=Path(profile_file(tmp_path, cpu_env(ZEN3, os.cpu_count()))))
    costs, source = scheduler.preemption_costs(options, spec, 16)
    assert source.startswith("measured") and costs.costs.block_size == 16
    assert len(logged) == 1
    assert (logged[0][0] % logged[0][1:]).startswith("kvbench: profile measured on")
    logged.clear()
    options = PluginOptions(profile=Path(profile_file(tmp_path, cpu_env(ZEN4, os.cpu_count()))))
    scheduler.preemption_costs(options, spec, 16)
    assert logged == []
