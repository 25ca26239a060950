"""`kvbench report` builds results/README.md from baselines and profiles found on disk."""

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from kvbench.cli import app
from kvbench.hardware import fingerprint_slug, get_hardware
from kvbench.models import get_model
from kvbench.profile import analytic_profile, save
from kvbench.report import build_report

BENCH = {
    "datetime": "2026-11-21T12:00:00", "commit_info": {"id": "abcdef123456"},
    "machine_info": {"cpu": {"brand_raw": "Test CPU"}},
    "benchmarks": [
        {"name": "test_kv_copy[swap_out-torch-256]", "group": "swap_out 256 tokens",
         "param": "swap_out-torch-256", "stats": {"median": 0.002},
         "extra_info": {"direction": "swap_out", "num_tokens": 256, "block_size": 16,
                        "impl": "torch", "bandwidth_gbps": 12.5, "fraction_of_ceiling": 0.625}},
        {"name": "test_vectorized[1M]", "group": "selector-1M", "param": "1M",
         "stats": {"median": 0.097}, "extra_info": {}},
    ],
}

# Without it `kvbench report` would rewrite the repository's own README.md (the default).
NO_README = ["--readme", "/nonexistent/README.md"]


def test_report_has_a_section_per_machine(tmp_path):
    bench_dir = tmp_path / "benchmarks" / "cpu-test-2c" / "Linux-CPython-3.11-64bit"
    bench_dir.mkdir(parents=True)
    (bench_dir / "0001_old.json").write_text(json.dumps({**BENCH, "benchmarks": []}))
    (bench_dir / "0002_new.json").write_text(json.dumps(BENCH))
    prof = analytic_profile(get_model("llama-3-8b"), get_hardware("h100-sxm"))
    save(prof, tmp_path / "profiles" / "h100-llama.json")
    (tmp_path / "profiles" / "h100-llama.samples.json").write_text("{}")  # skipped, not a profile

    res = CliRunner().invoke(app, ["report", "--results", str(tmp_path), *NO_README])
    assert res.exit_code == 0, res.output
    text = (tmp_path / "README.md").read_text()
    assert "## cpu-test-2c" in text and f"## {fingerprint_slug(prof.environment)}" in text
    assert "0002_new.json" in text and "abcdef1" in text  # the newest run, with its commit
    assert "| swap_out | 256 | 16 | torch | 2 | 12.50 | 62% |" in text
    assert "| selector-1M | test_vectorized[1M] | 97 |" in text
    assert "[llama-3-8b](profiles/h100-llama.json)" in text


def test_report_on_the_committed_results(tmp_path):
    results = Path(__file__).resolve().parents[1] / "results"
    shutil.copytree(results, tmp_path / "results")
    res = CliRunner().invoke(app, ["report", "--results", str(tmp_path / "results"),
                                   *NO_README])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "results" / "README.md").read_text() == (results / "README.md").read_text()


def test_report_copy_rows_against_the_round_trip_ceiling(tmp_path):
    prof = analytic_profile(get_model("tiny"), get_hardware("l4"))
    extra = {"ceiling_gbps": {"out": 20.0, "in": 30.0},  # round trip: 2/(1/20 + 1/30) = 24 GB/s
             "swap_impls": {"torch": {"num_tokens": [16, 256, 4096],
                                      "round_trip_bandwidth_gbps": [1.5, 12.0, 9.0]}}}
    measured = prof.model_copy(update={"source": "measured", "extra": extra,
                                       "environment": {"device": "cpu", "cpu_model": "Test",
                                                       "cpu_count": 2}})
    save(measured, tmp_path / "profiles" / "tiny.json")
    text = build_report(tmp_path)
    # peak 12 GB/s is 50% of the 24 GB/s ceiling; 9 GB/s at the largest size
    assert "| tiny | torch | 16 | 16-4096 | 12.00 | 9.00 | 50% |" in text


def test_result_blocks_are_regenerated_from_committed_results(tmp_path):
    """Every `<!-- report: ... -->` block of README.md and of each docs/*.md page is what
    `kvbench report` renders now."""
    from kvbench.report import README_BLOCK, result_pages, update_readme

    root = Path(__file__).resolve().parents[1]
    pages = result_pages(root / "README.md")
    assert pages[0] == root / "README.md" and len(pages) > 1  # README, then the docs pages
    assert sum(len(README_BLOCK.findall(page.read_text())) for page in pages) >= 5
    for page in pages:
        text = page.read_text()
        copy = tmp_path / page.name
        copy.write_text(text)
        update_readme(copy, root)
        assert copy.read_text() == text, f"{page.relative_to(root)} is stale: run `kvbench report`"


def test_report_refuses_a_missing_results_folder(tmp_path, monkeypatch):
    """Run outside the project, `kvbench report` says what is missing and creates nothing."""
    from kvbench.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.argv", ["kvbench", "report"])
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 2
    assert list(tmp_path.iterdir()) == []


def test_report_error_is_one_line(tmp_path):
    res = CliRunner().invoke(app, ["report", "--results", str(tmp_path / "results"), *NO_README])
    assert res.exit_code == 2
    assert res.output.strip().splitlines() == [
        f"error: no results folder at {tmp_path / 'results'}: run it from the project root or "
        "give --results"]
    assert not (tmp_path / "results").exists()


def test_before_after_folder_renders_the_median_of_each_side(tmp_path):
    from kvbench.report import render_source

    folder = tmp_path / "before-after" / "x"
    folder.mkdir(parents=True)
    for side, walls in (("before", [2.0, 4.0, 3.0]), ("after", [3.3, 2.7])):
        for i, wall in enumerate(walls):
            run = {**BENCH, "benchmarks": [{"name": "test_a", "stats": {"median": wall}}]}
            (folder / f"{side}-{i}.json").write_text(json.dumps(run))
    lines = render_source(tmp_path, "before-after/x")
    assert lines[0].startswith("Test CPU, 3 + 2 rounds, interleaved")
    assert "| `test_a` | 3.00 | 3.00 | +0.0% |" in lines
