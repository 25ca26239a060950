"""`kvbench calibrate` (kvbench.calibration.pipeline): the pipeline end to end on `tiny`, the
files it writes, the summary it prints, and the command's errors."""

import json
import re
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from kvbench.calibration import pipeline
from kvbench.calibration.pipeline import (
    calibrate,
    calibration_model,
    calibration_summary,
    default_profile_path,
    samples_path,
)
from kvbench.calibration.plans import PLANS, CalibrationPlan, TokenSweep
from kvbench.cli import app
from kvbench.hardware import device_slug
from kvbench.profile import load, save
from kvbench.selector import select_preemption_strategy

ROOT = Path(__file__).resolve().parents[2]
TINY_PLAN = CalibrationPlan(swap_tokens=TokenSweep(16, 2048, 6),
                            prefill_tokens=TokenSweep(16, 512, 6), decode_batch_sizes=(1, 4, 8),
                            decode_contexts=(32, 128), per_block_max_tokens=None,
                            swap_interleave_s=0.2, prefill_interleave_s=0.2)
runner = CliRunner()


@pytest.fixture(scope="module")
def tiny_run():
    return calibrate(calibration_model("cpu", "tiny"), "cpu", block_size=8, quick=True,
                     plan=TINY_PLAN)


def test_pipeline_builds_a_measured_profile(tiny_run, tmp_path):
    prof = tiny_run.profile
    assert prof.source == "measured" and prof.environment["device"] == "cpu"
    assert prof.swap.impl in ("torch", "per_block") and prof.swap.block_size == 8
    sizes = TINY_PLAN.swap_tokens.sizes()
    samples = tiny_run.samples
    for phase in ("swap_out", "swap_in"):  # each direction fitted to its own timings
        section = getattr(prof, phase)
        assert section.measurements.num_tokens == sizes
        assert section.measurements.latency_ms == samples[phase][prof.swap.impl]["median_ms"]
        assert section.ms_per_token == 0  # whole blocks are copied: the fit prices blocks
        assert section.fit.max_tokens == 2048
    assert prof.swap_out.measurements != prof.swap_in.measurements
    assert all(x > 0 for x in prof.recompute.measurements.latency_ms)
    assert set(prof.extra["swap_impls"]) == {"torch", "per_block"}
    assert prof.extra["ceiling_gbps"]["out"] > 0
    assert prof.recompute.fit.max_tokens == 512
    assert prof.extra["quality"]["fits"] == ["swap_out", "swap_in", "recompute"]
    for fit in prof.fits().values():
        assert fit.r2 is not None and fit.heldout_mape is not None
    # the recompute measurement is L layers (each with its attention) plus the LM head
    assert prof.recompute.measurements.latency_ms[-1] > prof.extra["attention"]["latency_ms"][-1]
    path = save(prof, tmp_path / "p.json")
    again = load(path)
    assert again == prof
    result = select_preemption_strategy([0, 10, 100], again)
    assert result["swap_costs_ms"][1] == round(float(prof.cost_model().swap_ms(10)), 4)


def test_run_writes_profile_samples_and_plot(tiny_run, tmp_path):
    paths = tiny_run.write(tmp_path / "sub" / "p.json")
    digest = tiny_run.profile.extra["samples_sha256"]
    assert [p.name for p in paths] == ["p.json", f"p.{digest[:16]}.samples.json", "p.png"]
    assert load(paths[0]) == tiny_run.profile
    assert json.loads(paths[1].read_text()) == json.loads(json.dumps(tiny_run.samples))
    assert paths[2].read_bytes()[:4] == b"\x89PNG"
    assert sorted(p.name for p in paths[0].parent.iterdir()) == sorted(p.name for p in paths)


def test_summary_of_the_committed_profile_is_the_output_in_readme():
    """README shows `make calibrate`'s output for the committed CPU profile of `make
    calibrate`'s CPU model, rendered from it by `kvbench report`: the summary lines are in
    README as they are."""
    [path] = [p.relative_to(ROOT) for p in (ROOT / "results/profiles").glob("cpu-*.json")
              if p.stem.endswith(calibration_model("cpu").name.replace(".", "-"))]
    profile = load(ROOT / path)
    lines = calibration_summary(profile, [path, samples_path(path, profile),
                                          path.with_suffix(".png")])
    assert "\n".join(lines) in (ROOT / "README.md").read_text()
    assert lines[2].startswith("dtype: ") and any(line.startswith("time: ") for line in lines)


def test_summary_notes_sweeps_cut_short(tiny_run):
    extra = {**tiny_run.profile.extra, "stopped": {"swap": "out of memory at 2048 tokens"}}
    prof = tiny_run.profile.model_copy(update={"extra": extra, "decode": None})
    lines = calibration_summary(prof, [Path("a.json"), Path("a.samples.json"), Path("a.png")])
    assert lines[-1] == "note: sweep ended early: out of memory at 2048 tokens"
    assert not any(line.startswith("decode_step_ms") for line in lines)


def test_calibration_model_and_default_path(tmp_path):
    assert calibration_model("cpu").name == "qwen2.5-0.5b"
    assert calibration_model("cuda").name == "llama-3-8b"
    assert calibration_model("cpu", "tiny", dtype="fp16").dtype == "float16"
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"_name_or_path": "org/My Model", "num_hidden_layers": 2,
                                  "hidden_size": 64, "num_attention_heads": 4,
                                  "intermediate_size": 128, "vocab_size": 256}))
    spec = calibration_model("cpu", config_json=config)
    assert spec.name == "org/My Model" and spec.head_dim == 16
    with pytest.raises(ValueError, match="either --model or --config-json"):
        calibration_model("cpu", "tiny", config)
    path = default_profile_path("cpu", spec)
    assert path == Path("results/profiles") / f"{device_slug('cpu')}-org-my-model.json"
    assert re.fullmatch(r"[a-z0-9-]+\.json", path.name)


def test_cli_calibrate_writes_profile_samples_and_plot(tmp_path, monkeypatch):
    monkeypatch.setitem(PLANS, ("cpu", True), TINY_PLAN)
    out = tmp_path / "prof.json"
    res = runner.invoke(app, ["calibrate", "--device", "cpu", "--model", "tiny", "--quick",
                              "--out", str(out), "--force"])
    assert res.exit_code == 0, res.output
    assert "crossover_tokens" in res.stdout and "R²" in res.stdout
    assert load(out).model.name == "tiny"
    samples = samples_path(out, load(out))
    assert json.loads(samples.read_text())["swap_out"]
    assert out.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"
    assert res.stdout.splitlines() == calibration_summary(
        load(out), [out, samples, out.with_suffix(".png")])
    res = runner.invoke(app, ["select", "100", "--profile", str(out), "--model", "llama-3-8b"])
    assert res.exit_code == 2 and "profile is for model 'tiny'" in res.stderr
    res = runner.invoke(app, ["select", "100", "--profile", str(out), "--model", "llama-3-8b",
                              "--force", "--json"])
    assert res.exit_code == 0 and json.loads(res.stdout)["strategies"]


def test_cli_calibrate_interrupted_leaves_old_profile(tmp_path, monkeypatch):
    out = tmp_path / "prof.json"
    out.write_text("earlier profile")

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "calibrate", interrupted)
    res = runner.invoke(app, ["calibrate", "--device", "cpu", "--out", str(out)])
    assert res.exit_code == 130 and "nothing written" in res.stderr
    assert out.read_text() == "earlier profile"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prof.json"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_cli_calibrate_cuda_without_gpu_is_one_line_error():
    res = runner.invoke(app, ["calibrate", "--device", "cuda"])
    assert res.exit_code == 2
    assert res.stderr.strip().count("\n") == 0 and "no CUDA GPU" in res.stderr


def test_cli_calibrate_model_and_config_json_is_one_line_error(tmp_path):
    res = runner.invoke(app, ["calibrate", "--device", "cpu", "--model", "tiny",
                              "--config-json", str(tmp_path / "config.json")])
    assert res.exit_code == 2 and res.stdout == ""
    assert res.stderr == "error: give either --model or --config-json, not both\n"
