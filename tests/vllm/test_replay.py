"""`kvbench replay` through typer's CliRunner: a tiny CSV trace through real CPU engines (marker
`vllm`), and the user mistakes it refuses before starting any engine."""

from __future__ import annotations

import json
import shlex
import sys

import numpy as np
import pytest
from typer.testing import CliRunner

from kvbench.cli import app

pytestmark = pytest.mark.vllm
runner = CliRunner()
POLICY = "future-kv/lifo/recompute/oracle"


def write_trace(path, num_requests: int = 6, seed: int = 5):
    """A plain CSV: requests 50 ms apart, short enough that one engine replays it in seconds."""
    rng = np.random.default_rng(seed)
    rows = ["arrival_s,prompt_tokens,output_tokens"]
    rows += [f"{0.05 * i:.2f},{p},{o}" for i, (p, o) in enumerate(zip(
        rng.integers(8, 40, num_requests), rng.integers(8, 24, num_requests)))]
    path.write_text("\n".join(rows) + "\n")
    return path


def invoke(*args):
    return runner.invoke(app, ["replay", *map(str, args)])


def test_replay_runs_vllm_and_a_policy_and_sets_the_simulator_beside(tmp_path, monkeypatch):
    pytest.importorskip("vllm")
    trace = write_trace(tmp_path / "trace.csv")
    out = tmp_path / "out"
    args = ["--trace", trace, "--num-gpu-blocks", 4, "--policies", POLICY, "--out", out]
    monkeypatch.setattr(sys, "argv", ["kvbench", "replay", *map(str, args)])
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    for title in ("replayed in vLLM", "simulated", "replay vs simulator"):
        assert title in result.stdout
    document = json.loads((out / "replay.json").read_text())
    assert [row["policy"] for row in document["replayed"]] == ["vllm", POLICY]
    assert [row["policy"] for row in document["simulated"]] == ["vllm", POLICY]
    for row in document["replayed"]:
        assert row["completed"] == row["requests"] == 6
        assert row["ttft_p50_s"] > 0 and row["tpot_p50_ms"] > 0
    records = document["replayed"][1]["records"]
    assert len((out / "records" / "future-kv-lifo-recompute-oracle.jsonl").read_text()
               .splitlines()) == 6
    assert records.endswith("future-kv-lifo-recompute-oracle.jsonl")
    assert document["replayed"][1]["records_summary"]["requests"] == 6
    assert document["step_time"].startswith("linear:")
    markdown = (out / "replay.md").read_text()
    assert shlex.join(["kvbench", "replay", *map(str, args)]) in markdown
    assert markdown.count("| vllm |") == 3  # replayed, simulated, and the gap


@pytest.mark.parametrize("args, message", [
    (["--num-gpu-blocks", 2], "request 0:"),
    (["--num-gpu-blocks", 8, "--policies", "fcfs/lifo/swap/oracle"], "can only recompute"),
    (["--num-gpu-blocks", 8, "--policies", "fcfs/lfc/recompute/oracle"], "did you mean 'lcf'"),
])
def test_replay_refuses_mistakes_before_starting_an_engine(tmp_path, args, message):
    pytest.importorskip("vllm")
    result = invoke("--trace", write_trace(tmp_path / "trace.csv"), *args, "--out", tmp_path)
    assert result.exit_code == 2
    assert message in result.output and result.output.count("\n") == 1
    assert not (tmp_path / "replay.json").exists()


def test_replay_takes_a_synthetic_mix_instead_of_the_default_trace(tmp_path):
    pytest.importorskip("vllm")
    result = invoke("--synthetic", "multi-turn:sessions=2,turns=2,system-prompt-tokens=100",
                    "--num-gpu-blocks", 2, "--out", tmp_path)
    assert result.exit_code == 2
    assert "request 0:" in result.output and result.output.count("\n") == 1


def test_replay_refuses_kvbench_options_in_the_environment(tmp_path, monkeypatch):
    pytest.importorskip("vllm")
    monkeypatch.setenv("KVBENCH_VICTIM", "lcf")
    result = invoke("--trace", write_trace(tmp_path / "trace.csv"), "--num-gpu-blocks", 8,
                    "--out", tmp_path)
    assert result.exit_code == 2 and "unset KVBENCH_VICTIM" in result.output
