"""Swap (linear, out and in) and recompute (quadratic) cost models against hand-worked
numbers."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvbench.costmodel import COEFFICIENT_KEYS, CostModel, DecodeModel
from kvbench.hardware import HardwareSpec, get_hardware
from kvbench.models import get_model

# The round trip is 0.5 + 0.01·n + 0.2·ceil(n/16): out 0.2 + 0.004·n + 0.05·blocks, in the rest.
COSTS = CostModel(swap_out_fixed_ms=0.2, swap_out_ms_per_token=0.004, swap_out_ms_per_block=0.05,
                  swap_in_fixed_ms=0.3, swap_in_ms_per_token=0.006, swap_in_ms_per_block=0.15,
                  block_size=16, recompute_fixed_ms=0.3, recompute_ms_per_token=0.002,
                  recompute_ms_per_token_sq=1e-5)
ROUND_TRIP = {"swap_fixed_ms": 0.5, "swap_ms_per_token": 0.01, "swap_ms_per_block": 0.2,
              "block_size": 16, "recompute_fixed_ms": 0.3, "recompute_ms_per_token": 0.002,
              "recompute_ms_per_token_sq": 1e-5}

# Round numbers so the analytic coefficients can be worked by hand.
TEST_HW = HardwareSpec("test", h2d_gbps=50.0, d2h_gbps=25.0, transfer_latency_ms=0.01,
                       peak_tflops=100.0, achieved_fraction=0.5, hbm_gbps=1000.0,
                       block_copy_overhead_ms=0.002, launch_overhead_ms=0.05)


@pytest.mark.parametrize(("n", "expected_ms"), [
    (0, 0.0),  # no KV held: free
    (1, 0.5 + 0.01 + 0.2),  # one partial block
    (16, 0.5 + 0.16 + 0.2),  # exactly one block
    (17, 0.5 + 0.17 + 0.2 * 2),  # a partial last block
    (1000, 0.5 + 10.0 + 0.2 * 63),  # ceil(1000 / 16) = 63
])
def test_swap_ms(n, expected_ms):
    assert float(COSTS.swap_ms(n)) == pytest.approx(expected_ms, rel=1e-12)
    assert float(CostModel.from_dict(ROUND_TRIP).swap_ms(n)) == pytest.approx(expected_ms,
                                                                             rel=1e-12)


@pytest.mark.parametrize(("n", "out_ms", "in_ms"), [
    (0, 0.0, 0.0),
    (1, 0.2 + 0.004 + 0.05, 0.3 + 0.006 + 0.15),
    (17, 0.2 + 0.068 + 0.05 * 2, 0.3 + 0.102 + 0.15 * 2),
    (1000, 0.2 + 4.0 + 0.05 * 63, 0.3 + 6.0 + 0.15 * 63),
])
def test_swap_out_and_in_ms(n, out_ms, in_ms):
    assert float(COSTS.swap_out_ms(n)) == pytest.approx(out_ms, rel=1e-12)
    assert float(COSTS.swap_in_ms(n)) == pytest.approx(in_ms, rel=1e-12)
    assert float(COSTS.swap_ms(n)) == float(COSTS.swap_out_ms(n)) + float(COSTS.swap_in_ms(n))


@pytest.mark.parametrize(("n", "expected_ms"), [
    (0, 0.0),
    (1, 0.3 + 0.002 + 1e-5),
    (17, 0.3 + 0.034 + 289e-5),
    (1000, 0.3 + 2.0 + 10.0),
])
def test_recompute_ms(n, expected_ms):
    assert float(COSTS.recompute_ms(n)) == pytest.approx(expected_ms, rel=1e-12)


def test_vectorized_matches_scalar_formulas():
    rng = np.random.default_rng(1)
    n = rng.integers(0, 100_000, size=1000)
    swap, recompute = COSTS.swap_ms(n), COSTS.recompute_ms(n)
    assert swap.shape == recompute.shape == COSTS.swap_out_ms(n).shape == (1000,)
    for i, k in enumerate(n.tolist()):
        s = 0.0 if k == 0 else 0.5 + 0.01 * k + 0.2 * math.ceil(k / 16)
        r = 0.0 if k == 0 else 0.3 + 0.002 * k + 1e-5 * k * k
        assert swap[i] == pytest.approx(s, rel=1e-12)
        assert recompute[i] == pytest.approx(r, rel=1e-12)


def test_block_size_changes_block_count():
    costs = CostModel.from_dict({**ROUND_TRIP, "swap_fixed_ms": 0.0, "swap_ms_per_token": 0.0,
                                 "swap_ms_per_block": 1.0, "block_size": 5})
    np.testing.assert_array_equal(costs.swap_ms([1, 5, 6, 10, 11]), [1, 1, 2, 2, 3])
    np.testing.assert_array_equal(costs.swap_out_ms([1, 5, 6, 10, 11]), [.5, .5, 1, 1, 1.5])


def test_config_round_trip():
    config = COSTS.to_dict()
    assert set(config) == set(COEFFICIENT_KEYS)
    assert config == {"swap_out_fixed_ms": 0.2, "swap_out_ms_per_token": 0.004,
                      "swap_out_ms_per_block": 0.05, "swap_in_fixed_ms": 0.3,
                      "swap_in_ms_per_token": 0.006, "swap_in_ms_per_block": 0.15,
                      "block_size": 16, "recompute_fixed_ms": 0.3,
                      "recompute_ms_per_token": 0.002, "recompute_ms_per_token_sq": 1e-5}
    assert CostModel.from_dict(config) == COSTS


def test_a_round_trip_config_is_split_evenly():
    costs = CostModel.from_dict(ROUND_TRIP)
    assert costs.to_dict() == {"swap_out_fixed_ms": 0.25, "swap_out_ms_per_token": 0.005,
                               "swap_out_ms_per_block": 0.1, "swap_in_fixed_ms": 0.25,
                               "swap_in_ms_per_token": 0.005, "swap_in_ms_per_block": 0.1,
                               "block_size": 16, "recompute_fixed_ms": 0.3,
                               "recompute_ms_per_token": 0.002, "recompute_ms_per_token_sq": 1e-5}
    minimal = CostModel.from_dict({k: v for k, v in ROUND_TRIP.items()
                                   if k not in ("swap_ms_per_block", "block_size")})
    assert minimal.swap_out_ms_per_block == minimal.swap_in_ms_per_block == 0.0


@pytest.mark.parametrize(("config", "message"), [
    ({**ROUND_TRIP, "swap_in_fixed_ms": 0.1},
     "'swap_fixed_ms' prices the swap round trip and 'swap_in_fixed_ms' one direction"),
    ({k: v for k, v in COSTS.to_dict().items() if k != "swap_in_ms_per_token"},
     "missing key 'swap_in_ms_per_token'"),
    ({k: v for k, v in ROUND_TRIP.items() if k != "swap_fixed_ms"},
     "missing key 'swap_fixed_ms'.*the swap may be given as each direction"),
    ({**COSTS.to_dict(), "swap_out_fixed_ms": -1.0}, "swap_out_fixed_ms must be non-negative"),
])
def test_bad_swap_keys_are_named(config, message):
    with pytest.raises(ValueError, match=message):
        CostModel.from_dict(config)


# Zero or far from the subnormal range: halving a float near it loses its last bit (5e-324 / 2
# is 0), a cost no profile has.
coefficient = st.one_of(st.just(0.0), st.floats(min_value=1e-300, max_value=1e3))


@settings(max_examples=200, deadline=None)
@given(fixed=coefficient, per_token=coefficient, per_block=coefficient,
       block_size=st.integers(1, 4096),
       n=st.lists(st.integers(0, 10**7), min_size=1, max_size=20))
def test_even_split_prices_the_round_trip_bit_for_bit(fixed, per_token, per_block, block_size,
                                                      n):
    """out + in of a round trip split evenly is the round-trip formula exactly, so the
    selector's choices and costs are those of the round trip given."""
    costs = CostModel.from_dict({**ROUND_TRIP, "swap_fixed_ms": fixed,
                                 "swap_ms_per_token": per_token, "swap_ms_per_block": per_block,
                                 "block_size": block_size})
    tokens = np.array(n, dtype=np.float64)
    round_trip = np.where(tokens > 0, fixed + per_token * tokens
                          + per_block * np.ceil(tokens / block_size), 0.0)
    np.testing.assert_array_equal(costs.swap_ms(n), round_trip)
    np.testing.assert_array_equal(costs.swap_out_ms(n), costs.swap_in_ms(n))


def test_analytic_coefficients_follow_the_docstring():
    # tiny: float32, 2 layers, hidden 64, 4 heads, 2 KV heads, head_dim 16, MLP 128, vocab 256.
    costs = CostModel.analytic(get_model("tiny"), TEST_HW, block_size=32)
    kv_bytes = 2 * 2 * 2 * 16 * 4  # 512 B per token
    rate = 100e12 * 0.5 / 1e3  # FLOP per ms
    layer_params = 64 * (64 + 2 * 32) + 64 * 64 + 3 * 64 * 128  # 36864
    # out over the 25 GB/s device-to-host link, in over the 50 GB/s host-to-device one
    assert costs.swap_out_fixed_ms == costs.swap_in_fixed_ms == pytest.approx(0.01, rel=1e-12)
    assert costs.swap_out_ms_per_token == pytest.approx(kv_bytes / 25 / 1e6, rel=1e-12)
    assert costs.swap_out_ms_per_token == pytest.approx(2.048e-5, rel=1e-12)
    assert costs.swap_in_ms_per_token == pytest.approx(1.024e-5, rel=1e-12)
    assert costs.swap_out_ms_per_block == costs.swap_in_ms_per_block == pytest.approx(0.002)
    assert float(costs.swap_ms(32)) == pytest.approx(0.02 + 32 * 3.072e-5 + 0.004, rel=1e-12)
    assert costs.block_size == 32
    assert costs.recompute_ms_per_token == pytest.approx(2 * 2 * layer_params / rate, rel=1e-12)
    assert costs.recompute_ms_per_token == pytest.approx(2.94912e-6, rel=1e-12)
    assert costs.recompute_ms_per_token_sq == pytest.approx(2 * 4 * 16 * 2 / rate, rel=1e-12)
    assert costs.recompute_ms_per_token_sq == pytest.approx(5.12e-9, rel=1e-12)
    assert costs.recompute_fixed_ms == pytest.approx(2 * 64 * 256 / rate + 0.05, rel=1e-12)


def test_analytic_llama_3_8b_on_h100():
    costs = CostModel.analytic(get_model("llama-3-8b"), get_hardware("h100-sxm"))
    rate = 989e12 * 0.5 / 1e3
    # 131072 B/token each way over a 55 GB/s link: 4.7663 µs per token for the round trip.
    assert costs.swap_out_ms_per_token == costs.swap_in_ms_per_token  # 55 GB/s both ways
    assert costs.swap_out_ms_per_token == pytest.approx(131072 / 55e9 * 1e3, rel=1e-12)
    assert costs.recompute_ms_per_token == pytest.approx(13_958_643_712 / rate, rel=1e-12)
    assert costs.recompute_ms_per_token_sq == pytest.approx(2 * 32 * 128 * 32 / rate, rel=1e-12)
    # A 4096-token prompt: attention is ~7% of the prefill FLOPs; swap (19.5 ms) is ~6x cheaper
    # than recompute (124.6 ms).
    n = 4096
    recompute = 0.05 + (2 * 4096 * 128256 + 13_958_643_712 * n + 262_144 * n * n) / rate
    assert float(costs.recompute_ms(n)) == pytest.approx(recompute, rel=1e-12)
    assert float(costs.swap_ms(n)) == pytest.approx(0.02 + n * 131072 * 2 / 55e6, rel=1e-12)
    assert float(costs.swap_ms(n)) == pytest.approx(19.5426, abs=1e-4)
    assert float(costs.recompute_ms(n)) == pytest.approx(124.5671, abs=1e-4)


def test_analytic_tensor_parallel_halves_per_gpu_work():
    one = CostModel.analytic(get_model("llama-3-8b"), TEST_HW)
    two = CostModel.analytic(get_model("llama-3-8b", tp=2), TEST_HW)
    assert two.swap_out_ms_per_token == pytest.approx(one.swap_out_ms_per_token / 2, rel=1e-12)
    assert two.swap_in_ms_per_token == pytest.approx(one.swap_in_ms_per_token / 2, rel=1e-12)
    assert two.recompute_ms_per_token == pytest.approx(one.recompute_ms_per_token / 2, rel=1e-12)
    assert two.recompute_ms_per_token_sq == pytest.approx(one.recompute_ms_per_token_sq / 2,
                                                          rel=1e-12)
    assert two.swap_out_fixed_ms == one.swap_out_fixed_ms  # latency does not split


def test_crossover_tokens():
    # swap = 1 + 0.01·n, recompute = 1e-4·n²: recompute is cheaper while n² - 100n - 10⁴ < 0,
    # i.e. n < 50 + √12500 = 161.8, so swap wins from n = 162 on.
    costs = CostModel.from_dict({"swap_fixed_ms": 1.0, "swap_ms_per_token": 0.01,
                                 "recompute_fixed_ms": 0.0, "recompute_ms_per_token": 0.0,
                                 "recompute_ms_per_token_sq": 1e-4})
    assert costs.crossover_tokens() == 162
    assert float(costs.recompute_ms(161)) < float(costs.swap_ms(161))
    assert float(costs.swap_ms(162)) <= float(costs.recompute_ms(162))
    assert costs.crossover_tokens(max_tokens=100) is None  # still recompute at 100
    always_swap = CostModel.from_dict({"swap_fixed_ms": 0.0, "swap_ms_per_token": 1.0,
                                       "recompute_fixed_ms": 5.0, "recompute_ms_per_token": 5.0,
                                       "recompute_ms_per_token_sq": 5.0})
    assert always_swap.crossover_tokens() == 1


def test_decode_model():
    decode = DecodeModel(d0_ms=1.0, d1_ms_per_seq=0.1, d2_ms_per_seq_token=0.001)
    assert decode.step_ms(8, 1000) == pytest.approx(1.0 + 0.8 + 8.0, rel=1e-12)
    np.testing.assert_allclose(decode.step_ms([1, 2], 10), [1.11, 1.22], rtol=1e-12)
    analytic = DecodeModel.analytic(get_model("tiny"), TEST_HW)
    weight_bytes = (2 * 36864 + 2 * 256 * 64) * 4
    assert analytic.d0_ms == pytest.approx(weight_bytes / 1e9 + 0.05, rel=1e-12)
    assert analytic.d2_ms_per_seq_token == pytest.approx(512 / 1e9, rel=1e-12)
