"""Regression tests for issue 13, defects 2-4, 7 and 8: inputs that hung the simulator, ended in
a traceback, overflowed int64 or were accepted silently and wrong. Each docstring names its defect.

Through the CLI, a user mistake is exit 2 with one `error:` line on stderr and nothing else.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from kvbench.costmodel import CostModel
from kvbench.hardware import get_hardware
from kvbench.limits import MAX_TOKENS
from kvbench.models import from_hf_config
from kvbench.ops import prefill_attention
from kvbench.profile import ProfileError, analytic_profile, load, parse, save
from kvbench.reference import prefill_attention_ref
from kvbench.selector import select_preemption_strategy
from kvbench.sim.config import SimConfig
from kvbench.sim.engine import Simulator, simulate
from kvbench.sim.requests import FINISHED
from kvbench.sim.workloads import (
    SyntheticSpec,
    Workload,
    WorkloadError,
    load_workload,
    read_trace,
)

PLAIN = "arrival_s,prompt_tokens,output_tokens\n"
HF = {"num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 4,
      "intermediate_size": 128, "vocab_size": 256}


@pytest.fixture
def one_error_line(run_cli):
    """`one_error_line(args, fragment)`: `kvbench ARGS` (the console entry point) exits 2 with
    one `error:` line naming `fragment` and prints nothing on stdout; returns that line."""
    def check(args: list[str], fragment: str) -> str:
        code, out, err = run_cli(*args)
        assert code == 2, (out, err)
        assert out == ""
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), err
        assert fragment in lines[0], lines[0]
        return lines[0]
    return check


def write(tmp_path, text: str, name: str = "trace.csv"):
    path = tmp_path / name
    path.write_text(text)
    return path


def hf_config(tmp_path, **changes):
    return write(tmp_path, json.dumps({**HF, **changes}), "config.json")


# --- defect 2: the simulator hung on NaN arrival times --------------------------------------------

@pytest.mark.parametrize("spec, fragment", [
    ("requests=5,cv=inf,arrivals=gamma", "cv must be a finite number"),
    ("requests=5,rate=nan", "rate must be a finite number"),
    ("requests=5,rate=1e-320", "arrival times beyond"),
])
def test_non_finite_synthetic_parameters_are_rejected(spec, fragment, one_error_line):
    """Defect 2: `cv=inf` made NaN arrival times and `simulate` looped forever."""
    one_error_line(["simulate", "--synthetic", spec], fragment)


def test_arrivals_overflowing_under_a_rate_scale_are_rejected(tmp_path, one_error_line):
    """Defect 2: arrivals near 1e308 with a rate scale below 1 became inf, then NaN."""
    path = write(tmp_path, PLAIN + "0,10,5\n1e308,10,5\n")
    with pytest.raises(WorkloadError, match="span more than 1e[+]09 s .* rate scale 0.1"):
        read_trace(path, rate_scale=0.1)
    one_error_line(["simulate", "--trace", str(path), "--rate-scale", "0.1"], "rate scale 0.1")


@pytest.mark.filterwarnings("error")  # a numpy RuntimeWarning fails the test
@pytest.mark.parametrize("rows, scale, fragment", [
    ("-1e308,10,5\n1e308,10,5\n", "1", "arrivals from '-1e308' (line 2) to '1e308' (line 3)"),
    ("0,10,5\n1.7e308,10,5\n", "1", "arrivals from '0' (line 2) to '1.7e308' (line 3)"),
    ("1.7e308,10,5\n1e308,10,5\n", "0.5", "arrivals from '1e308' (line 3) to '1.7e308' (line 2)"),
    ("0,10,5\n1,10,5\n", "1e-320", "arrivals from '0' (line 2) to '1' (line 3)"),
])
def test_arrivals_beyond_the_float_range_are_one_error_line(tmp_path, one_error_line, rows,
                                                            scale, fragment):
    """Issue 20, item 7: arrivals near 1e308 printed numpy's RuntimeWarning (overflow in the
    subtraction of the first arrival) above the error line, or ran (0 and 1.7e308 s: steps lost
    in rounding, latencies wrong). Now one line naming the rows, before numpy subtracts."""
    path = write(tmp_path, PLAIN + rows)
    one_error_line(["simulate", "--trace", str(path), "--rate-scale", scale],
                   f"column arrival_s: {fragment}")


@pytest.mark.filterwarnings("error")
@pytest.mark.parametrize("args, fragment", [
    (["--synthetic", "requests=100,rate=1e-307"], "arrival times beyond 1e+09 s"),
    (["--synthetic", "requests=5,rate=1e308", "--rate-scale", "10"],
     "rate 1e+308/s scaled by 10 leaves the float range"),
])
def test_synthetic_arrivals_beyond_the_float_range(args, fragment, one_error_line):
    """Issue 20, item 7: 100 gaps of ~1e307 s overflowed numpy's cumsum (a RuntimeWarning); a
    rate scaled to inf was reported as "rate must be a finite number, got inf"."""
    one_error_line(["simulate", *args], fragment)


@pytest.mark.parametrize("stamps, fragment", [
    (("1680-01-01 00:00:00", "2261-01-01 00:00:00"), "span more than 1e+09 s"),
    (("2023-01-01 00:00:00", "1500-01-01 00:00:00"),
     "line 3, column TIMESTAMP: '1500-01-01 00:00:00' is not a timestamp"),
])
def test_azure_timestamps_do_not_wrap_around(tmp_path, stamps, fragment, one_error_line):
    """Issue 20, item 7: nanoseconds in int64 wrapped silently: 581 years apart came out 2.5
    years apart, the earlier arriving last; the year 1500 was read as 2084."""
    path = write(tmp_path, "TIMESTAMP,ContextTokens,GeneratedTokens\n"
                 + "".join(f"{stamp},10,5\n" for stamp in stamps))
    one_error_line(["simulate", "--trace", str(path)], fragment)


def test_arrival_rate_of_a_tiny_span_is_not_infinite(tmp_path):
    """Issue 20, item 7: two arrivals 5e-324 s apart gave an arrival rate of inf, written as
    `Infinity` (not JSON) in summary.json."""
    work = read_trace(write(tmp_path, PLAIN + "0,10,5\n5e-324,10,5\n"))
    assert work.describe()["arrival_rate_per_s"] is None


@pytest.mark.parametrize("scale", [math.inf, math.nan])
def test_non_finite_rate_scale(scale, tmp_path):
    """Defect 2: the rate scale divides every arrival time."""
    with pytest.raises(WorkloadError, match="rate scale must be a finite number"):
        load_workload(write(tmp_path, PLAIN + "0,10,5\n"), rate_scale=scale)


def test_workload_rejects_nan_arrivals():
    """Defect 2: `diff < 0` is False for NaN, so NaN passed the sortedness check."""
    with pytest.raises(WorkloadError, match="arrival times must be finite"):
        Workload("w", np.array([0.0, np.nan]), np.array([1, 1]), np.array([1, 1]),
                 np.array([1, 1]))


def test_guard_counts_iterations_that_advance_nothing():
    """Defect 2: with a NaN arrival the engine jumped to a NaN time again and again without a
    step, so the step-counting livelock guard never fired. Built past the workload checks."""
    work = Workload("w", np.array([0.0, 1.0]), np.array([4, 4]), np.array([2, 2]),
                    np.array([2, 2]))
    object.__setattr__(work, "arrival_s", np.array([0.0, np.nan]))
    sim = Simulator(work, SimConfig.build(num_gpu_blocks=10, livelock_steps=50))
    result = sim.run()
    assert result.livelock is not None and result.livelock["request_id"] == 1
    assert "no token generated" in result.livelock["reason"]


# --- defect 3: tracebacks for user mistakes ------------------------------------------------------

def test_zero_attention_heads_in_a_config_json(tmp_path, one_error_line):
    """Defect 3: `num_attention_heads: 0` raised ZeroDivisionError in models.py."""
    path = hf_config(tmp_path, num_attention_heads=0)
    with pytest.raises(ValueError, match="num_attention_heads must be a positive integer"):
        from_hf_config(path)
    one_error_line(["calibrate", "--device", "cpu", "--config-json", str(path)],
                   "num_attention_heads")


def test_token_count_wider_than_int64_in_a_trace(tmp_path, one_error_line):
    """Defect 3: a 23-digit prompt length raised OverflowError while reading the trace."""
    path = write(tmp_path, PLAIN + "0,99999999999999999999999,5\n")
    one_error_line(["simulate", "--trace", str(path)],
                   f"line 2, column prompt_tokens: '99999999999999999999999' is not an integer "
                   f"from 1 to {MAX_TOKENS}")


@pytest.mark.parametrize("spec, fragment", [
    ("cv=1e200,arrivals=gamma", "cv must be at most"),
    ("cv=1e-320,arrivals=gamma", "cv must be at least 0.001"),  # found by tests/test_fuzz.py
    ("requests=100000000000", "requests must be an integer from 1 to 10000000"),
])
def test_synthetic_values_too_large(spec, fragment, one_error_line):
    """Defect 3: cv=1e200 overflowed cv² (and 1e-320 underflowed it to a division by zero),
    requests=1e11 tried to allocate 745 GiB."""
    one_error_line(["simulate", "--synthetic", spec], fragment)


def test_deeply_nested_profile_json(tmp_path, one_error_line):
    """Defect 3: a deeply nested JSON document raised RecursionError in the decoder."""
    path = write(tmp_path, "[" * 100_000 + "]" * 100_000, "deep.json")
    with pytest.raises(ProfileError, match=f"{path}: not valid JSON .*nested too deeply"):
        load(path)
    one_error_line(["profile", "show", str(path)], "nested too deeply")
    config = write(tmp_path, "[" * 100_000 + "]" * 100_000, "config.json")
    with pytest.raises(ValueError, match="nested too deeply"):
        from_hf_config(config)


# --- defect 4: int64 overflow defeated the capacity and admission checks --------------------------

def test_token_counts_are_bounded_at_read_time(tmp_path):
    """Defect 4: a prompt of 2**63 - 1 tokens was accepted and ended as a reported livelock."""
    path = write(tmp_path, PLAIN + f"0,{2**63 - 1},5\n")
    with pytest.raises(WorkloadError, match=f"is not an integer from 1 to {MAX_TOKENS}"):
        read_trace(path)
    assert read_trace(write(tmp_path, PLAIN + f"0,{MAX_TOKENS},5\n")).prompt_tokens[0] \
        == MAX_TOKENS


def test_max_tokens_bounded(tmp_path, one_error_line):
    """Defect 4: `reserve-max` preempted with --max-tokens near 2**63 (prompt + max wrapped)."""
    path = write(tmp_path, PLAIN + "0,10,5\n")
    one_error_line(["simulate", "--trace", str(path), "--admission", "reserve-max",
                    "--max-tokens", str(2**63 - 10)], f"from 1 to {MAX_TOKENS}")
    with pytest.raises(WorkloadError, match=f"from 1 to {MAX_TOKENS}"):
        SyntheticSpec(max_tokens=MAX_TOKENS + 1)
    work = read_trace(write(tmp_path, PLAIN + "0,10,5\n0.001,20,5\n0.002,30,8\n"),
                      max_tokens=MAX_TOKENS)  # the largest limit: reserve-max never preempts
    result = simulate(work, SimConfig.build(admission="reserve-max", predictor="max"))
    assert result.requests.num_preemptions.sum() == 0 and result.livelock is None
    assert (result.requests.state == FINISHED).all()


def test_selector_bounds_token_counts():
    """Defect 4: the selector took any int64 count; now MAX_TOKENS is the documented limit."""
    config = {"model": "llama-3-8b"}
    assert len(select_preemption_strategy([MAX_TOKENS], config)["strategies"]) == 1
    with pytest.raises(ValueError, match=f"request 1: token count {MAX_TOKENS + 1} is too large "
                                         f"\\(at most {MAX_TOKENS}\\)"):
        select_preemption_strategy([1, MAX_TOKENS + 1], config)
    with pytest.raises(ValueError, match="request 0: .* too large"):
        select_preemption_strategy(np.array([2**62]), config)


# --- defect 7: messages that were not one line or blamed the wrong thing -------------------------

def test_huge_int_after_a_float_names_its_own_request():
    """Defect 7: `[1.0, 2**70]` named request 0 (the float) instead of request 1."""
    with pytest.raises(ValueError, match=r"request 1: token count \d+ is too large"):
        select_preemption_strategy([1.0, 2**70], {"model": "llama-3-8b"})


@pytest.mark.parametrize("key", ["model", "hardware", "dtype"])
def test_unhashable_preset_name(key):
    """Defect 7: `{'model': [...]}` said "unhashable type: 'list'"."""
    config = {"model": "llama-3-8b", key: ["llama-3-8b"]}
    with pytest.raises(TypeError, match=f"{key} must be a name .*got list"):
        select_preemption_strategy([1], config)


def test_tiny_achieved_fraction_is_one_line(one_error_line):
    """Defect 7: `--achieved-fraction 1e-320` printed ten lines of pydantic errors."""
    one_error_line(["select", "100", "--model", "llama-3-8b", "--achieved-fraction", "1e-320"],
                   "achieved_fraction")


def test_non_utf8_profile_names_the_file(tmp_path, one_error_line):
    """Defect 7: a profile that is not UTF-8 gave a codec message without the file's name."""
    path = tmp_path / "binary.json"
    path.write_bytes(b"\xff\xfe{}")
    with pytest.raises(ProfileError, match=f"{path}: not UTF-8 text"):
        load(path)
    one_error_line(["profile", "show", str(path)], str(path))


@pytest.mark.parametrize("flag, value", [
    ("--swap-space", "inf"), ("--swap-space", "nan"), ("--gpu-memory-gib", "inf"),
    ("--noise-sigma", "nan"), ("--headroom-fraction", "nan"), ("--history-quantile", "nan"),
])
def test_non_finite_simulator_options(flag, value, one_error_line):
    """Defects 7 and 8: `--swap-space inf` (then `--cpu-swap-gib`) said "cannot convert float
    NaN to integer" and `--noise-sigma nan` was accepted."""
    line = one_error_line(["simulate", "--synthetic", "requests=3", flag, value], "")
    assert flag.removeprefix("--") in line.replace("_", "-")


@pytest.mark.parametrize("field", ["swap_space", "noise_sigma", "gpu_memory_gib",
                                   "headroom_fraction"])
def test_sim_config_rejects_non_finite(field):
    """Defect 8: NaN passed every `< 0` check of SimConfig."""
    with pytest.raises(ValueError, match=f"{field} must be a finite number"):
        SimConfig.build(**{field: math.nan})


# --- defect 8: accepted silently and wrong -------------------------------------------------------

def test_head_dim_is_never_floored(tmp_path):
    """Defect 8: hidden 64 with 5 heads gave head_dim 12 (64 // 5) without a word."""
    with pytest.raises(ValueError, match="hidden_size 64 is not a multiple of "
                                         "num_attention_heads 5"):
        from_hf_config(hf_config(tmp_path, num_attention_heads=5, num_key_value_heads=5))
    spec = from_hf_config(hf_config(tmp_path, num_attention_heads=5, num_key_value_heads=5,
                                    head_dim=12))
    assert spec.head_dim == 12


@pytest.mark.parametrize("changes, fragment", [
    ({"num_hidden_layers": 2.5}, "num_hidden_layers must be a positive integer"),
    ({"vocab_size": "256"}, "vocab_size must be a positive integer"),
    ({"num_key_value_heads": True}, "num_key_value_heads must be a positive integer"),
    ({"head_dim": [16]}, "head_dim must be a positive integer"),
    ({"_name_or_path": ["x"]}, "name"),
])
def test_hf_config_field_types(tmp_path, changes, fragment):
    """Defects 3 and 5: a non-integer field raised TypeError, or failed the profile schema only
    after minutes of measuring."""
    with pytest.raises(ValueError, match=fragment):
        from_hf_config(hf_config(tmp_path, **changes))


def test_empty_model_name_is_an_error(tmp_path, one_error_line):
    """Defect 8: `--model ""` calibrated the default model."""
    one_error_line(["calibrate", "--device", "cpu", "--model", "", "--out",
                    str(tmp_path / "p.json")], "unknown model ''")
    one_error_line(["select", "5", "--model", ""], "unknown model ''")
    one_error_line(["simulate", "--synthetic", "requests=2", "--model", ""], "unknown model ''")


@pytest.mark.parametrize("flag, value", [("--block-size", "32"), ("--tp", "2"),
                                         ("--dtype", "float16"), ("--block-size", "16")])
def test_analytic_flags_with_a_profile_are_errors(tmp_path, flag, value, one_error_line):
    """Defect 8: `--block-size`/`--tp` with `--profile` were silently ignored."""
    path = save(analytic_profile(from_hf_config(hf_config(tmp_path)), get_hardware()),
                tmp_path / "p.json")
    one_error_line(["select", "5", "--profile", str(path), flag, value],
                   f"{flag} sets analytic costs")


def test_select_json_never_prints_infinity(tmp_path, one_error_line):
    """Defect 8: coefficients near 1e308 priced a request at inf and `--json` printed
    `Infinity`, which is not JSON."""
    data = json.loads(analytic_profile(from_hf_config(hf_config(tmp_path)),
                                       get_hardware()).to_json())
    data["recompute"]["ms_per_token_sq"] = 1e308
    path = save(parse(data), tmp_path / "huge.json")
    line = one_error_line(["select", "0", "1000", "--profile", str(path), "--json"],
                          "request 1")
    assert "Infinity" not in line and "overflow" in line
    with pytest.raises(ValueError, match="request 1: recompute cost overflows"):
        select_preemption_strategy([0, 1000], CostModel.from_dict(
            {"swap_fixed_ms": 1, "swap_ms_per_token": 1, "recompute_fixed_ms": 1,
             "recompute_ms_per_token": 1, "recompute_ms_per_token_sq": 1e308}).to_dict())


def test_select_never_rounds_a_finite_cost_to_infinity():
    """Defect 8, found by tests/test_fuzz.py: a finite cost of 1e305 ms rounded to 4 decimals
    (np.round scales by 1e4) became inf in the result."""
    config = CostModel.from_dict({"swap_fixed_ms": 1, "swap_ms_per_token": 1,
                                  "recompute_fixed_ms": 1, "recompute_ms_per_token": 1,
                                  "recompute_ms_per_token_sq": 1e305}).to_dict()
    with pytest.raises(ValueError, match=r"request 0: recompute cost overflows at 1 tokens "
                                         r"\(1e\+305 ms, beyond 1e\+100 ms\)"):
        select_preemption_strategy([1], config)


def test_select_rejects_an_inconsistent_profile_model(tmp_path, one_error_line):
    """Defect 8: `select` used a profile whose model had 6 heads over 4 KV heads, which
    `profile show` rejected."""
    data = json.loads(analytic_profile(from_hf_config(hf_config(tmp_path)),
                                       get_hardware()).to_json())
    data["model"].update(num_heads=6, num_kv_heads=4)
    with pytest.raises(ProfileError, match="model: .*num_heads \\(6\\) must be a multiple of "
                                           "num_kv_heads \\(4\\)"):
        parse(data)
    path = tmp_path / "bad-model.json"
    path.write_text(json.dumps(data))
    one_error_line(["select", "5", "--profile", str(path)], "num_kv_heads")


@pytest.mark.parametrize("sm_scale", [0.0, -0.0, -0.3])
def test_torch_attention_with_non_positive_scale(sm_scale):
    """Defect 8: sm_scale=0.0 gave NaN with the torch impl (SDPA's causal mask times 0)."""
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(17, 4, 16, generator=gen) for _ in range(3))
    out = prefill_attention(q, k, v, causal=True, sm_scale=sm_scale, impl="torch")
    expected = prefill_attention_ref(q, k, v, causal=True, sm_scale=sm_scale)
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)


def test_model_dimensions_are_bounded(tmp_path, one_error_line):
    """Defect 3 (found while fuzzing): a 400-digit hidden_size overflowed the float conversion
    of the memory plan into a traceback."""
    path = hf_config(tmp_path, hidden_size=10**400)
    one_error_line(["calibrate", "--device", "cpu", "--config-json", str(path), "--out",
                    str(tmp_path / "p.json")], "hidden_size must be an integer from 1 to ")


@pytest.mark.parametrize("command", [["select", "5", "--model", "tiny"],
                                     ["calibrate", "--device", "cpu", "--model", "tiny"]])
def test_block_size_too_large_for_a_float(command, tmp_path, one_error_line):
    """Defect 3 (found while fuzzing): a 400-digit --block-size overflowed a float conversion
    into a traceback."""
    out = ["--out", str(tmp_path / "p.json")] if command[0] == "calibrate" else []
    one_error_line([*command, "--block-size", "9" * 400, *out], f"up to {MAX_TOKENS}"
                   if command[0] == "select" else f"from 1 to {MAX_TOKENS}")
