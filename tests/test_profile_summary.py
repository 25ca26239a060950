"""What commands do with a profile beyond load/save (kvbench.profile): resolve a --profile or
--model option, warn on extrapolation, the round-trip copy ceiling, the `profile show` lines."""

import json

import pytest

from kvbench.hardware import get_hardware
from kvbench.models import get_model
from kvbench.profile import (
    ProfileError,
    analytic_profile,
    extrapolation_warning,
    parse,
    resolve,
    round_trip_ceiling_gbps,
    save,
    summary_lines,
)


@pytest.fixture
def tiny_path(tmp_path):
    return save(analytic_profile(get_model("tiny"), get_hardware("l4"), max_tokens=4096),
                tmp_path / "tiny.json")


def test_resolve_a_profile_file(tiny_path):
    prof = resolve(tiny_path, None)
    assert prof.model.name == "tiny" and prof.swap_out.fit.max_tokens == 4096
    assert resolve(tiny_path, "tiny") == prof
    with pytest.raises(ProfileError, match="profile is for model 'tiny', not 'llama-3-8b'"):
        resolve(tiny_path, "llama-3-8b")
    assert resolve(tiny_path, "llama-3-8b", force=True) == prof
    with pytest.raises(ValueError, match="--peak-tflops sets analytic costs"):
        resolve(tiny_path, None, peak_tflops=3.0, h2d_gbps=None)
    assert resolve(tiny_path, None, peak_tflops=None) == prof  # None: the option was not given


def test_resolve_analytic_costs():
    prof = resolve(None, "mistral-7b", "a100-80gb", block_size=32, dtype="fp16", tp=2,
                   h2d_gbps=20.0, d2h_gbps=None)
    expected = analytic_profile(get_model("mistral-7b", dtype="fp16", tp=2),
                                get_hardware("a100-80gb", h2d_gbps=20.0), block_size=32)
    assert prof.cost_model() == expected.cost_model()
    assert prof.decode_model() == expected.decode_model()
    assert prof.model.tp == 2 and prof.dtype == "float16" and prof.swap.block_size == 32
    with pytest.raises(ValueError, match="give --profile PATH or --model NAME"):
        resolve(None, None)


def test_extrapolation_warning(tiny_path):
    prof = resolve(tiny_path, None)
    assert extrapolation_warning(prof, []) is None
    assert extrapolation_warning(prof, [0, 4096]) is None
    assert extrapolation_warning(prof, [5000, 4097]) == (
        "5000 tokens is beyond the profile's measured range (up to 4096); costs there are "
        "extrapolated")


def test_round_trip_ceiling_is_the_harmonic_mean_of_both_directions(tiny_path):
    prof = resolve(tiny_path, None)
    assert round_trip_ceiling_gbps(prof) is None  # analytic: nothing measured
    # 1 GB out at 20 GB/s (50 ms) and back at 30 GB/s (33.3 ms): 2 GB in 83.3 ms = 24 GB/s
    measured = prof.model_copy(update={"extra": {"ceiling_gbps": {"out": 20.0, "in": 30.0}}})
    assert round_trip_ceiling_gbps(measured) == pytest.approx(24.0)


def test_summary_lines_without_decode_or_impl(tiny_path):
    data = json.loads(tiny_path.read_text())
    data["decode"] = None
    lines = summary_lines(parse(data), "p.json")
    assert lines[0] == "profile: p.json"
    assert lines[4] == "swap_ms(n) = swap_out_ms(n) + swap_in_ms(n)"  # no impl
    assert lines[5].startswith("swap_out_ms(n) = ") and lines[5].endswith("·ceil(n/16)")
    assert lines[6].startswith("swap_in_ms(n) = ")
    assert not any(line.startswith("decode_step_ms") for line in lines)
    assert lines[8:] == [f"{phase} fit: R² n/a, held-out error n/a, valid 1-4096 tokens "
                         "(analytic)" for phase in ("swap_out", "swap_in", "recompute")
                         ] + [lines[-1]]
    assert lines[-1].startswith("crossover_tokens: ")
