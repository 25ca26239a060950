"""select_preemption_strategy: exact semantics, properties, and every rejected input.

Expected costs are worked by hand from the coefficients below, not recomputed with the code
under test.
"""

import json
import math
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvbench.costmodel import CostModel
from kvbench.hardware import get_hardware
from kvbench.limits import MAX_TOKENS
from kvbench.models import get_model
from kvbench.profile import analytic_profile, save
from kvbench.reference import preemption_costs_ref
from kvbench.selector import select_preemption_strategy

# swap_ms(n)      = 1 + 0.01·n + 0.25·ceil(n/16)
# recompute_ms(n) = 0.5 + 0.002·n + 1e-5·n²
CONFIG = {"swap_fixed_ms": 1.0, "swap_ms_per_token": 0.01, "swap_ms_per_block": 0.25,
          "block_size": 16, "recompute_fixed_ms": 0.5, "recompute_ms_per_token": 0.002,
          "recompute_ms_per_token_sq": 1e-5}
REQUIRED_KEYS = ("swap_fixed_ms", "swap_ms_per_token", "recompute_fixed_ms",
                 "recompute_ms_per_token", "recompute_ms_per_token_sq")
FLOAT_KEYS = REQUIRED_KEYS + ("swap_ms_per_block",)
# The same swap given each way: out 0.4 + 0.004·n + 0.05·blocks, in 0.6 + 0.006·n + 0.2·blocks.
ONE_WAY = {"swap_out_fixed_ms": 0.4, "swap_out_ms_per_token": 0.004,
           "swap_out_ms_per_block": 0.05, "swap_in_fixed_ms": 0.6, "swap_in_ms_per_token": 0.006,
           "swap_in_ms_per_block": 0.2, "block_size": 16, "recompute_fixed_ms": 0.5,
           "recompute_ms_per_token": 0.002, "recompute_ms_per_token_sq": 1e-5}

# n: (swap_ms, recompute_ms, choice), worked by hand.
HAND = {
    0: (0.0, 0.0, "swap"),  # no KV: both free, swap
    10: (1.35, 0.521, "recompute"),  # 1 + 0.1 + 0.25·1 ; 0.5 + 0.02 + 0.001
    17: (1.67, 0.5369, "recompute"),  # 1 + 0.17 + 0.25·2 ; 0.5 + 0.034 + 0.00289 = 0.53689
    100: (3.75, 0.8, "recompute"),  # 1 + 1 + 0.25·7 ; 0.5 + 0.2 + 0.1
    1000: (26.75, 12.5, "recompute"),  # 1 + 10 + 0.25·63 ; 0.5 + 2 + 10
    2000: (52.25, 44.5, "recompute"),  # 1 + 20 + 0.25·125 ; 0.5 + 4 + 40
    3000: (78.0, 96.5, "swap"),  # 1 + 30 + 0.25·188 ; 0.5 + 6 + 90
    5000: (129.25, 260.5, "swap"),  # 1 + 50 + 0.25·313 ; 0.5 + 10 + 250
}


def config(**changes):
    return {**CONFIG, **changes}


# --- exact semantics ---------------------------------------------------------------------------

def test_hand_computed_costs_choices_and_total_in_request_order():
    counts = [5000, 0, 10, 1000, 17, 100, 3000, 2000]
    result = select_preemption_strategy(counts, CONFIG)
    assert result == {
        "strategies": [HAND[n][2] for n in counts],
        "swap_costs_ms": [HAND[n][0] for n in counts],
        "recompute_costs_ms": [HAND[n][1] for n in counts],
        # 129.25 + 0 + 0.521 + 12.5 + 0.53689 + 0.8 + 78 + 44.5, rounded at the end
        "total_cost_ms": 266.1079,
    }
    assert result["strategies"] == ["swap", "swap", "recompute", "recompute", "recompute",
                                    "recompute", "swap", "recompute"]


def test_returns_plain_python_values():
    result = select_preemption_strategy(np.array([10, 5000], dtype=np.int32), CONFIG)
    assert set(result) == {"strategies", "swap_costs_ms", "recompute_costs_ms", "total_cost_ms"}
    assert type(result["strategies"]) is list and type(result["swap_costs_ms"]) is list
    assert all(type(s) is str for s in result["strategies"])
    assert all(type(x) is float for x in result["swap_costs_ms"] + result["recompute_costs_ms"])
    assert type(result["total_cost_ms"]) is float
    assert json.loads(json.dumps(result)) == result


def test_exact_tie_chooses_swap():
    # swap = 2n, recompute = n²: 1 → recompute (2 > 1), 2 → tie (4 = 4) → swap, 3 → swap.
    tie = {"swap_fixed_ms": 0.0, "swap_ms_per_token": 2.0, "recompute_fixed_ms": 0.0,
           "recompute_ms_per_token": 0.0, "recompute_ms_per_token_sq": 1.0}
    result = select_preemption_strategy([1, 2, 3], tie)
    assert result["strategies"] == ["recompute", "swap", "swap"]
    assert result["swap_costs_ms"] == [2.0, 4.0, 6.0]
    assert result["recompute_costs_ms"] == [1.0, 4.0, 9.0]
    assert result["total_cost_ms"] == 11.0  # 1 + 4 + 6


def test_tie_with_fixed_costs_and_all_zero_coefficients():
    # swap = 0.5 + 0.25n, recompute = 0.25 + 0.5n: equal at n = 1 (0.75), exact in binary.
    tie = {"swap_fixed_ms": 0.5, "swap_ms_per_token": 0.25, "recompute_fixed_ms": 0.25,
           "recompute_ms_per_token": 0.5, "recompute_ms_per_token_sq": 0.0}
    assert select_preemption_strategy([1], tie)["strategies"] == ["swap"]
    zero = {k: 0.0 for k in REQUIRED_KEYS}
    result = select_preemption_strategy([0, 1, 7, 100_000], zero)
    assert result["strategies"] == ["swap"] * 4
    assert result["total_cost_ms"] == 0.0


def test_zero_tokens_cost_nothing_and_swap():
    # Large fixed costs would make recompute cheaper, but 0 tokens hold no KV at all.
    result = select_preemption_strategy([0, 0], config(swap_fixed_ms=100.0))
    assert result == {"strategies": ["swap", "swap"], "swap_costs_ms": [0.0, 0.0],
                      "recompute_costs_ms": [0.0, 0.0], "total_cost_ms": 0.0}


@pytest.mark.parametrize("empty", [[], (), np.array([], dtype=np.int64), np.array([])])
def test_empty_input(empty):
    assert select_preemption_strategy(empty, CONFIG) == {
        "strategies": [], "swap_costs_ms": [], "recompute_costs_ms": [], "total_cost_ms": 0.0}


def test_costs_are_compared_unrounded():
    # 1.00004 and 1.00001 both print as 1.0; the cheaper unrounded one still wins.
    c = {"swap_fixed_ms": 1.00004, "swap_ms_per_token": 0.0, "recompute_fixed_ms": 1.00001,
         "recompute_ms_per_token": 0.0, "recompute_ms_per_token_sq": 0.0}
    result = select_preemption_strategy([5], c)
    assert result["swap_costs_ms"] == result["recompute_costs_ms"] == [1.0]
    assert result["strategies"] == ["recompute"]
    assert result["total_cost_ms"] == 1.0
    c["swap_fixed_ms"], c["recompute_fixed_ms"] = 1.00001, 1.00004
    assert select_preemption_strategy([5], c)["strategies"] == ["swap"]


def test_total_sums_unrounded_costs():
    # Each recompute costs 0.00004 ms, which rounds to 0.0; ten of them still total 0.0004.
    c = {"swap_fixed_ms": 1.0, "swap_ms_per_token": 0.0, "recompute_fixed_ms": 0.00004,
         "recompute_ms_per_token": 0.0, "recompute_ms_per_token_sq": 0.0}
    result = select_preemption_strategy(list(range(1, 11)), c)
    assert result["strategies"] == ["recompute"] * 10
    assert result["recompute_costs_ms"] == [0.0] * 10
    assert result["total_cost_ms"] == 0.0004


def test_costs_round_to_four_decimals():
    c = {"swap_fixed_ms": 0.123456, "swap_ms_per_token": 0.0, "recompute_fixed_ms": 9.87654321,
         "recompute_ms_per_token": 0.0, "recompute_ms_per_token_sq": 0.0}
    result = select_preemption_strategy([3], c)
    assert result["swap_costs_ms"] == [0.1235]
    assert result["recompute_costs_ms"] == [9.8765]
    assert result["total_cost_ms"] == 0.1235


@pytest.mark.parametrize("counts", [
    [10, 5000, 0],
    (10, 5000, 0),
    np.array([10, 5000, 0]),
    np.array([10, 5000, 0], dtype=np.uint16),
    np.array([10, 5000, 0], dtype=np.int32),
    [np.int64(10), np.int32(5000), np.uint8(0)],
    np.array([10, 5000, 0], dtype=object),
    np.array([10.0, 5000.0, 0.0]),  # integral floats from an array are accepted
])
def test_input_containers_agree(counts):
    assert select_preemption_strategy(counts, CONFIG) == {
        "strategies": ["recompute", "swap", "swap"], "swap_costs_ms": [1.35, 129.25, 0.0],
        "recompute_costs_ms": [0.521, 260.5, 0.0], "total_cost_ms": 129.771}


def test_each_way_prices_out_plus_in():
    counts = list(HAND)
    result = select_preemption_strategy(counts, ONE_WAY)
    assert result["strategies"] == [HAND[n][2] for n in counts]
    assert result["swap_costs_ms"] == pytest.approx([HAND[n][0] for n in counts], abs=1e-12)
    costs = CostModel.from_dict(ONE_WAY)
    np.testing.assert_allclose(costs.swap_out_ms([10, 17]), [0.4 + 0.04 + 0.05, 0.4 + 0.068 + 0.1])


def test_round_trip_keys_give_the_same_answer_as_their_even_split():
    """A config of round-trip keys keeps its meaning: split evenly, out + in is the round trip
    bit for bit, so costs, choices and total are those of the round trip (exact ties too)."""
    counts = [0, 1, 10, 17, 100, 1000, 2000, 3000, 5000, MAX_TOKENS]
    split = {**{k: v for k, v in CONFIG.items() if not k.startswith("swap_")},
             **{f"swap_{way}_{k.removeprefix('swap_')}": CONFIG[k] / 2
                for way in ("out", "in") for k in ("swap_fixed_ms", "swap_ms_per_token",
                                                    "swap_ms_per_block")}}
    assert select_preemption_strategy(counts, split) == select_preemption_strategy(counts, CONFIG)
    assert CostModel.from_dict(split) == CostModel.from_dict(CONFIG)
    tie = {"swap_fixed_ms": 0.0, "swap_ms_per_token": 2.0, "recompute_fixed_ms": 0.0,
           "recompute_ms_per_token": 1.0, "recompute_ms_per_token_sq": 0.5}  # equal at n = 2
    assert select_preemption_strategy([2], tie)["strategies"] == ["swap"]


def test_optional_keys_default_to_no_block_cost_and_block_16():
    minimal = {k: CONFIG[k] for k in REQUIRED_KEYS}
    result = select_preemption_strategy([17], minimal)
    assert result["swap_costs_ms"] == [1.17]  # 1 + 0.01·17, no per-block term
    explicit = {**minimal, "swap_ms_per_block": 0.0, "block_size": 16}
    assert select_preemption_strategy([17, 99], explicit) == \
        select_preemption_strategy([17, 99], minimal)
    # block_size 16 is the default: with a per-block cost, 17 tokens are 2 blocks.
    with_block = {**minimal, "swap_ms_per_block": 0.25}
    assert select_preemption_strategy([17], with_block)["swap_costs_ms"] == [1.67]


def test_profile_object_and_paths_agree_with_coefficients(tmp_path):
    profile = analytic_profile(get_model("llama-3-8b"), get_hardware("h100-sxm"))
    path = save(profile, tmp_path / "p.json")
    counts = [1, 100, 4096, 0, 32768]
    expected = select_preemption_strategy(counts, profile.cost_model().to_dict())
    assert select_preemption_strategy(counts, profile) == expected
    assert select_preemption_strategy(counts, path) == expected
    assert select_preemption_strategy(counts, str(path)) == expected


def test_analytic_config_matches_analytic_cost_model():
    model, hw = get_model("llama-3-8b", tp=2), get_hardware("a100-80gb", peak_tflops=200.0)
    counts = [0, 1, 128, 8192]
    expected = CostModel.analytic(model, hw, block_size=32).to_dict()
    got = select_preemption_strategy(counts, {"model": "llama-3-8b", "hardware": "a100-80gb",
                                              "tp": 2, "peak_tflops": 200.0, "block_size": 32})
    assert got == select_preemption_strategy(counts, expected)
    # Hand check of one cost: 128 tokens, 65536 B/token per GPU each way over 25 GB/s.
    swap_128 = 0.02 + 128 * 65536 * 2 / 25e6
    assert got["swap_costs_ms"][2] == round(swap_128, 4)


def test_analytic_config_defaults_to_h100():
    a = select_preemption_strategy([512], {"model": "mistral-7b"})
    b = select_preemption_strategy([512], {"model": "mistral-7b", "hardware": "h100-sxm"})
    assert a == b
    # 512 tokens · 131072 B each way at 55 GB/s, plus 2 × 0.01 ms latency
    assert a["swap_costs_ms"] == [round(0.02 + 512 * 131072 * 2 / 55e6, 4)]


# --- properties --------------------------------------------------------------------------------

coefficient = st.floats(min_value=0.0, max_value=1e3, allow_nan=False, allow_infinity=False)
configs = st.one_of(
    st.fixed_dictionaries(
        {k: coefficient for k in REQUIRED_KEYS},
        optional={"swap_ms_per_block": coefficient, "block_size": st.integers(1, 4096)}),
    st.fixed_dictionaries(  # the swap each way
        {k: coefficient for k in ONE_WAY if k not in ("block_size", "swap_out_ms_per_block",
                                                       "swap_in_ms_per_block")},
        optional={"swap_out_ms_per_block": coefficient, "swap_in_ms_per_block": coefficient,
                  "block_size": st.integers(1, 4096)}),
)
token_lists = st.lists(st.integers(min_value=0, max_value=10**6), max_size=40)


def close(a: float, b: float, rel: float = 1e-9) -> bool:
    return math.isclose(a, b, rel_tol=rel, abs_tol=1e-12)


@settings(max_examples=300, deadline=None)
@given(counts=token_lists, c=configs)
def test_choice_is_the_argmin(counts, c):
    result = select_preemption_strategy(counts, c)
    assert len(result["strategies"]) == len(counts)
    for i, n in enumerate(counts):
        swap, recompute = preemption_costs_ref(n, c)
        # Reported costs are the reference costs rounded to 4 decimals.
        assert abs(result["swap_costs_ms"][i] - swap) <= 0.5e-4 + 1e-12 * swap
        assert abs(result["recompute_costs_ms"][i] - recompute) <= 0.5e-4 + 1e-12 * recompute
        if not close(swap, recompute):  # exact ties are pinned by the hand tests
            assert result["strategies"][i] == ("swap" if swap < recompute else "recompute")


@settings(max_examples=300, deadline=None)
@given(counts=token_lists, c=configs)
def test_total_is_the_sum_of_chosen_costs(counts, c):
    result = select_preemption_strategy(counts, c)
    chosen = [min(preemption_costs_ref(n, c)) for n in counts]
    expected = sum(chosen)
    assert abs(result["total_cost_ms"] - expected) <= 0.5e-4 + 1e-9 * expected


@settings(max_examples=200, deadline=None)
@given(counts=token_lists, c=configs)
def test_costs_are_monotone_in_tokens(counts, c):
    counts = sorted(counts)
    result = select_preemption_strategy(counts, c)
    for key in ("swap_costs_ms", "recompute_costs_ms"):
        costs = result[key]
        assert all(a <= b for a, b in zip(costs, costs[1:])), key
    model = CostModel.from_dict({"block_size": 16, **c})
    n = np.array(counts, dtype=np.int64)
    assert (np.diff(model.swap_ms(n)) >= 0).all()
    assert (np.diff(model.recompute_ms(n)) >= 0).all()


@settings(max_examples=100, deadline=None)
@given(counts=token_lists, c=configs, data=st.data())
def test_order_is_kept(counts, c, data):
    order = data.draw(st.permutations(range(len(counts))))
    result = select_preemption_strategy(counts, c)
    permuted = select_preemption_strategy([counts[i] for i in order], c)
    for key in ("strategies", "swap_costs_ms", "recompute_costs_ms"):
        assert permuted[key] == [result[key][i] for i in order]
    assert select_preemption_strategy(np.array(counts, dtype=np.int64), c) == result
    assert select_preemption_strategy(tuple(counts), c) == result


# --- bad token counts --------------------------------------------------------------------------

@pytest.mark.parametrize(("counts", "index"), [
    ([1, -1], 1),
    ([5, 0, -3, -4], 2),
    ([0, 3.5], 1),
    ([1, 2, float("nan")], 2),
    ([float("inf")], 0),
    ([1, True], 1),
    ([False], 0),
    ([1, np.bool_(True)], 1),
    ([1, 2, "3"], 2),
    ([None], 0),
    ((7, -7), 1),
    (np.array([1, -5, 2]), 1),
    (np.array([1.0, 3.5]), 1),
    (np.array([1.0, 2.0, np.nan]), 2),
    (np.array([1.0, -np.inf]), 1),
    (np.array([True, False]), 0),
    (np.array([1, "x"], dtype=object), 1),
    # too large for int64: these used to wrap around to negative counts and cost 0
    ([0, 2**63], 1),
    ([0, 1, 2**64 - 1], 2),
    ([5, 2**70], 1),
    ([1, 1e19], 1),
    (np.array([0, 2**64 - 1], dtype=np.uint64), 1),
    (np.array([0.0, 1e19]), 1),
])
def test_bad_token_count_names_the_request(counts, index):
    with pytest.raises((ValueError, TypeError), match=rf"\brequest {index}\b"):
        select_preemption_strategy(counts, CONFIG)


@pytest.mark.parametrize("counts", [[True], ["3"], [None]])
def test_non_numbers_are_type_errors(counts):
    with pytest.raises(TypeError, match="request 0"):
        select_preemption_strategy(counts, CONFIG)


@pytest.mark.parametrize("counts", [[-1], [3.5], [float("nan")]])
def test_bad_numbers_are_value_errors(counts):
    with pytest.raises(ValueError, match="request 0"):
        select_preemption_strategy(counts, CONFIG)


@pytest.mark.parametrize("counts", [5, "1 2 3", {1, 2}, None, (n for n in [1])])
def test_token_counts_must_be_a_sequence(counts):
    with pytest.raises(TypeError, match="token_counts"):
        select_preemption_strategy(counts, CONFIG)


def test_token_counts_must_be_one_dimensional():
    with pytest.raises(ValueError, match="one-dimensional"):
        select_preemption_strategy(np.array([[1, 2]]), CONFIG)


def test_largest_token_count_is_accepted():
    result = select_preemption_strategy([MAX_TOKENS], CONFIG)
    assert result["strategies"] == ["swap"]
    assert result["swap_costs_ms"][0] > 1e7


# --- bad configs -------------------------------------------------------------------------------

@pytest.mark.parametrize("key", REQUIRED_KEYS)
def test_missing_key_is_named(key):
    c = config()
    del c[key]
    with pytest.raises(ValueError, match=rf"missing key '{key}'"):
        select_preemption_strategy([1], c)


@pytest.mark.parametrize(("wrong", "right"), [
    ("swap_ms_per_tokn", "swap_ms_per_token"),
    ("recompute_ms_per_token_sqr", "recompute_ms_per_token_sq"),
    ("swap_fixed", "swap_fixed_ms"),
    ("blocksize", "block_size"),
])
def test_misspelt_key_is_named(wrong, right):
    c = config()
    c[wrong] = c.pop(right)
    with pytest.raises(ValueError, match=rf"unknown key '{wrong}'.*did you mean '{right}'"):
        select_preemption_strategy([1], c)


def test_extra_key_is_named():
    with pytest.raises(ValueError, match="unknown key 'decode_ms'"):
        select_preemption_strategy([1], config(decode_ms=1.0))


@pytest.mark.parametrize("key", FLOAT_KEYS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf"), -1.0, -1e-12, -3])
def test_bad_coefficient_value_is_named(key, bad):
    with pytest.raises(ValueError, match=rf"config: {key} must be"):
        select_preemption_strategy([1], config(**{key: bad}))


@pytest.mark.parametrize("key", FLOAT_KEYS)
@pytest.mark.parametrize("bad", [True, "1.0", None, [1.0]])
def test_coefficient_of_wrong_type_is_named(key, bad):
    with pytest.raises(TypeError, match=rf"config: {key} must be a number"):
        select_preemption_strategy([1], config(**{key: bad}))


@pytest.mark.parametrize("bad", [0, -16, 16.0, True, "16", float("nan")])
def test_bad_block_size_is_named(bad):
    with pytest.raises((ValueError, TypeError), match="block_size"):
        select_preemption_strategy([1], config(block_size=bad))


def test_numpy_scalars_are_valid_coefficients():
    c = config(swap_fixed_ms=np.float32(1.0), block_size=np.int64(16))
    assert select_preemption_strategy([10], c)["swap_costs_ms"] == [1.35]


@pytest.mark.parametrize("bad", [[1.0, 2.0], None, 3.0, CostModel.from_dict(CONFIG)])
def test_config_of_wrong_type(bad):
    with pytest.raises(TypeError, match="config"):
        select_preemption_strategy([1], bad)


@pytest.mark.parametrize(("analytic", "named"), [
    ({"model": "llama-3-8b", "peak_tflop": 500.0}, "peak_tflop"),
    ({"model": "llama-3-8b", "swap_fixed_ms": 1.0}, "swap_fixed_ms"),
    ({"model": "llama-3-8b", "peak_tflops": float("nan")}, "peak_tflops"),
    ({"model": "llama-3-8b", "h2d_gbps": -5.0}, "h2d_gbps"),
    ({"model": "llama-3-8b", "achieved_fraction": 0.0}, "achieved_fraction"),
    ({"model": "llama-3-8b", "tp": 2.5}, "tp"),
    ({"model": "llama-3-8b", "tp": 0}, "tp"),
    ({"model": "llama-3-8b", "block_size": 0}, "block_size"),
    ({"model": "llama-9"}, "llama-9"),
    ({"model": "llama-3-8b", "hardware": "tpu"}, "tpu"),
    ({"model": "llama-3-8b", "dtype": "int3"}, "int3"),
])
def test_bad_analytic_config_is_named(analytic, named):
    with pytest.raises((ValueError, TypeError), match=named):
        select_preemption_strategy([1], analytic)


def test_missing_profile_path(tmp_path):
    with pytest.raises(ValueError, match="cannot read profile"):
        select_preemption_strategy([1], tmp_path / "absent.json")
    with pytest.raises(ValueError, match="cannot read profile"):
        select_preemption_strategy([1], str(Path(tmp_path) / "absent.json"))
