"""`kvbench simulate`, `kvbench compare-policies` (and `kvbench sweep`'s --out) through typer's
CliRunner."""

from __future__ import annotations

import json
from datetime import datetime, timedelta

import pytest
from typer.testing import CliRunner

import kvbench
from kvbench.cli import app
from kvbench.hardware import code_sha256, device_slug, get_hardware
from kvbench.models import get_model
from kvbench.profile import analytic_profile, save
from kvbench.sim.config import SimConfig
from kvbench.sim.study import STUDY_POLICIES, comparison_rows
from kvbench.sim.workloads import AZURE_CONV_TRACE

runner = CliRunner()
SPEC = "requests=120,rate=30,long-prompt=0.3,long-output=0.3"
SUMMARY_KEYS = {"preemptions", "preempted_requests", "completed", "max_kv_blocks_used",
                "gpu_blocks", "throughput_tokens_per_s", "recompute_fraction",
                "gpu_utilization", "useful_utilization", "ttft_p50_s", "ttft_p90_s",
                "ttft_p99_s", "tpot_p50_ms", "tpot_div_n_p50_ms", "e2e_p99_s", "wasted_flops",
                "recompute_tokens", "swapped_bytes"}


def invoke(*args: str):
    return runner.invoke(app, list(args))


def assert_provenance(entry: dict) -> None:
    """A result file's `provenance` (`kvbench.hardware.provenance`)."""
    assert entry["kvbench"] == kvbench.__version__ and entry["machine"] == device_slug("cpu")
    assert len(entry["code_sha256"]) == 64 and entry["code_sha256"] == code_sha256()
    assert datetime.fromisoformat(entry["date"]).utcoffset() == timedelta(0)
    assert set(entry) >= {"commit", "command", "python"}


def test_simulate_json_has_the_summary_keys():
    result = invoke("simulate", "--synthetic", SPEC, "--num-gpu-blocks", "300", "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert SUMMARY_KEYS <= set(summary)
    assert summary["completed"] == 120 and summary["gpu_blocks"] == 300
    assert summary["policy"] == "fcfs/lifo/recompute/oracle"
    assert summary["preemptions"] > 0


def test_simulate_same_seed_same_output():
    args = ("simulate", "--synthetic", SPEC, "--num-gpu-blocks", "300", "--predictor", "noisy",
            "--admission", "future-kv", "--seed", "3", "--json")
    assert invoke(*args).stdout == invoke(*args).stdout


def test_simulate_trace_with_policies_and_out_dir(tmp_path):
    trace = tmp_path / "trace.csv"
    trace.write_text("arrival_s,prompt_tokens,output_tokens\n"
                     + "".join(f"{i * 0.01},{100 + 37 * i % 500},{20 + 13 * i % 150}\n"
                               for i in range(80)))
    out = tmp_path / "run"
    result = invoke("simulate", "--trace", str(trace), "--admission", "future-kv", "--victim",
                    "cost-aware", "--preemption", "selector", "--predictor", "history",
                    "--num-gpu-blocks", "120", "--rate-scale", "2", "--model", "llama-3-8b",
                    "--out", str(out))
    assert result.exit_code == 0, result.output
    assert "policy: future-kv/cost-aware/selector/history" in result.stdout
    assert "completed: 80 (0 rejected, 0 unfinished)" in result.stdout
    assert "max_kv_blocks_used:" in result.stdout
    for name in ("summary.json", "summary.csv", "requests.csv", "timeline.csv", "run.png"):
        assert (out / name).stat().st_size > 0, name
    document = json.loads((out / "summary.json").read_text())
    assert document["summary"]["model"] == "llama-3-8b"
    assert_provenance(document["provenance"])
    rows = (out / "requests.csv").read_text().splitlines()
    assert len(rows) == 81 and rows[0].startswith("request_id,status,arrival_s")


def test_simulate_with_a_profile_file(tmp_path):
    path = save(analytic_profile(get_model("qwen2.5-7b"), get_hardware("l4")),
                tmp_path / "profile.json")
    result = invoke("simulate", "--synthetic", SPEC, "--profile", str(path), "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["model"] == "qwen2.5-7b" and summary["completed"] == 120
    both = invoke("simulate", "--synthetic", SPEC, "--profile", str(path), "--model", "tiny")
    assert both.exit_code == 2 and "not both" in both.output


def test_sim_commands_use_the_profile_block_size(tmp_path):
    """The swap model prices the profile's blocks: the simulated cache uses the same size."""
    model = get_model("llama-2-7b")
    path = save(analytic_profile(model, get_hardware("h100-sxm"), block_size=32),
                tmp_path / "profile.json")
    args = ("--synthetic", SPEC, "--profile", str(path), "--num-gpu-blocks", "150", "--json")
    result = invoke("simulate", *args)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["kv_block_bytes"] == 32 * model.kv_bytes_per_token
    result = invoke("compare-policies", *args, "--policies", "fcfs/lifo/swap/oracle", "--out",
                    str(tmp_path))
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "compare.json").read_text())["config"]["replica"][
        "block_size"] == 32


@pytest.mark.parametrize("args, message", [
    (("--synthetic", SPEC, "--admission", "fifo"), "unknown admission policy 'fifo'"),
    (("--synthetic", "requests=ten"), "requests='ten' is not a valid int"),
    (("--trace", "/no/such/trace.csv"), "cannot read trace"),
    (("--synthetic", SPEC, "--trace", "x.csv"), "exactly one"),
    ((), "exactly one"),
    (("--synthetic", SPEC, "--model", "gpt-9"), "unknown model 'gpt-9'"),
    (("--synthetic", SPEC, "--rate-scale", "0"), "rate scale must be positive"),
    (("--synthetic", SPEC, "--seed", "-1"), "seed must be an integer from 0"),
])
def test_simulate_user_errors_are_one_line(args, message):
    result = invoke("simulate", *args)
    assert result.exit_code == 2
    assert message in result.output
    assert "Traceback" not in result.output


def test_simulate_reports_rejections():
    result = invoke("simulate", "--synthetic", "requests=20,long-prompt=1,long-prompt-tokens=4000",
                    "--num-gpu-blocks", "200")
    assert result.exit_code == 0, result.output
    assert "rejected: request" in result.stdout and "the cache has 199" in result.stdout


def test_compare_policies_table_json_and_files(tmp_path):
    policies = "fcfs/lifo/recompute/oracle,future-kv/lifo/recompute/oracle"
    result = invoke("compare-policies", "--synthetic", SPEC, "--num-gpu-blocks", "300",
                    "--policies", policies, "--out", str(tmp_path), "--json")
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert [r["policy"] for r in rows] == policies.split(",")
    assert rows[0]["preemptions_removed_pct"] == 0 and rows[0]["throughput_change_pct"] == 0
    assert rows[1]["preemptions"] < rows[0]["preemptions"]
    for name in ("compare.json", "compare.csv", "compare.png"):
        assert (tmp_path / name).stat().st_size > 0
    assert_provenance(json.loads((tmp_path / "compare.json").read_text())["provenance"])
    table = invoke("compare-policies", "--synthetic", SPEC, "--num-gpu-blocks", "300",
                   "--policies", policies, "--out", str(tmp_path), "--jobs", "2")
    assert table.exit_code == 0, table.output
    assert "future-kv/lifo/recompute/oracle" in table.stdout and "compare.png" in table.stdout


@pytest.mark.parametrize("args, message", [
    (("--policies", "fcfs/lifo"), "admission/victim/preemption/predictor"),
    (("--policies", ","), "no policy to compare"),
    (("--rate-scale", "0"), "rate scale must be positive"),
])
def test_compare_policies_user_errors_are_one_line(tmp_path, args, message):
    result = invoke("compare-policies", "--synthetic", SPEC, *args, "--out", str(tmp_path))
    assert result.exit_code == 2 and message in result.output
    assert "Traceback" not in result.output and not list(tmp_path.iterdir())


def test_study_helpers():
    assert len(STUDY_POLICIES) == len(set(STUDY_POLICIES))
    for policy in STUDY_POLICIES:
        assert SimConfig().with_policy(policy).policy_name == policy
    rows = comparison_rows([
        {"policy": "a", "preemptions": 200, "preempted_requests": 150, "recompute_fraction": 0.1,
         "throughput_tokens_per_s": 100.0, "useful_utilization": 0.9, "ttft_p50_s": 1.0,
         "ttft_p99_s": 2.0, "tpot_p50_ms": 3.0, "e2e_p99_s": 4.0},
        {"policy": "b", "preemptions": 10, "preempted_requests": 10, "recompute_fraction": 0.002,
         "throughput_tokens_per_s": 97.0, "useful_utilization": 0.95, "ttft_p50_s": 1.0,
         "ttft_p99_s": 2.0, "tpot_p50_ms": 3.0, "e2e_p99_s": 4.0},
    ])
    assert rows[1]["preemptions_removed_pct"] == pytest.approx(95.0)
    assert rows[1]["throughput_change_pct"] == pytest.approx(-3.0)
    assert rows[1]["recompute_fraction_pct"] == pytest.approx(0.2)


@pytest.mark.skipif(not AZURE_CONV_TRACE.exists(), reason=f"{AZURE_CONV_TRACE} not present")
def test_compare_policies_defaults_to_the_azure_trace(tmp_path):
    result = invoke("compare-policies", "--num-requests", "300", "--policies",
                    "fcfs/lifo/recompute/oracle", "--out", str(tmp_path), "--json")
    assert result.exit_code == 0, result.output
    document = json.loads((tmp_path / "compare.json").read_text())
    assert document["workload"]["name"] == "azure_llm_2023_conv.csv, rate x2"
    assert document["workload"]["num_requests"] == 300


@pytest.mark.parametrize("command", [
    ("simulate", "--synthetic", SPEC),
    ("compare-policies", "--synthetic", SPEC),
    ("sweep", "sweep.toml"),
])
def test_out_on_a_file_is_one_line(tmp_path, command):
    """Issue 21, item 8: `--out FILE` printed a raw `[Errno 17] File exists`, after the run."""
    path = tmp_path / "taken"
    path.write_text("not a folder\n")
    result = invoke(*command, "--out", str(path))
    assert result.exit_code == 2, result.output
    assert result.stderr == f"error: --out {path} is a file; give a folder\n"
    result = invoke(*command, "--out", str(path / "below"))
    assert result.stderr == (f"error: --out {path / 'below'}: {path} is a file; give a "
                             "folder\n")
    assert path.read_text() == "not a folder\n"
