"""The kvbench scheduler inside vLLM (kvbench.vllm.scheduler): options, records, policies.

Without vLLM: options and the recorder's arithmetic. With vLLM (marker `vllm`, `make
test-vllm`): vLLM's scheduler driven step by step without a model (`kvbench.vllm.drive`), where
the default options must give vLLM's schedule exactly and every kvbench policy the simulator's
schedule exactly; then real CPU engines (the tiny Llama, dummy weights) on a trace small enough
to replay in seconds that still preempts.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from kvbench.costmodel import CostModel
from kvbench.models import ModelSpec
from kvbench.vllm.instrument import Recorder, read_records, summarize_records, summary_path
from kvbench.vllm.options import PluginError, PluginOptions

MODEL = ModelSpec("t", num_layers=2, hidden_size=256, num_heads=4, num_kv_heads=2, head_dim=64,
                  intermediate_size=512, vocab_size=32000, dtype="float32")
COSTS = CostModel.from_dict({"swap_fixed_ms": 0.5, "swap_ms_per_token": 0.01, "block_size": 32,
                             "recompute_fixed_ms": 0.1, "recompute_ms_per_token": 0.02,
                             "recompute_ms_per_token_sq": 1e-5})


# ---------------------------------------------------------------------------------------------
# Options (no vLLM)

def test_default_options_are_vllms():
    options = PluginOptions.from_sources({}, None)
    assert options.is_vllm_default
    assert options.label == "fcfs/lifo/recompute/history"
    assert options.to_config() == {"kvbench": {}}


def test_options_from_environment_and_config_round_trip():
    options = PluginOptions.from_sources(
        {"KVBENCH_VICTIM": "cost-aware", "KVBENCH_PROTECT_STEPS": "2", "PATH": "/bin"},
        {"kvbench": {"admission": "future-kv", "headroom_fraction": 0.1}})
    assert not options.is_vllm_default
    assert (options.policy.victim, options.knobs.protect_steps) == ("cost-aware", 2)
    assert (options.policy.admission, options.knobs.headroom_fraction) == ("future-kv", 0.1)
    assert PluginOptions.from_sources({}, options.to_config()) == options


@pytest.mark.parametrize("environ, config, message", [
    ({"KVBENCH_VICTIM": "lfc"}, None, "KVBENCH_VICTIM: unknown victim policy 'lfc' "
                                      "(did you mean 'lcf'?)"),
    ({"KVBENCH_VICTIMS": "lcf"}, None, "unknown option KVBENCH_VICTIMS (did you mean "
                                       "KVBENCH_VICTIM?)"),
    ({}, {"kvbench": {"admission": "future"}}, 'additional_config["kvbench"]["admission"]: '
                                               "unknown admission policy 'future'"),
    ({"KVBENCH_PROTECT_STEPS": "two"}, None, "KVBENCH_PROTECT_STEPS: Input should be a valid "
                                            "integer"),
    ({"KVBENCH_HEADROOM_FRACTION": "1.5"}, None, "KVBENCH_HEADROOM_FRACTION: "
                                                "headroom_fraction must be in [0, 1)"),
    ({"KVBENCH_HARDWARE": "h1000"}, None, "KVBENCH_HARDWARE: unknown hardware 'h1000'"),
    ({"KVBENCH_PROFILE": "/no/such/profile.json"}, None, "KVBENCH_PROFILE: no file"),
    ({"KVBENCH_VICTIM": "lcf"}, {"kvbench": {"victim": "lcf"}}, "option 'victim' is given "
                                                               "twice"),
])
def test_bad_options_say_which_in_one_line(environ, config, message):
    with pytest.raises(PluginError) as info:
        PluginOptions.from_sources(environ, config)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


# ---------------------------------------------------------------------------------------------
# The recorder's arithmetic (no vLLM)

def test_recorder_counts_recomputed_positions_and_their_flops(tmp_path):
    path = tmp_path / "records.jsonl"
    recorder = Recorder(MODEL, COSTS, block_size=32, path=path, about={"policy": "p"})
    recorder.add("a-1", prompt_tokens=100, max_tokens=20, predicted=10, arrival_time=1.0)
    recorder.add("b-2", prompt_tokens=50, max_tokens=5, predicted=5, arrival_time=2.0)
    recorder.admitted("a-1", 0)
    recorder.admitted("b-2", 32)  # a prefix-cache hit on arrival is not recomputation
    recorder.preempted("a-1", 110)  # prompt + 10 generated tokens computed, then dropped
    recorder.admitted("a-1", 64)  # re-admitted: not a first admission
    recorder.computing("a-1", start=64, num_tokens=40)  # hits gave back 64; 64..104 again
    assert "a-1" in recorder.catching_up
    recorder.computing("a-1", start=104, num_tokens=7)  # 104..110 again, 110 is new
    assert "a-1" not in recorder.catching_up
    a = recorder.finished("a-1", output_tokens=20, computed_tokens=119,
                          finish_reason="FINISHED_LENGTH_CAPPED")
    b = recorder.finished("b-2", output_tokens=5, computed_tokens=54, finish_reason="X")
    assert a["recompute_tokens"] == 110 - 64 and a["num_preemptions"] == 1
    assert a["wasted_flops"] == pytest.approx(MODEL.chunk_flops(64, 110))
    assert a["flops"] == pytest.approx(MODEL.chunk_flops(0, 119) + MODEL.chunk_flops(64, 110)
                                       + 20 * MODEL.lm_head_flops)
    assert b["flops"] == pytest.approx(MODEL.chunk_flops(32, 54) + 5 * MODEL.lm_head_flops)
    assert a["preemption_frequency"] == 1 / 20 and a["preempted_s"] > 0
    (choice,) = a["preemptions"]
    swap_ms, recompute_ms = float(COSTS.swap_ms(110)), float(COSTS.recompute_ms(110))
    assert (choice["swap_ms"], choice["recompute_ms"]) == (swap_ms, recompute_ms)
    assert choice["selector"] == ("swap" if swap_ms <= recompute_ms else "recompute")
    assert choice["saved_ms"] == pytest.approx(max(recompute_ms - swap_ms, 0.0))
    assert choice["kv_bytes"] == 4 * 32 * MODEL.kv_bytes_per_token  # ceil(110 / 32) blocks
    summary = recorder.close()
    assert summary["recompute_tokens"] == 46 and summary["preempted_requests"] == 1
    assert summary["recompute_fraction"] == pytest.approx(
        a["wasted_flops"] / (a["flops"] + b["flops"]))
    assert read_records(path) == [a, b]
    written = json.loads(summary_path(path).read_text())
    assert written == summary and written["policy"] == "p"
    assert summarize_records(path).items() <= summary.items()


def test_recorder_repeated_preemption_recomputes_up_to_the_furthest_position():
    recorder = Recorder(MODEL, COSTS, block_size=32)
    recorder.add("r", 40, 100, 100, 0.0)
    recorder.admitted("r", 0)
    recorder.preempted("r", 80)
    recorder.computing("r", 0, 30)  # a chunk of the recomputation, then preempted again
    recorder.preempted("r", 30)
    recorder.computing("r", 0, 90)
    line = recorder.finished("r", 60, 99, "X")
    assert line["recompute_tokens"] == 30 + 80 and line["num_preemptions"] == 2
    assert recorder.summary()["unfinished"] == 0


# ---------------------------------------------------------------------------------------------
# vLLM's scheduler without a model (marker vllm)

vllm_only = pytest.mark.vllm
SLICE = dict(num_requests=300)
PLUGIN = "kvbench.vllm.scheduler.KvbenchScheduler"
# (admission, victim, predictor): each the simulator's function, run inside vLLM
POLICIES = [("fcfs", "lcf", "history"), ("fcfs", "cost-aware", "history"),
            ("future-kv", "lifo", "oracle"), ("future-kv", "cost-aware", "history")]


@pytest.fixture(scope="module")
def azure():
    pytest.importorskip("vllm")
    from kvbench.sim.tokens import random_token_ids
    from kvbench.sim.workloads import AZURE_CONV_TRACE, read_trace

    workload = read_trace(AZURE_CONV_TRACE, **SLICE)
    return workload, random_token_ids(workload, seed=0)


def drive_config(async_scheduling: bool):
    from kvbench.sim.engines import ReplicaSpec

    return ReplicaSpec(num_gpu_blocks=400, max_num_seqs=64, max_num_batched_tokens=2048,
                       async_scheduling=async_scheduling)


@pytest.fixture(scope="module")
def vllm_logs(azure):
    """vLLM's own scheduler on the slice, sync and async."""
    from kvbench.vllm.drive import drive

    workload, tokens = azure
    return {asynchronous: drive(workload, drive_config(asynchronous), tokens)
            for asynchronous in (False, True)}


@vllm_only
@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
def test_default_options_schedule_as_vllm_step_by_step(azure, vllm_logs, async_scheduling):
    from kvbench.sim.steplog import first_difference
    from kvbench.vllm.drive import drive

    workload, tokens = azure
    theirs = vllm_logs[async_scheduling]
    ours = drive(workload, drive_config(async_scheduling), tokens, scheduler_cls=PLUGIN)
    assert ours.engine.endswith("(KvbenchAsyncScheduler)" if async_scheduling
                                else "(KvbenchScheduler)")
    assert theirs.num_preemptions > 0
    assert first_difference(theirs, ours) is None


@vllm_only
@pytest.mark.parametrize("admission, victim, predictor", POLICIES)
def test_each_policy_in_vllm_schedules_as_the_simulator(azure, monkeypatch, tmp_path,
                                                        admission, victim, predictor):
    """The same policy function, over vLLM's requests or the simulator's: the same schedule,
    and the records' per-request counts are the simulator's."""
    from kvbench.models import from_hf_config
    from kvbench.sim.config import Costs
    from kvbench.sim.engine import Simulator
    from kvbench.sim.policies import PolicySpec
    from kvbench.sim.steplog import first_difference
    from kvbench.vllm.differential import same_requests, sim_config
    from kvbench.vllm.drive import TINY_MODEL, drive

    workload, tokens = azure
    records = tmp_path / "records.jsonl"
    monkeypatch.setenv("KVBENCH_ADMISSION", admission)
    monkeypatch.setenv("KVBENCH_VICTIM", victim)
    monkeypatch.setenv("KVBENCH_PREDICTOR", predictor)
    monkeypatch.setenv("KVBENCH_RECORDS", str(records))
    config = drive_config(async_scheduling=False)
    ours = drive(workload, config, tokens, scheduler_cls=PLUGIN)
    # The plugin prices with analytic H100 costs for the served (tiny) model: so does this run.
    costs = Costs.analytic(from_hf_config(TINY_MODEL / "config.json"), "h100-sxm",
                           config.block_size)
    sim_cfg = dataclasses.replace(sim_config(config, step_s=0.02),
                                  policy=PolicySpec(admission, victim, "recompute", predictor))
    sim = Simulator(same_requests(workload), sim_cfg, costs, tokens=tokens, record=True).run()
    assert first_difference(ours, sim.step_log) is None
    lines = {int(line["request_id"]): line for line in read_records(records)}
    assert sorted(lines) == list(range(workload.num_requests))
    ids = np.arange(workload.num_requests)
    req = sim.requests
    for column, expected in (("num_preemptions", req.num_preemptions),
                             ("recompute_tokens", req.recompute_tokens)):
        assert [lines[i][column] for i in ids] == expected.tolist(), column
    np.testing.assert_allclose([lines[i]["wasted_flops"] for i in ids], req.wasted_flops)
    total = sum(line["flops"] for line in lines.values())
    assert total == pytest.approx(sim.flops, rel=1e-9)


@vllm_only
def test_kvbench_policies_change_vllms_schedule(azure, vllm_logs, monkeypatch):
    from kvbench.vllm.drive import drive

    workload, tokens = azure
    vllm_log = vllm_logs[False]
    monkeypatch.setenv("KVBENCH_ADMISSION", "future-kv")
    monkeypatch.setenv("KVBENCH_PREDICTOR", "oracle")
    assert drive(workload, drive_config(False), tokens, scheduler_cls=PLUGIN).num_preemptions < \
        vllm_log.num_preemptions


# ---------------------------------------------------------------------------------------------
# Real vLLM engines on CPU (marker vllm)

def tiny_trace():
    """8 requests at once on 5 blocks of 32 tokens: vLLM preempts a few times in ~80 steps."""
    from kvbench.sim.workloads import Workload

    rng = np.random.default_rng(3)
    output = rng.integers(12, 40, 8)
    return Workload("tiny", np.zeros(8), rng.integers(8, 40, 8), output, output.copy())


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    """vLLM's scheduler, the kvbench scheduler at its defaults, and future-kv with the oracle,
    each in a fresh CPU engine on the tiny trace."""
    pytest.importorskip("vllm")
    from kvbench.sim.engines import ReplicaSpec
    from kvbench.sim.tokens import random_token_ids
    from kvbench.vllm.replay import ReplayEngine, run_engine

    workload = tiny_trace()
    tokens = random_token_ids(workload, seed=0)
    settings = ReplayEngine(ReplicaSpec.named("vllm-0.32-cpu", num_gpu_blocks=5))
    out = tmp_path_factory.mktemp("records")
    runs = {"vllm": run_engine(workload, tokens, settings, "vllm", None)}
    for label, fields in (("default", {}), ("future-kv", {"admission": "future-kv",
                                                         "predictor": "oracle"})):
        options = PluginOptions.parse({**fields, "records": out / f"{label}.jsonl"})
        runs[label] = run_engine(workload, tokens, settings, label, options)
    return workload, settings, runs


@vllm_only
def test_plugin_runs_in_a_real_engine_and_writes_its_records(engines):
    workload, settings, runs = engines
    run = runs["default"]
    assert np.isfinite(run.finish_s).all()
    lines = read_records(run.records)
    assert sorted(int(line["request_id"].rsplit("-", 1)[0]) for line in lines) == \
        list(range(workload.num_requests))
    summary = json.loads(summary_path(run.records).read_text())
    assert summary["policy"] == "vllm (fcfs/lifo/recompute/history)"
    assert summary["num_gpu_blocks"] == settings.replica.num_gpu_blocks
    assert summary["requests"] == workload.num_requests and summary["unfinished"] == 0
    assert [line["output_tokens"] for line in sorted(
        lines, key=lambda x: int(x["request_id"].rsplit("-", 1)[0]))] == \
        workload.output_tokens.tolist()


@vllm_only
def test_default_plugin_schedule_is_vllms_in_a_real_engine(engines):
    from kvbench.sim.steplog import first_difference
    from kvbench.vllm.replay import _canonical

    _, _, runs = engines
    assert runs["vllm"].log.num_preemptions > 0
    assert first_difference(_canonical(runs["vllm"].log), _canonical(runs["default"].log),
                            times=False) is None


@vllm_only
def test_records_add_up_to_what_the_engine_recomputed(engines):
    """Per request, the plugin's records (scheduler side) against the batches the executor ran
    (positions computed below the furthest already reached)."""
    workload, _, runs = engines
    run = runs["default"]
    lines = {int(line["request_id"].rsplit("-", 1)[0]): line for line in read_records(
        run.records)}
    ids = range(workload.num_requests)
    observed = run.observer
    assert observed.recompute_tokens.sum() > 0
    assert [lines[i]["recompute_tokens"] for i in ids] == observed.recompute_tokens.tolist()
    np.testing.assert_allclose([lines[i]["wasted_flops"] for i in ids], observed.wasted_flops)
    preempted = np.bincount(run.log.preempted_request, minlength=workload.num_requests)
    assert [lines[i]["num_preemptions"] for i in ids] == preempted.tolist()
    assert summarize_records(run.records)["recompute_tokens"] == observed.recompute_tokens.sum()


@vllm_only
def test_future_kv_with_the_oracle_preempts_less_than_vllm(engines):
    _, _, runs = engines
    assert runs["future-kv"].log.num_preemptions < runs["vllm"].log.num_preemptions
    assert np.isfinite(runs["future-kv"].finish_s).all()


@vllm_only
def test_bad_option_stops_the_engine_at_start(monkeypatch):
    pytest.importorskip("vllm")
    from vllm.v1.engine.llm_engine import LLMEngine

    from kvbench.sim.engines import ReplicaSpec
    from kvbench.vllm.replay import ReplayEngine

    settings = ReplayEngine(ReplicaSpec.named("vllm-0.32-cpu", num_gpu_blocks=5))
    args = settings.engine_args(64, PluginOptions())
    monkeypatch.setenv("KVBENCH_VICTIM", "lfc")
    with pytest.raises(PluginError, match=r"^kvbench: KVBENCH_VICTIM: unknown victim policy "
                                          r"'lfc' \(did you mean 'lcf'\?\)"):
        LLMEngine.from_engine_args(args)
