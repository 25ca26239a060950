"""Sweep specs, plans and resume (`kvbench.sim.sweep`), and `kvbench sweep SPEC [--ray]`
against real Ray instances on this machine (127.0.0.1, 2 CPUs): the same 24 cells give the
same numbers in one process, in two processes and on Ray, and a worker killed mid-sweep loses
no finished cell. About a minute on 2 cores: the 24-cell sweep four times over, two Ray
starts.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
from pathlib import Path

import pytest
from typer.testing import CliRunner

from kvbench import hardware
from kvbench.cli import app
from kvbench.cluster import import_ray
from kvbench.hardware import get_hardware
from kvbench.models import get_model
from kvbench.profile import analytic_profile, save
from kvbench.sim.study import STUDY_POLICIES
from kvbench.sim.sweep import (
    CELLS_DIR,
    SWEEP_CSV,
    SWEEP_JSON,
    SWEEP_PNG,
    SYNTHETIC,
    SweepError,
    SweepInterrupted,
    load_spec,
    plan_sweep,
    policy_means,
    run_sweep,
)
from kvbench.sim.sweep import run as sweep_run

MIX = ("requests=50,rate=10,long-prompt=0.3,long-output=0.3,short-prompt-tokens=128,"
       "long-prompt-tokens=1024,short-output-tokens=32,long-output-tokens=128,max-tokens=256")
SPEC_TOML = f"""\
policies = ["fcfs/lifo/recompute/oracle", "future-kv/cost-aware/selector/history"]
synthetic = ["{MIX}"]
rate_scales = [1.0, 2.0]
num_gpu_blocks = [100, 160, 250]
seeds = [0, 1]
"""
needs_ray = pytest.mark.skipif(importlib.util.find_spec("ray") is None,
                               reason="needs Ray: pip install 'kvbench[ray]'")
runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, list(args))


@pytest.fixture(scope="module")
def spec_path(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("spec") / "sweep.toml"
    path.write_text(SPEC_TOML)
    return path


@pytest.fixture(scope="module")
def reference(spec_path, tmp_path_factory) -> tuple[Path, list[dict]]:
    """The 24 cells in this process (`--jobs 1`), through the command line."""
    out = tmp_path_factory.mktemp("jobs1")
    result = invoke("sweep", str(spec_path), "--out", str(out))
    assert result.exit_code == 0, result.output
    assert "cells: 24 (24 run now, 0 already in" in result.stdout
    assert "future-kv/cost-aware/selector/history" in result.stdout
    assert f"sweep: 24 cells, 0 reused from {out}/cells, 24 to run\n" in result.stderr
    # a table per load level, each policy's mean over its 6 cells (3 cache sizes x 2 seeds)
    assert "mean over cells at rate x1\n" in result.stdout
    assert "mean over cells at rate x2\n" in result.stdout
    document = json.loads((out / SWEEP_JSON).read_text())
    rows = document["rows"]
    assert len(rows) == 24 and sum(r["preemptions"] for r in rows) > 0
    assert document["provenance"]["code_sha256"] == hardware.code_sha256()
    assert document["provenance"]["command"] is not None
    return out, rows


@pytest.fixture(scope="module")
def local_ray():
    ray = import_ray(loopback=True)
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             logging_level="warning")  # a private instance, whatever else runs here
    yield ray
    ray.shutdown()


# ---------------------------------------------------------------------------------------------
# Specs and plans


def test_toml_and_yaml_specs_agree_and_paths_are_relative_to_the_spec(tmp_path):
    (tmp_path / "traces").mkdir()
    (tmp_path / "traces" / "t.csv").write_text("arrival_s,prompt_tokens,output_tokens\n0,5,5\n")
    (tmp_path / "s.toml").write_text('traces = ["traces/t.csv"]\nsynthetic = ["requests=9"]\n'
                                     "rate_scales = [1, 2.5]\nseeds = [3]\n")
    (tmp_path / "s.yaml").write_text("traces: [traces/t.csv]\nsynthetic: ['requests=9']\n"
                                     "rate_scales: [1, 2.5]\nseeds: [3]\n")
    spec = load_spec(tmp_path / "s.toml")
    assert spec == load_spec(tmp_path / "s.yaml")
    assert spec.traces == [tmp_path / "traces" / "t.csv"] and spec.rate_scales == [1.0, 2.5]
    plan = plan_sweep(spec)
    # workloads x rates x sizes x seeds x policies
    assert len(plan.cells) == 2 * 2 * 1 * 1 * len(STUDY_POLICIES)
    assert {c.source for c in plan.cells} == {str(spec.traces[0]), SYNTHETIC + "requests=9"}
    assert plan.cells[0].label() == ("fcfs/lifo/recompute/oracle on t.csv (rate x1, "
                                     "memory-sized cache, seed 3)")


@pytest.mark.parametrize("text, message", [
    ("synthetic = ['requests=9']\nrate_scale = [1]\n", "rate_scale is an axis here"),
    ("synthetic = ['requests=9']\ngpu_blocks = [1]\n", "unknown option 'gpu_blocks'"),
    ("synthetic = ['requests=9']\nrate_scales = [0]\n", "rate_scales.0: Input should be greater"),
    ("synthetic = ['requests=9']\nseeds = [1, 1]\n", "seeds: 1 appears twice"),
    ("synthetic = ['requests=9']\npolicies = ['fcfs/lifo/recompute']\n",
     "policies.0: policy 'fcfs/lifo/recompute': write it as admission/victim/preemption"),
    ("synthetic = ['requests=9']\npolicies = ['fcfs/lifo/recompte/oracle']\n",
     "did you mean 'recompute'?"),
    ("synthetic = ['requests=nine']\n", "synthetic.0: synthetic spec: requests='nine'"),
    ("rate_scales = [1]\n", "give at least one workload"),
    ("synthetic = ['requests=9']\nmodel = 'llama-2-7b'\nprofile = 'p.json'\n",
     "give either --profile or --model, not both"),
    ("synthetic = 'requests=9\n", "not valid TOML"),
])
def test_bad_specs_name_the_field(tmp_path, text, message):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(SweepError) as info:
        load_spec(path)
    assert message in str(info.value) and str(path) in str(info.value)
    result = invoke("sweep", str(path), "--out", str(tmp_path / "o"))
    assert result.exit_code == 2 and result.stderr.count("\n") == 1, result.output
    assert message in result.stderr


def test_sweep_takes_no_workload_flags_and_needs_a_spec(spec_path, tmp_path):
    """A cell's settings come from the spec only; `--ray` without a spec is a usage error."""
    for args, message in (([str(spec_path), "--seed", "0"], "No such option: --seed"),
                          ([str(spec_path), "--model", "llama-3-8b"], "No such option: --model"),
                          (["--ray", "local"], "Missing argument 'SPEC'")):
        result = invoke("sweep", *args, "--out", str(tmp_path))
        assert result.exit_code == 2 and message in result.stderr, result.output
    assert not list(tmp_path.iterdir())


def test_cell_keys_follow_what_the_result_depends_on(spec_path):
    spec = load_spec(spec_path)
    keys = dict(zip(plan_sweep(spec).cells, plan_sweep(spec).keys))
    assert len(set(keys.values())) == 24
    reordered = spec.model_copy(update={"seeds": [1, 0], "rate_scales": [2.0, 1.0]})
    assert dict(zip(plan_sweep(reordered).cells, plan_sweep(reordered).keys)) == keys
    for change in ({"num_requests": 40}, {"model": "llama-3-8b"}, {"swap_space": 1.0}):
        assert not set(plan_sweep(spec.model_copy(update=change)).keys) & set(keys.values())


# ---------------------------------------------------------------------------------------------
# Running, resuming


def test_a_cell_is_kvbench_simulate_with_the_cells_options(reference):
    _, rows = reference
    row = next(r for r in rows if r["policy"] == "future-kv/cost-aware/selector/history"
               and r["rate_scale"] == 2.0 and r["gpu_blocks"] == 160 and r["seed"] == 1)
    result = invoke("simulate", "--synthetic", MIX, "--rate-scale", "2", "--num-gpu-blocks", "160",
                    "--seed", "1", "--admission", "future-kv", "--victim", "cost-aware",
                    "--preemption", "selector", "--predictor", "history", "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert {k: row[k] for k in summary} == summary


def test_a_profile_spec_prices_cells_with_the_profile(tmp_path):
    profile = tmp_path / "profile.json"
    save(analytic_profile(get_model("llama-3-8b"), get_hardware("a100-80gb"), block_size=32),
         profile)
    (tmp_path / "s.toml").write_text(f'synthetic = ["{MIX}"]\npolicies = '
                                     '["fcfs/lifo/selector/oracle"]\nnum_gpu_blocks = [60]\n'
                                     'profile = "profile.json"\n')
    [row] = run_sweep(load_spec(tmp_path / "s.toml"), tmp_path / "out").rows
    result = invoke("simulate", "--synthetic", MIX, "--num-gpu-blocks", "60", "--preemption",
                    "selector", "--profile", str(profile), "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert {k: row[k] for k in summary} == summary
    assert summary["model"] == "llama-3-8b" and summary["kv_block_bytes"] == 32 * get_model(
        "llama-3-8b").kv_bytes_per_token


def test_resume_runs_only_the_missing_cells_and_two_processes_agree(reference, spec_path,
                                                                    tmp_path):
    out, rows = reference
    shutil.copytree(out, tmp_path, dirs_exist_ok=True)
    cells = sorted((tmp_path / CELLS_DIR).glob("*.json"))
    for path in cells[:5]:
        path.unlink()
    cells[5].write_text('{"cell": ')  # a torn file from some other writer: run it again
    outcome = run_sweep(load_spec(spec_path), tmp_path, jobs=2)
    assert (outcome.ran, outcome.skipped, outcome.failures) == (6, 18, [])
    assert outcome.rows == rows
    assert json.loads((tmp_path / SWEEP_JSON).read_text())["rows"] == rows
    assert (tmp_path / SWEEP_CSV).read_text() == (out / SWEEP_CSV).read_text()
    assert (tmp_path / SWEEP_PNG).stat().st_size > 0


def test_per_load_level_means():
    rows = [{"policy": p, "rate_scale": r, "preemptions": n, "recompute_fraction": 0.0,
             "throughput_tokens_per_s": 1.0, "ttft_p99_s": n / 10, "e2e_p99_s": None}
            for p, r, n in (("b", 2.0, 10), ("a", 2.0, 4), ("b", 1.0, 2), ("b", 1.0, 4))]
    means = policy_means(rows)
    assert [(m["rate_scale"], m["policy"], m["cells"], m["preemptions"]) for m in means] == [
        (1.0, "b", 2, 3.0), (2.0, "b", 1, 10.0), (2.0, "a", 1, 4.0)]
    assert means[0]["e2e_p99_s"] is None


TRACE = "arrival_s,prompt_tokens,output_tokens\n" + "".join(
    f"{i * 0.05:.2f},{100 + 37 * i % 400},{20 + 13 * i % 120}\n" for i in range(40))


def test_resume_keys_on_content_not_on_the_trace_path(tmp_path, monkeypatch):
    """Issue 21, item 6: the same spec from another folder, or naming its trace by an absolute
    path, reuses every cell; other code runs them again."""
    (tmp_path / "spec" / "traces").mkdir(parents=True)
    (tmp_path / "spec" / "traces" / "t.csv").write_text(TRACE)
    settings = ('policies = ["fcfs/lifo/recompute/oracle"]\nrate_scales = [1, 2]\n'
                'num_gpu_blocks = [40]\n')
    (tmp_path / "spec" / "s.toml").write_text('traces = ["traces/t.csv"]\n' + settings)
    (tmp_path / "abs.toml").write_text(f'traces = ["{tmp_path}/spec/traces/t.csv"]\n' + settings)
    out = tmp_path / "out"
    lines: list[str] = []
    monkeypatch.chdir(tmp_path)
    first = run_sweep(load_spec("spec/s.toml"), out, log=lines.append)
    assert (first.ran, first.skipped) == (2, 0)
    files = sorted((out / CELLS_DIR).iterdir())
    cell = json.loads(files[0].read_text())
    assert cell["cell"]["code_sha256"] == hardware.code_sha256()
    assert cell["cell"]["source_sha256"] and "commit" in cell
    monkeypatch.chdir(tmp_path / "spec")
    for spec in ("s.toml", tmp_path / "abs.toml"):
        again = run_sweep(load_spec(spec), out, log=lines.append)
        assert (again.ran, again.skipped) == (0, 2)
        # the same results; each row names the trace as this spec does
        assert [{**r, "source": None} for r in again.rows] == [{**r, "source": None}
                                                              for r in first.rows]
        assert sorted((out / CELLS_DIR).iterdir()) == files
    assert lines == [f"sweep: 2 cells, {n} reused from {out}/cells, {2 - n} to run"
                     for n in (0, 2, 2)]
    monkeypatch.setattr(hardware, "code_sha256", lambda: "0" * 64)
    changed = run_sweep(load_spec("s.toml"), out)
    assert (changed.ran, changed.skipped) == (2, 0)
    assert len(list((out / CELLS_DIR).iterdir())) == 4


def test_a_bundled_trace_by_name_in_a_spec(tmp_path):
    (tmp_path / "s.toml").write_text('traces = ["azure-conv-2023"]\nnum_requests = 30\n'
                                     'policies = ["fcfs/lifo/recompute/oracle"]\n')
    spec = load_spec(tmp_path / "s.toml")
    assert spec.traces == [Path("azure-conv-2023")]
    [row] = run_sweep(spec, tmp_path / "out").rows
    assert row["source"] == "azure-conv-2023" and row["requests"] == 30
    (tmp_path / "bad.toml").write_text('traces = ["azure-conv-2099"]\n')
    with pytest.raises(SweepError, match="nor a bundled trace's name \\(azure-conv-2023"):
        plan_sweep(load_spec(tmp_path / "bad.toml"))


def test_an_interrupted_sweep_keeps_its_cells_and_says_so(spec_path, tmp_path, monkeypatch):
    """Issue 21, item 5: Ctrl-C after 3 cells writes the outputs of those 3, says how to resume
    on one line and exits 130; the same command then runs the other 21."""
    real, calls = sweep_run.run_cell, []

    def run_cell(*args):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(sweep_run, "run_cell", run_cell)
    with pytest.raises(SweepInterrupted) as info:
        run_sweep(load_spec(spec_path), tmp_path / "lib")
    assert (info.value.kept, info.value.total) == (3, 24)
    assert isinstance(info.value, KeyboardInterrupt)
    assert len(json.loads((tmp_path / "lib" / SWEEP_JSON).read_text())["rows"]) == 3

    calls.clear()
    result = invoke("sweep", str(spec_path), "--out", str(tmp_path))
    assert result.exit_code == 130, result.output
    assert result.stderr.splitlines()[-1] == (
        f"sweep interrupted: 3 of 24 cells kept in {tmp_path}/cells; run the same command "
        "again to resume")
    assert "Traceback" not in result.output and "error" not in result.stderr
    assert len(list((tmp_path / CELLS_DIR).iterdir())) == 3
    assert len(json.loads((tmp_path / SWEEP_JSON).read_text())["rows"]) == 3
    monkeypatch.setattr(sweep_run, "run_cell", real)
    outcome = run_sweep(load_spec(spec_path), tmp_path)
    assert (outcome.ran, outcome.skipped) == (21, 3)


# ---------------------------------------------------------------------------------------------
# On Ray


@needs_ray
def test_ray_sweep_gives_the_numbers_of_one_process(reference, spec_path, tmp_path):
    """`--ray local` starts (and stops) its own Ray instance, on 127.0.0.1."""
    result = invoke("sweep", str(spec_path), "--ray", "local", "--out",
                    str(tmp_path), "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert (report["ran"], report["skipped"], report["failures"]) == (24, 0, [])
    assert json.loads((tmp_path / SWEEP_JSON).read_text())["rows"] == reference[1]
    workers = {json.loads(p.read_text())["worker"] for p in (tmp_path / CELLS_DIR).iterdir()}
    assert all(int(w.rsplit(":", 1)[1]) != os.getpid() for w in workers)


@needs_ray
def test_an_address_where_no_head_listens_is_one_line(spec_path, tmp_path):
    for address, message in (("127.0.0.1:1", "no Ray head node answers at 127.0.0.1:1"),
                             ("head-node", "Ray address 'head-node': use local, auto or")):
        result = invoke("sweep", str(spec_path), "--ray", address,
                        "--out", str(tmp_path))
        assert result.exit_code == 2 and message in result.stderr, result.output


def _kill_running_cells() -> list[int]:
    """SIGKILL the Ray workers of this process's Ray instance that are running a cell (Ray
    titles a busy worker `ray::<task>`; workers are children of the raylet, a child of ours)."""
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
                parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
    killed = []
    for pid, parent in parents.items():
        try:
            title = (Path("/proc") / str(pid) / "cmdline").read_bytes()
        except OSError:
            continue
        if title.startswith(b"ray::run_cell") and parents.get(parent) == os.getpid():
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)
    return killed


@needs_ray
def test_a_killed_worker_loses_no_finished_cell_and_resume_completes(reference, spec_path,
                                                                      local_ray, tmp_path):
    spec = load_spec(spec_path)
    finished_before_kill: list[str] = []
    killed: list[int] = []

    def on_cell(done, total, cell, error):
        if not killed and done >= 3:
            finished_before_kill.extend(p.name for p in (tmp_path / CELLS_DIR).iterdir())
            killed.extend(_kill_running_cells())

    first = run_sweep(spec, tmp_path, ray_address="local", retries=0, on_cell=on_cell)
    assert killed, "no Ray worker was running a cell"
    assert 1 <= len(first.failures) <= len(killed)
    assert all("worker died" in f["error"] or "Worker" in f["error"] for f in first.failures)
    on_disk = {p.name for p in (tmp_path / CELLS_DIR).iterdir()}
    assert set(finished_before_kill) <= on_disk
    assert len(on_disk) == 24 - len(first.failures) == len(first.rows)
    assert all(row in reference[1] for row in first.rows)
    assert json.loads((tmp_path / SWEEP_JSON).read_text())["failures"] == first.failures

    second = run_sweep(spec, tmp_path, ray_address="local")
    assert (second.ran, second.skipped, second.failures) == (len(first.failures),
                                                             24 - len(first.failures), [])
    assert second.rows == reference[1]
