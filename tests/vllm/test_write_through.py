"""Write-through offloading with a choice at resume (kvbench.vllm.write_through, offload_spec).

Marker `vllm`: the modules subclass vLLM's. First the pieces alone: the resume choice against
the prices, the option's check, the torch-copy worker's copies. Then CPU engines (the tiny Llama)
on a few requests that preempt each other: greedy outputs must be plain vLLM's whether the
victims' KV comes back from the host or is recomputed.
"""

from __future__ import annotations

import functools
import gc
import re

import numpy as np
import pytest

from kvbench.costmodel import CostModel

pytestmark = pytest.mark.vllm

MODES = ("selector", "load", "recompute")


@pytest.fixture(scope="module")
def wt():
    pytest.importorskip("vllm")
    from kvbench.vllm import write_through

    return write_through


def costs(swap_ms_per_token: float) -> CostModel:
    return CostModel.from_dict({
        "swap_fixed_ms": 0.2, "swap_ms_per_token": swap_ms_per_token, "block_size": 32,
        "recompute_fixed_ms": 0.1, "recompute_ms_per_token": 0.01,
        "recompute_ms_per_token_sq": 1e-5})


# ---------------------------------------------------------------------------------------------
# The choice and the option

@pytest.mark.parametrize("swap_ms_per_token, device_tokens, host_tokens, expected", [
    (0.001, 0, 64, "load"),  # a cheap link: load
    (0.1, 0, 64, "recompute"),  # a slow link: recompute
    (0.021, 0, 17, "recompute"),  # 17 tokens: the fixed costs decide
    (0.021, 1000, 64, "load"),  # behind 1000 cached tokens, recomputing 64 costs more
])
def test_resume_choice_follows_the_prices(wt, swap_ms_per_token, device_tokens, host_tokens,
                                          expected):
    model = costs(swap_ms_per_token)
    choice = wt.resume_choice(model, device_tokens, host_tokens, "selector")
    recompute_ms = float(model.recompute_ms(device_tokens + host_tokens)
                         - model.recompute_ms(device_tokens))
    assert choice == {"device_tokens": device_tokens, "host_tokens": host_tokens,
                      "load_ms": wt.load_ms(model, host_tokens), "recompute_ms": recompute_ms,
                      "decision": expected}
    assert (choice["load_ms"] <= choice["recompute_ms"]) == (expected == "load")
    for forced in ("load", "recompute"):
        assert wt.resume_choice(model, device_tokens, host_tokens, forced)["decision"] == forced


def test_load_is_the_way_in_of_a_swap(wt):
    model = costs(0.01)
    assert wt.load_ms(model, 100) == float(model.swap_in_ms(100))
    assert wt.load_ms(model, 100) < float(model.swap_ms(100))


def test_a_load_wins_a_tie(wt):
    model = CostModel.from_dict({"swap_fixed_ms": 0.0, "swap_ms_per_token": 0.02,
                                 "recompute_fixed_ms": 0.0, "recompute_ms_per_token": 0.01,
                                 "recompute_ms_per_token_sq": 0.0})
    assert wt.resume_choice(model, 0, 10, "selector")["decision"] == "load"


def test_bad_resume_option_says_which_in_one_line(wt):
    from kvbench.vllm.options import PluginError

    assert wt.resume_mode({}) == "selector"
    assert wt.resume_mode({"kvbench_resume": "recompute"}) == "recompute"
    with pytest.raises(PluginError) as info:
        wt.resume_mode({"kvbench_resume": "swap"})
    assert str(info.value) == ('kvbench: kv_connector_extra_config["kvbench_resume"] is '
                               "'swap'; give one of selector, load, recompute")


# ---------------------------------------------------------------------------------------------
# The torch-copy worker

def test_torch_copy_worker_stores_and_loads_the_blocks_named(wt):
    """Two KV cache groups (one sharing a tensor between two layers), chunks of 2 blocks, a
    group starting mid-chunk: each block comes back where it is loaded, byte for byte."""
    import torch
    from vllm.v1.kv_offload.base import (
        CanonicalKVCacheRef,
        CanonicalKVCaches,
        CanonicalKVCacheTensor,
        GPULoadStoreSpec,
    )
    from vllm.v1.kv_offload.cpu.common import CPULoadStoreSpec

    from kvbench.vllm.offload_spec import TorchCopyWorker

    gen = torch.Generator().manual_seed(0)
    caches = [torch.randint(-128, 128, (17, size), dtype=torch.int8, generator=gen)
              for size in (40, 24)]
    kv = CanonicalKVCaches([CanonicalKVCacheTensor(t, t.shape[1]) for t in caches],
                           [[CanonicalKVCacheRef(0, 40)],
                            [CanonicalKVCacheRef(1, 24), CanonicalKVCacheRef(1, 24)]])
    worker = wt.MeasuredWorker(TorchCopyWorker(kv, blocks_per_chunk=2, num_chunks=5))
    saved = [t.clone() for t in caches]
    # group 0: request blocks 0-2 (device 3, 9, 16) into chunks 4, 1; group 1: request
    # blocks 1-2 (device 5, 6) into the second half of chunk 0 and the first of chunk 3.
    assert worker.submit_store(7, GPULoadStoreSpec([3, 9, 16, 5, 6], group_sizes=[3, 2],
                                                   block_indices=[0, 1]),
                               CPULoadStoreSpec([4, 1, 0, 3]))
    for t in caches:
        t.random_(-128, 128, generator=gen)
    assert worker.submit_load(8, CPULoadStoreSpec([4, 1, 0, 3]),
                              GPULoadStoreSpec([0, 1, 2, 10, 11], group_sizes=[3, 2],
                                               block_indices=[0, 1]))
    assert torch.equal(caches[0][[0, 1, 2]], saved[0][[3, 9, 16]])
    assert torch.equal(caches[1][[10, 11]], saved[1][[5, 6]])
    results = worker.get_finished()
    assert [r.job_id for r in results] == [7, 8]
    assert all(r.success and r.transfer_time > 0 for r in results)
    num_bytes = 3 * 40 + 2 * 24
    assert [(job, direction, size) for job, direction, size, _ in worker.measured] == \
        [(7, "store", num_bytes), (8, "load", num_bytes)]
    meta = wt.MeasuredWorkerMetadata({7: 1}, transfers=worker.measured[:1]).aggregate(
        wt.MeasuredWorkerMetadata({7: 1}, transfers=worker.measured[1:]))
    assert meta.completed_jobs == {7: 2} and meta.transfers == worker.measured


# ---------------------------------------------------------------------------------------------
# CPU engines

MAX_TOKENS = 40
NUM_GPU_BLOCKS = 6  # of 32 tokens, one of them vLLM's null block: 160 tokens for 6 requests


def prompts():
    from vllm.inputs import TokensPrompt

    rng = np.random.default_rng(0)
    return [TokensPrompt(prompt_token_ids=rng.integers(3, 32000, int(n)).tolist())
            for n in rng.integers(10, 40, 6)]


def kv_transfer_config(resume: str) -> dict:
    """What a user passes on vLLM's CPU platform, with the resume mode given."""
    return {"kv_connector": "KvbenchWriteThroughConnector",
            "kv_connector_module_path": "kvbench.vllm.write_through", "kv_role": "kv_both",
            "kv_connector_extra_config": {
                "spec_name": "TorchCopyOffloadingSpec",
                "spec_module_path": "kvbench.vllm.offload_spec",
                "cpu_bytes_to_use": 1 << 24, "offload_prompt_only": False,
                "kvbench_resume": resume}}


def engine(monkeypatch, **kwargs):
    """A CPU engine of the tiny Llama. Its dummy weights are drawn from +-0.1, not vLLM's
    +-0.001: with those every logit is the same and any KV, even a wrong one, gives the same
    tokens."""
    from vllm import LLM
    from vllm.model_executor.model_loader import dummy_loader

    from kvbench.vllm.drive import TINY_MODEL

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    monkeypatch.setattr(dummy_loader, "initialize_single_dummy_weight", functools.partial(
        dummy_loader.initialize_single_dummy_weight, low=-0.1, high=0.1))
    return LLM(model=str(TINY_MODEL), load_format="dummy", skip_tokenizer_init=True, seed=0,
               enforce_eager=True, block_size=32, num_gpu_blocks_override=NUM_GPU_BLOCKS,
               max_model_len=MAX_TOKENS + 40, gpu_memory_utilization=0.5, **kwargs)


@pytest.fixture(scope="module")
def runs():
    """Greedy outputs of plain vLLM and, per mode, of the connector (and what it reported);
    each engine started when a test first asks for it."""
    pytest.importorskip("vllm")
    from vllm import SamplingParams

    from kvbench.vllm.model_shape import model_spec
    from kvbench.vllm.options import PluginOptions
    from kvbench.vllm.scheduler import preemption_costs

    params = SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True, temperature=0,
                            detokenize=False)

    @functools.cache
    def run(resume: str | None):
        with pytest.MonkeyPatch.context() as monkeypatch:
            llm = engine(monkeypatch, **({} if resume is None else
                                         {"kv_transfer_config": kv_transfer_config(resume)}))
        try:
            connector = llm.llm_engine.engine_core.engine_core.scheduler.connector
            called = {"decisions": [], "transfers": []}
            if connector is not None:
                connector.on_decision = called["decisions"].append
                connector.on_transfer = called["transfers"].append
            outputs = llm.generate(prompts(), params, use_tqdm=False)
            model = model_spec(llm.llm_engine.vllm_config)
            run = {"tokens": [list(o.outputs[0].token_ids) for o in outputs],
                   "kv_bytes_per_token": model.kv_bytes_per_token}
            if connector is not None:
                run |= {**called, "costs": connector.costs,
                        "plugin_costs": preemption_costs(PluginOptions(), model, 32)[0].costs}
            return run
        finally:
            llm.llm_engine.engine_core.shutdown()
            del llm
            gc.collect()

    return run


@pytest.mark.parametrize("resume", MODES)
def test_outputs_are_plain_vllms_with_victims_resumed(runs, resume):
    run = runs(resume)
    assert run["decisions"], "no preempted request resumed with blocks on the host"
    assert run["tokens"] == runs(None)["tokens"]


def test_forced_load_loads_the_host_blocks_and_measures_each_copy(runs):
    run = runs("load")
    decisions, transfers = run["decisions"], run["transfers"]
    assert all(d["decision"] == "load" and d["loaded_tokens"] == d["host_tokens"] > 0
               for d in decisions)
    loads = [t for t in transfers if t["direction"] == "load"]
    assert sorted(t["request_id"] for t in loads) == sorted(d["request_id"] for d in decisions)
    loaded = {d["request_id"]: d["loaded_tokens"] for d in decisions}
    assert all(t["bytes"] == loaded[t["request_id"]] * run["kv_bytes_per_token"]
               for t in loads)
    stores = [t for t in transfers if t["direction"] == "store"]
    assert stores and all(t["bytes"] > 0 and t["transfer_ms"] > 0 for t in transfers)


def test_forced_recompute_loads_nothing(runs):
    run = runs("recompute")
    assert all(d["decision"] == "recompute" and d["loaded_tokens"] == 0
               for d in run["decisions"])
    assert not [t for t in run["transfers"] if t["direction"] == "load"]
    assert [t for t in run["transfers"] if t["direction"] == "store"]


def test_the_selector_prices_each_resume_with_the_plugins_costs(runs, wt):
    run = runs("selector")
    assert run["costs"] == run["plugin_costs"]
    for d in run["decisions"]:
        assert d == {"request_id": d["request_id"],
                     **wt.resume_choice(run["costs"], d["device_tokens"], d["host_tokens"],
                                        "selector"),
                     "loaded_tokens": d["host_tokens"] if d["decision"] == "load" else 0}


def test_bad_resume_option_stops_the_engine_at_start(wt, monkeypatch):
    from kvbench.vllm.options import PluginError

    with pytest.raises(PluginError, match="^" + re.escape(
            'kvbench: kv_connector_extra_config["kvbench_resume"] is \'swap\'; give one of '
            "selector, load, recompute") + "$"):
        engine(monkeypatch, kv_transfer_config=kv_transfer_config("swap"))
