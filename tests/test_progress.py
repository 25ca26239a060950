"""kvbench.progress (issue 20, part 3): plain, throttled lines on stderr without a terminal (CI,
nohup, a log file), rich's live display on one; and the commands using it."""

import io
import re

import pytest
from rich.console import Console
from typer.testing import CliRunner

from kvbench import progress
from kvbench.calibration.plans import PLANS, CalibrationPlan, TokenSweep
from kvbench.cli import app
from kvbench.progress import PLAIN_INTERVAL_S, Reporter

TINY_PLAN = CalibrationPlan(swap_tokens=TokenSweep(16, 2048, 6),
                            prefill_tokens=TokenSweep(16, 512, 6), decode_batch_sizes=(1, 4, 8),
                            decode_contexts=(32, 128), per_block_max_tokens=None,
                            swap_interleave_s=0.2, prefill_interleave_s=0.2)
runner = CliRunner()


class Clock:
    """`progress.monotonic`, moved by hand."""

    def __init__(self):
        self.now_s = 100.0

    def __call__(self) -> float:
        return self.now_s


@pytest.fixture
def clock(monkeypatch) -> Clock:
    clock = Clock()
    monkeypatch.setattr(progress, "monotonic", clock)
    return clock


def log_console() -> Console:
    return Console(file=io.StringIO(), width=60)  # a file: not a terminal


def lines(console: Console) -> list[str]:
    return console.file.getvalue().splitlines()


def test_phases_print_a_line_as_they_start_then_one_per_interval(clock):
    assert PLAIN_INTERVAL_S == 5.0  # the expected lines below step 1 s per point
    console = log_console()
    with Reporter(console, "calibrate", "points") as reporter:
        assert reporter.live is None
        reporter.on_point("swap", "10 sizes up to n=8192, torch", start=True)
        for i in range(10):
            clock.now_s += 1
            reporter.on_point("swap", f"torch n={16 << i}: {i + 1}.5 GB/s round trip")
        reporter.on_point("prefill", "n=16: 1.5 ms")
        clock.now_s += 2
    assert lines(console) == [
        "calibrate: swap: 10 sizes up to n=8192, torch (0 points, 0 s)",
        "calibrate: swap: torch n=256: 5.5 GB/s round trip (5 points, 5 s)",
        "calibrate: swap: torch n=8192: 10.5 GB/s round trip (10 points, 10 s)",
        "calibrate: swap done (10 points, 10 s)",
        "calibrate: prefill: n=16: 1.5 ms (1 points, 0 s)",
        "calibrate: prefill done (1 points, 2 s)",
    ]


def test_a_counted_task_prints_done_of_total(clock):
    console = log_console()
    with Reporter(console, "replay", "requests") as reporter:
        for done in range(0, 301, 3):  # 600 updates a second would be 600 lines
            clock.now_s += 0.5
            reporter.count("vllm", done, 300)
        reporter.count("fcfs/lifo/recompute/max", 0, 300)
    printed = lines(console)
    assert printed[:2] == ["replay: vllm (0/300 requests, 0 s)",
                           "replay: vllm (30/300 requests, 5 s)"]
    assert len(printed) == 14 and printed[-4:] == [
        "replay: vllm (300/300 requests, 50 s)",
        "replay: vllm done (300/300 requests, 50 s)",
        "replay: fcfs/lifo/recompute/max (0/300 requests, 0 s)",
        "replay: fcfs/lifo/recompute/max done (0/300 requests, 0 s)"]
    console = log_console()
    with Reporter(console, "sweep", "cells") as reporter:  # one unnamed task
        reporter.count("", 1, 4)
    assert lines(console) == ["sweep (1/4 cells, 0 s)", "sweep done (1/4 cells, 0 s)"]


def test_an_error_leaves_no_done_line(clock):
    console = log_console()
    with pytest.raises(KeyboardInterrupt), Reporter(console, "calibrate", "points") as reporter:
        reporter.on_point("prefill", "n=16: 1.5 ms")
        raise KeyboardInterrupt
    assert lines(console) == ["calibrate: prefill: n=16: 1.5 ms (1 points, 0 s)"]


def test_a_terminal_gets_the_live_display():
    console = Console(file=io.StringIO(), force_terminal=True, width=100)
    with Reporter(console, "calibrate", "points") as reporter:
        assert reporter.live is not None
        reporter.on_point("swap", "torch n=16: 1.5 GB/s round trip")
    output = console.file.getvalue()
    assert "\x1b[?25l" in output  # the live display hides the cursor while it runs
    assert "calibrate: swap: torch n=16: 1.5 GB/s round trip (1 points)" in output
    assert "done (" not in output


def test_calibrate_without_a_terminal_prints_plain_progress(tmp_path, monkeypatch):
    """Under CliRunner stderr is not a terminal: each phase says it starts and ends, in plain
    lines (the live display showed nothing in a log file)."""
    monkeypatch.setitem(PLANS, ("cpu", True), TINY_PLAN)
    res = runner.invoke(app, ["calibrate", "--device", "cpu", "--model", "tiny", "--quick",
                              "--out", str(tmp_path / "p.json"), "--force"])
    assert res.exit_code == 0, res.output
    assert "\x1b" not in res.stderr
    printed = res.stderr.splitlines()
    for phase, start in (("swap", "6 sizes up to n=2048, torch"),
                         ("prefill", "6 sizes up to n=512"), ("decode", "6 points up to B=8")):
        assert any(line.startswith(f"calibrate: {phase}: {start}") for line in printed), printed
        assert any(re.fullmatch(rf"calibrate: {phase} done \(\d+ points, \d+ s\)", line)
                   for line in printed), printed


def test_simulate_without_a_terminal_prints_its_count():
    res = runner.invoke(app, ["simulate", "--synthetic", "requests=40,rate=30",
                              "--num-gpu-blocks", "300"])
    assert res.exit_code == 0, res.output
    assert re.search(r"^simulate: fcfs/lifo/recompute/oracle done \(40/40 requests, \d+ s\)$",
                     res.stderr, re.MULTILINE), res.stderr
