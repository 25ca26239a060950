"""Speed of the simulator on a workload whose requests share prefixes, against vLLM 0.32's own
scheduler on the same trace and settings, in one benchmark run (issue 23: a 12,000-request
Mooncake-format trace in at most 10 s per policy, and at least 10x faster than driving vLLM).

The trace: Mooncake's synthetic trace (bundled, 3,993 requests) tiled three times and then some,
each copy after the one before and with its hash ids shifted (copies share nothing with each
other; within a copy, requests share as in the original), its one request longer than the drive's
model takes left out, written as Mooncake JSONL and read back: 12,000 requests.

    wall_s           = time.perf_counter around one `Simulator.run` or `drive` call (the trace
                       parsed and its token ids generated beforehand)
    speedup          = vLLM's wall_s / the simulator's wall_s (extra_info of the simulator's
                       fcfs row, which is vLLM's own policy)

Settings: vLLM 0.32's defaults (prefix caching, async scheduling, chunked prefill), 256
sequences / 8192 batched tokens, 16-token blocks, a KV cache of 29,206 blocks (llama-3-8b on an
H100's 80 GB), 20 ms steps for both. Needs vLLM:
.venv-vllm/bin/python -m pytest benchmarks/bench_sharing.py (skipped elsewhere).
"""

import json
import time

import pytest

pytest.importorskip("vllm")  # the comparison is the point: `make bench-check` skips it

from kvbench.sim.engines import ReplicaSpec  # noqa: E402
from kvbench.sim.workloads import MOONCAKE_SYNTHETIC_TRACE, read_trace  # noqa: E402

pytestmark = pytest.mark.vllm

NUM_REQUESTS = 12_000
MAX_MODEL_LEN = 131_072  # the tiny Llama's positions (the drive's model)
TARGET_S = 10.0  # per policy
TARGET_SPEEDUP = 10.0
REPLICA = ReplicaSpec(num_gpu_blocks=29_206, max_num_seqs=256, max_num_batched_tokens=8192)
POLICIES = ("fcfs/lifo/recompute/oracle", "future-kv/lifo/recompute/history",
            "fcfs/cost-aware/recompute/history")
WALL_S: dict[str, float] = {}
LOGS: dict[str, object] = {}


@pytest.fixture(scope="module")
def mooncake12k(tmp_path_factory):
    rows = [json.loads(line) for line in MOONCAKE_SYNTHETIC_TRACE.read_text().splitlines()]
    span_ms = rows[-1]["timestamp"] + 250
    shift = max(max(r["hash_ids"]) for r in rows) + 1
    lines, i = [], 0
    while len(lines) < NUM_REQUESTS:
        row, copy = rows[i % len(rows)], i // len(rows)
        i += 1
        if row["input_length"] + row["output_length"] > MAX_MODEL_LEN:
            continue  # longer than the drive's model takes (one request of the trace)
        lines.append(json.dumps({**row, "timestamp": row["timestamp"] + copy * span_ms,
                                 "hash_ids": [h + copy * shift for h in row["hash_ids"]]}))
    path = tmp_path_factory.mktemp("trace") / "mooncake12k.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return read_trace(path)


def test_drive_vllm_scheduler_mooncake12k(benchmark, mooncake12k):
    from kvbench.vllm.drive import drive

    benchmark.group = "mooncake 12k"

    def run():
        start = time.perf_counter()
        LOGS["vllm"] = drive(mooncake12k, REPLICA)
        WALL_S["vllm"] = time.perf_counter() - start
        return LOGS["vllm"]

    log = benchmark.pedantic(run, rounds=1, iterations=1)
    benchmark.extra_info.update({"wall_s": WALL_S["vllm"], **log.summary()})


@pytest.mark.parametrize("policy", POLICIES)
def test_simulator_mooncake12k(benchmark, mooncake12k, policy):
    from kvbench.sim.engine import Simulator
    from kvbench.vllm.differential import same_requests, sim_config

    benchmark.group = "mooncake 12k"
    config = sim_config(REPLICA, step_s=0.02).with_policy(policy)
    workload = same_requests(mooncake12k)

    def run():  # the first policy's step log is compared with vLLM's
        start = time.perf_counter()
        LOGS[policy] = Simulator(workload, config, record=policy == POLICIES[0]).run()
        WALL_S[policy] = time.perf_counter() - start
        return LOGS[policy]

    result = benchmark.pedantic(run, rounds=1, iterations=1)
    benchmark.extra_info.update({"wall_s": WALL_S[policy], "steps": result.steps,
                                 "prefix_hit_tokens": int(result.requests.prefix_hit_tokens.sum())})
    if policy == POLICIES[0] and "vllm" in WALL_S:
        from kvbench.sim.steplog import first_difference

        assert first_difference(LOGS["vllm"], result.step_log) is None
        benchmark.extra_info["speedup"] = WALL_S["vllm"] / WALL_S[policy]
        assert benchmark.extra_info["speedup"] >= TARGET_SPEEDUP
    assert WALL_S[policy] <= TARGET_S, f"{policy}: {WALL_S[policy]:.1f} s"

