"""Issue 13, defects 5 and 6: `kvbench calibrate` checks its inputs and output path before it
measures, and writes the profile and its samples as a unit (kvbench.calibration.pipeline)."""

from __future__ import annotations

import hashlib
import json
import os
import time

import pytest

from kvbench.calibration import pipeline
from kvbench.calibration.pipeline import CalibrationRun, calibrate, samples_path
from kvbench.calibration.plans import PLANS, CalibrationPlan, TokenSweep
from kvbench.models import get_model
from kvbench.profile import load

TINY_PLAN = CalibrationPlan(swap_tokens=TokenSweep(16, 2048, 6),
                            prefill_tokens=TokenSweep(16, 512, 6), decode_batch_sizes=(1, 4, 8),
                            decode_contexts=(32, 128), per_block_max_tokens=None,
                            swap_interleave_s=0.2, prefill_interleave_s=0.2)


@pytest.fixture(scope="module")
def tiny_run():
    return calibrate(get_model("tiny"), "cpu", block_size=8, quick=True, plan=TINY_PLAN)


@pytest.fixture
def no_sweeps(monkeypatch):
    """Fail any test that gets as far as measuring."""
    def never(*args, **kwargs):
        raise AssertionError("a sweep started")

    for name in ("swap_sweep", "prefill_sweep", "decode_sweep"):
        monkeypatch.setattr(pipeline, name, never)


def other_run(run: CalibrationRun, marker: str) -> CalibrationRun:
    """The same run with different raw samples (and the profile naming them)."""
    samples = json.dumps({**run.samples, "marker": marker})
    extra = {**run.profile.extra, "samples_sha256": hashlib.sha256(samples.encode()).hexdigest()}
    return CalibrationRun(run.profile.model_copy(update={"extra": extra}), samples)


def one_error(run_cli, *args: str) -> str:
    code, out, err = run_cli(*args)
    assert code == 2 and out == "" and err.count("\n") == 1 and err.startswith("error: "), err
    return err.strip()


@pytest.mark.parametrize("out", ["folder", "/proc/kvbench-x.json", "file/p.json"])
def test_bad_output_path_is_refused_before_measuring(tmp_path, run_cli, no_sweeps, out):
    """Defect 5: a bad --out (a folder, /proc/x.json, below a file) was reported only after
    minutes of measuring, naming a temp file, and left an orphan .samples.json."""
    (tmp_path / "folder").mkdir()
    (tmp_path / "file").write_text("a file")
    target = out if out.startswith("/") else str(tmp_path / out)
    line = one_error(run_cli, "calibrate", "--device", "cpu", "--model", "tiny", "--out",
                     target)
    assert line.startswith(f"error: cannot write {target}")
    if out == "file/p.json":
        assert line.endswith(f"{tmp_path / 'file'} is a file, not a folder")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "folder"]
    assert not list((tmp_path / "folder").iterdir())


def test_model_field_failing_the_schema_is_refused_before_measuring(tmp_path, run_cli,
                                                                     no_sweeps):
    """Defect 5: a config.json whose name is not a string failed the profile schema only when
    the profile was built, after measuring."""
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"_name_or_path": ["a", "b"], "num_hidden_layers": 2,
                                  "hidden_size": 64, "num_attention_heads": 4,
                                  "intermediate_size": 128, "vocab_size": 256}))
    line = one_error(run_cli, "calibrate", "--device", "cpu", "--config-json", str(config),
                     "--out", str(tmp_path / "p.json"))
    assert "name must be a string" in line


def test_check_inputs_refuses_a_dtype_it_cannot_time(tmp_path):
    with pytest.raises(ValueError, match="dtype fp8 cannot be timed"):
        pipeline.check_inputs(get_model("tiny", dtype="fp8"), tmp_path / "p.json")


def test_profile_names_its_own_samples_and_old_ones_go(tiny_run, tmp_path):
    """Defect 6: the profile and its samples were two files written one after the other; now
    the samples file is named by its content hash, which the profile records."""
    path = tmp_path / "p.json"
    first = tiny_run.write(path)
    second = other_run(tiny_run, "second").write(path)
    assert first[1] != second[1] and not first[1].exists()
    profile = load(path)
    assert samples_path(path, profile) == second[1]
    text = second[1].read_text()
    assert hashlib.sha256(text.encode()).hexdigest() == profile.extra["samples_sha256"]
    assert json.loads(text)["marker"] == "second"


def test_interrupted_write_keeps_a_matching_pair(tiny_run, tmp_path, monkeypatch):
    """Defect 6: Ctrl-C in the write window left new samples beside the old profile. Now the
    old profile keeps naming its own samples, and the next write removes the orphan."""
    path = tmp_path / "p.json"
    tiny_run.write(path)
    before = path.read_text()

    def interrupted(profile, target):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "save", interrupted)
    late = other_run(tiny_run, "interrupted")
    with pytest.raises(KeyboardInterrupt):
        late.write(path)
    monkeypatch.undo()
    assert path.read_text() == before
    assert samples_path(path, load(path)).exists()
    orphan = samples_path(path, late.profile)
    assert orphan.exists()
    paths = other_run(tiny_run, "third").write(path)
    assert not orphan.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in paths)


def test_stale_temp_files_are_cleaned(tiny_run, tmp_path):
    """Defect 6: kill -9 in the write window left a `.P.json.*.tmp`; a later write removes such
    files once they are older than any live write, and leaves other files alone."""
    path = tmp_path / "p.json"
    digest = tiny_run.profile.extra["samples_sha256"][:16]
    old = [tmp_path / ".p.json.0badf00d.tmp", tmp_path / f".p.{digest}.samples.json.1a2b.tmp",
           tmp_path / ".p.png.c0ffee00.tmp"]
    fresh = tmp_path / ".p.json.12345678.tmp"  # a write still going on
    unrelated = [tmp_path / ".q.json.0badf00d.tmp", tmp_path / "q.samples.json"]
    long_ago = time.time() - 3600
    for f in (*old, fresh, *unrelated):
        f.write_text("x")
        if f is not fresh:
            os.utime(f, (long_ago, long_ago))
    tiny_run.write(path)
    assert not any(f.exists() for f in old)
    assert fresh.exists() and all(f.exists() for f in unrelated)


def test_cli_interrupted_while_writing(tmp_path, run_cli, monkeypatch):
    """Defect 6: Ctrl-C while writing exited 130 without a word."""
    monkeypatch.setitem(PLANS, ("cpu", True), TINY_PLAN)

    def interrupted(self, path):
        raise KeyboardInterrupt

    monkeypatch.setattr(CalibrationRun, "write", interrupted)
    code, out, err = run_cli("calibrate", "--device", "cpu", "--model", "tiny", "--quick",
                             "--out", str(tmp_path / "p.json"))
    assert code == 130
    assert err.splitlines()[-1].startswith("interrupted while writing: ")
