"""kvbench's swap connector (kvbench.vllm.swap_connector): the worker's copies, the planner's
decisions and fallbacks, and (marker `vllm`) real CPU engines where swapped victims must resume
from their host copy: their freed device blocks are overwritten with noise after the copy and
the greedy outputs must still equal vLLM's own.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from kvbench.costmodel import CostModel
from kvbench.sim.policies import swap_if_cheaper, swap_if_room, swap_never
from kvbench.vllm.swap_scheduler import SwapPlanner
from kvbench.vllm.swap_worker import SwapIn, SwapOut, SwapWorker, copy_view

COSTS = CostModel.from_dict({"swap_fixed_ms": 0.0, "swap_ms_per_token": 0.01, "block_size": 16,
                             "recompute_fixed_ms": 0.0, "recompute_ms_per_token": 0.001,
                             "recompute_ms_per_token_sq": 1e-5})


# ---------------------------------------------------------------------------------------------
# The worker's round trip on vLLM's KV cache layouts

def cpu_layer(num_blocks: int, block_size: int, heads: int = 2, head_size: int = 32,
              seed: int = 0) -> torch.Tensor:
    """A layer as vLLM's CPU attention allocates it: [num_blocks, heads, block_size,
    2·head_size] (KVCacheLayout.LBHNC)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(num_blocks, heads, block_size, 2 * head_size, generator=g)


def flash_layer(num_blocks: int, block_size: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, num_blocks, block_size, 2, 32, generator=g).to(torch.bfloat16)


@pytest.mark.parametrize("make", [cpu_layer, flash_layer])
@pytest.mark.parametrize("block_size", [16, 32, 48])
def test_round_trip_is_bit_exact(make, block_size):
    num_blocks = 12
    caches = {f"layer{i}": make(num_blocks, block_size, seed=i) for i in range(3)}
    original = {k: v.clone() for k, v in caches.items()}
    worker = SwapWorker("torch")
    worker.register(caches, num_blocks)
    computed = 2 * block_size + 5  # a partial last block
    victim = (5, 2, 9)
    worker.swap_out([SwapOut("r", victim, computed)])
    for layer in worker.layers:  # vLLM reuses the freed blocks
        layer[:, :, list(victim)] = 7.0
    target = (1, 7, 3)
    assert worker.swap_in([SwapIn("r", 0, target, computed)]) == set()
    for name, cache in caches.items():
        view, before = copy_view(cache, num_blocks), copy_view(original[name], num_blocks)
        for old, new in zip(victim, target):
            assert torch.equal(view[:, :, new], before[:, :, old])
        untouched = sorted(set(range(num_blocks)) - set(victim) - set(target))
        assert torch.equal(view[:, :, untouched], before[:, :, untouched])
    (out, back) = worker.take_reports()
    assert (out.direction, back.direction) == ("out", "in") and out.ok and back.ok
    per_block = sum(c[0].numel() if c.dim() == 4 else 2 * c[0, 0].numel()
                    for c in caches.values()) * caches["layer0"].element_size()
    assert out.bytes == back.bytes == 3 * per_block
    assert computed <= 3 * block_size and worker.host == {}


def test_resume_loads_only_what_the_device_cache_lost():
    caches = {"l": cpu_layer(8, 16)}
    before = caches["l"].clone()
    worker = SwapWorker("torch")
    worker.register(caches, 8)
    worker.swap_out([SwapOut("r", (4, 5, 6), 40)])
    caches["l"][[5, 6]] = 0.0
    worker.swap_in([SwapIn("r", 1, (2, 3), 32)])  # block 0 was a prefix-cache hit
    assert torch.equal(caches["l"][[2, 3]], before[[5, 6]])
    assert worker.take_reports()[1].bytes == 2 * before[0].numel() * 4


def test_a_load_without_a_host_copy_is_a_load_error():
    worker = SwapWorker("torch")
    worker.register({"l": cpu_layer(4, 16)}, 4)
    assert worker.swap_in([SwapIn("gone", 0, (1, 2), 32)]) == {1, 2}
    assert not worker.take_reports()[0].ok


def test_unknown_layout_is_refused():
    from kvbench.errors import KvbenchError

    with pytest.raises(KvbenchError, match="KV cache layout"):
        copy_view(torch.zeros(3, 5, 16, 8), 5)


# ---------------------------------------------------------------------------------------------
# The planner: decisions, the host pool, fallbacks

class Events:
    def __init__(self):
        self.events = []

    def connector_event(self, request_id, event, **fields):
        self.events.append((request_id, event, fields))


def planner(decide, host_blocks=10):
    return SwapPlanner(host_blocks, 16, 1024, COSTS, decide, Events())


def test_selector_swaps_long_victims_and_recomputes_short_ones():
    plan = planner(swap_if_cheaper, host_blocks=100)
    crossover = COSTS.crossover_tokens()
    assert not plan.preempting("short", crossover - 20, [1, 2, 3, 4, 5, 6, 7, 8])
    assert plan.preempting("long", crossover + 20, list(range(1, 40)))
    decided = [f for _, e, f in plan.recorder.events if e == "decided"]
    assert [d["decision"] for d in decided] == ["recompute", "swap"]
    assert decided[1]["swap_out_ms"] + decided[1]["swap_in_ms"] == pytest.approx(
        float(COSTS.swap_ms(crossover + 20)))


def test_full_host_pool_falls_back_to_recompute_and_says_why():
    plan = planner(swap_if_room, host_blocks=3)
    assert plan.preempting("a", 40, [1, 2, 3])  # 3 blocks
    assert not plan.preempting("b", 20, [4, 5])
    assert plan.recorder.events[-1][2]["reason"] == "host-full"
    plan.finished("a")  # aborted while swapped: its host blocks come back
    assert plan.free_blocks == 3 and plan.take()[2] == ["a"]


def test_resume_before_the_copy_is_reported_recomputes():
    plan = planner(swap_if_room)
    plan.preempting("a", 40, [1, 2, 3])
    assert plan.matched("a", 41, 0) == 0  # the worker has not reported the copy yet
    plan.allocated("a", [7, 8, 9], 0)
    assert plan.recorder.events[-1][2]["fallback"] == "copy-not-done"
    assert plan.free_blocks == 10 and plan.take()[1] == []


def test_resume_loads_past_the_prefix_hit_and_computes_one_token():
    from kvbench.vllm.swap_worker import CopyReport

    plan = planner(swap_if_room)
    plan.preempting("a", 40, [1, 2, 3])
    plan.reported([CopyReport("a", "out", 3, 3072, 0.1)])
    assert plan.matched("a", 40, 16) == 23  # one token is left to compute
    plan.allocated("a", [9, 4, 5], 23)
    assert plan.take()[1] == [SwapIn("a", 1, (4, 5), 23)]


def test_recompute_policy_never_swaps():
    plan = planner(swap_never)
    assert not plan.preempting("a", 4000, list(range(300)))
    assert plan.recorder.events[0][2]["reason"] == "policy"


def test_connector_options_are_checked_in_one_line():
    pytest.importorskip("vllm")
    from kvbench.vllm.options import PluginError
    from kvbench.vllm.swap_connector import SwapSettings

    for extra, message in (({"host_blokcs": 3}, "unknown option 'host_blokcs'.*did you mean "
                                                "'host_blocks'"),
                           ({"host_gib": 1, "host_blocks": 2}, "not both"),
                           ({"host_blocks": -1}, "non-negative integer"),
                           ({"copy_impl": "memcpy"}, "copy_impl 'memcpy'")):
        with pytest.raises(PluginError, match=message):
            SwapSettings.parse(extra, 1024)
    assert SwapSettings.parse({"host_gib": 1}, 1 << 20).host_blocks == 1024


# ---------------------------------------------------------------------------------------------
# Real CPU engines: swapped victims resume from the host copy

TINY = os.path.join(os.path.dirname(__file__), "..", "..", "kvbench", "vllm", "tiny_llama")


def generate(tmp_path, mode: str | None, module: str = "kvbench.vllm.swap_connector",
             name: str = "KvbenchSwapConnector", prefix_caching: bool = False):
    """Greedy outputs of six requests through a 12-block cache (it preempts), and the
    plugin's summary; `mode`: the preemption option (None: plain vLLM)."""
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    extra = {}
    records = tmp_path / f"{mode}.jsonl"
    if mode is not None:
        extra = dict(scheduler_cls="kvbench.vllm.scheduler.KvbenchScheduler",
                     kv_transfer_config={"kv_connector": name, "kv_connector_module_path": module,
                                         "kv_role": "kv_both",
                                         "kv_connector_extra_config": {"host_blocks": 64}},
                     additional_config={"kvbench": {"preemption": mode,
                                                    "records": str(records)}})
    llm = LLM(model=TINY, load_format="dummy", skip_tokenizer_init=True, enforce_eager=True,
              block_size=32, num_gpu_blocks_override=12, max_model_len=300, max_num_seqs=8,
              seed=0, gpu_memory_utilization=0.1, enable_prefix_caching=prefix_caching,
              dtype="float32", **extra)
    rng = np.random.default_rng(0)
    prompts = [TokensPrompt(prompt_token_ids=rng.integers(10, 30000, 60 + 10 * i).tolist())
               for i in range(6)]
    outputs = llm.generate(prompts, SamplingParams(max_tokens=60, temperature=0,
                                                   ignore_eos=True), use_tqdm=False)
    llm.llm_engine.engine_core.shutdown()
    del llm
    summary = records.with_name(f"{records.stem}.summary.json")
    lines = ([json.loads(line) for line in records.read_text().splitlines()]
             if mode is not None else [])
    return ([o.outputs[0].token_ids for o in outputs],
            json.loads(summary.read_text()) if mode is not None else None, lines)


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    pytest.importorskip("vllm")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    return generate(tmp_path_factory.mktemp("plain"), None)[0]


@pytest.mark.vllm
def test_swapped_victims_resume_from_the_host_copy(plain, tmp_path, monkeypatch):
    outputs, summary, lines = generate(tmp_path, "swap", "tests.vllm.poison_connector",
                                       "PoisonedSwapConnector")
    assert summary["preemptions"] > 0 and summary["swapped_preemptions"] == summary["preemptions"]
    assert outputs == plain  # the noise written over the freed blocks was never read
    victims = [p for line in lines for p in line["preemptions"]]
    # Without prefix caching every swapped token is loaded back, and nothing recomputed.
    assert summary["loaded_tokens"] == sum(p["computed_tokens"] for p in victims)
    assert summary["recompute_tokens"] == 0 and summary["swap_fallbacks"] == 0
    block_bytes = 2 * 2 * 32 * 2 * 64 * 4  # layers · K,V · block · kv heads · head · fp32
    assert summary["bytes_in"] == sum(-(-p["computed_tokens"] // 32) for p in victims) \
        * block_bytes == summary["bytes_out"]
    assert all(p["swap_out"]["ms"] > 0 and p["swap_in"]["ms"] > 0 for p in victims)
    monkeypatch.setenv("POISONED_SWAP_SKIP_LOAD", "1")  # the noise is read: outputs change
    assert generate(tmp_path, "swap", "tests.vllm.poison_connector",
                    "PoisonedSwapConnector")[0] != plain


@pytest.mark.vllm
def test_forced_recompute_loads_nothing(plain, tmp_path):
    outputs, summary, _ = generate(tmp_path, "recompute")
    assert outputs == plain and summary["preemptions"] > 0
    assert summary["loaded_tokens"] == summary["bytes_out"] == summary["bytes_in"] == 0
    assert summary["recompute_tokens"] > 0


@pytest.mark.vllm
def test_selector_with_prefix_caching_loads_what_the_device_lost(plain, tmp_path):
    outputs, summary, lines = generate(tmp_path, "selector", prefix_caching=True)
    assert outputs == plain
    victims = [p for line in lines for p in line["preemptions"]]
    assert all(p["decision"] == p["selector"] for p in victims)
    assert 0 < summary["loaded_tokens"] <= sum(p["computed_tokens"] for p in victims)


@pytest.mark.vllm
def test_bad_connector_option_stops_the_engine_at_start(tmp_path):
    pytest.importorskip("vllm")
    from vllm import LLM

    from kvbench.vllm.options import PluginError

    with pytest.raises(PluginError, match=r"^kvbench swap connector: unknown option 'hots_gib'"):
        LLM(model=TINY, load_format="dummy", skip_tokenizer_init=True, enforce_eager=True,
            block_size=32, num_gpu_blocks_override=12, max_model_len=300,
            gpu_memory_utilization=0.1,
            scheduler_cls="kvbench.vllm.scheduler.KvbenchScheduler",
            kv_transfer_config={"kv_connector": "KvbenchSwapConnector",
                                "kv_connector_module_path": "kvbench.vllm.swap_connector",
                                "kv_role": "kv_both",
                                "kv_connector_extra_config": {"hots_gib": 2}})
