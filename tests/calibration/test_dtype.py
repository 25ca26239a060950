"""The CPU calibration's dtype: native by the ISA torch reports and a probe, else float32; an
explicit --dtype the CPU emulates is kept with a warning. The ISA report and the probe are faked
here, so these tests take the "no native bfloat16" path on any CPU."""

from __future__ import annotations

from unittest import mock

import pytest

from kvbench.calibration import dtype as dtype_module
from kvbench.calibration import pipeline
from kvbench.calibration.dtype import choose_cpu_dtype, isa_report, native_by_isa, probe_ms
from kvbench.errors import KvbenchError
from kvbench.models import get_model

AVX2_ONLY = {"capability": "AVX2", "avx2": True, "avx512": False, "avx512_bf16": False,
             "amx": False, "amx_fp16": False, "onednn_bf16": False, "onednn_fp16": False}
SAPPHIRE_RAPIDS = {**AVX2_ONLY, "capability": "AVX512", "avx512": True, "avx512_bf16": True,
                   "amx": True, "onednn_bf16": True}
RESTRICTED = {**SAPPHIRE_RAPIDS, "onednn_bf16": False}  # ONEDNN_MAX_CPU_ISA=AVX2


def fake_probe(times: dict[str, float]):
    return mock.patch.object(dtype_module, "probe_ms", lambda spec, dtype: times[dtype])


def test_isa_report_reads_what_torch_reports():
    isa = isa_report()
    assert isa["capability"] in ("DEFAULT", "AVX2", "AVX512", "ZVECTOR", "VSX", "SVE256")
    assert set(AVX2_ONLY) == set(isa) and all(isinstance(v, bool) for k, v in isa.items()
                                              if k != "capability")
    assert isa["onednn_bf16"] <= (isa["avx512_bf16"] or isa["amx"])  # oneDNN needs the unit


@pytest.mark.parametrize("isa, native, words", [
    (AVX2_ONLY, False, "no native bfloat16"),
    (RESTRICTED, False, "oneDNN may not use it"),
    (SAPPHIRE_RAPIDS, True, "AVX512-BF16/AMX"),
])
def test_native_bfloat16_by_the_isa(isa, native, words):
    verdict, reason = native_by_isa("bfloat16", isa)
    assert verdict is native and words in reason
    assert native_by_isa("float32", isa)[0]


def test_no_native_bfloat16_defaults_to_float32():
    spec = get_model("qwen2.5-0.5b")  # bfloat16 preset
    with fake_probe({"float32": 2.0, "bfloat16": 120.0}):
        choice = choose_cpu_dtype(spec, explicit=False, isa=AVX2_ONLY)
    assert choice.dtype == "float32" and choice.asked == "bfloat16" and not choice.native
    assert choice.slowdown == 60 and choice.warning is None  # chosen for the user: no warning
    line = choice.line()
    assert line.startswith("float32 (instead of the model's bfloat16): this CPU has no native "
                           "bfloat16") and "(60x)" in line


def test_an_explicit_emulated_dtype_is_kept_with_its_measured_slowdown():
    spec = get_model("qwen2.5-0.5b", dtype="bfloat16")
    with fake_probe({"float32": 2.0, "bfloat16": 120.0}):
        choice = choose_cpu_dtype(spec, explicit=True, isa=AVX2_ONLY)
    assert choice.dtype == "bfloat16" and not choice.native
    assert "bfloat16 is emulated on this CPU" in choice.warning and "(60x)" in choice.warning


def test_native_bfloat16_is_kept_unless_the_probe_says_otherwise():
    spec = get_model("qwen2.5-0.5b")
    with fake_probe({"float32": 2.0, "bfloat16": 0.7}):
        assert choose_cpu_dtype(spec, explicit=False, isa=SAPPHIRE_RAPIDS).dtype == "bfloat16"
    with fake_probe({"float32": 2.0, "bfloat16": 9.0}):  # the ISA says yes, the probe no
        choice = choose_cpu_dtype(spec, explicit=False, isa=SAPPHIRE_RAPIDS)
    assert choice.dtype == "float32" and "not by the probe" in choice.reason


def test_a_float32_model_needs_no_probe():
    with mock.patch.object(dtype_module, "probe_ms", side_effect=AssertionError("probed")):
        choice = choose_cpu_dtype(get_model("tiny"), explicit=False, isa=AVX2_ONLY)
    assert choice.dtype == "float32" and choice.native and choice.slowdown is None


def test_the_probe_is_short_even_for_an_emulated_dtype():
    """A product slower than PROBE_SLOW_MS is timed once: the probe of any model's shape stays
    within a fraction of a second of a slow call."""
    calls = []

    class Slow:
        def __matmul__(self, other):
            calls.append(1)
            dtype_module.time.sleep(dtype_module.PROBE_SLOW_MS / 1e3 * 1.2)

    with mock.patch.object(dtype_module.torch, "randn", lambda *a, **k: mock.Mock(
            to=lambda dtype: Slow())):
        probe_ms(get_model("llama-3-70b"), "bfloat16")
    assert len(calls) == 1


def test_calibrate_prints_the_dtype_and_warns_before_measuring(run_cli, tmp_path):
    """The CLI on a CPU without native bfloat16 (faked): the default model calibrates in float32
    with the reason printed; --dtype bfloat16 is kept with a warning; both before the time plan
    (stopped there)."""
    out = str(tmp_path / "p.json")
    with mock.patch.object(dtype_module, "isa_report", lambda: AVX2_ONLY), \
            fake_probe({"float32": 2.0, "bfloat16": 120.0}), \
            mock.patch.object(pipeline, "plan_time", side_effect=KvbenchError("stop")) as plan:
        code, _, err = run_cli("calibrate", "--device", "cpu", "--quick", "--out", out)
        assert code == 2 and err == "error: stop\n"  # a refused plan is its one line
        assert plan.call_args.args[0].dtype == "float32"
        code, _, err = run_cli("calibrate", "--device", "cpu", "--quick", "--dtype", "bf16",
                               "--out", out)
        assert code == 2 and plan.call_args.args[0].dtype == "bfloat16"
    measured = {}
    stop = mock.patch.object(pipeline, "calibrate", side_effect=KvbenchError("stop"))
    with mock.patch.object(dtype_module, "isa_report", lambda: AVX2_ONLY), \
            fake_probe({"float32": 2.0, "bfloat16": 120.0}), stop:
        for args in (("--model", "qwen2.5-0.5b"), ("--model", "tiny", "--dtype", "bf16")):
            measured[args[1]] = run_cli("calibrate", "--device", "cpu", "--quick", "--out", out,
                                        *args)[2].splitlines()
    lines = measured["qwen2.5-0.5b"]
    assert lines[0].startswith("dtype: float32 (instead of the model's bfloat16): this CPU has "
                               "no native bfloat16") and "(60x)" in lines[0]
    assert lines[1].startswith("plan: about ") and lines[-1] == "error: stop"
    lines = measured["tiny"]
    assert lines[0].startswith("dtype: bfloat16 (asked for with --dtype): this CPU has no "
                               "native bfloat16")
    assert lines[1].startswith("warning: bfloat16 is emulated on this CPU") and "(60x)" in \
        lines[1]
    assert lines[2].startswith("plan: about ") and lines[-1] == "error: stop"
