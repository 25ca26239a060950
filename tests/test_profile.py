"""Profiles: versioned schema, validation messages, atomic save, round trip, version 1 files."""

import copy
import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from kvbench import profile as profile_mod
from kvbench.cli import app
from kvbench.costmodel import CostModel
from kvbench.fleet import is_current
from kvbench.hardware import get_hardware
from kvbench.models import get_model
from kvbench.profile import (
    SCHEMA,
    SCHEMA_VERSION,
    Profile,
    ProfileError,
    analytic_profile,
    load,
    parse,
    save,
)
from kvbench.selector import select_preemption_strategy

V1_FILE = Path(__file__).parent / "data" / "profile-v1.json"  # the CPU profile as v1 wrote it

# A measured profile as `kvbench calibrate` would write it (numbers made up, shape real), with
# every field present, so that saving it must reproduce it key for key.
MEASURED = {
    "schema": "kvbench.profile",
    "schema_version": 2,
    "created_at": "2025-01-02T03:04:05+00:00",
    "kvbench_version": "0.1.0",
    "source": "measured",
    "dtype": "bfloat16",
    "environment": {"device": "cuda", "device_name": "NVIDIA H100 80GB HBM3", "commit": "abc123",
                    "torch": "2.5.0", "triton": "3.1.0"},
    "model": {"name": "llama-3-8b", "num_layers": 32, "hidden_size": 4096, "num_heads": 32,
              "num_kv_heads": 8, "head_dim": 128, "intermediate_size": 14336,
              "vocab_size": 128256, "dtype": "bfloat16", "tp": 1},
    "config": {"num_tokens": [16, 64, 256]},
    "swap": {"block_size": 16, "impl": "triton"},
    "swap_out": {"fit": {"r2": 0.9991, "r2_unweighted": 0.9978, "heldout_mape": 0.031,
                         "min_tokens": 16, "max_tokens": 32768, "method": "nnls"},
                 "measurements": {"num_tokens": [16, 64, 256], "latency_ms": [0.05, 0.14, 0.5],
                                  "spread_ms": [0.01, 0.01, 0.02],
                                  "heldout": [False, True, False]},
                 "fixed_ms": 0.011, "ms_per_token": 0.0019, "ms_per_block": 0.0002},
    "swap_in": {"fit": {"r2": 0.9983, "r2_unweighted": 0.9971, "heldout_mape": 0.044,
                        "min_tokens": 16, "max_tokens": 16384, "method": "nnls"},
                "measurements": {"num_tokens": [16, 64, 256], "latency_ms": [0.07, 0.22, 0.8],
                                 "spread_ms": [0.01, 0.02, 0.02],
                                 "heldout": [False, True, False]},
                "fixed_ms": 0.02, "ms_per_token": 0.003, "ms_per_block": 0.0005},
    "recompute": {"fixed_ms": 0.21, "ms_per_token": 0.031, "ms_per_token_sq": 6.1e-7,
                  "fit": {"r2": 0.9987, "r2_unweighted": 0.9969, "heldout_mape": 0.042,
                          "min_tokens": 16, "max_tokens": 32768, "method": "nnls"},
                  "measurements": {"num_tokens": [16, 256], "latency_ms": [0.7, 8.2],
                                   "spread_ms": [0.02, 0.1], "heldout": [False, False]}},
    "decode": {"d0_ms": 5.1, "d1_ms_per_seq": 0.02, "d2_ms_per_seq_token": 4e-5, "r2": 0.99,
               "heldout_mape": None},
    "crossover_tokens": 1,
    "extra": {},
}
MEASURED_SELECTOR_CONFIG = {"swap_out_fixed_ms": 0.011, "swap_out_ms_per_token": 0.0019,
                            "swap_out_ms_per_block": 0.0002, "swap_in_fixed_ms": 0.02,
                            "swap_in_ms_per_token": 0.003, "swap_in_ms_per_block": 0.0005,
                            "block_size": 16, "recompute_fixed_ms": 0.21,
                            "recompute_ms_per_token": 0.031, "recompute_ms_per_token_sq": 6.1e-7}


def measured(**changes) -> dict:
    data = copy.deepcopy(MEASURED)
    data.update(changes)
    return data


def write_json(path, data) -> None:
    path.write_text(json.dumps(data))


def test_schema_constants():
    assert SCHEMA == "kvbench.profile"
    assert SCHEMA_VERSION == 2


def test_parse_measured_profile():
    prof = parse(measured())
    assert prof.source == "measured"
    assert prof.swap.impl == "triton" and prof.swap_out.fit.method == "nnls"
    assert prof.swap_in.measurements.heldout == [False, True, False]
    assert prof.swap_in.fit.max_tokens == 16384
    assert prof.model.spec() == get_model("llama-3-8b")
    assert prof.decode_model().step_ms(2, 100) == pytest.approx(5.1 + 0.04 + 2 * 100 * 4e-5)


def test_cost_model_dict_is_the_coefficient_dict():
    assert parse(measured()).cost_model().to_dict() == MEASURED_SELECTOR_CONFIG


def test_round_trip_through_a_file(tmp_path):
    prof = parse(measured())
    path = save(prof, tmp_path / "h100.json")
    assert path == tmp_path / "h100.json"
    raw = json.loads(path.read_text())
    assert raw["schema"] == "kvbench.profile" and raw["schema_version"] == 2
    assert "schema_" not in raw
    assert raw == MEASURED  # nothing added, renamed or dropped
    again = load(path)
    assert again == prof
    assert again.cost_model().to_dict() == MEASURED_SELECTOR_CONFIG


def test_analytic_profile_round_trip(tmp_path):
    model, hw = get_model("qwen2.5-7b", tp=2), get_hardware("a100-80gb")
    prof = analytic_profile(model, hw, block_size=32)
    assert prof.source == "analytic" and prof.schema_version == 2
    assert prof.swap.block_size == 32
    assert prof.model.spec() == model
    costs = CostModel.analytic(model, hw, block_size=32)
    assert prof.cost_model() == costs
    assert prof.crossover_tokens == costs.crossover_tokens()
    loaded = load(save(prof, tmp_path / "sub" / "dir" / "p.json"))  # folders are created
    assert loaded == prof
    assert loaded.cost_model().to_dict() == costs.to_dict()


def test_analytic_profile_rejects_bad_block_size():
    with pytest.raises(ValueError, match="block_size"):
        analytic_profile(get_model("tiny"), get_hardware("h100-sxm"), block_size=0)


def test_profile_error_is_a_value_error():
    assert issubclass(ProfileError, ValueError)


# --- schema and version ------------------------------------------------------------------------

@pytest.mark.parametrize("schema", ["other.profile", "kvbench.profiles", None, 1])
def test_other_schema_is_rejected(tmp_path, schema):
    path = tmp_path / "p.json"
    write_json(path, measured(schema=schema))
    with pytest.raises(ProfileError, match=r"not a kvbench profile.*kvbench\.profile"):
        load(path)


def test_missing_schema_is_rejected():
    data = measured()
    del data["schema"]
    with pytest.raises(ProfileError, match="not a kvbench profile"):
        parse(data)


@pytest.mark.parametrize("version", [3, 17])
def test_newer_version_is_rejected(tmp_path, version):
    path = tmp_path / "p.json"
    write_json(path, measured(schema_version=version))
    with pytest.raises(ProfileError, match=rf"schema_version {version} is newer.*upgrade"):
        load(path)


@pytest.mark.parametrize("version", ["1", 1.0, True, None, 0, -1])
def test_malformed_version_is_rejected(version):
    with pytest.raises(ProfileError, match="schema_version"):
        parse(measured(schema_version=version))


# --- one line per problem ----------------------------------------------------------------------

def test_every_problem_is_reported_on_one_line(tmp_path):
    data = measured(bogus=1)
    data["swap_out"]["fixed_ms"] = -1.0
    data["recompute"]["ms_per_token"] = "fast"
    del data["model"]["head_dim"]
    path = tmp_path / "p.json"
    write_json(path, data)
    with pytest.raises(ProfileError) as info:
        load(path)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(str(path))
    for where in ("swap_out.fixed_ms", "recompute.ms_per_token", "model.head_dim", "bogus"):
        assert where in message
    assert len(message.split("; ")) == 4


@pytest.mark.parametrize(("section", "field", "value"), [
    ("swap_out", "fixed_ms", -0.5),
    ("swap_in", "ms_per_token", float("inf")),
    ("swap", "block_size", 0),
    ("recompute", "ms_per_token_sq", -1e-9),
    ("recompute", "fixed_ms", float("nan")),
    ("decode", "d0_ms", -1.0),
])
def test_bad_coefficient_is_named(section, field, value):
    data = measured()
    data[section][field] = value
    with pytest.raises(ProfileError, match=rf"{section}\.{field}"):
        parse(data)


def test_nan_in_the_file_is_rejected(tmp_path):
    path = tmp_path / "p.json"
    path.write_text(json.dumps(measured()).replace('"fixed_ms": 0.011', '"fixed_ms": NaN'))
    with pytest.raises(ProfileError, match=r"swap_out\.fixed_ms"):
        load(path)


@pytest.mark.parametrize("field", ["created_at", "swap", "swap_out", "swap_in", "model", "source",
                                   "environment"])
def test_missing_field_is_named(field):
    data = measured()
    del data[field]
    with pytest.raises(ProfileError, match=rf"{field}: Field required"):
        parse(data)


def test_bad_values_are_named():
    with pytest.raises(ProfileError, match="created_at"):
        parse(measured(created_at="yesterday"))
    with pytest.raises(ProfileError, match="source"):
        parse(measured(source="guessed"))
    with pytest.raises(ProfileError, match="crossover_tokens"):
        parse(measured(crossover_tokens=0))


def test_not_json_and_not_an_object(tmp_path):
    path = tmp_path / "p.json"
    path.write_text('{"schema": "kvbench.profile",')
    with pytest.raises(ProfileError, match=r"not valid JSON.*line 1"):
        load(path)
    write_json(path, [1, 2])
    with pytest.raises(ProfileError, match="expected a JSON object, got list"):
        load(path)


def test_missing_file(tmp_path):
    with pytest.raises(ProfileError, match=r"cannot read profile .*absent\.json"):
        load(tmp_path / "absent.json")


def test_model_rejects_extra_field():
    with pytest.raises(ValueError, match="extra"):
        Profile.model_validate(measured(extra_field=1))


# --- atomic save -------------------------------------------------------------------------------

def _old_and_new(tmp_path):
    path = tmp_path / "p.json"
    save(parse(measured()), path)
    old = path.read_bytes()
    new = parse(measured(kvbench_version="9.9.9"))
    return path, old, new


@pytest.mark.parametrize("fail_in", ["fsync", "replace"])
def test_failed_save_keeps_the_old_file_and_no_temp_file(tmp_path, monkeypatch, fail_in):
    path, old, new = _old_and_new(tmp_path)

    def broken(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(profile_mod.os, fail_in, broken)
    with pytest.raises(OSError, match="No space left"):
        save(new, path)
    monkeypatch.undo()
    assert path.read_bytes() == old
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.json"]


def test_interrupted_write_keeps_the_old_file(tmp_path, monkeypatch):
    path, old, new = _old_and_new(tmp_path)
    real_fdopen = os.fdopen

    class HalfWriter:
        """Writes half the bytes, then fails, like a full disk."""

        def __init__(self, fh):
            self.fh = fh

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.fh.close()
            return False

        def write(self, data):
            self.fh.write(data[: len(data) // 2])
            raise KeyboardInterrupt

    monkeypatch.setattr(profile_mod.os, "fdopen", lambda *a, **k: HalfWriter(real_fdopen(*a, **k)))
    with pytest.raises(KeyboardInterrupt):
        save(new, path)
    monkeypatch.undo()
    assert path.read_bytes() == old
    assert load(path).kvbench_version == "0.1.0"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.json"]


def test_successful_save_replaces_and_leaves_no_temp_file(tmp_path):
    path, _, new = _old_and_new(tmp_path)
    save(new, path)
    assert load(path).kvbench_version == "9.9.9"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.json"]
    text = path.read_text()
    assert text.endswith("}\n") and not math.isnan(json.loads(text)["swap_out"]["fixed_ms"])


# --- version 1 files ---------------------------------------------------------------------------

def v1_round_trip() -> dict:
    """The fixture's selector config as version 1 stored it: the swap round trip."""
    raw = json.loads(V1_FILE.read_text())
    swap, recompute = raw["swap"], raw["recompute"]
    return {"swap_fixed_ms": swap["fixed_ms"], "swap_ms_per_token": swap["ms_per_token"],
            "swap_ms_per_block": swap["ms_per_block"], "block_size": swap["block_size"],
            **{f"recompute_{k}": recompute[k] for k in ("fixed_ms", "ms_per_token",
                                                        "ms_per_token_sq")}}


def test_a_version_1_file_loads_split_evenly_with_a_one_line_notice():
    lines = []
    prof = load(V1_FILE, warn=lines.append)
    assert len(lines) == 1 and "\n" not in lines[0]
    assert lines[0].startswith(f"{V1_FILE}: schema_version 1 profile")
    assert "split evenly between swap_out and swap_in" in lines[0]
    raw = json.loads(V1_FILE.read_text())
    v1 = raw["swap"]
    assert prof.schema_version == 2 and prof.swap.impl == v1["impl"] == "torch"
    for section in (prof.swap_out, prof.swap_in):
        assert (section.fixed_ms, section.ms_per_token, section.ms_per_block) == (
            v1["fixed_ms"] / 2, v1["ms_per_token"] / 2, v1["ms_per_block"] / 2)
        assert section.measurements.latency_ms == [ms / 2 for ms in
                                                   v1["measurements"]["latency_ms"]]
        assert section.measurements.num_tokens == v1["measurements"]["num_tokens"]
        assert section.fit.heldout_mape == v1["fit"]["heldout_mape"]
        assert section.fit.method == "nnls, relative error; v1 round trip split evenly"
    assert prof.recompute.model_dump() == profile_mod.RecomputeSection(**raw["recompute"]
                                                                       ).model_dump()
    n = np.array([0, 1, 16, 17, 1000, 65536, 10**6])
    np.testing.assert_array_equal(prof.cost_model().swap_ms(n),
                                  CostModel.from_dict(v1_round_trip()).swap_ms(n))
    blocks = np.ceil(n / 16)
    np.testing.assert_array_equal(prof.cost_model().swap_ms(n), np.where(
        n > 0, v1["fixed_ms"] + v1["ms_per_token"] * n + v1["ms_per_block"] * blocks, 0.0))


def test_selecting_with_a_version_1_file_is_selecting_with_its_round_trip():
    counts = [0, 1, 16, 256, 4096, 65536, 10**6]
    quiet = load(V1_FILE, warn=lambda line: None)
    assert select_preemption_strategy(counts, quiet) == select_preemption_strategy(
        counts, v1_round_trip())
    result = CliRunner().invoke(app, ["select", "16", "256", "4096", "--profile", str(V1_FILE),
                                      "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == select_preemption_strategy([16, 256, 4096],
                                                                   v1_round_trip())
    assert json.loads(result.stdout)["swap_costs_ms"] == [0.5576, 1.6364, 18.8974]
    # The notice (and, on another CPU than the profile's, that its costs may not hold here);
    # no traceback.
    lines = result.stderr.splitlines()
    assert lines[0].startswith(f"warning: {V1_FILE}: schema_version 1 profile")
    assert all(line.startswith("warning: ") for line in lines)


def test_a_version_1_file_saved_again_is_version_2(tmp_path):
    prof = load(V1_FILE, warn=lambda line: None)
    lines = []
    again = load(save(prof, tmp_path / "v2.json"), warn=lines.append)
    assert again == prof and lines == []
    assert json.loads((tmp_path / "v2.json").read_text())["schema_version"] == 2


def test_a_malformed_version_1_swap_section_is_named():
    data = json.loads(V1_FILE.read_text())
    data["swap"]["fixed_ms"] = -1.0
    with pytest.raises(ProfileError, match=r"^v1: swap\.fixed_ms: Input should be greater"):
        parse(data, origin="v1")
    del data["swap"]
    with pytest.raises(ProfileError, match="swap: Field required"):
        parse(data)


def test_a_fleet_recalibrates_a_version_1_profile(tmp_path):
    prof = load(V1_FILE, warn=lambda line: None)
    spec, env = prof.model.spec(), prof.environment
    assert not is_current(V1_FILE, env, spec, block_size=16, quick=False)
    split = save(prof, tmp_path / "split.json")  # version 2 now, but still the split round trip
    assert not is_current(split, env, spec, block_size=16, quick=False)
    data = json.loads(split.read_text())
    for phase in ("swap_out", "swap_in"):
        data[phase]["fit"]["method"] = "nnls, relative error"  # as if fitted each way
    write_json(tmp_path / "v2.json", data)
    assert is_current(tmp_path / "v2.json", env, spec, block_size=16, quick=False)
